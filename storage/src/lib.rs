//! # meshchat-storage
//!
//! Owns persistence: what the node stores and reads, behind traits, with one contract for
//! every backend.
//!
//! - [`traits`]: [`HistoryStore`] (messages, replies, reactions; pages by id; idempotent
//!   append) and [`StateStore`] (users and credentials, chat lists with unread counts and
//!   delivered/seen marks, channels and members). [`Storage`] is both.
//! - [`model`]: the plain data crossing those traits.
//! - [`error`]: [`StorageError`], shared by every backend.
//! - [`embedded`]: the default backend, SQLite in WAL mode with group commit; several node
//!   processes on one machine share one store.
//! - `cassandra` (feature `cassandra`): the Cassandra/ScyllaDB backend over the `scylla`
//!   driver, its CQL schema (`storage/cql/`) and migrator.
//! - [`contract`]: the backend-generic contract suite; each backend's tests instantiate it
//!   with [`contract_tests!`].

#[cfg(feature = "cassandra")]
pub mod cassandra;
pub mod contract;
pub mod embedded;
pub mod error;
pub mod model;
pub mod traits;

pub use embedded::{CrossProcess, Durability, EmbeddedConfig, EmbeddedStore};
pub use error::StorageError;
pub use model::*;
pub use traits::{HistoryStore, StateStore, Storage};
