//! The backend contract suite against the embedded SQLite store in a temp dir.

use std::sync::Arc;

use async_trait::async_trait;
use meshchat_storage::contract::Harness;
use meshchat_storage::{EmbeddedStore, Storage};
use parking_lot::Mutex;

struct Embedded {
    dir: tempfile::TempDir,
    open: Mutex<Option<Arc<EmbeddedStore>>>,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            open: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn Storage> {
        let store = Arc::new(EmbeddedStore::open_dir(self.dir.path()).expect("open store"));
        *self.open.lock() = Some(store.clone());
        store
    }

    async fn close(&self, store: Arc<dyn Storage>) {
        drop(store);
        let typed = self.open.lock().take().expect("a store is open");
        match Arc::try_unwrap(typed) {
            Ok(store) => store.close().await,
            Err(_) => panic!("the contract leaked a store handle"),
        }
    }
}

meshchat_storage::contract_tests!(Embedded::new());

#[test]
fn a_store_from_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(meshchat_storage::embedded::DB_FILE);
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    conn.execute_batch("PRAGMA user_version = 999")
        .expect("set version");
    drop(conn);
    match EmbeddedStore::open_dir(dir.path()) {
        Err(meshchat_storage::StorageError::SchemaTooNew { found: 999, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

/// A write that waited longer than `max_queue_delay` for the writer is refused with
/// `Overloaded` and not applied (so an id is never committed long after it was issued).
#[tokio::test]
async fn a_write_that_waited_too_long_is_refused_not_applied() {
    use meshchat_idgen::UserId;
    use meshchat_storage::{EmbeddedConfig, StateStore, StorageError};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = EmbeddedConfig::in_dir(dir.path());
    cfg.max_queue_delay = std::time::Duration::ZERO;
    let store = EmbeddedStore::open(cfg).expect("open");
    let r = store.create_user(UserId(7), "late", "hash").await;
    assert!(matches!(r, Err(StorageError::Overloaded { .. })), "{r:?}");
    assert!(store.user_by_id(UserId(7)).await.expect("read").is_none());
    store.close().await;
    // With the default bound the same write lands.
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    store
        .create_user(UserId(7), "late", "hash")
        .await
        .expect("create");
    store.close().await;
}
