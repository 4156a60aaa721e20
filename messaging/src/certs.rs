//! `meshchat-node certs`: a cluster's PKI for operators who have none. Two CAs, as the node
//! expects (docs/SECURITY.md): a client-facing CA (`ca.pem`, what clients trust) signing each
//! node's client-facing certificate for its advertised names, and a mesh CA (`mesh-ca.pem`)
//! signing each node's mesh certificate, whose one name is `node-<id>` (mutual TLS between
//! nodes). CA keys are created once and reused, so running it again for a new node, or with
//! `renew` to rotate the leaves, keeps every existing certificate valid. Keys are written
//! owner-only, atomically ([`crate::secret`]), certificates atomically too; leaves are valid
//! for `days` from now (not capped by the CA's own end, 10 years after it was made: renew the
//! CA before then).
//!
//! Files in the output directory: `ca.pem`, `ca.key`, `mesh-ca.pem`, `mesh-ca.key`, and per
//! node `node-<id>.pem`, `node-<id>.key` (`[tls] cert/key`) and `mesh-node-<id>.pem`,
//! `mesh-node-<id>.key` (`[cluster] cert/key`, with `[cluster] ca = mesh-ca.pem`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};

use crate::tls::ca_params;
use tracing::info;

use meshchat_backplane::mesh::mesh_name;
use meshchat_backplane::tls::TlsError;
use meshchat_idgen::NodeId;

/// CAs are valid this long (rotate them by issuing a new one and trusting both meanwhile).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// One node's certificates to make: its id and the names clients dial it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCerts {
    /// Node id (its mesh certificate is for `node-<id>`).
    pub id: u32,
    /// DNS names or IP addresses of its client-facing certificate.
    pub names: Vec<String>,
}

impl std::str::FromStr for NodeCerts {
    type Err = String;

    /// `ID=NAME[,NAME...]`, for example `1=chat1.example.net,10.0.0.1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, names) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected ID=NAME[,NAME...]"))?;
        let id = id
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {id:?} is not a node id"))?;
        let names: Vec<String> = names
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Err(format!("{s:?}: node {id} needs at least one name"));
        }
        for n in &names {
            // What clients put in SNI / check: a DNS name or an IP, no port, no brackets.
            if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                return Err(format!(
                    "{s:?}: {n:?} is not a DNS name or an IP address (no port, no brackets)"
                ));
            }
        }
        Ok(Self { id, names })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |e| TlsError::Io {
        path: path.to_owned(),
        source: e,
    }
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// Writes a certificate atomically (temp file, then rename over the old one).
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

fn validity(params: &mut CertificateParams, valid: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: a peer whose clock is a little behind accepts it at once.
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + valid;
}

/// The CA `file`.pem / `file`.key in `out`: created on first use, reused after.
fn ca(out: &Path, file: &str, name: &str) -> Result<(Issuer<'static, KeyPair>, bool), TlsError> {
    let key_path = out.join(format!("{file}.key"));
    let cert_path = out.join(format!("{file}.pem"));
    if cert_path.exists() && !key_path.exists() {
        // Checked before any key is written: a new key under the old certificate would sign
        // leaves that chain to nothing.
        return Err(pem_err(
            &cert_path,
            "exists without its key: move it away, or put its key beside it",
        ));
    }
    let fresh = KeyPair::generate()?.serialize_pem().into_bytes();
    let created = !key_path.exists();
    let key_pem =
        crate::secret::read_or_create(&key_path, || fresh).map_err(|e| pem_err(&key_path, e))?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| pem_err(&key_path, "not a PEM key"))?;
    let key = KeyPair::from_pem(&key_pem)?;
    if !cert_path.exists() {
        let mut params = ca_params(name)?;
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        write_public(&cert_path, cert.pem().as_bytes())?;
    }
    // The issuer is the CA's name and key; the key identifier is derived from the key.
    Ok((Issuer::new(ca_params(name)?, key), created))
}

/// Writes a leaf certificate and its key as `file`.pem / `file`.key, unless both exist and
/// `renew` is false. Returns whether it wrote them.
fn leaf(
    out: &Path,
    file: &str,
    issuer: &Issuer<'static, KeyPair>,
    names: &[String],
    usages: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
    renew: bool,
) -> Result<bool, TlsError> {
    let cert_path = out.join(format!("{file}.pem"));
    let key_path = out.join(format!("{file}.key"));
    if !renew && cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = usages;
    validity(
        &mut params,
        Duration::from_secs(u64::from(days) * 24 * 3600),
    );
    let cert = params.signed_by(&key, issuer)?;
    // The key first, so a certificate never names a key that is not on disk.
    crate::secret::write(&key_path, key.serialize_pem().as_bytes())
        .map_err(|e| pem_err(&key_path, e))?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(true)
}

/// Makes (or completes) a cluster's PKI in `out` for `nodes`; with `renew`, issues every
/// node's leaves again (same CAs). Returns the files written.
pub fn make(
    out: &Path,
    nodes: &[NodeCerts],
    days: u32,
    renew: bool,
) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut written = Vec::new();
    let (client_ca, new) = ca(out, "ca", "meshchat cluster CA")?;
    if new {
        written.extend([out.join("ca.pem"), out.join("ca.key")]);
    }
    let (mesh_ca, new) = ca(out, "mesh-ca", "meshchat mesh CA")?;
    if new {
        written.extend([out.join("mesh-ca.pem"), out.join("mesh-ca.key")]);
    }
    for n in nodes {
        let client = format!("node-{}", n.id);
        if leaf(
            out,
            &client,
            &client_ca,
            &n.names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            days,
            renew,
        )? {
            written.extend([
                out.join(format!("{client}.pem")),
                out.join(format!("{client}.key")),
            ]);
        }
        let mesh = format!("mesh-node-{}", n.id);
        if leaf(
            out,
            &mesh,
            &mesh_ca,
            &[mesh_name(NodeId(n.id))],
            // A node both dials and accepts in the mesh.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            days,
            renew,
        )? {
            written.extend([
                out.join(format!("{mesh}.pem")),
                out.join(format!("{mesh}.key")),
            ]);
        }
    }
    info!(dir = %out.display(), files = written.len(), "certificates written");
    Ok(written)
}
