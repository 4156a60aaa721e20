//! The cross-process writer lock: which process of the machine writes the store next.
//!
//! SQLite lets one connection write at a time and tells the others `SQLITE_BUSY`; its default
//! busy handler then sleeps 1, 2, 5, 10 ... up to 100 ms before it looks again. With several
//! node processes committing continuously that made a waiting process sleep through many of
//! the others' commits (3-node dev cluster at 3k msg/s: ack p99 852 ms, docs/PERFORMANCE.md).
//! So every writer of the store takes this lock around its transaction instead, and SQLite's
//! own lock is always free when it asks:
//!
//! - **No sleeps.** A waiter blocks in the kernel (`flock`) and is woken when the holder
//!   releases. A process that dies holding the lock (SIGKILL mid-batch) loses it with its file
//!   descriptors, at once.
//! - **Turns.** `flock` hands the lock to nobody in particular: the holder, straight back from
//!   its commit with its next batch ready, would win the race against a waiter still being
//!   woken, again and again. So a waiter announces itself first (a shared lock on a second
//!   file, the queue) and keeps the announcement until it holds the lock; a releasing process
//!   that finds announcements waits until every announced waiter has had its turn (up to
//!   20 ms: a stopped waiter cannot hold the others up). Best effort: a newcomer that finds
//!   the lock free takes it without queueing, and the checkpointer threads take turns too.
//! - **Not bounded by SQLite's busy timeout.** A process stopped while holding the lock
//!   (SIGSTOP, a debugger) holds up every writer of the machine until it resumes or dies; the
//!   store answers the waiting callers with an error after its queue limits (see `write`).
//!
//! Threads of one process take turns the same way: each holder has its own file descriptions.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How writers of different processes share the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossProcess {
    /// The writer lock of this module (the default): blocking waits, turns between processes.
    TurnLock,
    /// SQLite's own lock and its default busy handler (sleeps of 1 to 100 ms). The scheme
    /// before this module; kept to measure against.
    SqliteBusy,
    /// SQLite's own lock with a busy handler that looks again every ~50 µs. A measured
    /// candidate: no long sleeps, but polling and no turns.
    BusyPoll,
}

impl std::str::FromStr for CrossProcess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "turn-lock" => Ok(Self::TurnLock),
            "sqlite-busy" => Ok(Self::SqliteBusy),
            "busy-poll" => Ok(Self::BusyPoll),
            other => Err(format!(
                "unknown cross-process scheme {other:?} (turn-lock, sqlite-busy, busy-poll)"
            )),
        }
    }
}

/// SQLite busy handler of [`CrossProcess::BusyPoll`]: sleeps ~50 µs per call, gives up after
/// ~10 s (200,000 calls).
pub(super) fn poll_busy(calls: i32) -> bool {
    if calls >= 200_000 {
        return false;
    }
    std::thread::sleep(Duration::from_micros(50));
    true
}

/// One holder's handle on the writer lock (see the module docs). Not shared between threads:
/// each thread that writes opens its own.
#[derive(Debug)]
pub(super) struct WriterLock {
    lock: File,
    queue: File,
    turn_wait: Duration,
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// The lock files of the store at `db`: `<db>-writer` and `<db>-writer-queue`.
fn lock_paths(db: &Path) -> (PathBuf, PathBuf) {
    let mut lock = db.as_os_str().to_owned();
    lock.push("-writer");
    let mut queue = lock.clone();
    queue.push("-queue");
    (lock.into(), queue.into())
}

impl WriterLock {
    /// Opens (creating if needed) the lock files beside the database file `db`.
    pub(super) fn open(db: &Path) -> io::Result<Self> {
        let (lock, queue) = lock_paths(db);
        Ok(Self {
            lock: open_lock_file(&lock)?,
            queue: open_lock_file(&queue)?,
            turn_wait: TURN_WAIT,
        })
    }

