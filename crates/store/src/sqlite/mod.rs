//! The SQLite backend: the management plane's own state on a single machine (docs/architecture.md,
//! "Stores"; why SQLite rather than redb: docs/benchmarks.md, "Choosing the embedded store").
//!
//! # Durability and group commit
//!
//! The database runs in WAL mode with `synchronous=FULL`: a transaction is on disk (the WAL
//! fsynced) when `COMMIT` returns. Every write goes to one writer thread (`writer.rs`), which takes
//! the first queued write and everything queued behind it, applies them in one transaction (each
//! under its own savepoint, so one write's failed precondition does not undo the others), commits
//! once, and only then answers each writer. Concurrent writers therefore share one fsync, and no
//! write is acknowledged before it is durable. A `put_all` is one request whose writes share one
//! savepoint: they land together or not at all.
//!
//! # Layout
//!
//! ```text
//! objects      (namespace, name) → version, labels (JSON), annotations (JSON)
//! object_data  (namespace, name, key) → value (bytes)
//! counters     'version' → the last resource version handed out
//! ```
//!
//! Resource versions come from one counter for the whole database (like etcd's revision), so
//! they only grow, also across a delete and re-create. Nothing in the schema knows what an
//! object means: the management plane's tokens, cluster records, issued-serial logs, and any
//! record kind added later (a rotation journal, an audit log) are objects like any other.
//!
//! # Other processes
//!
//! SQLite serializes writers across processes with its own locks, so another process (a test, an
//! operator's tool) may open the same file through [`SqliteStore::open`] and read or write while
//! the management plane runs; a watch notices such writes within its poll interval. The file,
//! its `-wal` and `-shm` are created 0600 (they hold private keys), and deleted content is
//! overwritten (`secure_delete`).

mod writer;

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::dir::{io_err, run_blocking, versioned};
use crate::watch::{WatchedObject, watch_stream};
use crate::{
    ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned, WatchStream, Write, is_dns_label,
    is_valid_data_key,
};

/// How often a watch checks for writes made by other processes (writes through the same
/// [`SqliteStore`] are delivered at once). One indexed lookup per watcher per tick.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a connection waits for another process's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes queued for the writer thread before `put`/`delete` wait for room (back-pressure).
const QUEUE_CAPACITY: usize = 4096;
/// Read connections: reads beyond this many at once wait for one (opening a connection per read
/// would parse the schema and set the pragmas every time).
const READERS: usize = 16;
/// The schema this code reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// In-process change notifications buffered per watcher (see the directory store).
const CHANGE_CHANNEL_CAPACITY: usize = 256;

/// A [`Store`] in one SQLite database file; see the [module documentation](self).
///
/// Cloning is cheap; clones share the writer thread, the read connections and in-process watch
/// notifications. The writer thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    poll_interval: Duration,
}

/// Counts kept by the writer thread, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes the writer thread has taken off the queue.
    pub received: u64,
    /// Writes answered (applied, refused or failed).
    pub answered: u64,
    /// Transactions committed (or attempted): each is one fsync of the WAL.
    pub commits: u64,
}

struct Inner {
    path: PathBuf,
    writes: mpsc::Sender<writer::Request>,
    stats: Arc<writer::Counters>,
    readers: Mutex<Vec<Connection>>,
    /// One permit per read connection in use through [`SqliteStore::read`].
    reading: tokio::sync::Semaphore,
    changes: broadcast::Sender<ObjectKey>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread once it has answered what it holds; waiting
        // for it closes the database cleanly (the WAL checkpointed) before the process goes on.
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writes, tx));
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// Maps a SQLite error to a [`StoreError`] naming the database file.
pub(crate) fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| sqlite_error(path, disk_full(&e), e.to_string())
}

