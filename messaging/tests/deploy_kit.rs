//! The operator's deploy kit (`deploy/`): the systemd units pass `systemd-analyze verify`
//! (through `deploy/systemd/verify.sh`, which stands in for the binary the units start), and
//! the sysctl file sets only keys this kernel has. `.ci/test.sh` installs systemd-analyze.

use std::path::Path;
use std::process::Command;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let out = Command::new("sh")
        .arg(deploy().join("systemd/verify.sh"))
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify.sh failed ({:?}): {stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok:") && stdout.contains("meshchat-node.service"),
        "{stdout}"
    );
}

#[test]
fn the_sysctl_file_names_only_keys_this_kernel_has() {
    let text =
        std::fs::read_to_string(deploy().join("sysctl/90-meshchat.conf")).expect("sysctl file");
    let mut keys = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key = value");
        let (key, value) = (key.trim(), value.trim());
        assert!(!value.is_empty(), "{key} has no value");
        let proc = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(proc.exists(), "{key}: no {} on this kernel", proc.display());
        keys += 1;
    }
    assert!(keys >= 5, "only {keys} settings");
}