    /// The writer lock of the store at `db` if `scheme` uses one.
    pub(super) fn for_scheme(db: &Path, scheme: CrossProcess) -> io::Result<Option<Self>> {
        match scheme {
            CrossProcess::TurnLock => Self::open(db).map(Some),
            CrossProcess::SqliteBusy | CrossProcess::BusyPoll => Ok(None),
        }
    }

    /// The same, with another bound on the turn wait of [`Self::release`] (tests).
    #[cfg(test)]
    fn with_turn_wait(mut self, turn_wait: Duration) -> Self {
        self.turn_wait = turn_wait;
        self
    }

    /// Takes the lock, blocking until it is free; returns how long it waited. On an error
    /// nothing is left held.
    pub(super) fn acquire(&self) -> io::Result<Duration> {
        match self.lock.try_lock() {
            Ok(()) => return Ok(Duration::ZERO),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let started = Instant::now();
        // Announce, wait, and withdraw the announcement once holding the lock.
        self.queue.lock_shared()?;
        if let Err(e) = self.lock.lock() {
            let _ = self.queue.unlock();
            return Err(e);
        }
        if let Err(e) = self.queue.unlock() {
            let _ = self.lock.unlock();
            return Err(e);
        }
        Ok(started.elapsed())
    }

    /// Releases the lock; if other holders announced themselves, waits (at most
    /// [`TURN_WAIT`]) until each of them has taken it, so this caller cannot take it straight
    /// back. Bounded, so a waiter that was stopped (SIGSTOP) cannot hold up every release.
    pub(super) fn release(&self) -> io::Result<()> {
        self.lock.unlock()?;
        let deadline = Instant::now() + self.turn_wait;
        loop {
            match self.queue.try_lock() {
                Ok(()) => return self.queue.unlock(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    // A woken waiter takes the lock within tens of microseconds.
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(TryLockError::WouldBlock) => return Ok(()),
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
    }
}

/// Longest a releasing holder waits for announced waiters to take their turn.
const TURN_WAIT: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn a_release_waits_until_an_announced_waiter_has_had_its_turn() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("x.db");
        // A turn wait far beyond any scheduling delay: the test is about the turn, not time.
        let holder = WriterLock::open(&db)
            .expect("open")
            .with_turn_wait(Duration::from_secs(60));
        holder.acquire().expect("acquire");
        let observer = WriterLock::open(&db).expect("open");
        let (db2, got) = (db.clone(), Arc::new(AtomicBool::new(false)));
        let got2 = got.clone();
        let waiter = std::thread::spawn(move || {
            let lock = WriterLock::open(&db2).expect("open");
            lock.acquire().expect("acquire");
            got2.store(true, Ordering::SeqCst);
            lock
        });
        // Wait (a condition, not a time) until the waiter has announced itself.
        while !matches!(observer.queue.try_lock(), Err(TryLockError::WouldBlock)) {
            observer.queue.unlock().expect("unlock");
            std::thread::yield_now();
        }
        // The holder, straight back for another turn, must not get it first: its release
        // returns only once the waiter holds the lock.
        holder.release().expect("release");
        assert!(
            matches!(observer.lock.try_lock(), Err(TryLockError::WouldBlock)),
            "the lock was free after the release: the waiter did not get its turn"
        );
        let lock = waiter.join().expect("waiter");
        assert!(got.load(Ordering::SeqCst));
        lock.release().expect("release");
        assert_eq!(holder.acquire().expect("acquire"), Duration::ZERO);
        holder.release().expect("release");
    }

    #[test]
    fn a_lock_dropped_with_its_holder_is_free_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("x.db");
        let first = WriterLock::open(&db).expect("open");
        first.acquire().expect("acquire");
        let second = WriterLock::open(&db).expect("open");
        assert!(matches!(
            second.lock.try_lock(),
            Err(TryLockError::WouldBlock)
        ));
        // Closing the holder's descriptors (as a killed process's are) frees the lock.
        drop(first);
        assert_eq!(second.acquire().expect("acquire"), Duration::ZERO);
        second.release().expect("release");
    }
}
