//! The embedded backend: SQLite in WAL mode, on disk, shared by every node process on the
//! machine.
//!
//! ## Why SQLite
//!
//! The dev cluster and the fault tests run nodes as separate processes over one data
//! directory and SIGKILL them; history must survive and stay readable by the others, as it
//! does with Cassandra. SQLite in WAL mode is the one well-proven embedded engine that several
//! processes can open at once (readers never block the writer; writers take turns through a
//! file lock) and it is crash-safe by design. fjall and redb take an exclusive lock on their
//! files, so a second node process could not open the store. See `docs/STORAGE.md` for the
//! measurements.
//!
//! ## Group commit
//!
//! All writes of a process go through one bounded queue to one writer thread. The thread takes
//! every job waiting (up to `max_batch`), runs them in one transaction (without savepoints
//! unless a job fails half done: `writer::run_batch`), commits, fsyncs the WAL once for the
//! whole batch, and only then answers each job. So a write returns only after it is durable,
//! and N concurrent writers share one sync.
//!
//! A full queue makes the caller wait up to `enqueue_timeout`, then fail with
//! `StorageError::Overloaded`: memory never grows with load. A job that waited longer than
//! `max_queue_delay` before the writer reached it is refused the same way, not applied.
//!
//! The writer commits without an fsync and a syncer thread fsyncs the WAL before any job of
//! the batch is answered, so the next batch runs while the last one syncs (`writer`).
//! Writers of several processes take turns through a blocking file lock (`lock`), not
//! SQLite's sleeping busy handler.
//!
//! A checkpointer thread copies committed WAL frames back into the database (PASSIVE, every
//! 200 ms), so checkpoints do not run inside the writer's commits, and makes the WAL start
//! over once it passes 16 MiB.
//!
//! Reads run on a small pool of read-only connections via `spawn_blocking`; WAL readers see
//! every committed write and never block the writer.

mod lock;
mod pcache;
mod schema;
mod sql;
mod walbuf;
mod writer;

pub use lock::CrossProcess;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How long a read waits for a free reader connection before it is refused `Overloaded`.
pub const READ_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
use tracing::{debug, error, info, warn};

use crate::error::StorageError;
use crate::model::{
    AppendOutcome, Channel, ChatSummary, Marks, NewMessage, PageQuery, ReceiptKind, StoredMessage,
    User, UserCredentials,
};
use crate::traits::{HistoryStore, StateStore};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "meshchat.db";

/// How durable a commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The WAL is fsynced (by the syncer thread) before any write of a batch is answered.
    /// Survives process crash and power loss: acked means durable. The default. (A commit is
    /// visible to readers a moment before its sync: docs/STORAGE.md.)
    Full,
    /// No fsync per batch: survives a process crash, may lose the last commits on power loss.
    /// For benchmarks and throwaway dev clusters only.
    Normal,
}

/// Settings of the embedded store. Defaults are sized for one node process.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Database file.
    pub path: PathBuf,
    /// Most jobs committed in one transaction (default 512). Bigger batches amortise the
    /// fsync further but make the first job of the batch wait longer.
    pub max_batch: usize,
    /// Jobs that may wait for the writer (default 16,384). The bound on queued write memory.
    pub queue_capacity: usize,
    /// How long a write waits for room in a full queue before `Overloaded` (default 2 s).
    pub enqueue_timeout: Duration,
    /// Longest a write may wait, from the call to the writer picking it up; an older one is
    /// refused with `Overloaded` instead of applied (default 5 s). So a message id (issued
    /// just before the append) is never committed more than ~5 s after it was issued: the
    /// bound clients' gap fill relies on (it re-reads 10 s before the newest id it has). It
    /// also sheds work whose caller has likely given up, so an overloaded node catches up
    /// instead of committing stale requests.
    pub max_queue_delay: Duration,
    /// Read connections (default 4).
    pub readers: usize,
    /// How long SQLite waits for a lock held outside the writer lock (another tool's
    /// transaction; every writer of the store with [`CrossProcess::SqliteBusy`]) (default
    /// 10 s). Also part of the bound on a caller's wait: `max_queue_delay + busy_timeout`.
    pub busy_timeout: Duration,
    /// Commit durability (default [`Durability::Full`]).
    pub durability: Durability,
    /// How writers of different processes share the store (default
    /// [`CrossProcess::TurnLock`]).
    pub cross_process: CrossProcess,
    /// The writer's WAL frames are gathered in memory and written with one system call per
    /// transaction instead of two per page (the `walbuf` VFS shim; default true).
    pub gather_wal_writes: bool,
}

