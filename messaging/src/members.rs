//! The per-node cache of channel member lists, used for fan-out (authorisation always asks
//! storage). Shared by the send path and the mesh, which drops entries when a peer reports a
//! join or leave (`ChannelChanged`, on a mesh lane that is never dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use meshchat_idgen::{ChannelId, UserId};

/// Channel member lists cached at once before the cache is cleared.
const MEMBER_CACHE_MAX: usize = 10_000;

/// channel -> members, with a change counter.
#[derive(Debug, Default)]
pub struct MemberCache {
    lists: DashMap<ChannelId, Arc<Vec<UserId>>>,
    /// Bumped on every invalidation: a list read from storage is cached only if no change
    /// happened while it was being read (else a stale list could be cached after the
    /// invalidation that should have removed it).
    changes: AtomicU64,
}

impl MemberCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached list, if any.
    pub fn get(&self, id: ChannelId) -> Option<Arc<Vec<UserId>>> {
        self.lists.get(&id).map(|l| l.clone())
    }

    /// A token to pass to [`MemberCache::insert_if_unchanged`], taken before reading storage.
    pub fn version(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Caches `list` unless something changed since `version`.
    pub fn insert_if_unchanged(&self, id: ChannelId, list: Arc<Vec<UserId>>, version: u64) {
        if self.lists.len() >= MEMBER_CACHE_MAX {
            self.lists.clear();
        }
        // The version is checked under the entry's lock: an invalidation bumps the counter
        // before it takes that lock to remove, so it either is seen here (nothing cached) or
        // removes what is cached here after it; never a stale list cached past it.
        let entry = self.lists.entry(id);
        if self.changes.load(Ordering::SeqCst) != version {
            return;
        }
        entry.insert(list);
    }

    /// Drops every list: a mesh link came up (a change may have been lost with the old one),
    /// a peer owed us changes of too many channels to list, or resynced everyone.
    pub fn invalidate_all(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.lists.clear();
    }

    /// Drops a channel's list after a join or leave (here or on a peer).
    pub fn invalidate(&self, id: ChannelId) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.lists.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_read_across_an_invalidation_is_not_cached() {
        let c = MemberCache::new();
        let v = c.version();
        c.invalidate(ChannelId(1));
        c.insert_if_unchanged(ChannelId(1), Arc::new(vec![UserId(7)]), v);
        assert!(c.get(ChannelId(1)).is_none());
        let v = c.version();
        c.insert_if_unchanged(ChannelId(1), Arc::new(vec![UserId(7)]), v);
        assert_eq!(c.get(ChannelId(1)).map(|l| l.len()), Some(1));
    }
}
