//! Accounts: argon2id password hashes and signed, expiring tokens.
//!
//! Tokens are JWTs (HS256, `jsonwebtoken`) with the user id, name, issue and expiry times.
//! Verifying one needs no storage read: any node holding the cluster's token secret can check
//! it. Password hashing is memory-hard on purpose (~19 MiB, ~tens of ms), so it runs on the
//! blocking pool behind a semaphore: at most `max_concurrent_hashes` at once, the rest fail
//! fast with `OVERLOADED` after a short wait instead of piling up memory.

use std::path::Path;
use std::sync::Arc;
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
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user: UserId,
    /// Their name.
    pub name: String,
}

/// Token minting and checking, and password hashing.
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    hashing: Arc<Semaphore>,
    /// A hash of no password, checked when a login names no account so that it takes as
    /// long as a wrong password.
    nothing: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("ttl", &self.ttl).finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    /// Auth with the given secret.
    pub fn new(secret: &[u8], ttl: Duration, max_concurrent_hashes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            hashing: Arc::new(Semaphore::new(max_concurrent_hashes.max(1))),
            nothing: tokio::sync::OnceCell::new(),
        }
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
        let trimmed = bytes.trim_ascii().to_vec();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(AuthSetupError::TooShort(path.display().to_string()));
        }
        Ok(trimmed)
    }

    /// Mints a token for `user`. Returns the token and its expiry in Unix milliseconds.
    pub fn mint(&self, user: UserId, name: &str) -> Result<(String, u64), RequestError> {
        self.mint_at(user, name, now_secs())
    }

    /// Mints a token as if issued at `iat` (Unix seconds). For tests of expiry and for the
    /// load tester's synthetic users.
    pub fn mint_at(
        &self,
        user: UserId,
        name: &str,
        iat: u64,
    ) -> Result<(String, u64), RequestError> {
        let exp = iat + self.ttl.as_secs();
        let claims = Claims {
            sub: user.0.to_string(),
            name: name.to_owned(),
            iat,
            exp,
            iss: ISSUER.to_owned(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| RequestError::Internal(format!("minting token: {e}")))?;
        Ok((token, exp * 1000))
    }

    /// Checks a token's signature, issuer and expiry. No storage read.
    pub fn verify(&self, token: &str) -> Result<Identity, RequestError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => RequestError::TokenExpired,
                _ => RequestError::TokenInvalid(e.to_string()),
            })?;
        let user = data
            .claims
            .sub
            .parse::<u64>()
            .map_err(|_| RequestError::TokenInvalid("subject is not a user id".into()))?;
        Ok(Identity {
            user: UserId(user),
            name: data.claims.name,
        })
    }

    async fn hashing_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, RequestError> {
        match tokio::time::timeout(HASH_QUEUE_WAIT, self.hashing.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(RequestError::Overloaded(
                "too many logins and registrations at once; retry".into(),
            )),
        }
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
        assert_eq!(
            a.verify(&t).expect("verify"),
            Identity {
                user: UserId(42),
                name: "ada".into()
            }
        );
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
