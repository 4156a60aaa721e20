//! The `meshchat` CLI end to end, as a newcomer uses it: a real node (in this process, real
//! QUIC and store), the real binary run as a child process with profile directories.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const CLI: &str = env!("CARGO_BIN_EXE_meshchat");

struct Env {
    _node: meshchat_messaging::RunningNode,
    addr: String,
    ca: std::path::PathBuf,
    dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = meshchat_messaging::NodeConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("node"),
        ..Default::default()
    };
    config.limits.send_rate_per_sec = 1000;
    let node = meshchat_messaging::start(config).await.expect("node");
    Env {
        addr: node.addr.to_string(),
        ca: dir.path().join("node/ca.pem"),
        _node: node,
        dir,
    }
}

impl Env {
    fn home(&self, user: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("home-{user}"))
    }

    /// Runs the CLI for `user` with `--json`, hidden (`--hide-presence`: a one-shot command's
    /// connection must not push its user's presence into other tests' listeners); returns its
    /// output.
    fn run(&self, user: &str, args: &[&str]) -> Output {
        Command::new(CLI)
            .arg("--server")
            .arg(&self.addr)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--home")
            .arg(self.home(user))
            .arg("--json")
            .arg("--hide-presence")
            .args(args)
            .env("MESHCHAT_PASSWORD", "secret-password")
            .stdin(Stdio::null())
            .output()
            .expect("run meshchat")
    }

    fn ok(&self, user: &str, args: &[&str]) -> Vec<Value> {
        let out = self.run(user, args);
        assert!(
            out.status.success(),
            "meshchat {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines(&out.stdout)
    }
}

fn lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn spawn_listen(env: &Env, user: &str, count: u32) -> std::process::Child {
    spawn_listen_with(env, user, &[], count, 20)
}

/// `listen --json` with `flags` (global ones, such as `--hide-presence`), ending after
/// `count` events or `timeout_s` seconds.
fn spawn_listen_with(
    env: &Env,
    user: &str,
    flags: &[&str],
    count: u32,
    timeout_s: u32,
) -> std::process::Child {
    let (count, timeout) = (count.to_string(), timeout_s.to_string());
    let mut args = vec!["--json"];
    args.extend_from_slice(flags);
    args.extend(["listen", "--count", &count, "--timeout", &timeout]);
    spawn_cli(env, user, &args)
}

/// Runs the CLI for `user` with `args` (the profile gives server and CA) in the background.
fn spawn_cli(env: &Env, user: &str, args: &[&str]) -> std::process::Child {
    Command::new(CLI)
        .arg("--home")
        .arg(env.home(user))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshchat")
}

