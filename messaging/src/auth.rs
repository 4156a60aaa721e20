//! Accounts: argon2id password hashes and signed, expiring tokens.
//!
//! Tokens are JWTs (HS256, `jsonwebtoken`) with the user id, name, issue and expiry times,
//! and the time the user last proved their password (`ath_ms`). Any node holding the
//! cluster's token secret checks one; the node then reads the user's sign-out time (log out
//! everywhere, a password change) once per authentication, never per request.
//!
//! - **Key ids.** Every token names its key (`kid`, derived from the secret). A node signs
//!   with its current secret and verifies with it and any others listed, so the secret can be
//!   rotated without logging everyone out, in three rounds of reloads (SIGHUP) or restarts:
//!   list the new secret as a verification key everywhere; then sign with it, keeping the
//!   old one listed; then drop the old one once its tokens have expired. A reload swaps the
//!   keys at once ([`Auth::set_keys`]); requests in progress finish with the keys they began
//!   with.
//! - **Refresh with a hard end.** `Authenticate` with a valid token returns a fresh one, but
//!   never past `ath_ms + max_lifetime`: a stolen token cannot be refreshed forever, and a user
//!   proves their password again at least that often.
//!
//! Password hashing is memory-hard on purpose (~19 MiB, ~tens of ms), so it runs on the
//! blocking pool behind a semaphore: at most `max_concurrent_hashes` at once, the rest fail
//! fast with `OVERLOADED` after a short wait instead of piling up memory. Who may ask for a
//! hash at all is [`crate::admission::PasswordGate`]'s business.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meshchat_idgen::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::RequestError;

/// Issuer claim of every token.
const ISSUER: &str = "meshchat";
/// Shortest accepted token secret.
const MIN_SECRET_BYTES: usize = 32;
/// How long a registration or login waits for a free hashing slot.
pub const HASH_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Errors setting auth up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// Reading or creating the secret file failed, or others can read it.
    #[error("token secret: {0}")]
    Secret(#[from] crate::secret::SecretError),
    /// The secret is too short.
    #[error("token secret in {0} is shorter than 32 bytes")]
    TooShort(String),
}

/// Claims inside a token.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Claims {
    /// User id, as a decimal string (JWT `sub`).
    pub sub: String,
    /// User name.
    pub name: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Issuer.
    pub iss: String,
    /// When the user last proved their password (Unix milliseconds: a sign-out at a given
    /// millisecond tells logins before it from logins after); refreshes keep it.
    #[serde(default)]
    pub ath_ms: u64,
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user: UserId,
    /// Their name.
    pub name: String,
    /// When they last proved their password (Unix milliseconds): tokens minted for this
    /// identity end at `auth_time_ms + max_lifetime` at the latest.
    pub auth_time_ms: u64,
}

