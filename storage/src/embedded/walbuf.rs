//! A SQLite VFS shim, `meshchat-walbuf`, over the platform's default VFS: for the WAL file
//! only, it gathers a transaction's frame writes in memory and writes them with one system
//! call when the transaction's commit frame is complete.
//!
//! SQLite writes every WAL frame as two `pwrite`s (its 24-byte header, then the page), so a
//! batch of appends touching ~2.6 pages each cost ~5 system calls per append, the largest
//! share of the writer thread's CPU (docs/PERFORMANCE.md, issue 14). Gathered, a batch is one
//! `pwrite` per 64 KiB.
//!
//! What is gathered: writes that extend the WAL (appends at its end as this connection last
//! wrote it, and the WAL header that starts it over). A write anywhere else (SQLite rewriting a
//! frame of the same transaction in place, or its checksums) first writes what is gathered,
//! then goes straight to the file.
//!
//! Why it is safe:
//! - A transaction's frames become visible to other connections (and processes) only when
//!   SQLite updates the wal-index header in shared memory, after the commit frame has been
//!   written (`sqlite3WalFrames`). The gathered frames are written when the commit frame's
//!   page arrives, so before that update; a `COMMIT` that cannot write them fails as
//!   SQLite's own write would have. Writes after the commit frame (checksum rewrites) are not
//!   appends, so they go straight to the file.
//! - Only uncommitted frames can be left gathered, and only while this connection holds the
//!   WAL write lock may they be written: once the lock is gone another process may append at
//!   the same offsets. So they are dropped, never written, once their transaction is over:
//!   [`discard`] after every rollback of the store's writer, before its every `BEGIN`, and
//!   before its connection closes (SQLite's checkpoint at close syncs the WAL, which would
//!   write them), and at close. (Written while the lock is held, as a read in the transaction
//!   makes them, they are what SQLite itself would have written past the log's valid end.)
//! - Anything that looks at the file (a read, a size, a sync, a truncate, a file control)
//!   writes what is gathered first, so the connection never sees the file differently from
//!   SQLite's model of it.
//! - Nothing is durable before it was written: the syncer's `fdatasync` of the WAL happens
//!   after the `COMMIT` returned, so after the frames are in the file.
//! - It needs `synchronous = NORMAL` or `OFF` (the writer's setting, `schema::prepare`): with
//!   `FULL`, SQLite pads a commit to a sector boundary after syncing, and a padding write cut
//!   at the sync point would be gathered past the commit.
//! - Every other file (the database, journals) is the default VFS's own, untouched.
//!
//! Bounded: a gathering is written early once it holds [`MAX_GATHER`] bytes, and its buffer
//! is dropped if it grew past [`KEEP_CAPACITY`].

// A VFS is SQLite's C interface: function tables and raw file objects it allocates. The unsafe
// code is confined to this module; each method only forwards to the default VFS's file or
// copies bytes SQLite hands it.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The VFS's name, for `Connection::open_with_flags_and_vfs`.
pub(super) const NAME: &str = "meshchat-walbuf";
const NAME_C: &CStr = c"meshchat-walbuf";

/// Gathered bytes past which they are written before the commit frame (a very large batch).
const MAX_GATHER: usize = 8 << 20;
/// Largest write handed to the default VFS at once: SQLite's unix VFS writes at most
/// 128 KiB - 1 per call (`seekAndWriteFd` masks the length) and reports a shorter write as a
/// full disk.
const CHUNK: usize = 64 << 10;
/// A buffer that grew past this is let go once written.
const KEEP_CAPACITY: usize = 16 << 20;
/// The WAL file's header (`WAL_HDRSIZE`): frames start after it.
const WAL_HEADER: i64 = 32;
/// A frame header (`WAL_FRAME_HDRSIZE`): bytes 4..8 are the database size after a commit,
/// non-zero only in a transaction's commit frame.
const FRAME_HEADER: usize = 24;

/// The file object SQLite allocates for the shim (`szOsFile` bytes): this header, then the
/// default VFS's own file at [`real_offset`].
#[repr(C)]
struct WalFile {
    /// Must be first: SQLite reads `pMethods` through a `sqlite3_file*`.
    base: ffi::sqlite3_file,
    /// The default VFS's file, inside the same allocation.
    real: *mut ffi::sqlite3_file,
    gather: *mut Gather,
}