impl EmbeddedConfig {
    /// Defaults for a store in `dir` (file [`DB_FILE`]).
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        Self {
            path: dir.as_ref().join(DB_FILE),
            max_batch: 512,
            queue_capacity: 16_384,
            enqueue_timeout: Duration::from_secs(2),
            max_queue_delay: Duration::from_secs(5),
            readers: 4,
            busy_timeout: Duration::from_secs(10),
            durability: Durability::Full,
            cross_process: CrossProcess::TurnLock,
            gather_wal_writes: true,
        }
    }
}

use writer::Job;

/// The embedded SQLite store. Cheap to share behind an `Arc`; dropping the last handle lets the
/// writer drain its queue and stop.
pub struct EmbeddedStore {
    jobs: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    config: EmbeddedConfig,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping the sender stops the checkpointer thread.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.config.path)
            .finish()
    }
}

struct ReaderPool {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// Statements each connection keeps prepared (rusqlite's default of 16 is fewer than the
/// writer's distinct statements, so they were evicted and prepared again).
const STATEMENT_CACHE: usize = 128;

fn open_connection(
    path: &Path,
    flags: OpenFlags,
    busy: Duration,
) -> Result<Connection, StorageError> {
    let conn = Connection::open_with_flags(path, flags).map_err(StorageError::backend)?;
    tune(conn, busy)
}

fn tune(conn: Connection, busy: Duration) -> Result<Connection, StorageError> {
    conn.busy_timeout(busy).map_err(StorageError::backend)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Query planner stability: a cached statement keeps its plan whatever is bound to it.
    // Without it, a statement whose planning looked at a bound value (any `LIMIT ?N`; a
    // `chat = ?1` in a query with an ORDER BY, through the planner's small-integer estimate)
    // is expired by `sqlite3_clear_bindings`, which rusqlite calls when the statement goes
    // back to its cache, and so is parsed and planned again at every use: a per-append
    // `WHERE chat = ?1 ... ORDER BY` read spent a quarter of the writer in `sqlite3Reprepare`,
    // and the readers' paged queries paid the same. The store keeps no statistics for a value
    // to choose among plans anyway.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(StorageError::backend)?;
    Ok(conn)
}

/// How often the checkpointer copies committed WAL frames back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// How often it looks while the WAL is past half of [`RESTART_AFTER_FRAMES`]: under heavy
/// load the WAL grows by megabytes in 200 ms.
const CHECKPOINT_BUSY_EVERY: Duration = Duration::from_millis(10);

/// WAL frames (pages) past which the checkpointer makes the WAL start over: 16 MiB of 4 KiB
/// pages. The bound on the WAL under continuous load.
const RESTART_AFTER_FRAMES: i64 = 4096;

/// Frames few enough to checkpoint (and sync) while holding the writer lock.
const SMALL_REMAINDER: i64 = 256;

/// Runs a PASSIVE checkpoint; returns (frames in the WAL, frames checkpointed), or `None` if
/// another connection's checkpoint was running (SQLite's busy flag).
fn checkpoint(conn: &Connection) -> rusqlite::Result<Option<(i64, i64)>> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let busy: i64 = r.get(0)?;
        Ok((busy == 0).then_some((r.get(1)?, r.get(2)?)))
    })
}

