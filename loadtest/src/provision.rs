//! Synthetic users, made fast: rows written straight into the cluster's store (its embedded
//! store directory, or its Cassandra keyspace) and tokens minted with the cluster's signing
//! key. No password is hashed per user: every synthetic user shares one
//! argon2id hash of a random password nobody knows, so nobody can log in as one, and the
//! node checks their tokens, rate limits and permissions exactly as it does for real users.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshchat_idgen::UserId;
use meshchat_messaging::auth::Auth;
use meshchat_messaging::config::CassandraSettings;
use meshchat_storage::cassandra::CassandraStore;
use meshchat_storage::{EmbeddedStore, StateStore, StorageError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Token lifetime of synthetic users.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why users could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The store refused.
    #[error("store: {0}")]
    Store(#[from] StorageError),
    /// A token could not be minted.
    #[error("minting a token: {0}")]
    Mint(String),
    /// The Cassandra settings are invalid.
    #[error("{0}")]
    Config(#[from] meshchat_messaging::config::ConfigError),
}

/// The store of the cluster under test, where synthetic users are written.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded store in this directory.
    Embedded(PathBuf),
    /// This Cassandra keyspace (migrated).
    Cassandra(CassandraSettings),
}

/// An open store, and the embedded store again when it is one (to close it: wait for its
/// writes).
type Opened = (Arc<dyn StateStore>, Option<Arc<EmbeddedStore>>);

impl Store {
    async fn open(&self) -> Result<Opened, ProvisionError> {
        Ok(match self {
            Store::Embedded(dir) => {
                let store = Arc::new(EmbeddedStore::open_dir(dir)?);
                (store.clone(), Some(store))
            }
            Store::Cassandra(settings) => (
                Arc::new(CassandraStore::connect(&settings.to_config()?).await?),
                None,
            ),
        })
    }
}

/// The synthetic user of slot `i`.
pub fn user(first: u64, i: usize) -> UserId {
    UserId(first + i as u64)
}

/// The name of a synthetic user.
pub fn name(u: UserId) -> String {
    format!("lt{}", u.0)
}

/// Mints a token for each of `n` users from `first`.
pub fn tokens(
    secret: &[u8],
    first: u64,
    n: usize,
) -> Result<Vec<(UserId, String)>, ProvisionError> {
    let auth = Auth::new(secret, TOKEN_TTL, 1);
    (0..n)
        .map(|i| {
            let u = user(first, i);
            auth.mint(u, &name(u))
                .map(|(t, _)| (u, t))
                .map_err(|e| ProvisionError::Mint(e.to_string()))
        })
        .collect()
}

/// Writes the `n` users from `first` into `store` (users that already exist are kept).
/// Returns how many were new.
pub async fn users(store: &Store, first: u64, n: usize) -> Result<usize, ProvisionError> {
    let (store, embedded) = store.open().await?;
    let hash: Arc<str> = Auth::new(&[0u8; 32], TOKEN_TTL, 1)
        .hash_password(format!("{:032x}", rand::random::<u128>()))
        .await
        .map_err(|e| ProvisionError::Mint(e.to_string()))?
        .into();
    // Many writers at once: the embedded store's group commit batches them; Cassandra
    // serves them in parallel (each a name claim, a lightweight transaction).
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    let mut created = 0;
    let mut first_error = None;
    for i in 0..n {
        let (store, hash, gate) = (store.clone(), hash.clone(), gate.clone());
        let permit = gate
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Closed)?;
        tasks.spawn(async move {
            let u = user(first, i);
            let r = match store.create_user(u, &name(u), &hash).await {
                Ok(_) => Ok(true),
                Err(StorageError::UserExists(_)) => Ok(false),
                Err(e) => Err(e),
            };
            drop(permit);
            r
        });
        while let Some(r) = tasks.try_join_next() {
            tally(r, &mut created, &mut first_error);
        }
    }
    while let Some(r) = tasks.join_next().await {
        tally(r, &mut created, &mut first_error);
    }
    drop(store);
    if let Some(store) = embedded.and_then(|s| Arc::try_unwrap(s).ok()) {
        store.close().await;
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(created),
    }
}

fn tally(
    r: Result<Result<bool, StorageError>, tokio::task::JoinError>,
    created: &mut usize,
    first_error: &mut Option<StorageError>,
) {
    match r {
        Ok(Ok(true)) => *created += 1,
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) => {
            first_error.get_or_insert(StorageError::Backend(Arc::new(e)));
        }
    }
}