/// Writes not yet made: contiguous bytes starting at `at`.
#[derive(Default)]
struct Gather {
    at: i64,
    bytes: Vec<u8>,
    /// Where this connection's writes left the WAL's end (`None` before its first write).
    end: Option<i64>,
    /// The last write was a commit frame's header: its page completes the transaction.
    commit_header_seen: bool,
}

struct Vfs {
    vfs: ffi::sqlite3_vfs,
    methods: ffi::sqlite3_io_methods,
    /// The default VFS, which opens every file.
    default: *mut ffi::sqlite3_vfs,
}

// The VFS tables are written once, then only read (by SQLite, from any thread).
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

static VFS: OnceLock<Result<Box<Vfs>, String>> = OnceLock::new();

/// Registers the shim (once per process). Errors if SQLite has no default VFS or refuses.
pub(super) fn register() -> std::io::Result<()> {
    VFS.get_or_init(|| unsafe { make() })
        .as_ref()
        .map(|_| ())
        .map_err(|e| std::io::Error::other(e.clone()))
}

fn real_offset() -> usize {
    std::mem::size_of::<WalFile>().next_multiple_of(16)
}

unsafe fn make() -> Result<Box<Vfs>, String> {
    unsafe {
        let default = ffi::sqlite3_vfs_find(ptr::null());
        if default.is_null() {
            return Err("SQLite has no default VFS".into());
        }
        // Every method but xOpen is the default VFS's, called with this VFS: it keeps the
        // default's pAppData and sizes, which is all those methods read of it.
        let mut vfs = *default;
        vfs.szOsFile = (real_offset() + (*default).szOsFile as usize) as c_int;
        vfs.zName = NAME_C.as_ptr();
        vfs.pNext = ptr::null_mut();
        vfs.xOpen = Some(x_open);
        let methods = ffi::sqlite3_io_methods {
            iVersion: 3,
            xClose: Some(x_close),
            xRead: Some(x_read),
            xWrite: Some(x_write),
            xTruncate: Some(x_truncate),
            xSync: Some(x_sync),
            xFileSize: Some(x_file_size),
            xLock: Some(x_lock),
            xUnlock: Some(x_unlock),
            xCheckReservedLock: Some(x_check_reserved_lock),
            xFileControl: Some(x_file_control),
            xSectorSize: Some(x_sector_size),
            xDeviceCharacteristics: Some(x_device_characteristics),
            xShmMap: Some(x_shm_map),
            xShmLock: Some(x_shm_lock),
            xShmBarrier: Some(x_shm_barrier),
            xShmUnmap: Some(x_shm_unmap),
            xFetch: Some(x_fetch),
            xUnfetch: Some(x_unfetch),
        };
        let mut boxed = Box::new(Vfs {
            vfs,
            methods,
            default,
        });
        let rc = ffi::sqlite3_vfs_register(&mut boxed.vfs, 0);
        if rc != ffi::SQLITE_OK {
            return Err(format!("sqlite3_vfs_register: {rc}"));
        }
        Ok(boxed)
    }
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let Some(Ok(shim)) = VFS.get() else {
            return ffi::SQLITE_CANTOPEN;
        };
        let default = shim.default;
        let Some(open) = (*default).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            // Not the WAL: the default VFS's file, as it is.
            return open(default, name, file, flags, out_flags);
        }
        let wal = file as *mut WalFile;
        let real = (file as *mut u8).add(real_offset()) as *mut ffi::sqlite3_file;
        (*wal).base.pMethods = ptr::null();
        (*wal).real = real;
        (*wal).gather = ptr::null_mut();
        let rc = open(default, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // SQLite calls no method of a file whose pMethods is null.
            return rc;
        }
        if (*real).pMethods.is_null() {
            return ffi::SQLITE_CANTOPEN;
        }
        (*wal).gather = Box::into_raw(Box::default());
        (*wal).base.pMethods = &shim.methods;
        ffi::SQLITE_OK
    }
}

/// The file's parts: its gathering and the default VFS's file with its methods.
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (
    &'a mut Gather,
    *mut ffi::sqlite3_file,
    &'a ffi::sqlite3_io_methods,
) {
    unsafe {
        let wal = file as *mut WalFile;
        let real = (*wal).real;
        (&mut *(*wal).gather, real, &*(*real).pMethods)
    }
}

