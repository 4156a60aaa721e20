//! The write path: one writer thread per process runs group-commit batches, and one syncer
//! thread makes them durable, so the next batch executes while the last one is being synced.
//!
//! ```text
//!  callers --(bounded queue)--> writer: [turn lock] BEGIN, job, job, ... COMMIT [release]
//!                                  |  committed batches (bounded)
//!                                  v
//!                               syncer: fdatasync(WAL) once for every batch waiting, then
//!                                       answers each job of those batches
//! ```
//!
//! The writer's connection runs with `synchronous=NORMAL`: its COMMIT appends the batch to the
//! WAL and returns without an fsync. With [`Durability::Full`](super::Durability::Full) the
//! syncer then calls `fdatasync` on the WAL file before any job of the batch is answered, so a
//! write still returns only once it is durable (what `synchronous=FULL` gave, one fsync per
//! batch), but the fsync no longer stalls the writer: the next batch runs meanwhile, and one
//! fsync covers every batch committed while the previous one ran. Checkpoints still sync the
//! WAL before they copy it and the database after (SQLite does so in NORMAL mode), so a WAL
//! restart never overwrites frames that are not yet durable in the database file.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::lock::WriterLock;
use crate::error::StorageError;

/// Committed batches that may wait for the syncer before the writer waits for it.
const SYNC_QUEUE: usize = 64;

/// A batch whose transaction ended: its jobs (holding their results), and how the commit went.
struct Committed {
    jobs: Vec<Job>,
    commit: Result<(), StorageError>,
}

/// How a job's run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ran {
    /// It succeeded; its changes are part of the batch.
    Done,
    /// It failed without changing anything (a refusal such as an unknown id, or a statement
    /// that failed as a whole): the rest of the batch goes on.
    Refused,
    /// It failed after changing something: the batch must be rolled back and run again with
    /// a savepoint around each job.
    Partial,
}

/// One queued write.
pub(super) trait WriteJob: Send {
    /// Runs the write on the batch's connection (it may be run again after a rollback).
    fn run(&mut self, conn: &Connection) -> Ran;
    /// Answers the caller, once the batch's commit (and sync) outcome is known.
    fn finish(self: Box<Self>, commit: Result<(), StorageError>);
}

pub(super) type Job = Box<dyn WriteJob>;

/// A write of `T`: the statement function, its last result, and its caller's answer slot.
pub(super) struct Write<T, F> {
    f: F,
    started: Instant,
    max_wait: Duration,
    /// Set at the first run if the job waited longer than `max_wait` for the writer: it is
    /// refused, never run (also not on a rerun).
    expired_after: Option<Duration>,
    ran: bool,
    result: Option<Result<T, StorageError>>,
    answer: oneshot::Sender<Result<T, StorageError>>,
}

impl<T, F> Write<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> Result<T, StorageError> + Send + 'static,
{
    /// A job for `f`, queued at `started`; refused if the writer reaches it after `max_wait`.
    pub(super) fn job(
        f: F,
        started: Instant,
        max_wait: Duration,
        answer: oneshot::Sender<Result<T, StorageError>>,
    ) -> Job {
        Box::new(Self {
            f,
            started,
            max_wait,
            expired_after: None,
            ran: false,
            result: None,
            answer,
        })
    }
}

impl<T, F> WriteJob for Write<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> Result<T, StorageError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> Ran {
        if !self.ran {
            self.ran = true;
            let waited = self.started.elapsed();
            if waited > self.max_wait {
                self.expired_after = Some(waited);
            }
        }
        if let Some(waited) = self.expired_after {
            self.result = Some(Err(StorageError::Overloaded {
                waited_ms: waited.as_millis() as u64,
            }));
            return Ran::Refused;
        }
        let before = conn.total_changes();
        let result = (self.f)(conn);
        let ran = match &result {
            Ok(_) => Ran::Done,
            // Rows changed before the error: they must not be committed.
            Err(_) if conn.total_changes() != before => Ran::Partial,
            // A failed engine call may have left the statement's own work half done.
            Err(StorageError::Backend(_)) => Ran::Partial,
            Err(_) => Ran::Refused,
        };
        self.result = Some(result);
        ran
    }

    fn finish(self: Box<Self>, commit: Result<(), StorageError>) {
        let result = self.result.unwrap_or_else(|| {
            Err(StorageError::backend(std::io::Error::other(
                "the write's batch could not run",
            )))
        });
        // The caller may have gone away; its write is durable all the same.
        let _ = self.answer.send(commit.and(result));
    }
}