/// Starts the checkpointer: a thread with its own connection that runs a PASSIVE checkpoint
/// every [`CHECKPOINT_EVERY`]. A PASSIVE checkpoint never blocks the writer (it copies what
/// no reader still needs and leaves the rest for the next round), so commits do not stall
/// while a checkpoint copies thousands of pages inside a commit.
///
/// Under continuous commits a PASSIVE checkpoint never catches up with the last frame, and
/// SQLite restarts the WAL from its beginning only when a write transaction starts on a fully
/// checkpointed WAL; so the WAL grew without end and the writer's own automatic checkpoints
/// came back (p99 spikes every ~3 s at 100k connections, docs/PERFORMANCE.md). So once the WAL
/// holds [`RESTART_AFTER_FRAMES`], the checkpointer syncs the database and passes again
/// (outside the lock) until a pass finds little new, then takes the writer lock and
/// checkpoints the few frames committed meanwhile: the next write (of any process) then
/// restarts the WAL. Writers wait only for that small remainder (1-4 ms measured under load).
fn start_checkpointer(
    config: &EmbeddedConfig,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), StorageError> {
    let conn = open_connection(
        &config.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        config.busy_timeout,
    )?;
    // NORMAL: a checkpoint syncs the WAL before it copies and the database after.
    conn.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(StorageError::backend)?;
    let lock = lock::WriterLock::for_scheme(&config.path, config.cross_process)
        .map_err(StorageError::backend)?;
    // To sync the database file between passes (see below).
    let db_file = std::fs::File::open(&config.path).map_err(StorageError::backend)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("mc-store-ckpt".into())
        .spawn(move || {
            let mut pause = CHECKPOINT_EVERY;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(pause)
            {
                // Busy (another process's checkpointer runs) is fine: try again next round.
                let (frames, mut copied) = match checkpoint(&conn) {
                    Ok(Some(counts)) => counts,
                    Ok(None) => continue,
                    Err(e) => {
                        debug!(error = %e, "checkpoint skipped");
                        continue;
                    }
                };
                pause = if frames >= RESTART_AFTER_FRAMES / 2 {
                    CHECKPOINT_BUSY_EVERY
                } else {
                    CHECKPOINT_EVERY
                };
                let Some(lock) = lock.as_ref().filter(|_| frames >= RESTART_AFTER_FRAMES) else {
                    continue;
                };
                // SQLite syncs the database only after a pass that reached the WAL's end, so
                // under continuous writes the pass under the lock would sync every page the
                // earlier passes copied (measured: writers held 1 ms, growing to 45 ms within
                // 40 s). So sync outside the lock, and pass again until a pass finds little
                // new: the pass under the lock then copies and syncs only that little.
                let mut caught_up = false;
                for _ in 0..4 {
                    if let Err(e) = db_file.sync_data() {
                        warn!(error = %e, "checkpointer could not sync the database");
                        break;
                    }
                    let Ok(Some((_, now))) = checkpoint(&conn) else {
                        break;
                    };
                    let fresh = now - copied;
                    copied = now;
                    if (0..SMALL_REMAINDER).contains(&fresh) {
                        caught_up = true;
                        break;
                    }
                }
                // Not caught up (a reader pins an old snapshot, the disk is slow): no lock this
                // round, and the next one after the long pause.
                if !caught_up || db_file.sync_data().is_err() {
                    pause = CHECKPOINT_EVERY;
                    continue;
                }
                let started = Instant::now();
                if let Err(e) = lock.acquire() {
                    warn!(error = %e, "checkpointer could not take the writer lock");
                    continue;
                }
                let waited = started.elapsed();
                let last = checkpoint(&conn);
                let held = started.elapsed();
                if let Err(e) = lock.release() {
                    warn!(error = %e, "checkpointer could not release the writer lock");
                }
                if !matches!(last, Ok(Some((n, done))) if n == done) {
                    pause = CHECKPOINT_EVERY;
                }
                debug!(
                    frames,
                    last = ?last,
                    waited_us = waited.as_micros() as u64,
                    held_us = held.saturating_sub(waited).as_micros() as u64,
                    "WAL checkpointed to its end; the next write restarts it"
                );
            }
        })
        .map_err(StorageError::backend)?;
    Ok((stop, handle))
}