/// Writes what is gathered, in one call; the gathering is empty afterwards, written or not
/// (a failed write is reported to SQLite, which treats the transaction as failed).
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (g, real, m) = parts(file);
        g.commit_header_seen = false;
        if g.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let Some(write) = m.xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut at = g.at;
        for chunk in g.bytes.chunks(CHUNK) {
            rc = write(real, chunk.as_ptr().cast(), chunk.len() as c_int, at);
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += chunk.len() as i64;
        }
        g.bytes.clear();
        if g.bytes.capacity() > KEEP_CAPACITY {
            g.bytes = Vec::new();
        }
        rc
    }
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let (g, _, _) = parts(file);
        let data = std::slice::from_raw_parts(data as *const u8, amount.max(0) as usize);
        // Read before any flush below (which forgets it): this write may be the page of a
        // commit frame whose header is gathered, or was just written by that flush.
        let completes_commit = g.commit_header_seen;
        let appends = offset == 0 || g.end.is_none_or(|end| end == offset);
        if !g.bytes.is_empty()
            && (!appends || offset == 0 || g.bytes.len() + data.len() > MAX_GATHER)
        {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let (g, real, m) = parts(file);
        let written_to = offset + data.len() as i64;
        if !appends {
            // A rewrite in place: straight to the file, after what was gathered before it.
            g.commit_header_seen = false;
            g.end = g.end.max(Some(written_to));
            return match m.xWrite {
                Some(write) => write(real, data.as_ptr().cast(), amount, offset),
                None => ffi::SQLITE_IOERR_WRITE,
            };
        }
        if g.bytes.is_empty() {
            g.at = offset;
        }
        g.bytes.extend_from_slice(data);
        g.end = Some(written_to);
        g.commit_header_seen =
            offset >= WAL_HEADER && data.len() == FRAME_HEADER && data[4..8] != [0u8; 4];
        if completes_commit {
            return flush(file);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        // What is still gathered belongs to a transaction that did not commit: dropped.
        let wal = file as *mut WalFile;
        let real = (*wal).real;
        let closed = match (*(*real).pMethods).xClose {
            Some(close) => close(real),
            None => ffi::SQLITE_OK,
        };
        drop(Box::from_raw((*wal).gather));
        (*wal).gather = ptr::null_mut();
        closed
    }
}

/// `conn`'s WAL file, when it is open and opened through this VFS.
fn wal_of(conn: &rusqlite::Connection) -> Option<*mut ffi::sqlite3_file> {
    let Some(Ok(shim)) = VFS.get() else {
        return None;
    };
    unsafe {
        // The WAL file once it is open; before, the pager's journal file (never this VFS's).
        let mut wal: *mut ffi::sqlite3_file = ptr::null_mut();
        let rc = ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            (&mut wal as *mut *mut ffi::sqlite3_file).cast(),
        );
        (rc == ffi::SQLITE_OK && !wal.is_null() && ptr::eq((*wal).pMethods, &shim.methods))
            .then_some(wal)
    }
}

/// Bytes `conn`'s WAL file has gathered and not written (0 when not through this VFS).
#[cfg(test)]
fn gathered(conn: &rusqlite::Connection) -> usize {
    wal_of(conn).map_or(0, |wal| unsafe { parts(wal).0.bytes.len() })
}

/// Drops what `conn`'s WAL file has gathered, unwritten: call it when no transaction is open
/// on `conn` (before a `BEGIN`). Anything gathered then belongs to a transaction that did not
/// commit, and the write lock that made writing it safe is gone. A no-op for a connection not
/// opened through this VFS, or whose WAL is not open yet.
pub(super) fn discard(conn: &rusqlite::Connection) {
    // A transaction still open (a failed ROLLBACK) may yet need its frames.
    if !conn.is_autocommit() {
        return;
    }
    let Some(wal) = wal_of(conn) else { return };
    unsafe {
        let (g, _, _) = parts(wal);
        if !g.bytes.is_empty() {
            tracing::debug!(
                bytes = g.bytes.len(),
                "dropping WAL frames of a transaction that did not commit"
            );
        }
        g.bytes.clear();
        g.commit_header_seen = false;
        // Another process may have moved the WAL's end meanwhile.
        g.end = None;
    }
}

/// A method that does what the default VFS does (the WAL file's locks and shared memory are
/// never used by SQLite: they are the database file's).
macro_rules! forward {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            unsafe {
                let (_, real, m) = parts(file);
                match m.$method {
                    Some(f) => f(real, $($arg),*),
                    None => $missing,
                }
            }
        }
    };
}

/// A method that writes what is gathered, then does what the default VFS does.
macro_rules! after_flush {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            unsafe {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                let (_, real, m) = parts(file);
                match m.$method {
                    Some(f) => f(real, $($arg),*),
                    None => $missing,
                }
            }
        }
    };
}