/// Runs until the job queue closes; then lets the syncer answer the last batches and stops.
// Takes the connection and lock by value: the writer thread owns them until the queue closes.
#[allow(clippy::needless_pass_by_value)]
pub(super) fn writer_loop(
    conn: Connection,
    lock: Option<WriterLock>,
    wal: Option<File>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
) {
    let (to_syncer, committed) = std_mpsc::sync_channel::<Committed>(SYNC_QUEUE);
    let poisoned = Arc::new(AtomicBool::new(false));
    let syncer_poisoned = poisoned.clone();
    let syncer = std::thread::Builder::new()
        .name("mc-store-syncer".into())
        .spawn(move || syncer_loop(wal, committed, &syncer_poisoned));
    let syncer = match syncer {
        Ok(handle) => handle,
        Err(e) => {
            // Without a syncer nothing could be answered: fail every write instead.
            warn!(error = %e, "could not start the store's syncer thread");
            while let Some(job) = rx.blocking_recv() {
                drop(job);
            }
            return;
        }
    };
    while let Some(first) = rx.blocking_recv() {
        let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
        jobs.push(first);
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let size = jobs.len();
        let started = Instant::now();
        if poisoned.load(Ordering::SeqCst) {
            // A WAL sync failed: nothing is run or answered Ok until the store is reopened.
            let commit = Err(sync_failed());
            if to_syncer.send(Committed { jobs, commit }).is_err() {
                break;
            }
            continue;
        }
        let unsent = match lock.as_ref().map(WriterLock::acquire).transpose() {
            Ok(waited) => {
                let commit = run_batch(&conn, &mut jobs);
                log_batch(size, started, &commit);
                if let Some(waited) = waited.filter(|w| !w.is_zero()) {
                    debug!(
                        waited_us = waited.as_micros() as u64,
                        "waited for another writer"
                    );
                }
                // To the syncer before the release, which may wait for another process's
                // turn: this batch's fsync need not wait for that.
                let sent = to_syncer.try_send(Committed { jobs, commit });
                if let Some(Err(e)) = lock.as_ref().map(WriterLock::release) {
                    warn!(error = %e, "could not release the store's writer lock");
                }
                match sent {
                    Ok(()) => None,
                    Err(std_mpsc::TrySendError::Full(c)) => Some(c),
                    Err(std_mpsc::TrySendError::Disconnected(_)) => break,
                }
            }
            Err(e) => {
                let commit = Err(StorageError::backend(e));
                log_batch(size, started, &commit);
                Some(Committed { jobs, commit })
            }
        };
        if let Some(c) = unsent
            && to_syncer.send(c).is_err()
        {
            break;
        }
    }
    // Before the connection closes: SQLite's checkpoint at close syncs the WAL, which would
    // write what a failed last batch left gathered.
    super::walbuf::discard(&conn);
    drop(to_syncer);
    if syncer.join().is_err() {
        warn!("the store's syncer thread panicked");
    }
    debug!("embedded store writer drained and stopped");
}

fn log_batch(size: usize, started: Instant, commit: &Result<(), StorageError>) {
    if let Err(e) = commit {
        warn!(error = %e, size, "group commit failed; every job in the batch gets the error");
    }
    debug!(
        size,
        micros = started.elapsed().as_micros() as u64,
        "group commit"
    );
}

/// The error of every write once a WAL sync has failed.
fn sync_failed() -> StorageError {
    StorageError::backend(std::io::Error::other(
        "an earlier WAL sync failed; writes are refused until the store is reopened",
    ))
}