/// The WAL file of the database at `db` (`<db>-wal`), opened to sync it.
fn open_wal(db: &Path) -> Result<std::fs::File, StorageError> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::File::open(std::path::PathBuf::from(wal)).map_err(StorageError::backend)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `config.path` and starts its writer thread.
    pub fn open(config: EmbeddedConfig) -> Result<Self, StorageError> {
        if let Some(dir) = config.path.parent() {
            std::fs::create_dir_all(dir).map_err(StorageError::backend)?;
        }
        // Before anything starts SQLite (a VFS lookup does): it can only be set up before.
        if !pcache::install() {
            debug!("SQLite was started before the store: its page cache stays as it is");
        }
        let writer_flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut writer_conn = if config.gather_wal_writes {
            walbuf::register().map_err(StorageError::backend)?;
            let conn =
                Connection::open_with_flags_and_vfs(&config.path, writer_flags, walbuf::NAME)
                    .map_err(StorageError::backend)?;
            tune(conn, config.busy_timeout)?
        } else {
            open_connection(&config.path, writer_flags, config.busy_timeout)?
        };
        if config.cross_process == CrossProcess::BusyPoll {
            writer_conn
                .busy_handler(Some(lock::poll_busy))
                .map_err(StorageError::backend)?;
        }
        let writer_lock = lock::WriterLock::for_scheme(&config.path, config.cross_process)
            .map_err(StorageError::backend)?;
        // Several processes may open a fresh store at once: switching to WAL and creating the
        // schema can then meet SQLITE_BUSY without SQLite's busy handler being consulted.
        // Retry until the busy timeout, as the handler would.
        let started = Instant::now();
        loop {
            if let Some(lock) = &writer_lock {
                lock.acquire().map_err(StorageError::backend)?;
            }
            walbuf::discard(&writer_conn);
            let prepared = schema::prepare(&writer_conn);
            if let Some(lock) = &writer_lock {
                lock.release().map_err(StorageError::backend)?;
            }
            match prepared {
                Ok(()) => break,
                Err(e) if schema::is_busy(&e) && started.elapsed() < config.busy_timeout => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    // Its close must not write what a failed transaction gathered.
                    walbuf::discard(&writer_conn);
                    return Err(e);
                }
            }
        }
        // The writer commits with synchronous=NORMAL; with Full durability the syncer thread
        // fsyncs the WAL before any write of a batch is answered (see `writer`).
        let wal = match config.durability {
            Durability::Full => Some(open_wal(&config.path)?),
            Durability::Normal => None,
        };
        let (jobs, rx) = mpsc::channel::<Job>(config.queue_capacity.max(1));
        let max_batch = config.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("mc-store-writer".into())
            .spawn(move || writer::writer_loop(writer_conn, writer_lock, wal, rx, max_batch))
            .map_err(StorageError::backend)?;
        let checkpointer = start_checkpointer(&config)?;
        // Readers are opened (and the schema parsed) now, not by the first requests.
        let mut idle = Vec::with_capacity(config.readers.max(1));
        for _ in 0..config.readers.max(1) {
            let reader = open_connection(
                &config.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                config.busy_timeout,
            )?;
            reader
                .query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
                .map_err(StorageError::backend)?;
            idle.push(reader);
        }
        info!(path = %config.path.display(), "embedded store open");
        Ok(Self {
            jobs,
            readers: Arc::new(ReaderPool {
                path: config.path.clone(),
                busy_timeout: config.busy_timeout,
                idle: Mutex::new(idle),
                permits: Arc::new(Semaphore::new(config.readers.max(1))),
            }),
            config,
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Opens the store in `dir` with default settings.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open(EmbeddedConfig::in_dir(dir))
    }

    /// The settings this store was opened with.
    pub fn config(&self) -> &EmbeddedConfig {
        &self.config
    }

    /// Writes queued for the writer thread now.
    pub fn queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Stops accepting writes, waits for every queued write to commit, and stops the writer.
    pub async fn close(self) {
        let Self {
            jobs,
            writer,
            checkpointer,
            ..
        } = self;
        drop(jobs);
        let checkpointer = checkpointer.lock().take();
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let handle = writer.lock().take();
        if let Some(handle) = handle {
            let joined = tokio::task::spawn_blocking(move || handle.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                error!("embedded store writer thread panicked");
            }
        }
    }

    /// Runs `f` inside the next group-commit batch; answers after the batch is durable. `f`
    /// may run twice (see `writer::run_batch`): only its last run's changes are kept.
    async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        let job = writer::Write::job(f, started, self.config.max_queue_delay, tx);
        match self
            .jobs
            .send_timeout(job, self.config.enqueue_timeout)
            .await
        {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                return Err(StorageError::Overloaded {
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(StorageError::Closed),
        }
        // Every job is answered; a dropped answer means the writer thread died. Bounded: a
        // process stopped while holding the writer lock (SIGSTOP) would otherwise hold this
        // caller forever; the job itself is refused unrun once it is older than
        // `max_queue_delay` when the writer reaches it.
        let bound = self.config.max_queue_delay + self.config.busy_timeout;
        match tokio::time::timeout(bound, rx).await {
            Ok(answer) => answer
                .map_err(|_| StorageError::backend(std::io::Error::other("write batch aborted")))?,
            Err(_) => Err(StorageError::Overloaded {
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Runs `f` on a read connection on the blocking pool, waiting at most
    /// [`READ_QUEUE_WAIT`] for a free reader.
    async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let pool = self.readers.clone();
        // The permit moves into the blocking closure: if the caller is cancelled, the read
        // still holds its slot until it finishes, so the pool bound holds.
        // Bounded: when every reader is busy for this long (one user's heavy reads, a slow
        // disk), the caller hears OVERLOADED instead of queueing without end.
        let permit =
            match tokio::time::timeout(READ_QUEUE_WAIT, pool.permits.clone().acquire_owned()).await
            {
                Ok(p) => p.map_err(|_| StorageError::Closed)?,
                Err(_) => {
                    return Err(StorageError::Overloaded {
                        waited_ms: READ_QUEUE_WAIT.as_millis() as u64,
                    });
                }
            };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match pool.idle.lock().pop() {
                Some(c) => c,
                None => open_connection(
                    &pool.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    pool.busy_timeout,
                )?,
            };
            let out = f(&conn);
            pool.idle.lock().push(conn);
            out
        })
        .await
        .map_err(StorageError::backend)?
    }
}

#[async_trait]
impl HistoryStore for EmbeddedStore {
    async fn append(&self, msg: NewMessage) -> Result<AppendOutcome, StorageError> {
        self.write(move |c| sql::append(c, &msg)).await
    }

    async fn message(
        &self,
        chat: ChatId,
        id: MessageId,
    ) -> Result<Option<StoredMessage>, StorageError> {
        self.read(move |c| sql::message(c, chat, id)).await
    }

    async fn page(
        &self,
        chat: ChatId,
        query: PageQuery,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.read(move |c| sql::page(c, chat, query)).await
    }

    async fn react(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
        emoji: &str,
    ) -> Result<(), StorageError> {
        let emoji = emoji.to_owned();
        self.write(move |c| sql::react(c, chat, id, user, &emoji))
            .await
    }

    async fn unreact(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
    ) -> Result<bool, StorageError> {
        self.write(move |c| sql::unreact(c, chat, id, user)).await
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn create_user(
        &self,
        id: UserId,
        name: &str,
        password_hash: &str,
    ) -> Result<User, StorageError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        self.write(move |c| sql::create_user(c, id, &name, &hash))
            .await
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<UserCredentials>, StorageError> {
        let name = name.to_owned();
        self.read(move |c| sql::user_by_name(c, &name)).await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StorageError> {
        self.read(move |c| sql::user_by_id(c, id)).await
    }

    async fn is_member(&self, user: UserId, chat: ChatId) -> Result<bool, StorageError> {
        self.read(move |c| sql::is_member(c, user, chat)).await
    }

    async fn mark(
        &self,
        user: UserId,
        chat: ChatId,
        kind: ReceiptKind,
        upto: MessageId,
    ) -> Result<Marks, StorageError> {
        self.write(move |c| sql::mark(c, user, chat, kind, upto))
            .await
    }

    async fn chat_list(&self, user: UserId, limit: u32) -> Result<Vec<ChatSummary>, StorageError> {
        self.read(move |c| sql::chat_list(c, user, limit)).await
    }

    async fn set_password_hash(
        &self,
        user: UserId,
        _name: &str,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StorageError> {
        let (old, new) = (old_hash.to_owned(), new_hash.to_owned());
        self.write(move |c| sql::set_password_hash(c, user, &old, &new))
            .await
    }

    async fn signed_out_before(&self, user: UserId) -> Result<u64, StorageError> {
        self.read(move |c| sql::signed_out_before(c, user)).await
    }

    async fn sign_out_before(&self, user: UserId, at: u64) -> Result<(), StorageError> {
        self.write(move |c| sql::sign_out_before(c, user, at)).await
    }

    async fn create_channel_with(
        &self,
        id: ChannelId,
        name: &str,
        owner: UserId,
        private: bool,
    ) -> Result<Channel, StorageError> {
        let name = name.to_owned();
        self.write(move |c| sql::create_channel(c, id, &name, owner, private))
            .await
    }

    async fn is_channel_admin(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        self.read(move |c| sql::is_channel_admin(c, id, user)).await
    }

    async fn set_channel_admin(
        &self,
        id: ChannelId,
        user: UserId,
        admin: bool,
    ) -> Result<bool, StorageError> {
        self.write(move |c| sql::set_channel_admin(c, id, user, admin))
            .await
    }

    async fn channel(&self, id: ChannelId) -> Result<Option<Channel>, StorageError> {
        self.read(move |c| sql::channel(c, id)).await
    }

    async fn channel_by_name(&self, name: &str) -> Result<Option<Channel>, StorageError> {
        let name = name.to_owned();
        self.read(move |c| sql::channel_by_name(c, &name)).await
    }

    async fn join_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        self.write(move |c| sql::join_channel(c, id, user)).await
    }

    async fn leave_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        self.write(move |c| sql::leave_channel(c, id, user)).await
    }

    async fn channel_members(&self, id: ChannelId) -> Result<Vec<UserId>, StorageError> {
        self.read(move |c| sql::channel_members(c, id)).await
    }

    async fn channels_of(&self, user: UserId) -> Result<Vec<Channel>, StorageError> {
        self.read(move |c| sql::channels_of(c, user)).await
    }

    async fn channel_members_page(
        &self,
        id: ChannelId,
        after: UserId,
        limit: u32,
    ) -> Result<Vec<UserId>, StorageError> {
        self.read(move |c| sql::channel_members_page(c, id, after, limit))
            .await
    }

    async fn channels_of_page(
        &self,
        user: UserId,
        after: ChannelId,
        limit: u32,
    ) -> Result<Vec<Channel>, StorageError> {
        self.read(move |c| sql::channels_of_page(c, user, after, limit))
            .await
    }

    async fn direct_peers(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
        self.read(move |c| sql::direct_peers(c, user)).await
    }
}
