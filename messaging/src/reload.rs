//! Reloading a running node's configuration (SIGHUP, `meshchat-node run`): what may change
//! without a restart, and applying it all or nothing.
//!
//! Reloadable, applied at once:
//! - `[tls] cert` and `key`: the client-facing certificate. Handshakes from now on get the
//!   files' current contents; connected clients keep their session.
//! - `[cluster] cert`, `key` and `ca`: the mesh certificate and the CAs peers must chain to.
//!   Links made from now on (dialled or accepted) use them; links up now stay up.
//! - `[limits]`, except `max_frame_bytes` (the frame size connected clients were told in
//!   `HelloOk` and read with). `max_body_bytes` and `max_page_size` are in `HelloOk` too, but
//!   a lower one only turns a request into a clear error (`MESSAGE_TOO_LARGE`) or a shorter
//!   page, and the reloaded limits must still hold with the running frame size.
//!   Per-request limits (body size, page sizes, rates, bytes in flight) apply to the next
//!   request; per-connection ones (outbound queue, requests in flight per connection,
//!   timeouts, connections per user) to connections made from now on. New rates start with
//!   full buckets. A smaller handshake or in-flight budget takes effect as what is held now is
//!   released.
//! - `[log] level`, when the caller passes its log handle.
//! - `[auth] secret_file` and `previous_secret_files`: the token keys. Tokens are signed with
//!   the new current key from the next one minted, and verified with the new list from the
//!   next request (a key rotation in three rounds of reloads: `crate::auth`).
//!
//! Everything else (addresses, ids, storage, Redis, the rest of `[auth]`, `[transport]`,
//! `[runtime]`, the rest of `[cluster]`) is read at start only: a reload reports those keys
//! as needing a restart and leaves them as they are. The certificate and token secret files
//! are re-read on every reload, so renewing them in place (`meshchat-node certs --renew`) and
//! sending SIGHUP rotates them.
//!
//! A reload builds everything first (new configuration validated, certificates and keys
//! loaded, TLS configs built) and applies only if all of it succeeded: a bad file or an
//! unreadable key leaves the node exactly as it was.

use meshchat_backplane::mesh::Mesh;
use serde_json::Value;

use crate::auth::{Auth, AuthSetupError, Keys};
use crate::config::{ConfigError, NodeConfig};
use crate::logging::{LogError, LogHandle};
use crate::server::RunningNode;
use crate::tls::{self, TlsError};

/// Keys a reload applies (a key, or a table all of whose keys are reloadable).
const RELOADABLE: &[&str] = &[
    "tls.cert",
    "tls.key",
    "cluster.cert",
    "cluster.key",
    "cluster.ca",
    "limits",
    "log.level",
    "auth.secret_file",
    "auth.previous_secret_files",
];

/// Keys inside a reloadable table that are not.
const NOT_RELOADABLE: &[&str] = &["limits.max_frame_bytes"];

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed keys that were applied (`limits.send_rate_per_sec`, ...). The certificate
    /// files are re-read whether or not their paths changed.
    pub applied: Vec<String>,
    /// Changed keys that need a restart and were left as they are.
    pub needs_restart: Vec<String>,
}

/// Why a reload applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate, key or CA file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The new log level is invalid.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The mesh refused its new certificates.
    #[error("mesh certificates: {0}")]
    Mesh(String),
    /// A token secret file could not be used.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
}

/// The dotted keys whose values differ between `a` and `b` (tables compared key by key).
fn changed_keys(a: &Value, b: &Value, prefix: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                changed_keys(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &key,
                    out,
                );
            }
        }
        _ if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

fn reloadable(key: &str) -> bool {
    let under = |k: &&str| key == *k || key.starts_with(&format!("{k}."));
    RELOADABLE.iter().any(under) && !NOT_RELOADABLE.iter().any(under)
}

/// Sorts the keys changed from `old` to `new` into those a reload applies and those that need
/// a restart.
pub fn classify(old: &NodeConfig, new: &NodeConfig) -> Reloaded {
    let (a, b) = (
        serde_json::to_value(old).unwrap_or(Value::Null),
        serde_json::to_value(new).unwrap_or(Value::Null),
    );
    let mut changed = Vec::new();
    changed_keys(&a, &b, "", &mut changed);
    let (applied, needs_restart) = changed.into_iter().partition(|k| reloadable(k));
    Reloaded {
        applied,
        needs_restart,
    }
}

/// The configuration the node runs with after reloading `new` over `running` (what `start`
/// filled in, such as the bound advertise address, is kept): `running` with the reloadable
/// keys of `new`. Also what the node was given, as far as it applied it.
fn merged(running: &NodeConfig, new: &NodeConfig) -> NodeConfig {
    let mut c = running.clone();
    c.tls = new.tls.clone();
    c.cluster.cert = new.cluster.cert.clone();
    c.cluster.key = new.cluster.key.clone();
    c.cluster.ca = new.cluster.ca.clone();
    c.limits = crate::config::LimitsConfig {
        max_frame_bytes: running.limits.max_frame_bytes,
        ..new.limits.clone()
    };
    c.log.level = new.log.level.clone();
    c.auth.secret_file = new.auth.secret_file.clone();
    c.auth.previous_secret_files = new.auth.previous_secret_files.clone();
    c
}