/// Makes committed batches durable and answers their jobs. One `fdatasync` covers every batch
/// waiting when it starts.
///
/// A failed sync is sticky (`poisoned`): on Linux a failed fsync marks the pages clean and
/// reports the error once, so a later sync that succeeds proves nothing about them. Every
/// batch after it is answered with an error until the store is reopened.
// Owns the WAL handle and the receiver for the thread's life.
#[allow(clippy::needless_pass_by_value)]
fn syncer_loop(wal: Option<File>, committed: std_mpsc::Receiver<Committed>, poisoned: &AtomicBool) {
    let mut ready: Vec<Committed> = Vec::new();
    while let Ok(first) = committed.recv() {
        ready.push(first);
        while let Ok(more) = committed.try_recv() {
            ready.push(more);
        }
        let any_committed = ready.iter().any(|c| c.commit.is_ok());
        let synced = match &wal {
            _ if poisoned.load(Ordering::SeqCst) => Err(sync_failed()),
            Some(wal) if any_committed => {
                let started = Instant::now();
                let synced = wal.sync_data().map_err(StorageError::backend);
                debug!(
                    batches = ready.len(),
                    micros = started.elapsed().as_micros() as u64,
                    "wal synced"
                );
                synced
            }
            _ => Ok(()),
        };
        if let Err(e) = &synced
            && !poisoned.swap(true, Ordering::SeqCst)
        {
            error!(error = %e, "WAL sync failed; every write is refused until the store is reopened");
        }
        for Committed { jobs, commit } in ready.drain(..) {
            let outcome = commit.and_then(|()| synced.clone());
            for job in jobs {
                job.finish(outcome.clone());
            }
        }
    }
}

/// Runs a cached statement that returns no rows.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs `batch` in one transaction and commits it (without syncing).
///
/// Optimistically first: every job straight into the transaction, no savepoints (a savepoint
/// copies each page a job touches into the statement journal: 15% of the writer's time).
/// A job that is refused changed nothing, so the others go on. Only if a job fails after
/// changing rows ([`Ran::Partial`]) is the transaction rolled back and the whole batch run
/// again with a savepoint around each job, so that job alone is undone.
fn run_batch(conn: &Connection, batch: &mut [Job]) -> Result<(), StorageError> {
    if !conn.is_autocommit() {
        // A transaction left open by a failed ROLLBACK would hold SQLite's write lock.
        rollback(conn);
    }
    begin(conn)?;
    // A job whose error made SQLite roll the transaction back counts as half done too: the
    // jobs after it must not run outside a transaction.
    if batch
        .iter_mut()
        .all(|job| job.run(conn) != Ran::Partial && !conn.is_autocommit())
    {
        return commit(conn);
    }
    rollback(conn);
    debug!(
        size = batch.len(),
        "a write failed half done; running its batch again with savepoints"
    );
    begin(conn)?;
    for job in batch.iter_mut() {
        let step = exec(conn, "SAVEPOINT job").and_then(|()| {
            if job.run(conn) == Ran::Done {
                exec(conn, "RELEASE job")
            } else {
                exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
            }
        });
        if let Err(e) = step {
            // A savepoint statement failed: the transaction is unusable.
            rollback(conn);
            return Err(StorageError::backend(e));
        }
    }
    commit(conn)
}

/// Rolls the open transaction back; the WAL frames it gathered are dropped (`walbuf::discard`).
fn rollback(conn: &Connection) {
    let _ = exec(conn, "ROLLBACK");
    super::walbuf::discard(conn);
}

/// Starts the batch's write transaction; WAL frames a failed transaction left gathered are
/// dropped first (`walbuf::discard`: they must never be written once its lock is gone).
fn begin(conn: &Connection) -> Result<(), StorageError> {
    super::walbuf::discard(conn);
    exec(conn, "BEGIN IMMEDIATE").map_err(StorageError::backend)
}

