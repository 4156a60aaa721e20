//! A shim over SQLite's page cache that spares every commit a walk of the whole cache.
//!
//! At the end of each transaction SQLite truncates the page cache to the database's size
//! (`pager_end_transaction` -> `pcache1Truncate(dbSize + 1)`). The default cache keeps the
//! largest page number it has ever held (`iMaxKey`), and when that is far above the limit it
//! walks its entire hash table. A b-tree split (`balance_nonroot`) parks a page under the
//! number of the lock-byte page (the page at `PENDING_BYTE`, 1 GiB, page 262,145 at 4 KiB)
//! for a moment while it orders sibling pages, so after a split the cache's `iMaxKey` is
//! 262,145 and the commit that ends the transaction (of a database under 1 GiB) walks the
//! whole table. Under appends to many chats nearly every batch splits a page: with the
//! store's 64 MiB cache, 30% of the writer thread's CPU (issue 14, docs/PERFORMANCE.md).
//!
//! The shim keeps its own largest page number, leaving out the lock-byte page (SQLite never
//! stores a page there; `balance_nonroot` moves the page away again in the next statement),
//! and passes a truncation on only when a page at or past the limit can be in the cache.
//! Everything else is the default cache's.
//!
//! Installed once per process, before SQLite is initialised (`sqlite3_config` refuses after):
//! [`install`] returns false when it was too late, and the store works as before.

// SQLite's page-cache interface is C: function tables and opaque pointers. The unsafe code
// is confined to this module; each method forwards to the default cache.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// SQLite's `PENDING_BYTE` (not changed in this build): the lock-byte page is the page that
/// holds it.
const PENDING_BYTE: c_uint = 0x4000_0000;

/// The default cache's methods, called by the shim.
struct Inner(ffi::sqlite3_pcache_methods2);

// Written once before SQLite starts, then only read.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();

/// One cache: the default cache's, and the largest page number it may hold.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The lock-byte page's number for this cache's page size.
    lock_byte_page: c_uint,
    /// No page numbered above this is in the cache (the lock-byte page aside, transiently).
    max_key: c_uint,
}

/// Installs the shim; true if it is in place (now or from an earlier call), false if SQLite
/// was initialised before (the default cache stays, unchanged).
pub(super) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| unsafe {
        let mut default: ffi::sqlite3_pcache_methods2 = std::mem::zeroed();
        if ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_GETPCACHE2,
            &mut default as *mut ffi::sqlite3_pcache_methods2,
        ) != ffi::SQLITE_OK
            || default.xCreate.is_none()
        {
            return false;
        }
        if INNER.set(Inner(default)).is_err() {
            return false;
        }
        let shim = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: ptr::null_mut(),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            xCreate: Some(x_create),
            xCachesize: Some(x_cachesize),
            xPagecount: Some(x_pagecount),
            xFetch: Some(x_fetch),
            xUnpin: Some(x_unpin),
            xRekey: Some(x_rekey),
            xTruncate: Some(x_truncate),
            xDestroy: Some(x_destroy),
            xShrink: Some(x_shrink),
        };
        // SQLite copies the table.
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PCACHE2,
            &shim as *const ffi::sqlite3_pcache_methods2,
        ) == ffi::SQLITE_OK
    })
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    // Set before the shim's table was handed to SQLite, which is the only caller.
    &INNER
        .get()
        .expect("the default page cache is recorded first")
        .0
}

unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    let i = inner();
    match i.xInit {
        Some(f) => unsafe { f(i.pArg) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {
    let i = inner();
    if let Some(f) = i.xShutdown {
        unsafe { f(i.pArg) }
    }
}

unsafe extern "C" fn x_create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = inner().xCreate else {
        return ptr::null_mut();
    };
    let inner = unsafe { create(page_size, extra, purgeable) };
    if inner.is_null() {
        return ptr::null_mut();
    }
    let c = Box::new(Cache {
        inner,
        lock_byte_page: PENDING_BYTE / page_size.max(512) as c_uint + 1,
        max_key: 0,
    });
    Box::into_raw(c).cast()
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    if let Some(f) = inner().xCachesize {
        unsafe { f(cache(p).inner, n) }
    }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    match inner().xPagecount {
        Some(f) => unsafe { f(cache(p).inner) },
        None => 0,
    }
}

unsafe extern "C" fn x_fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let Some(f) = inner().xFetch else {
        return ptr::null_mut();
    };
    unsafe {
        let c = cache(p);
        let page = f(c.inner, key, create);
        if !page.is_null() && key != c.lock_byte_page && key > c.max_key {
            c.max_key = key;
        }
        page
    }
}

unsafe extern "C" fn x_unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    if let Some(f) = inner().xUnpin {
        unsafe { f(cache(p).inner, page, discard) }
    }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    if let Some(f) = inner().xRekey {
        unsafe {
            let c = cache(p);
            f(c.inner, page, old, new);
            if new != c.lock_byte_page && new > c.max_key {
                c.max_key = new;
            }
        }
    }
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    unsafe {
        let c = cache(p);
        // Nothing at or past the limit: the default cache would only walk its table.
        if limit > c.max_key {
            return;
        }
        if let Some(f) = inner().xTruncate {
            f(c.inner, limit);
        }
        c.max_key = limit.saturating_sub(1);
    }
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    unsafe {
        let c = Box::from_raw(p as *mut Cache);
        if let Some(f) = inner().xDestroy {
            f(c.inner);
        }
    }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(f) = inner().xShrink {
        unsafe { f(cache(p).inner) }
    }
}