impl RunningNode {
    /// Applies what can change without a restart from `new` (the configuration file read
    /// again, with the same command-line overrides as at start): certificates, limits and,
    /// with `log`, the log level. All or nothing; see the module docs.
    pub fn reload(
        &self,
        new: &NodeConfig,
        log: Option<&LogHandle>,
    ) -> Result<Reloaded, ReloadError> {
        new.validate()?;
        let mut given = self.given.lock();
        let report = classify(&given, new);
        let effective = merged(&self.node.config, new);
        // The new limits must hold with what stays (the running frame size: a body limit
        // that no longer fits in a frame, a request budget below one frame).
        effective.validate()?;
        // Build everything before changing anything. The token secrets are read, never
        // created: a missing file is an error, not a new key that no other node holds.
        let secret = Auth::load_secret(&effective.secret_file())?;
        let previous = Auth::load_previous(&effective.auth.previous_secret_files)?;
        let keys = Keys::new(&secret, &previous);
        let identity = tls::node_identity(&effective)?;
        let client_expiry = tls::not_after_unix(&identity.chain[0]);
        let server = tls::server_config(
            identity,
            meshchat_proto::CLIENT_ALPN,
            &effective,
            &self.token_key,
            &self.tickets,
        )?;
        let mut mesh_expiry = None;
        let mesh = match &self.mesh {
            Some(mesh) => {
                let (identity, roots) = tls::mesh_identity(&effective)?;
                mesh_expiry = tls::not_after_unix(&identity.chain[0]);
                let prepared = Mesh::prepare_tls(&identity, &roots)
                    .map_err(|e| ReloadError::Mesh(e.to_string()))?;
                Some((mesh, prepared))
            }
            None => None,
        };
        // Only a changed level replaces the filter: a reload for a certificate rotation must
        // not drop the RUST_LOG filter an operator started the node with.
        if let Some(log) = log
            && new.log.level != given.log.level
        {
            log.set_level(&effective.log.level)?;
        }
        // From here on nothing fails.
        if let Some((mesh, prepared)) = mesh {
            mesh.set_tls(prepared);
        }
        self.endpoint.set_server_config(server);
        let l = &effective.limits;
        self.gate.set_limits(
            l.max_concurrent_handshakes,
            l.retry_above_handshakes,
            l.max_handshakes_per_source,
        );
        self.node.set_limits(effective.limits.clone());
        self.node.set_cert_expiry(client_expiry, mesh_expiry);
        if keys.kid() != self.node.auth.kid() {
            tracing::info!(
                kid = keys.kid(),
                "token keys reloaded: signing with a new key"
            );
        }
        self.node.auth.set_keys(keys);
        // What runs now: the keys applied, not the ones that wait for a restart (a later
        // reload reports those again).
        **given = merged(&given, new);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_sorted_into_applied_and_needing_a_restart() {
        let old = NodeConfig::default();
        let mut new = old.clone();
        new.limits.send_rate_per_sec += 1;
        new.limits.max_frame_bytes += 1;
        new.tls.cert = Some("/etc/meshchat/node.pem".into());
        new.cluster.ca = Some("/etc/meshchat/mesh-ca.pem".into());
        new.cluster.peer_queue += 1;
        new.listen = "127.0.0.1:7999".parse().expect("addr");
        new.log.level = "debug".into();
        new.runtime.worker_threads = 2;
        let r = classify(&old, &new);
        assert_eq!(
            r.applied,
            [
                "cluster.ca",
                "limits.send_rate_per_sec",
                "log.level",
                "tls.cert"
            ]
        );
        assert_eq!(
            r.needs_restart,
            [
                "cluster.peer_queue",
                "limits.max_frame_bytes",
                "listen",
                "runtime.worker_threads"
            ]
        );
        assert_eq!(classify(&old, &old), Reloaded::default());
    }

    #[test]
    fn the_merged_config_keeps_what_start_filled_in_and_the_frame_limit() {
        let mut running = NodeConfig {
            advertise: Some("127.0.0.1:7401".into()),
            ..NodeConfig::default()
        };
        running.limits.max_frame_bytes = 1000;
        let mut new = NodeConfig::default();
        new.limits.max_frame_bytes = 2000;
        new.limits.max_body_bytes = 77;
        new.listen = "127.0.0.1:1".parse().expect("addr");
        let m = merged(&running, &new);
        assert_eq!(m.advertise.as_deref(), Some("127.0.0.1:7401"));
        assert_eq!(m.listen, running.listen);
        assert_eq!(m.limits.max_frame_bytes, 1000);
        assert_eq!(m.limits.max_body_bytes, 77);
    }
}