fn commit(conn: &Connection) -> Result<(), StorageError> {
    exec(conn, "COMMIT").map_err(|e| {
        rollback(conn);
        StorageError::backend(e)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("sqlite");
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .expect("table");
        conn
    }

    type Answer = oneshot::Receiver<Result<i64, StorageError>>;

    #[derive(Clone, Copy, PartialEq)]
    enum Fails {
        Never,
        BeforeInsert,
        AfterInsert,
    }

    /// A job inserting `k`, refusing before its insert or failing after it as told.
    fn insert(k: i64, fails: Fails, runs: Arc<AtomicU32>) -> (Job, Answer) {
        let (tx, rx) = oneshot::channel();
        let job = Write::job(
            move |c: &Connection| {
                runs.fetch_add(1, Ordering::SeqCst);
                if fails == Fails::BeforeInsert {
                    return Err(StorageError::InvalidArgument("refused"));
                }
                c.execute("INSERT INTO t (k) VALUES (?1)", [k])
                    .map_err(StorageError::backend)?;
                if fails == Fails::AfterInsert {
                    return Err(StorageError::InvalidArgument("refused after a change"));
                }
                Ok(k)
            },
            Instant::now(),
            Duration::from_secs(60),
            tx,
        );
        (job, rx)
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT k FROM t ORDER BY k").expect("select");
        stmt.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    #[test]
    fn a_refused_job_leaves_the_rest_of_its_batch_in_one_pass() {
        let conn = db();
        let runs = Arc::new(AtomicU32::new(0));
        let (a, mut ra) = insert(1, Fails::Never, runs.clone());
        let (b, mut rb) = insert(2, Fails::BeforeInsert, runs.clone());
        let (c, mut rc) = insert(3, Fails::Never, runs.clone());
        let mut batch = vec![a, b, c];
        run_batch(&conn, &mut batch).expect("commit");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no job ran twice");
        for job in batch {
            job.finish(Ok(()));
        }
        assert_eq!(ra.try_recv().expect("answer").expect("ok"), 1);
        assert!(matches!(
            rb.try_recv().expect("answer"),
            Err(StorageError::InvalidArgument("refused"))
        ));
        assert_eq!(rc.try_recv().expect("answer").expect("ok"), 3);
        assert_eq!(rows(&conn), vec![1, 3]);
    }

    #[test]
    fn a_job_failing_half_done_is_undone_alone() {
        let conn = db();
        let runs = Arc::new(AtomicU32::new(0));
        let (a, mut ra) = insert(1, Fails::Never, runs.clone());
        let (b, mut rb) = insert(2, Fails::AfterInsert, runs.clone());
        let (c, mut rc) = insert(3, Fails::Never, runs.clone());
        let mut batch = vec![a, b, c];
        run_batch(&conn, &mut batch).expect("commit");
        // a and b ran, b failed half done, then all three ran again with savepoints.
        assert_eq!(runs.load(Ordering::SeqCst), 5);
        for job in batch {
            job.finish(Ok(()));
        }
        assert_eq!(ra.try_recv().expect("answer").expect("ok"), 1);
        assert!(matches!(
            rb.try_recv().expect("answer"),
            Err(StorageError::InvalidArgument("refused after a change"))
        ));
        assert_eq!(rc.try_recv().expect("answer").expect("ok"), 3);
        assert_eq!(
            rows(&conn),
            vec![1, 3],
            "b's row was rolled back, a's and c's kept"
        );
    }

    #[test]
    fn a_job_that_waited_too_long_is_refused_unrun() {
        let conn = db();
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, mut rx) = oneshot::channel();
        let counted = runs.clone();
        let job = Write::job(
            move |c: &Connection| {
                counted.fetch_add(1, Ordering::SeqCst);
                c.execute("INSERT INTO t (k) VALUES (9)", [])
                    .map_err(StorageError::backend)
            },
            Instant::now() - Duration::from_secs(1),
            Duration::ZERO,
            tx,
        );
        let mut batch = vec![job];
        run_batch(&conn, &mut batch).expect("commit");
        for job in batch {
            job.finish(Ok(()));
        }
        assert!(matches!(
            rx.try_recv().expect("answer"),
            Err(StorageError::Overloaded { .. })
        ));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert!(rows(&conn).is_empty());
    }
}
