//! The Cassandra backend's own error type: driver failures and answers the backend did not
//! expect. Every variant reaches callers as [`StorageError::Backend`].

use crate::error::StorageError;

/// Why the Cassandra backend failed (wrapped in [`StorageError::Backend`]).
#[derive(Debug, thiserror::Error)]
pub enum CassandraError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No session could be opened.
    #[error("cannot connect to the cluster: {0}")]
    Connect(#[from] scylla::errors::NewSessionError),
    /// A statement could not be prepared (often: the schema is missing; run the migrator).
    #[error("cannot prepare a statement: {0}")]
    Prepare(#[from] scylla::errors::PrepareError),
    /// A request failed (timeout, unavailable replicas, ...).
    #[error("request failed: {0}")]
    Execution(#[from] scylla::errors::ExecutionError),
    /// A paged request failed to start.
    #[error("paged request failed: {0}")]
    Pager(#[from] scylla::errors::PagerExecutionError),
    /// A later page of a paged request failed.
    #[error("reading the next row failed: {0}")]
    NextRow(#[from] scylla::errors::NextRowError),
    /// A response was not a result set.
    #[error("unexpected response: {0}")]
    IntoRows(#[from] scylla::errors::IntoRowsResultError),
    /// Rows did not have the expected columns.
    #[error("unexpected columns: {0}")]
    Rows(#[from] scylla::errors::RowsError),
    /// The first row did not have the expected columns.
    #[error("unexpected row: {0}")]
    FirstRow(#[from] scylla::errors::MaybeFirstRowError),
    /// The row type did not match the result's columns.
    #[error("type check failed: {0}")]
    TypeCheck(#[from] scylla::errors::TypeCheckError),
    /// A value could not be decoded.
    #[error("cannot decode a value: {0}")]
    Deserialize(#[from] scylla::errors::DeserializationError),
    /// Stored data is not what this backend writes (a bad chat key, a missing column).
    #[error("unexpected stored data: {0}")]
    Data(String),
    /// The keyspace has no schema version: the migrator has not run.
    #[error("keyspace {0} has no meshchat schema; run `meshchat-node migrate` first")]
    NotMigrated(String),
    /// The keyspace is on an older schema than this build needs.
    #[error(
        "keyspace {keyspace} is at schema version {found}, this build needs {needed}; run \
         `meshchat-node migrate` (it only adds tables)"
    )]
    Outdated {
        /// The keyspace.
        keyspace: String,
        /// Its schema version.
        found: i32,
        /// This build's.
        needed: i32,
    },
    /// Outside development, the keyspace has too few replicas for "acked means durable".
    #[error(
        "keyspace {keyspace} has {replicas} replicas in {datacenter}; a cluster that is not on \
         this machine needs at least 3 (or allow_weak_durability)"
    )]
    WeakReplication {
        /// The keyspace.
        keyspace: String,
        /// The datacenter (or `replication_factor`).
        datacenter: String,
        /// Its replicas.
        replicas: u32,
    },
    /// The keyspace was created with another history bucket width.
    #[error("keyspace bucket width is {stored} ms but the config says {configured} ms")]
    BucketWidthMismatch {
        /// Width stored in the keyspace.
        stored: u64,
        /// Width in the config.
        configured: u64,
    },
}

/// A [`CassandraConfig`](super::CassandraConfig) field is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Cassandra config: {0}")]
pub struct ConfigError(pub String);

impl From<ConfigError> for StorageError {
    fn from(e: ConfigError) -> Self {
        StorageError::backend(CassandraError::Config(e))
    }
}

impl From<CassandraError> for StorageError {
    fn from(e: CassandraError) -> Self {
        StorageError::backend(e)
    }
}

/// Maps any driver error into a [`StorageError`] (for `map_err`).
pub(crate) fn drv<E: Into<CassandraError>>(e: E) -> StorageError {
    StorageError::from(e.into())
}
