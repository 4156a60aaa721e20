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
