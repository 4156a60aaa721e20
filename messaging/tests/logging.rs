//! `meshchat-node run` logs as `[log]` says: JSON lines (each one parses, with the message
//! and the node's span fields), and a SIGHUP re-reads `[log] level` from the config file and
//! applies it without a restart. A real node process; every wait is for a line, with a
//! deadline.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The next stderr line of the node that satisfies `want`, within 20 s.
fn line_where(lines: &mpsc::Receiver<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if want(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("no such log line within 20 s: {e}"),
        }
    }
}

/// A `meshchat-node run` process on `file`, killed if the test fails.
struct NodeProcess {
    child: std::process::Child,
    pid: nix::unistd::Pid,
    lines: mpsc::Receiver<String>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Reaped children are not signalled again (their pid may be reused).
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl NodeProcess {
    fn start(file: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
            .args(["run", "--config"])
            .arg(file)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("meshchat-node starts");
        let stderr = child.stderr.take().expect("stderr");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, pid, lines }
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid, s).expect("signal");
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("node exits")
    }
}

#[test]
fn json_logs_and_a_log_level_reloaded_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    let config = |level: &str| {
        format!(
            "node_id = 4\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"{level}\"\n",
            dir.path().join("data").display().to_string()
        )
    };
    std::fs::write(&file, config("info")).expect("config written");
    let node = NodeProcess::start(&file);
    let lines = &node.lines;

    let listening = line_where(lines, |l| l.contains("listening"));
    let v: serde_json::Value = serde_json::from_str(&listening).expect("a JSON log line");
    assert_eq!(v["fields"]["message"], "listening", "{listening}");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["node"], 4, "{listening}");

    // A bad level is refused and the running one stays; a good one is applied.
    std::fs::write(&file, config("info,[")).expect("config written");
    node.signal(nix::sys::signal::Signal::SIGHUP);
    let refused = line_where(lines, |l| l.contains("SIGHUP"));
    assert!(refused.contains("not reloaded"), "{refused}");
    std::fs::write(&file, config("debug")).expect("config written");
    node.signal(nix::sys::signal::Signal::SIGHUP);
    let applied = line_where(lines, |l| l.contains("SIGHUP"));
    let v: serde_json::Value = serde_json::from_str(&applied).expect("a JSON log line");
    assert_eq!(
        v["fields"]["message"], "SIGHUP: configuration reloaded",
        "{applied}"
    );
    assert_eq!(v["fields"]["applied"], r#"["log.level"]"#, "{applied}");

    let status = node.stop();
    assert!(status.success(), "{status:?}");
}

/// The parts of an OTLP `ExportTraceServiceRequest` the test reads (opentelemetry-proto's
/// field numbers; everything else is skipped).
#[allow(unreachable_pub)]
mod otlp {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Export {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, tag = "1")]
        pub string_value: String,
        #[prost(int64, tag = "3")]
        pub int_value: i64,
    }

    /// `key`'s value as text (string or integer attributes).
    pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
        let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
        Some(if v.string_value.is_empty() {
            v.int_value.to_string()
        } else {
            v.string_value.clone()
        })
    }
}

#[test]
fn spans_are_exported_over_otlp_and_flushed_at_shutdown() {
    use std::sync::{Arc, Mutex};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The collector: OTLP/HTTP with protobuf bodies, as an OpenTelemetry Collector takes it.
    type Received = Vec<(Vec<otlp::KeyValue>, otlp::Span)>;
    let received: Arc<Mutex<Received>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let export = <otlp::Export as prost::Message>::decode(body)
                    .expect("an OTLP ExportTraceServiceRequest");
                let mut sink = sink.lock().expect("lock");
                for rs in export.resource_spans {
                    let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            sink.push((resource.clone(), span));
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("collector port");
    let collector = listener.local_addr().expect("addr");
    rt.spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        format!(
            "node_id = 6\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[log]\nformat = \"json\"\n\
             otlp_endpoint = \"http://{collector}/v1/traces\"\notlp_sample_ratio = 1.0\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("config written");
    let node = NodeProcess::start(&file);
    let listening = line_where(&node.lines, |l| l.contains("\"listening\""));
    let v: serde_json::Value = serde_json::from_str(&listening).expect("a JSON log line");
    let addr = v["fields"]["addr"].as_str().expect("addr").to_owned();
    rt.block_on(async {
        let ca = meshchat_client::load_ca(&dir.path().join("data").join("ca.pem")).expect("CA");
        let (c, _events) =
            meshchat_client::Client::connect(&addr, meshchat_client::ConnectOptions::new(ca))
                .await
                .expect("connect");
        let me = c.register("otto", "password-123").await.expect("register");
        let chat = meshchat_idgen::ChatId::direct(me.user, me.user);
        c.send(chat, "traced", None).await.expect("send");
    });
    // The batch exporter's queue is flushed at shutdown: no wait for its interval.
    let status = node.stop();
    assert!(status.success(), "{status:?}");

    let spans = received.lock().expect("lock").clone();
    let send = spans
        .iter()
        .find(|(_, s)| {
            s.name == "request" && otlp::attr(&s.attributes, "type").as_deref() == Some("send")
        })
        .unwrap_or_else(|| panic!("no send request span among {} spans", spans.len()));
    let (resource, send) = send;
    assert_eq!(
        otlp::attr(resource, "service.name").as_deref(),
        Some("meshchat-node")
    );
    assert_eq!(
        otlp::attr(resource, "service.instance.id").as_deref(),
        Some("6")
    );
    assert!(
        otlp::attr(&send.attributes, "id").is_some_and(|id| id != "0"),
        "{send:?}"
    );
    // Its parent is its connection's span, the root of the connection's trace.
    let conn = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.span_id == send.parent_span_id)
        .expect("the request's parent span");
    assert_eq!(conn.name, "conn");
    assert_eq!(conn.trace_id, send.trace_id);
    assert!(
        conn.parent_span_id.is_empty(),
        "a connection's span is a root: {conn:?}"
    );
    assert_eq!(otlp::attr(&conn.attributes, "node").as_deref(), Some("6"));
}
