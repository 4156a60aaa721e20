//! A SQLite VFS shim, `meshchat-walbuf`, over the platform's default VFS: for the WAL file
//! only, it gathers a transaction's frame writes in memory and writes them with one system
//! call when the transaction's commit frame is complete.
//!
//! SQLite writes every WAL frame as two `pwrite`s (its 24-byte header, then the page), so a
//! batch of appends touching ~2.6 pages each cost ~5 system calls per append, the largest
//! share of the writer thread's CPU (docs/PERFORMANCE.md, issue 14). Gathered, a batch is one
//! `pwrite` per 64 KiB.
//!
//! Why it is safe:
//! - A transaction's frames become visible to other connections (and processes) only when
//!   SQLite updates the wal-index header in shared memory, which it does after the commit
//!   frame has been written. The gathered frames are written when the commit frame's page
//!   arrives, so before that update; a `COMMIT` that cannot write them fails as SQLite's own
//!   write would have.
//! - Anything that looks at the file (a read, a size, a sync, a truncate, a file control, a
//!   lock, a close) writes what is gathered first, so the shim's connection never sees the
//!   file differently from SQLite's model of it. Frames of a transaction rolled back before
//!   its commit are written too, as SQLite itself would have written them: past the WAL's
//!   valid end, they are never read.
//! - Nothing is durable before it was written: the syncer's `fdatasync` of the WAL happens
//!   after the `COMMIT` returned, so after the frames are in the file.
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
        if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
            // SQLite calls no method of a file whose pMethods is null.
            return rc;
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
        let contiguous = g.at + g.bytes.len() as i64 == offset;
        if !g.bytes.is_empty() && (!contiguous || g.bytes.len() + data.len() > MAX_GATHER) {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let (g, _, _) = parts(file);
        if g.bytes.is_empty() {
            g.at = offset;
        }
        g.bytes.extend_from_slice(data);
        let completes_commit = g.commit_header_seen;
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
        let flushed = flush(file);
        let wal = file as *mut WalFile;
        let real = (*wal).real;
        let closed = match (*(*real).pMethods).xClose {
            Some(close) => close(real),
            None => ffi::SQLITE_OK,
        };
        drop(Box::from_raw((*wal).gather));
        (*wal).gather = ptr::null_mut();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
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
after_flush!(x_lock, xLock, (level: c_int), ffi::SQLITE_IOERR_LOCK);
after_flush!(x_unlock, xUnlock, (level: c_int), ffi::SQLITE_IOERR_UNLOCK);
after_flush!(x_check_reserved_lock, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_IOERR_CHECKRESERVEDLOCK);
after_flush!(x_file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
after_flush!(x_shm_map, xShmMap, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void), ffi::SQLITE_IOERR_SHMMAP);
after_flush!(x_shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR_SHMLOCK);
after_flush!(x_shm_unmap, xShmUnmap, (delete: c_int), ffi::SQLITE_OK);
after_flush!(x_fetch, xFetch, (offset: ffi::sqlite3_int64, amount: c_int, out: *mut *mut c_void), {
    // No memory map: SQLite reads instead.
    *out = ptr::null_mut();
    ffi::SQLITE_OK
});
after_flush!(x_unfetch, xUnfetch, (offset: ffi::sqlite3_int64, page: *mut c_void), ffi::SQLITE_OK);

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
        let _ = flush(file);
        let (_, real, m) = parts(file);
        if let Some(f) = m.xShmBarrier {
            f(real);
        }
    }
}