after_flush!(x_read, xRead, (data: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64), ffi::SQLITE_IOERR_READ);
after_flush!(x_truncate, xTruncate, (size: ffi::sqlite3_int64), ffi::SQLITE_IOERR_TRUNCATE);
after_flush!(x_sync, xSync, (flags: c_int), ffi::SQLITE_IOERR_FSYNC);
after_flush!(x_file_size, xFileSize, (size: *mut ffi::sqlite3_int64), ffi::SQLITE_IOERR_FSTAT);
forward!(x_lock, xLock, (level: c_int), ffi::SQLITE_IOERR_LOCK);
forward!(x_unlock, xUnlock, (level: c_int), ffi::SQLITE_IOERR_UNLOCK);
forward!(x_check_reserved_lock, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_IOERR_CHECKRESERVEDLOCK);
after_flush!(x_file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
forward!(x_shm_map, xShmMap, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void), ffi::SQLITE_IOERR_SHMMAP);
forward!(x_shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR_SHMLOCK);
forward!(x_shm_unmap, xShmUnmap, (delete: c_int), ffi::SQLITE_OK);
forward!(x_fetch, xFetch, (offset: ffi::sqlite3_int64, amount: c_int, out: *mut *mut c_void), {
    // No memory map: SQLite reads instead.
    *out = ptr::null_mut();
    ffi::SQLITE_OK
});
forward!(x_unfetch, xUnfetch, (offset: ffi::sqlite3_int64, page: *mut c_void), ffi::SQLITE_OK);

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (_, real, m) = parts(file);
        m.xSectorSize.map_or(4096, |f| f(real))
    }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (_, real, m) = parts(file);
        m.xDeviceCharacteristics.map_or(0, |f| f(real))
    }
}

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe {
        let (_, real, m) = parts(file);
        if let Some(f) = m.xShmBarrier {
            f(real);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shim against real SQLite files: another connection (the default VFS, standing in
    //! for another process) reads and writes the same database, and a copy of the files taken
    //! without a checkpoint (as a crash leaves them) is recovered from the WAL alone.

    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};

    use super::*;

    fn writer(path: &Path) -> Connection {
        register().expect("register");
        let c = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            NAME,
        )
        .expect("open through the shim");
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .expect("set up");
        c
    }

    fn other(path: &Path) -> Connection {
        let c = Connection::open(path).expect("open");
        c.execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .expect("set up");
        c
    }

    fn insert(c: &Connection, from: i64, n: i64) {
        let mut st = c
            .prepare_cached("INSERT INTO t (k, v) VALUES (?1, zeroblob(300))")
            .expect("prepare");
        for k in from..from + n {
            st.execute([k]).expect("insert");
        }
    }

    fn keys(c: &Connection) -> (i64, i64) {
        c.query_row("SELECT count(*), coalesce(sum(k), 0) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("count")
    }

    fn sum(from: i64, n: i64) -> i64 {
        (from..from + n).sum()
    }

    /// The database and its WAL copied as they are on disk (no checkpoint, no close), opened
    /// elsewhere: what a crash right now would leave.
    fn crash_copy(path: &Path, to: &Path) -> Connection {
        let wal = |p: &Path| {
            let mut s = p.as_os_str().to_owned();
            s.push("-wal");
            std::path::PathBuf::from(s)
        };
        std::fs::copy(path, to).expect("copy the database");
        // None left when the last connection closed and checkpointed it.
        if wal(path).exists() {
            std::fs::copy(wal(path), wal(to)).expect("copy the WAL");
        }
        let c = Connection::open(to).expect("open the copy");
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("check");
        assert_eq!(ok, "ok");
        c
    }

    #[test]
    fn committed_transactions_are_in_the_file_when_commit_returns() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("a.db");
        let w = writer(&path);
        for round in 0..20 {
            w.execute_batch("BEGIN IMMEDIATE").expect("begin");
            insert(&w, round * 100, 100);
            w.execute_batch("COMMIT").expect("commit");
            assert_eq!(gathered(&w), 0, "written when COMMIT returns");
        }
        assert_eq!(keys(&other(&path)), (2_000, sum(0, 2_000)));
        let copy = crash_copy(&path, &dir.path().join("copy.db"));
        assert_eq!(keys(&copy), (2_000, sum(0, 2_000)));
    }

    #[test]
    fn a_spilled_transaction_that_rolls_back_never_overwrites_another_writers_frames() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("b.db");
        let w = writer(&path);
        insert(&w, 0, 2_000);
        // The table's pages in the database file, not the WAL: the update reads them there
        // (a read of the WAL would write what is gathered first).
        w.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint");
        // Same-size updates with a cache of a few pages: the transaction spills frames into
        // the WAL and is rolled back. (Whether any are still gathered at the rollback depends
        // on SQLite's reads during the spill; none may be written after it either way.)
        w.execute_batch("PRAGMA cache_size = 4")
            .expect("small cache");
        w.execute_batch("BEGIN IMMEDIATE").expect("begin");
        // One row in 25: each leaf page is changed once, spilled, and not read again.
        w.execute_batch("UPDATE t SET v = zeroblob(300) WHERE k % 25 = 0")
            .expect("update");
        w.execute_batch("ROLLBACK").expect("rollback");
        let left = gathered(&w);
        // What the store's writer does after every rollback (and before every BEGIN).
        discard(&w);
        assert_eq!(gathered(&w), 0);
        // Another writer appends where the rolled-back frames were.
        let o = other(&path);
        o.execute_batch("BEGIN IMMEDIATE").expect("begin");
        insert(&o, 10_000, 500);
        o.execute_batch("COMMIT").expect("commit");
        w.execute_batch("BEGIN IMMEDIATE").expect("begin");
        insert(&w, 20_000, 10);
        w.execute_batch("COMMIT").expect("commit");
        let want = (2_510, sum(0, 2_000) + sum(10_000, 500) + sum(20_000, 10));
        assert_eq!(
            keys(&o),
            want,
            "{left} bytes were left gathered by the rollback"
        );
        // And the checkpoint SQLite runs when the last connection closes.
        drop(w);
        drop(o);
        let copy = crash_copy(&path, &dir.path().join("copy.db"));
        assert_eq!(keys(&copy), want);
    }

    #[test]
    fn a_commit_frame_past_the_gathering_bound_is_written_before_commit_returns() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.db");
        let w = writer(&path);
        w.execute_batch("PRAGMA cache_size = -65536")
            .expect("cache");
        // One row per page: a transaction that updates n rows writes n leaf pages (plus a
        // few interior ones), so some of these put the commit frame right at the point where
        // the gathering (8 MiB, 2,036 frames of 4 KiB) is written early.
        w.execute_batch("BEGIN IMMEDIATE").expect("begin");
        let mut st = w
            .prepare("INSERT INTO t (k, v) VALUES (?1, zeroblob(3500))")
            .expect("prepare");
        for k in 0..2_100 {
            st.execute([k]).expect("insert");
        }
        drop(st);
        w.execute_batch("COMMIT").expect("commit");
        for n in 2_025..2_045 {
            w.execute_batch("BEGIN IMMEDIATE").expect("begin");
            w.execute(
                "UPDATE t SET v = zeroblob(3500 - ?1 % 2) WHERE k < ?2",
                [n, n],
            )
            .expect("update");
            w.execute_batch("COMMIT").expect("commit");
            assert_eq!(gathered(&w), 0, "all of the commit of {n} rows is written");
        }
        let copy = crash_copy(&path, &dir.path().join("copy.db"));
        assert_eq!(keys(&copy), (2_100, sum(0, 2_100)));
        let last: i64 = copy
            .query_row(
                "SELECT count(*) FROM t WHERE length(v) = 3500 - 2044 % 2 AND k < 2044",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(last, 2_044, "the last commit is whole in the WAL");
    }

    #[test]
    fn a_spilled_transaction_that_commits_is_whole_on_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.db");
        let w = writer(&path);
        // Spills, then rewrites pages it already wrote in this transaction (SQLite overwrites
        // such frames in place and rewrites the checksums after the commit frame).
        w.execute_batch("PRAGMA cache_size = 4")
            .expect("small cache");
        w.execute_batch("BEGIN IMMEDIATE").expect("begin");
        insert(&w, 0, 3_000);
        w.execute_batch("UPDATE t SET v = zeroblob(310) WHERE k % 7 = 0")
            .expect("update");
        w.execute_batch("COMMIT").expect("commit");
        let copy = crash_copy(&path, &dir.path().join("copy.db"));
        assert_eq!(keys(&copy), (3_000, sum(0, 3_000)));
        let longer: i64 = copy
            .query_row("SELECT count(*) FROM t WHERE length(v) = 310", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(longer, (0..3_000).filter(|k| k % 7 == 0).count() as i64);
    }
}