/// Whether SQLite failed because the disk (or the quota) is full.
pub(crate) fn disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// The store error for a SQLite failure: a full disk as the I/O error it is (callers tell "out
/// of space" from other failures by it), anything else as a backend error.
pub(crate) fn sqlite_error(path: &Path, full: bool, message: String) -> StoreError {
    if full {
        StoreError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, message),
        }
    } else {
        StoreError::Backend(format!("{}: {message}", path.display()))
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path`; a missing parent directory is created
    /// 0700. This does blocking I/O (and may wait for another process's lock): call it at
    /// start-up, not from inside a busy async task.
    pub fn open(path: impl Into<PathBuf>) -> Result<SqliteStore, StoreError> {
        let path = path.into();
        let who = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(io_err(&who, parent))?;
        }
        // Created here, 0600, rather than by SQLite with the umask's mode: SQLite gives the
        // `-wal` and `-shm` files the database file's mode.
        OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io_err(&who, &path))?;
        let conn = connect(&path)?;
        init_schema(&conn, &path)?;
        let (writes, queue) = mpsc::channel(QUEUE_CAPACITY);
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let stats = Arc::new(writer::Counters::default());
        let thread = {
            let (path, changes, stats) = (path.clone(), changes.clone(), stats.clone());
            std::thread::Builder::new()
                .name("meshca-store-writer".into())
                .spawn(move || writer::run(conn, &path, queue, &changes, &stats))
                .map_err(|e| StoreError::Io { path: who.clone(), source: e })?
        };
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writes,
                stats,
                readers: Mutex::new(Vec::new()),
                reading: tokio::sync::Semaphore::new(READERS),
                changes,
                thread: Mutex::new(Some(thread)),
            }),
            poll_interval: DEFAULT_POLL_INTERVAL,
        })
    }

    /// Sets how often watches poll for other processes' writes (default [`DEFAULT_POLL_INTERVAL`]).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What the writer thread has done so far.
    pub fn stats(&self) -> WriteStats {
        self.inner.stats.snapshot()
    }

    /// Writes waiting for the writer thread (not yet taken into a batch).
    pub fn queued_writes(&self) -> usize {
        self.inner.writes.max_capacity() - self.inner.writes.capacity()
    }

    /// Every namespace that holds at least one object, sorted (for migration and backups).
    pub async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn, path| {
            let mut st = conn
                .prepare_cached("SELECT DISTINCT namespace FROM objects ORDER BY namespace")
                .map_err(db_err(path))?;
            let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err(path))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err(path))
        })
        .await
    }

    async fn write(&self, key: &ObjectKey, op: writer::Op) -> Result<u64, StoreError> {
        let versions = self.write_all(vec![(key.clone(), op)]).await?;
        versions.first().copied().ok_or_else(|| StoreError::Backend("the writer thread answered no version".into()))
    }

    /// Sends writes that stand or fall together to the writer thread; their versions once committed.
    async fn write_all(&self, writes: Vec<(ObjectKey, writer::Op)>) -> Result<Vec<u64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = writer::Request { writes, reply };
        let closed =
            || StoreError::Backend(format!("{}: the store's writer thread has stopped", self.inner.path.display()));
        self.inner.writes.send(request).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Runs `f`, a read of a few rows, on a pooled read connection on the calling thread, and
    /// only when that would wait (another process holds a lock SQLite must wait out, or no
    /// connection is idle) on the blocking pool. A point read costs microseconds from SQLite's
    /// and the kernel's caches — less than handing it to the blocking pool and back, which cost a
    /// tenth of the management plane's CPU per issuance in thread wake-ups (docs/benchmarks.md).
    /// In WAL mode readers never wait for the writer thread.
    async fn point_read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        {
            let _permit = self.inner.reading.acquire().await.map_err(|_| self.closed())?;
            if let Some(done) = self.inner.try_inline(&f) {
                return done;
            }
        }
        self.read(f).await
    }

    fn closed(&self) -> StoreError {
        StoreError::Backend(format!("{}: the store is closed", self.inner.path.display()))
    }

    /// Runs `f` on a pooled read connection, off the async worker threads.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self.inner.reading.acquire().await.map_err(|_| self.closed())?;
        let inner = Arc::clone(&self.inner);
        run_blocking(move || inner.with_reader(f)).await
    }
}

thread_local! {
    /// Set by [`give_up`] when SQLite would have waited for a lock during an inline read.
    static WOULD_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The busy handler of an inline read: never wait (the read is retried on the blocking pool).
fn give_up(_attempts: i32) -> bool {
    WOULD_WAIT.with(|w| w.set(true));
    false
}

impl Inner {
    /// `f` on an idle pooled connection on this thread, with SQLite told not to wait for locks;
    /// `None` when no connection is idle or SQLite would have waited (the caller reads on the
    /// blocking pool instead, where waiting is harmless).
    fn try_inline<T>(&self, f: &impl Fn(&Connection, &Path) -> Result<T, StoreError>) -> Option<Result<T, StoreError>> {
        let mut conn = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        let mut result = None;
        if conn.busy_handler(Some(give_up)).is_ok() {
            WOULD_WAIT.with(|w| w.set(false));
            let r = f(&conn, &self.path);
            if !WOULD_WAIT.with(|w| w.replace(false)) {
                result = Some(r);
            }
        }
        // Back to waiting up to the busy timeout for whoever uses it next; a connection that
        // cannot be set back is closed.
        if conn.busy_timeout(BUSY_TIMEOUT).is_ok() {
            let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < READERS {
                idle.push(conn);
            }
        }
        result
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection, &Path) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        let result = f(&conn, &self.path);
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < READERS {
            idle.push(conn);
        }
        result
    }
}

/// A connection with the settings every connection needs (WAL and `synchronous` are per
/// database and per connection respectively; `secure_delete` and the busy timeout per connection).
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let err = db_err(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(&err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(&err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "{}: the file system does not support SQLite's WAL mode (journal_mode is {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(&err)?;
    conn.pragma_update(None, "secure_delete", "ON").map_err(&err)?;
    conn.pragma_update(None, "foreign_keys", "OFF").map_err(&err)?;
    // The query planner stability guarantee: a statement's plan does not depend on the values
    // bound to it. Without it (this build of SQLite has STAT4), a cached statement whose WHERE
    // clause compares a bound value (every read here does) is compiled again from its SQL each
    // time it is bound to other values — a tenth of the management plane's CPU per issuance went
    // to re-parsing `read_object`'s query (docs/benchmarks.md). Our statements are point lookups
    // on the primary key, whose plan no value changes.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(&err)?;
    Ok(conn)
}

fn init_schema(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = db_err(path);
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(&err)?;
    match version {
        0 => conn
            .execute_batch(&format!(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS objects (
                     namespace TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
                     labels TEXT NOT NULL, annotations TEXT NOT NULL,
                     PRIMARY KEY (namespace, name)) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS object_data (
                     namespace TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                     PRIMARY KEY (namespace, name, key)) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT OR IGNORE INTO counters (name, value) VALUES ('version', 0);
                 PRAGMA user_version = {SCHEMA_VERSION};
                 COMMIT;"
            ))
            .map_err(&err),
        SCHEMA_VERSION => Ok(()),
        other => Err(StoreError::Backend(format!(
            "{}: schema version {other} was written by a newer meshca (this one reads {SCHEMA_VERSION})",
            path.display()
        ))),
    }
}

/// An object's version, if it exists (one indexed lookup).
pub(crate) fn version_of(conn: &Connection, path: &Path, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT version FROM objects WHERE namespace = ?1 AND name = ?2").map_err(db_err(path))?;
    let v: Option<i64> =
        st.query_row(params![key.namespace(), key.name()], |r| r.get(0)).optional().map_err(db_err(path))?;
    Ok(v.map(|v| v as u64))
}

/// The query of [`read_object`].
const READ_OBJECT: &str = "SELECT o.version, o.labels, o.annotations, d.key, d.value
     FROM objects o LEFT JOIN object_data d ON d.namespace = o.namespace AND d.name = o.name
     WHERE o.namespace = ?1 AND o.name = ?2";

/// Reads an object in one statement (so one snapshot: the version and the data belong together).
fn read_object(conn: &Connection, path: &Path, key: &ObjectKey) -> Result<Option<(u64, Secret)>, StoreError> {
    let mut st = conn.prepare_cached(READ_OBJECT).map_err(db_err(path))?;
    let mut rows = st.query(params![key.namespace(), key.name()]).map_err(db_err(path))?;
    let corrupt = |reason: String| StoreError::Corrupt { key: key.clone(), reason };
    let mut found: Option<(u64, Secret)> = None;
    while let Some(row) = rows.next().map_err(db_err(path))? {
        if found.is_none() {
            let version: i64 = row.get(0).map_err(db_err(path))?;
            let labels: String = row.get(1).map_err(db_err(path))?;
            let annotations: String = row.get(2).map_err(db_err(path))?;
            let mut secret = Secret::default();
            secret.labels = serde_json::from_str(&labels).map_err(|e| corrupt(format!("labels: {e}")))?;
            secret.annotations =
                serde_json::from_str(&annotations).map_err(|e| corrupt(format!("annotations: {e}")))?;
            found = Some((version as u64, secret));
        }
        let data_key: Option<String> = row.get(3).map_err(db_err(path))?;
        if let (Some(k), Some((_, secret))) = (data_key, found.as_mut()) {
            let value: Vec<u8> = row.get(4).map_err(db_err(path))?;
            secret.data.insert(k, value);
        }
    }
    Ok(found)
}

/// Refuses data keys no backend may store (the rule of [`is_valid_data_key`]).
fn check_data_keys(key: &ObjectKey, secret: &Secret) -> Result<(), StoreError> {
    match secret.data.keys().find(|k| !is_valid_data_key(k)) {
        Some(bad) => Err(StoreError::InvalidKey(format!(
            "data key {bad:?} of {key}: data keys are [-._a-zA-Z0-9]+, at most 253 characters, not `.` and not starting with `..`"
        ))),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError> {
        let key = key.clone();
        Ok(self.point_read(move |conn, path| read_object(conn, path, &key)).await?.map(versioned))
    }

    async fn put(
        &self,
        key: &ObjectKey,
        secret: &Secret,
        precondition: Precondition,
    ) -> Result<ResourceVersion, StoreError> {
        check_data_keys(key, secret)?;
        let version = self.write(key, writer::Op::Put { secret: secret.clone(), precondition }).await?;
        Ok(ResourceVersion(version.to_string()))
    }

    fn transactions(&self) -> bool {
        true
    }

    fn partial_writes(&self) -> bool {
        true
    }

    async fn put_all(&self, writes: Vec<Write>) -> Result<Vec<ResourceVersion>, StoreError> {
        for w in &writes {
            check_data_keys(&w.key, &w.secret)?;
        }
        let ops = writes
            .into_iter()
            .map(|w| (w.key, writer::Op::Put { secret: w.secret, precondition: w.precondition }))
            .collect();
        let versions = self.write_all(ops).await?;
        Ok(versions.into_iter().map(|v| ResourceVersion(v.to_string())).collect())
    }

    async fn delete(&self, key: &ObjectKey, precondition: Precondition) -> Result<(), StoreError> {
        self.write(key, writer::Op::Delete { precondition }).await.map(drop)
    }

    async fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        if !is_dns_label(namespace) {
            return Err(StoreError::InvalidKey(format!("namespace {namespace:?} is not a DNS-1123 label")));
        }
        let namespace = namespace.to_string();
        self.read(move |conn, path| {
            let mut st = conn
                .prepare_cached("SELECT name FROM objects WHERE namespace = ?1 ORDER BY name")
                .map_err(db_err(path))?;
            let rows = st.query_map([&namespace], |r| r.get::<_, String>(0)).map_err(db_err(path))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err(path))
        })
        .await
    }

    fn watch(&self, key: &ObjectKey) -> WatchStream {
        let object = Arc::new(DbObject { inner: Arc::clone(&self.inner), key: key.clone() });
        watch_stream(object, key.clone(), self.inner.changes.subscribe(), self.poll_interval)
    }
}

struct DbObject {
    inner: Arc<Inner>,
    key: ObjectKey,
}

impl WatchedObject for DbObject {
    fn current_version(&self) -> Result<Option<u64>, StoreError> {
        self.inner.with_reader(|conn, path| version_of(conn, path, &self.key))
    }

    fn read(&self) -> Result<Option<(u64, Secret)>, StoreError> {
        self.inner.with_reader(|conn, path| read_object(conn, path, &self.key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;

    /// A read connection compiles `read_object`'s query once and then only binds new values to
    /// it: with SQLite's STAT4 and no planner stability guarantee it was compiled again from its
    /// SQL on every read of another object.
    #[test]
    fn reads_of_different_objects_reuse_the_compiled_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        std::fs::File::create(&path).unwrap();
        let conn = connect(&path).unwrap();
        init_schema(&conn, &path).unwrap();
        conn.execute_batch(
            "INSERT INTO objects VALUES ('ns', 'a', 1, '{}', '{}'), ('ns', 'b', 2, '{}', '{}');
             INSERT INTO object_data VALUES ('ns', 'a', 'k', x'01'), ('ns', 'b', 'k', x'02');",
        )
        .unwrap();
        for name in ["a", "b", "a", "missing", "b"] {
            read_object(&conn, &path, &ObjectKey::new("ns", name).unwrap()).unwrap();
        }
        let (version, secret) = read_object(&conn, &path, &ObjectKey::new("ns", "b").unwrap()).unwrap().unwrap();
        assert_eq!((version, secret.data.get("k").map(Vec::as_slice)), (2, Some(&[2u8][..])));
        let st = conn.prepare_cached(READ_OBJECT).unwrap();
        assert_eq!(st.get_status(StatementStatus::RePrepare), 0, "the query was compiled again on a new binding");
    }

    /// A put rewrites only the data rows it changes: a large value carried over unchanged costs
    /// no page in the WAL (with `secure_delete`, a rewrite would cost its pages twice), and the
    /// object still reads back whole, with the keys the put dropped gone.
    #[tokio::test]
    async fn a_put_leaves_unchanged_data_rows_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let k = ObjectKey::new("ns", "log").unwrap();
        let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let first = Secret::with_data([("big", big.clone()), ("small", b"1".to_vec()), ("gone", b"x".to_vec())]);
        let v1 = store.put(&k, &first, Precondition::Absent).await.unwrap();
        let side = connect(&path).unwrap();
        // Every frame so far copied into the database and the WAL emptied: what the next put
        // writes is all the WAL holds.
        side.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();

        let second = Secret::with_data([("big", big.clone()), ("small", b"2".to_vec())]);
        store.put(&k, &second, Precondition::Version(v1)).await.unwrap();
        let frames: i64 = side.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1)).unwrap();
        // The 64 kB value spans 16 overflow pages: rewritten, it would cost at least 16 frames
        // (20 measured with the delete and re-insert this replaced). The change itself touches
        // a handful of pages.
        assert!((1..8).contains(&frames), "the put wrote {frames} WAL frames");

        let got = store.get(&k).await.unwrap().unwrap().value;
        assert_eq!(got.data, second.data);
    }

    /// A read on the calling thread never waits for a lock there: SQLite's wait is cut short
    /// and the caller is told to read on the blocking pool, where the connection waits up to the
    /// busy timeout again. (A WAL reader hardly ever has to wait; a statement that needs the write
    /// lock another connection holds stands in for it here.) Plain reads go on meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_read_that_would_wait_hands_over_to_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let k = ObjectKey::new("ns", "o").unwrap();
        store.put(&k, &Secret::with_data([("k", "v")]), Precondition::Absent).await.unwrap();
        assert!(store.get(&k).await.unwrap().is_some(), "a reader connection is now idle in the pool");
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let needs_the_lock = |conn: &Connection, path: &Path| {
            conn.execute_batch("INSERT INTO counters (name, value) VALUES ('probe', 1)").map_err(db_err(path))
        };
        assert!(store.inner.try_inline(&needs_the_lock).is_none(), "it waited, or failed, on the calling thread");
        let read = store.inner.try_inline(&|conn: &Connection, path: &Path| read_object(conn, path, &k));
        assert!(matches!(read, Some(Ok(Some(_)))), "a plain read goes on under the write lock: {read:?}");
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.read(needs_the_lock).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.execute_batch("ROLLBACK").unwrap();
        waiting.await.unwrap().expect("on the blocking pool it waited for the lock");
    }
}
