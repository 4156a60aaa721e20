//! Secret files: the token signing key and the development CAs' private keys.
//!
//! A secret is created once, owner-only (mode 0600), and atomically: written to a temporary
//! file in the same directory, fsynced, then hard-linked into place, which fails if the name
//! exists. A crash leaves either no secret or a whole one, never an empty or half-written
//! file; two processes creating the same secret at once agree on the one that was linked
//! first. A secret that any other user can read is refused at start: whoever reads the token
//! key can mint a token for any account, and whoever reads a CA key can sign a node.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors reading or creating a secret file.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file system refused.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Other users can read the file.
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); \
         run `chmod 600 {path}` (and check who could have copied it)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a file that group or others may read or write.
pub fn check_private(path: &Path) -> Result<(), SecretError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file after checking that only its owner can read it.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretError> {
    check_private(path)?;
    std::fs::read(path).map_err(io(path))
}

/// Writes `bytes` to a new owner-only file beside `path` (synced); returns its name.
fn write_tmp(path: &Path, bytes: &[u8]) -> Result<std::path::PathBuf, SecretError> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp{:016x}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    Ok(tmp)
}

/// Writes the secret `bytes` to `path`, owner-only, replacing what is there atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    let tmp = write_tmp(path, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })?;
    // The new name is durable once its directory is.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Reads the secret at `path`, or creates it from `make()` if there is none. Returns the
/// secret that is in the file afterwards: another process's, if it created one first.
pub fn read_or_create(path: &Path, make: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, SecretError> {
    match read(path) {
        Err(SecretError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let bytes = make();
    let tmp = write_tmp(path, &bytes)?;
    // A hard link is the no-clobber rename: it fails if the name exists.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Some(dir) = dir {
                // The new name is durable once its directory is.
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_owner_only_and_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("a/b/key");
        let a = read_or_create(&p, || b"first".to_vec()).expect("create");
        let b = read_or_create(&p, || b"second".to_vec()).expect("read");
        assert_eq!(a, b"first");
        assert_eq!(b, b"first");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(p.parent().expect("dir"))
            .expect("list")
            .collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn group_or_world_readable_secrets_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        for mode in [0o644, 0o640, 0o604, 0o620] {
            let p = dir.path().join(format!("key{mode:o}"));
            std::fs::write(&p, b"0123456789").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = read_or_create(&p, || b"new".to_vec()).expect_err("exposed");
            assert!(
                matches!(err, SecretError::Exposed { mode: m, .. } if m == mode),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
            // Nothing was replaced.
            assert_eq!(std::fs::read(&p).expect("read"), b"0123456789");
        }
    }

    #[test]
    fn racing_creators_agree_on_one_secret() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("key");
        let results: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let p = p.clone();
                    s.spawn(move || read_or_create(&p, || vec![i; 40]).expect("secret"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        let on_disk = std::fs::read(&p).expect("read");
        assert!(results.iter().all(|r| *r == on_disk));
    }
}