/// Waits until `listen` says on stderr that it is authenticated and receiving.
/// Returns the stderr reader: keep it alive so the child can still write to stderr.
fn wait_listening(
    child: &mut std::process::Child,
) -> std::io::BufReader<std::process::ChildStderr> {
    use std::io::BufRead;
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read stderr");
    assert!(line.starts_with("listening on"), "listen said: {line:?}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_with_the_cli_and_see_receipts() {
    let env = env().await;
    let reg = env.ok("alice", &["register", "alice"]);
    assert_eq!(reg[0]["type"], "auth");
    assert_eq!(reg[0]["user"], "alice");
    env.ok("bob", &["register", "bob"]);
    assert!(Path::new(&env.home("bob")).join("profile.json").exists());
    // A one-shot command closes its connection before it exits: the node lets go of it at
    // once, not after its 60 s idle timeout (a drain waits for every connection).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while env._node.node.registry().live_connections() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the CLI's connections outlived the commands"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Bob listens (the profile remembers server and CA); alice sends.
    let mut bob_listen = spawn_listen(&env, "bob", 1);
    let _stderr = wait_listening(&mut bob_listen);
    let sent = env.ok("alice", &["send", "bob", "hello bob"]);
    assert_eq!(sent[0]["type"], "processed");
    assert_eq!(sent[0]["chat"], "bob");
    let id = sent[0]["message_id"].as_u64().expect("id");
    let out = bob_listen
        .wait_with_output()
        .expect("listen exits after 1 event");
    assert!(out.status.success());
    let got = lines(&out.stdout);
    assert_eq!(got[0]["type"], "message");
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["chat"], "alice");
    assert_eq!(got[0]["text"], "hello bob");
    assert_eq!(got[0]["message_id"].as_u64(), Some(id));

    // Listening marked it delivered; bob marks it seen; alice's chat list shows both.
    env.ok("bob", &["seen", "alice", &id.to_string()]);
    let chats = env.ok("alice", &["chats"]);
    assert_eq!(chats[0]["chat"], "bob");
    assert_eq!(chats[0]["peer_seen"].as_u64(), Some(id));
    assert_eq!(chats[0]["peer_delivered"].as_u64(), Some(id));
    let bob_chats = env.ok("bob", &["chats"]);
    assert_eq!(bob_chats[0]["unread"].as_u64(), Some(0));

    // Routing reports: one node, homes everyone.
    let home = env.ok("alice", &["whereis", "bob"]);
    assert_eq!(home[0]["user"], "bob");
    assert_eq!(home[0]["node"].as_u64(), Some(1));
    assert_eq!(home[0]["addr"], env.addr.as_str());
    let cluster = env.ok("alice", &["cluster"]);
    assert_eq!(cluster[0]["members"][0]["state"], "self");

    // Reply, react, history.
    let reply = env.ok(
        "bob",
        &["send", "alice", "hi alice", "--reply-to", &id.to_string()],
    );
    let reply_id = reply[0]["message_id"].as_u64().expect("id");
    env.ok("alice", &["react", "bob", &reply_id.to_string(), "🎉"]);
    let hist = env.ok("alice", &["history", "bob", "--limit", "10"]);
    let msgs: Vec<&Value> = hist.iter().filter(|v| v["type"] == "message").collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["text"], "hi alice", "newest first");
    assert_eq!(msgs[0]["reply_to"].as_u64(), Some(id));
    assert_eq!(msgs[0]["reactions"][0]["emoji"], "🎉");
    env.ok("alice", &["unreact", "bob", &reply_id.to_string()]);
    let after = env.ok("alice", &["history", "bob", "--after", &id.to_string()]);
    assert_eq!(after[0]["text"], "hi alice");
    assert_eq!(after[0]["reactions"].as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_from_the_cli() {
    let env = env().await;
    for u in ["ann", "ben", "cid"] {
        env.ok(u, &["register", u]);
    }
    let made = env.ok("ann", &["channel", "create", "ops"]);
    assert_eq!(made[0]["name"], "ops");
    env.ok("ben", &["channel", "join", "#ops"]);
    let mut ben_listen = spawn_listen(&env, "ben", 1);
    let _stderr = wait_listening(&mut ben_listen);
    env.ok("ann", &["send", "#ops", "deploy at noon"]);
    let got = lines(&ben_listen.wait_with_output().expect("listen").stdout);
    assert_eq!(got[0]["chat"], "#ops");
    assert_eq!(got[0]["text"], "deploy at noon");
    let members = env.ok("ben", &["channel", "members", "ops"]);
    let mut names: Vec<&str> = members.iter().filter_map(|m| m["user"].as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["ann", "ben"]);
    assert_eq!(env.ok("ben", &["channel", "list"]).len(), 1);
    env.ok("ben", &["channel", "send", "ops", "ack"]);
    env.ok("ben", &["channel", "leave", "ops"]);
    assert!(env.ok("ben", &["channel", "list"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_go_to_stderr_with_their_code() {
    let env = env().await;
    env.ok("ann", &["register", "ann"]);
    env.ok("cid", &["register", "cid"]);
    // Unknown user.
    let out = env.run("ann", &["send", "nobody", "hi"]);
    assert_eq!(out.status.code(), Some(2));
    let err: Value = serde_json::from_slice(&out.stderr).expect("json error");
    assert_eq!(err["code"], "UNKNOWN_USER");
    assert!(out.stdout.is_empty());
    // Taken name.
    let out = env.run("x", &["register", "ann"]);
    assert_eq!(out.status.code(), Some(2));
    let err: Value = serde_json::from_slice(&out.stderr).expect("json error");
    assert_eq!(err["code"], "USER_EXISTS");
    // Not my channel.
    env.ok("ann", &["channel", "create", "secret"]);
    let out = env.run("cid", &["channel", "members", "secret"]);
    assert_ne!(out.status.code(), Some(0));
    // Not logged in is a local error (exit 1).
    let out = env.run("nobody-home", &["chats"]);
    assert_eq!(out.status.code(), Some(1));
    // Wrong password.
    let out = Command::new(CLI)
        .args(["--server", &env.addr, "--ca"])
        .arg(&env.ca)
        .arg("--home")
        .arg(env.home("ann2"))
        .args(["login", "ann", "--password", "wrong-password"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BAD_CREDENTIALS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_show_presence_and_listen_prints_its_changes() {
    let env = env().await;
    // One-shot commands run hidden (`Env::run`): alice never shows online, so bob's
    // one-event listener ends on the message it waits for.
    env.ok("alice", &["register", "alice"]);
    let bob_id = env.ok("bob", &["register", "bob"])[0]["user_id"]
        .as_u64()
        .map(meshchat_idgen::UserId)
        .expect("bob's id");
    env.ok("alice", &["send", "bob", "hi"]);
    // Bob online while his listener runs (no receipts: alice's listener below counts two
    // events); alice's chat list shows it.
    let mut bob = spawn_cli(
        &env,
        "bob",
        &[
            "--json",
            "listen",
            "--count",
            "1",
            "--no-receipts",
            "--timeout",
            "30",
        ],
    );
    let _bob_stderr = wait_listening(&mut bob);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let chats = env.ok("alice", &["chats"]);
        assert_eq!(chats[0]["chat"], "bob");
        if chats[0]["presence"]["online"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob never shown online: {chats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Alice listens; a message ends bob's listener; after the grace alice is told, with
    // last seen (her listener's other event: her own message, from her other device).
    let mut alice = spawn_listen_with(&env, "alice", &["--hide-presence"], 2, 30);
    let _alice_stderr = wait_listening(&mut alice);
    env.ok("alice", &["send", "bob", "bye"]);
    let bob_out = bob.wait_with_output().expect("bob's listen ends");
    assert!(bob_out.status.success());
    assert_eq!(lines(&bob_out.stdout)[0]["text"], "bye");
    let alice_out = alice.wait_with_output().expect("listen");
    assert!(alice_out.status.success());
    let got = lines(&alice_out.stdout);
    assert_eq!(got.len(), 2, "alice's listen: {got:?}");
    assert_eq!(got[0]["type"], "message");
    assert_eq!(got[0]["text"], "bye");
    assert_eq!(got[1]["type"], "presence");
    assert_eq!(got[1]["user"], "bob");
    assert_eq!(got[1]["online"], false);
    assert!(got[1]["last_seen_unix_ms"].as_u64().is_some_and(|t| t > 0));
    let chats = env.ok("alice", &["chats"]);
    assert_eq!(chats[0]["presence"]["online"], false);
    // With --hide-presence bob's connection is his, and does not show him online.
    let mut bob_hidden = spawn_cli(
        &env,
        "bob",
        &["--json", "--hide-presence", "listen", "--timeout", "2"],
    );
    let _hidden_stderr = wait_listening(&mut bob_hidden);
    let registry = env._node.node.registry();
    assert_eq!(registry.connections_of(bob_id), 1);
    assert_eq!(registry.visible_connections(bob_id), 0);
    assert!(
        bob_hidden
            .wait_with_output()
            .expect("listen")
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_from_the_cli_shows_in_listen() {
    let env = env().await;
    // Everyone hidden (`Env::run`, and the listener's flag): no presence event takes one of
    // the listener's two.
    env.ok("alice", &["register", "alice"]);
    let bob_id = env.ok("bob", &["register", "bob"])[0]["user_id"]
        .as_u64()
        .expect("bob's id");
    let mut alice = spawn_listen_with(&env, "alice", &["--hide-presence"], 2, 20);
    let _alice_stderr = wait_listening(&mut alice);
    let done = env.ok("bob", &["typing", "alice"]);
    assert_eq!(done[0]["type"], "done");
    assert_eq!(done[0]["action"], "typing");
    assert_eq!(done[0]["chat"], "alice");
    // Well within the indicator's 6 s: the stop is pushed and printed, not an expiry.
    let stop = env.ok("bob", &["typing", "alice", "--stop"]);
    assert_eq!(stop[0]["action"], "typing stop");
    // The listener ends on its second event, or at its timeout.
    let out = alice.wait_with_output().expect("listen");
    assert!(out.status.success());
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 2, "alice's listen: {got:?}");
    for (event, typing) in got.iter().zip([true, false]) {
        assert_eq!(event["type"], "typing", "{got:?}");
        assert_eq!(event["chat"], "bob");
        assert_eq!(event["user"], "bob");
        assert_eq!(event["user_id"].as_u64(), Some(bob_id));
        assert_eq!(event["typing"], typing, "{got:?}");
    }
}