/// The key id of a token secret: the first 8 bytes of its SHA-256, in hex. Not secret.
pub fn key_id(secret: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Token minting and checking, and password hashing.
pub struct Auth {
    keys: arc_swap::ArcSwap<Keys>,
    validation: Validation,
    ttl: Duration,
    max_lifetime: Duration,
    hashing: Arc<Semaphore>,
    max_hashes: usize,
    /// Callers waiting for a hashing slot now.
    hash_waiting: AtomicUsize,
    /// Callers refused for want of a slot, since start.
    hash_rejections: AtomicU64,
    /// A hash of no password, checked when a login names no account so that it takes as
    /// long as a wrong password.
    nothing: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("kid", &self.keys.load().kid)
            .field("ttl", &self.ttl)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

/// Default hard end of a login's tokens, refreshes included.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall clock in Unix seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token keys: the one tokens are signed with, and every one they are verified with.
pub struct Keys {
    kid: String,
    encoding: EncodingKey,
    /// Verification keys by key id: the current secret's and the previous ones'.
    decoding: Vec<(String, DecodingKey)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("kid", &self.kid)
            .field(
                "verifies",
                &self.decoding.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keys {
    /// Signing with `secret`, verifying with it and with every one of `previous`.
    pub fn new(secret: &[u8], previous: &[Vec<u8>]) -> Self {
        let kid = key_id(secret);
        let mut keys = Self {
            decoding: vec![(kid.clone(), DecodingKey::from_secret(secret))],
            kid,
            encoding: EncodingKey::from_secret(secret),
        };
        for secret in previous {
            let kid = key_id(secret);
            if !keys.decoding.iter().any(|(k, _)| *k == kid) {
                keys.decoding.push((kid, DecodingKey::from_secret(secret)));
            }
        }
        keys
    }

    /// The key id tokens are signed with.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

impl Auth {
    /// Auth signing with `secret`, tokens valid `ttl`, at most `max_concurrent_hashes`
    /// password hashes at once; logins last at most [`DEFAULT_MAX_LIFETIME`].
    pub fn new(secret: &[u8], ttl: Duration, max_concurrent_hashes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.leeway = 0;
        Self {
            keys: arc_swap::ArcSwap::from_pointee(Keys::new(secret, &[])),
            validation,
            ttl,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            hashing: Arc::new(Semaphore::new(max_concurrent_hashes.max(1))),
            max_hashes: max_concurrent_hashes.max(1),
            hash_waiting: AtomicUsize::new(0),
            hash_rejections: AtomicU64::new(0),
            nothing: tokio::sync::OnceCell::new(),
        }
    }

    /// Also accepts tokens signed with these earlier secrets (rotation).
    pub fn with_previous_secrets(self, previous: &[Vec<u8>]) -> Self {
        let now = self.keys.load_full();
        let mut decoding = now.decoding.clone();
        for secret in previous {
            let kid = key_id(secret);
            if !decoding.iter().any(|(k, _)| *k == kid) {
                decoding.push((kid, DecodingKey::from_secret(secret)));
            }
        }
        self.keys.store(Arc::new(Keys {
            kid: now.kid.clone(),
            encoding: now.encoding.clone(),
            decoding,
        }));
        self
    }

    /// Replaces the token keys (a reload): tokens are signed with the new current key from
    /// now on, and verified with the new list.
    pub fn set_keys(&self, keys: Keys) {
        self.keys.store(Arc::new(keys));
    }

    /// Sets the hard end of a login's tokens, refreshes included.
    pub fn with_max_lifetime(mut self, max_lifetime: Duration) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// The key id tokens are signed with now.
    pub fn kid(&self) -> String {
        self.keys.load().kid.clone()
    }

    /// Reads the secret from `path`, creating a random 64-byte one (owner-only, atomically)
    /// if the file is missing. Refuses a file that other users can read.
    pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
        let bytes = crate::secret::read_or_create(path, || {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..64)
                .map(|_| b"0123456789abcdef"[rng.random_range(0..16)])
                .collect()
        })?;
        Self::checked_secret(path, &bytes)
    }

    /// Reads an existing secret (an earlier one, kept for rotation). Refuses a file that other
    /// users can read.
    pub fn load_secret(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
        let bytes = crate::secret::read(path)?;
        Self::checked_secret(path, &bytes)
    }

    /// Reads the earlier secrets named by `auth.previous_secret_files` ([`Auth::load_secret`]
    /// each).
    pub fn load_previous(paths: &[std::path::PathBuf]) -> Result<Vec<Vec<u8>>, AuthSetupError> {
        paths.iter().map(|p| Self::load_secret(p)).collect()
    }

    fn checked_secret(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, AuthSetupError> {
        let trimmed = bytes.trim_ascii().to_vec();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(AuthSetupError::TooShort(path.display().to_string()));
        }
        Ok(trimmed)
    }

    /// Mints a token for `user`, who just proved their password. Returns the token and its
    /// expiry in Unix milliseconds.
    pub fn mint(&self, user: UserId, name: &str) -> Result<(String, u64), RequestError> {
        let now = now_secs();
        self.mint_at(user, name, now)
    }

    /// Mints a token as if the password was proved and the token issued at `iat` (Unix
    /// seconds). For tests of expiry and for the load tester's synthetic users.
    pub fn mint_at(
        &self,
        user: UserId,
        name: &str,
        iat: u64,
    ) -> Result<(String, u64), RequestError> {
        self.sign(user, name, iat, iat.saturating_mul(1000))
    }

    /// A fresh token for an identity that proved itself with a token: same login time, so
    /// never valid past `auth_time_ms + max_lifetime` (`TOKEN_EXPIRED` once that has passed).
    pub fn refresh(&self, who: &Identity) -> Result<(String, u64), RequestError> {
        let end_ms = who
            .auth_time_ms
            .saturating_add(self.max_lifetime.as_millis() as u64);
        if now_ms() >= end_ms {
            return Err(RequestError::TokenExpired);
        }
        self.sign(who.user, &who.name, now_secs(), who.auth_time_ms)
    }

    fn sign(
        &self,
        user: UserId,
        name: &str,
        iat: u64,
        ath_ms: u64,
    ) -> Result<(String, u64), RequestError> {
        let exp = iat
            .saturating_add(self.ttl.as_secs())
            .min((ath_ms / 1000).saturating_add(self.max_lifetime.as_secs()));
        let claims = Claims {
            sub: user.0.to_string(),
            name: name.to_owned(),
            iat,
            exp,
            iss: ISSUER.to_owned(),
            ath_ms,
        };
        let mut header = Header::new(Algorithm::HS256);
        let keys = self.keys.load();
        header.kid = Some(keys.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &keys.encoding)
            .map_err(|e| RequestError::Internal(format!("minting token: {e}")))?;
        Ok((token, exp * 1000))
    }

    /// Checks a token's key, signature, issuer and expiry. No storage read.
    pub fn verify(&self, token: &str) -> Result<Identity, RequestError> {
        let invalid = |e: jsonwebtoken::errors::Error| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => RequestError::TokenExpired,
            // The library's messages can quote the token's own fields: clipped.
            _ => RequestError::TokenInvalid(crate::error::clip(&e.to_string()).into_owned()),
        };
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let held = self.keys.load();
        let keys: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => match held.decoding.iter().find(|(k, _)| k == kid) {
                Some((_, key)) => vec![key],
                None => {
                    return Err(RequestError::TokenInvalid(format!(
                        "signed with key {}, which this node does not hold (rotated out?)",
                        crate::error::clip(kid)
                    )));
                }
            },
            // A token without a key id predates key ids: any key this node verifies with.
            None => held.decoding.iter().map(|(_, key)| key).collect(),
        };
        let mut result = Err(RequestError::TokenInvalid("no verification key".into()));
        for key in keys {
            result = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(invalid);
            if result.is_ok() {
                break;
            }
        }
        let data = result?;
        // Valid strictly before `exp` (the JWT rule): a connection is closed at `exp`, and its
        // token must not open another one in the same second.
        if data.claims.exp <= now_secs() {
            return Err(RequestError::TokenExpired);
        }
        let user = data
            .claims
            .sub
            .parse::<u64>()
            .map_err(|_| RequestError::TokenInvalid("subject is not a user id".into()))?;
        // Tokens from before `ath_ms` count from their issue time.
        let auth_time_ms = if data.claims.ath_ms == 0 {
            data.claims.iat.saturating_mul(1000)
        } else {
            data.claims.ath_ms
        };
        Ok(Identity {
            user: UserId(user),
            name: data.claims.name,
            auth_time_ms,
        })
    }

    async fn hashing_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, RequestError> {
        self.hash_waiting.fetch_add(1, Ordering::Relaxed);
        let slot =
            tokio::time::timeout(HASH_QUEUE_WAIT, self.hashing.clone().acquire_owned()).await;
        self.hash_waiting.fetch_sub(1, Ordering::Relaxed);
        match slot {
            Ok(Ok(p)) => Ok(p),
            _ => {
                self.hash_rejections.fetch_add(1, Ordering::Relaxed);
                Err(RequestError::Overloaded(
                    "too many logins and registrations at once; retry".into(),
                ))
            }
        }
    }

    /// Password hashes running or waiting for a slot now.
    pub fn hashes_in_progress(&self) -> usize {
        let running = self
            .max_hashes
            .saturating_sub(self.hashing.available_permits());
        running + self.hash_waiting.load(Ordering::Relaxed)
    }

    /// Registrations and logins refused for want of a hashing slot, since start.
    pub fn hash_rejections(&self) -> u64 {
        self.hash_rejections.load(Ordering::Relaxed)
    }

    /// Hashes a password with argon2id (PHC string).
    pub async fn hash_password(&self, password: String) -> Result<String, RequestError> {
        let _slot = self.hashing_slot().await?;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| RequestError::Internal(format!("hashing: {e}")))
        })
        .await
        .map_err(|e| RequestError::Internal(format!("hashing task: {e}")))?
    }

    /// Spends what checking `password` against an account would (one hash), for a login that
    /// names no account. Always fails.
    pub async fn verify_against_nothing(&self, password: String) -> Result<bool, RequestError> {
        let nothing = self
            .nothing
            .get_or_try_init(|| {
                let random: [u8; 16] = rand::random();
                self.hash_password(format!("{random:x?}"))
            })
            .await?
            .clone();
        self.verify_password(password, nothing).await?;
        Ok(false)
    }

    /// Checks a password against a stored PHC hash.
    pub async fn verify_password(
        &self,
        password: String,
        hash: String,
    ) -> Result<bool, RequestError> {
        let _slot = self.hashing_slot().await?;
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| RequestError::Internal(format!("stored hash: {e}")))?;
            Ok(Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok())
        })
        .await
        .map_err(|e| RequestError::Internal(format!("hashing task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&[7u8; 32], Duration::from_secs(60), 2)
    }

    #[test]
    fn minted_tokens_verify() {
        let a = auth();
        let (t, exp_ms) = a.mint(UserId(42), "ada").expect("mint");
        assert!(exp_ms > now_secs() * 1000);
        let who = a.verify(&t).expect("verify");
        assert_eq!((who.user, who.name.as_str()), (UserId(42), "ada"));
        assert!(who.auth_time_ms.abs_diff(now_ms()) <= 1_000);
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let a = auth();
        let (old, _) = a.mint_at(UserId(1), "x", now_secs() - 3600).expect("mint");
        assert!(matches!(a.verify(&old), Err(RequestError::TokenExpired)));
        let (t, _) = a.mint(UserId(1), "x").expect("mint");
        let mut tampered = t.clone();
        tampered.pop();
        tampered.push(if t.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            a.verify(&tampered),
            Err(RequestError::TokenInvalid(_))
        ));
        let other = Auth::new(&[9u8; 32], Duration::from_secs(60), 1);
        assert!(matches!(
            other.verify(&t),
            Err(RequestError::TokenInvalid(_))
        ));
        assert!(matches!(
            a.verify("garbage"),
            Err(RequestError::TokenInvalid(_))
        ));
    }

    #[test]
    fn rotated_keys_verify_old_tokens_and_unknown_keys_are_named() {
        let old = Auth::new(&[1u8; 32], Duration::from_secs(60), 1);
        let (t, _) = old.mint(UserId(7), "x").expect("mint");
        // The new secret is current, the old one previous: old tokens still verify, new ones
        // carry the new key id.
        let rotated = Auth::new(&[2u8; 32], Duration::from_secs(60), 1)
            .with_previous_secrets(&[vec![1u8; 32]]);
        assert_eq!(rotated.verify(&t).expect("old token").user, UserId(7));
        let (n, _) = rotated.mint(UserId(7), "x").expect("mint");
        assert_eq!(
            jsonwebtoken::decode_header(&n)
                .expect("header")
                .kid
                .as_deref(),
            Some(rotated.kid().as_str())
        );
        // Once the old secret is dropped, its tokens are refused, naming the key.
        let dropped = Auth::new(&[2u8; 32], Duration::from_secs(60), 1);
        match dropped.verify(&t) {
            Err(RequestError::TokenInvalid(why)) => assert!(why.contains(&old.kid()), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refreshes_never_pass_the_logins_hard_end() {
        let a = Auth::new(&[1u8; 32], Duration::from_secs(3600), 1)
            .with_max_lifetime(Duration::from_secs(7200));
        let now = now_secs();
        // Logged in 100 minutes ago: a refresh is valid 20 more minutes, not an hour.
        let mut who = Identity {
            user: UserId(1),
            name: "x".into(),
            auth_time_ms: (now - 6000) * 1000,
        };
        let (fresh, exp_ms) = a.refresh(&who).expect("refresh");
        assert_eq!(exp_ms / 1000, now - 6000 + 7200);
        assert_eq!(
            a.verify(&fresh).expect("fresh").auth_time_ms,
            (now - 6000) * 1000
        );
        // Logged in 2 hours ago: no refresh.
        who.auth_time_ms = (now - 7200) * 1000;
        assert!(matches!(a.refresh(&who), Err(RequestError::TokenExpired)));
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let a = auth();
        let h = a.hash_password("correct horse".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(
            a.verify_password("correct horse".into(), h.clone())
                .await
                .expect("verify")
        );
        assert!(!a.verify_password("wrong".into(), h).await.expect("verify"));
    }

    #[test]
    fn secret_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("k/token.key");
        let a = Auth::load_or_create_secret(&p).expect("create");
        let b = Auth::load_or_create_secret(&p).expect("read");
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        std::fs::remove_file(&p).expect("rm");
        crate::secret::read_or_create(&p, || b"short".to_vec()).expect("write");
        assert!(matches!(
            Auth::load_or_create_secret(&p),
            Err(AuthSetupError::TooShort(_))
        ));
    }
}
