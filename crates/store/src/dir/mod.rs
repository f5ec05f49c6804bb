//! The directory backend: the embedded default store (docs/architecture.md, "Stores").
//!
//! # Layout
//!
//! Every object is a directory laid out exactly like a secret volume written by the kubelet's
//! `AtomicWriter`, so real istiod can mount `<root>/istio-system/cacerts` as `/etc/cacerts` and
//! read plain files:
//!
//! ```text
//! <root>/                                    0700
//!   <namespace>/                             0700
//!     .<name>.lock                           0600  flock(2) for compare-and-swap; holds the version high-water mark
//!     <name>/                                0700
//!       ..v0000000042_<random>/              0700  one complete, immutable version of the data
//!         ca-cert.pem                        0600
//!         ...
//!         ..meta.json                        0600  labels and annotations
//!       ..data -> ..v0000000042_<random>           the current version: swapped with one rename(2)
//!       ca-cert.pem -> ..data/ca-cert.pem          one link per data key, so readers see plain files
//!       ...
//! ```
//!
//! The resource version is the number in the data directory's name. Readers resolve `..data` once
//! and read everything from that directory, so the version and the data they return always
//! belong together, and a concurrent update (which only ever creates a *new* data directory and
//! removes the old one *after* swapping the link) can never give them a mix.
//!
//! # Crash safety
//!
//! A writer makes every new file durable before anything points at it, and every switch is a
//! single `rename(2)`: the `..data` link for an update, the whole object directory for a create,
//! the whole object directory (moved aside) for a delete. Whatever a crash leaves behind (a
//! half-written data directory, a `..data_tmp` link, a `.<name>_tmp` or `.<name>_del` directory)
//! is reachable by no reader, and the next writer of that object removes it while holding the lock.
//!
//! # Concurrency
//!
//! Writers of one object (in this process or another) serialize on an exclusive `flock(2)` of
//! `<namespace>/.<name>.lock` for the whole read-check-write, which is what makes the version
//! check a compare-and-swap. Readers take no lock. Lock files are never removed: removing one
//! while another process waits on it would let two writers in at once.
//!
//! Versions only grow, also across a delete and re-create (the lock file keeps the last version of
//! a deleted object), so a stale compare-and-swap can never match a re-created object by accident.
//!
//! # Where each part lives
//!
//! This file holds the tree of objects (create, delete, list, preconditions); `layout` names the
//! entries of one object and reads it; `writer` is the kubelet-style atomic writer (shared with
//! [`crate::single`]); `lock` the per-object lock file; the watch stream is `crate::watch`, shared with the other
//! backends.

use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::watch::{WatchedObject, watch_stream};
use crate::{
    ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned, WatchStream, is_dns_label,
    is_dns_subdomain, is_valid_data_key,
};

pub(crate) use layout::{Attempt, DATA_LINK, LinkState, MetaOut, link_state, read_attempt};
pub(crate) use lock::{LockKind, lock_file, read_high_water, write_high_water};
pub(crate) use writer::{remove_any, sync_dir, sync_key_links, update_object};

use layout::{DIR_MODE, data_dir_name, highest_data_dir_version, key_link_target};
use writer::{remove_leftover, write_data_dir};

/// How often a watch re-reads the `..data` link to notice writes made by *other* processes (or
/// other [`DirStore`] instances). Writes through the same instance are delivered at once; this
/// only bounds how late an out-of-process write is seen. A `readlink(2)` per watcher per tick is
/// cheap enough that 200 ms costs nothing measurable.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Lock-free read attempts before a reader falls back to the shared lock (only needed when
/// writers swap versions faster than a read completes).
const OPTIMISTIC_READS: usize = 3;
/// In-process change notifications buffered per watcher; a watcher that falls further behind
/// just re-reads the object, so the size only trades memory against needless re-reads.
const CHANGE_CHANNEL_CAPACITY: usize = 256;

mod layout;
mod lock;
mod writer;

/// A [`Store`] in a local directory tree; see the [module documentation](self) for the layout and
/// its guarantees.
///
/// Cloning is cheap and clones share in-process watch notifications. Separate instances on the
/// same root (e.g. in different processes) are safe; they see each other's writes by polling.
#[derive(Clone)]
pub struct DirStore {
    inner: Arc<Inner>,
    poll_interval: Duration,
}

struct Inner {
    root: PathBuf,
    /// Every successful write through this instance (and its clones) announces its key here so
    /// that in-process watchers need not wait for the next poll.
    changes: broadcast::Sender<ObjectKey>,
}

impl fmt::Debug for DirStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirStore").field("root", &self.inner.root).field("poll_interval", &self.poll_interval).finish()
    }
}

impl DirStore {
    /// Opens the store rooted at `root`, creating it (mode 0700) if missing. An existing root keeps
    /// its mode: it may be shared on purpose (e.g. mounted into istiod's pod). What interrupted
    /// writes left behind anywhere in the tree (a crash, a full disk) is removed first, each
    /// object under its lock, so a concurrent writer is never disturbed.
    ///
    /// This does blocking I/O; call it at start-up, not from inside a busy async task.
    pub fn open(root: impl Into<PathBuf>) -> Result<DirStore, StoreError> {
        let root = root.into();
        let who = root.display().to_string();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Io {
                    path: who,
                    source: io::Error::new(io::ErrorKind::NotADirectory, "the store root is not a directory"),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new().recursive(true).mode(DIR_MODE).create(&root).map_err(io_err(&who, &root))?;
            }
            Err(e) => return Err(io_err(&who, &root)(e)),
        }
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let inner = Inner { root, changes };
        inner.sweep_leftovers();
        Ok(DirStore { inner: Arc::new(inner), poll_interval: DEFAULT_POLL_INTERVAL })
    }

    /// Sets how often watches poll for out-of-process writes (default [`DEFAULT_POLL_INTERVAL`]).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The directory holding `key`'s data keys as plain files: what istiod mounts (for `cacerts`,
    /// as `/etc/cacerts`). It may not exist yet.
    pub fn object_path(&self, key: &ObjectKey) -> PathBuf {
        self.inner.object_dir(key)
    }

    /// Every namespace directory under the root, sorted (for migration; a namespace may hold no
    /// object).
    pub async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|inner| {
            let who = inner.root.display().to_string();
            let mut names = Vec::new();
            for entry in fs::read_dir(&inner.root).map_err(io_err(&who, &inner.root))? {
                let entry = entry.map_err(io_err(&who, &inner.root))?;
                let is_dir = entry.file_type().map_err(io_err(&who, &entry.path()))?.is_dir();
                if let Some(name) = entry.file_name().to_str().filter(|n| is_dir && is_dns_label(n)) {
                    names.push(name.to_string());
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Every name in `namespace` that has an entry on disk, including objects [`Store::list`]
    /// skips because they cannot be read (for migration, which must not pass over them silently).
    pub async fn names_on_disk(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        let namespace = namespace.to_string();
        self.blocking(move |inner| {
            let dir = inner.namespace_dir(&namespace);
            let mut names = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io_err(&namespace, &dir))? {
                let entry = entry.map_err(io_err(&namespace, &dir))?;
                if let Some(name) = entry.file_name().to_str().filter(|n| is_dns_subdomain(n)) {
                    names.push(name.to_string());
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        run_blocking(move || f(&inner)).await
    }
}

/// Runs filesystem work off the async worker threads. A blocking write keeps running to the end
/// even if the calling future is dropped, so a cancelled `put` still finishes (or never starts)
/// its atomic update and releases its lock.
pub(crate) async fn run_blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("directory store task failed: {e}")))?
}

#[async_trait::async_trait]
impl Store for DirStore {
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError> {
        let key = key.clone();
        let found = self.blocking(move |inner| inner.read(&key)).await?;
        Ok(found.map(versioned))
    }

    async fn put(
        &self,
        key: &ObjectKey,
        secret: &Secret,
        precondition: Precondition,
    ) -> Result<ResourceVersion, StoreError> {
        let (key, secret) = (key.clone(), secret.clone());
        let version = self.blocking(move |inner| inner.put(&key, &secret, &precondition)).await?;
        Ok(ResourceVersion(version.to_string()))
    }

    async fn delete(&self, key: &ObjectKey, precondition: Precondition) -> Result<(), StoreError> {
        let key = key.clone();
        self.blocking(move |inner| inner.delete(&key, &precondition)).await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        if !is_dns_label(namespace) {
            return Err(StoreError::InvalidKey(format!("namespace {namespace:?} is not a DNS-1123 label")));
        }
        let namespace = namespace.to_string();
        self.blocking(move |inner| inner.list(&namespace)).await
    }

    fn watch(&self, key: &ObjectKey) -> WatchStream {
        // Subscribe now, not on first poll: a write made between `watch()` and the first poll is
        // then still announced (and in any case caught by the initial read).
        let object = Arc::new(TreeObject { inner: Arc::clone(&self.inner), key: key.clone() });
        watch_stream(object, key.clone(), self.inner.changes.subscribe(), self.poll_interval)
    }
}

pub(crate) fn versioned((version, value): (u64, Secret)) -> Versioned<Secret> {
    Versioned { value, version: ResourceVersion(version.to_string()) }
}

impl Inner {
    fn namespace_dir(&self, namespace: &str) -> PathBuf {
        self.root.join(namespace)
    }

    fn object_dir(&self, key: &ObjectKey) -> PathBuf {
        self.namespace_dir(key.namespace()).join(key.name())
    }

    fn lock_path(&self, key: &ObjectKey) -> PathBuf {
        self.namespace_dir(key.namespace()).join(format!(".{}.lock", key.name()))
    }

    /// Where a create builds the object before renaming it into place. `_` never occurs in a name,
    /// so this cannot collide with another object's entries. One fixed name per object suffices:
    /// only the lock holder uses it.
    fn create_temp_dir(&self, key: &ObjectKey) -> PathBuf {
        self.namespace_dir(key.namespace()).join(format!(".{}_tmp", key.name()))
    }

    /// Where a delete moves the object before removing it, so it vanishes in one step.
    fn delete_temp_dir(&self, key: &ObjectKey) -> PathBuf {
        self.namespace_dir(key.namespace()).join(format!(".{}_del", key.name()))
    }

    fn announce(&self, key: &ObjectKey) {
        // An error only means nobody is watching.
        let _ = self.changes.send(key.clone());
    }

    // ---- reading ----

    /// Reads an object: the version and the secret, consistent with each other.
    fn read(&self, key: &ObjectKey) -> Result<Option<(u64, Secret)>, StoreError> {
        let obj = self.object_dir(key);
        for _ in 0..OPTIMISTIC_READS {
            if let Attempt::Done(found) = read_attempt(key, &obj)? {
                return Ok(found);
            }
        }
        // Writers keep swapping versions faster than we read: wait them out. Under the shared lock
        // no writer runs, so this attempt cannot be disturbed.
        let _lock = self.lock(key, LockKind::Shared)?;
        match read_attempt(key, &obj)? {
            Attempt::Done(found) => Ok(found),
            Attempt::Retry => Err(StoreError::Backend(format!(
                "{key} changed while its lock was held: something other than meshca writes {}",
                obj.display()
            ))),
        }
    }

    fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.namespace_dir(namespace);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(namespace, &dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(namespace, &dir))?;
            // Temp directories and lock files start with `.`, which no name does.
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if !is_dns_subdomain(&name) {
                continue;
            }
            let key = ObjectKey::new(namespace, &name)?;
            if let LinkState::Present { .. } = link_state(&key, &entry.path())? {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    // ---- writing ----

    fn put(&self, key: &ObjectKey, secret: &Secret, precondition: &Precondition) -> Result<u64, StoreError> {
        if let Some(bad) = secret.data.keys().find(|k| !is_valid_data_key(k)) {
            return Err(StoreError::InvalidKey(format!(
                "data key {bad:?} of {key}: data keys are [-._a-zA-Z0-9]+, at most 253 characters, not `.` and not starting with `..`"
            )));
        }
        let meta = serde_json::to_vec_pretty(&MetaOut { labels: &secret.labels, annotations: &secret.annotations })
            .map_err(|e| StoreError::Backend(format!("encoding the labels and annotations of {key}: {e}")))?;

        self.ensure_namespace_dir(key)?;
        let lock = self.lock(key, LockKind::Exclusive)?;
        // Every writer cleans up after crashed writers of this object before doing anything else.
        self.remove_leftovers_in_namespace(key)?;
        let obj = self.object_dir(key);
        let current = match link_state(key, &obj)? {
            LinkState::Present { target, version } => Some((target, version)),
            LinkState::Absent => None,
            LinkState::Broken(reason) => {
                if *precondition != Precondition::Any {
                    return Err(StoreError::Corrupt { key: key.clone(), reason });
                }
                // An unconditional write may replace an object nobody can read.
                self.remove_object(key, &lock, highest_data_dir_version(&obj))?;
                None
            }
        };
        check_precondition(key, precondition, current.as_ref().map(|(_, v)| *v))?;

        let version = match current {
            Some((old_target, old_version)) => {
                let version = old_version + 1;
                update_object(key, &obj, Some(&old_target), version, secret, &meta)?;
                version
            }
            None => {
                let version = read_high_water(&lock) + 1;
                self.create_object(key, &obj, version, secret, &meta)?;
                version
            }
        };
        drop(lock);
        self.announce(key);
        Ok(version)
    }

    fn delete(&self, key: &ObjectKey, precondition: &Precondition) -> Result<(), StoreError> {
        let ns = self.namespace_dir(key.namespace());
        if !ns.is_dir() {
            // Nothing was ever written here; don't create directories just to find that out.
            return check_delete_precondition(key, precondition, None);
        }
        let lock = self.lock(key, LockKind::Exclusive)?;
        let obj = self.object_dir(key);
        match link_state(key, &obj)? {
            LinkState::Absent => {
                // Leftovers of a crashed create or delete are still ours to clean.
                self.remove_leftovers_in_namespace(key)?;
                check_delete_precondition(key, precondition, None)
            }
            LinkState::Broken(reason) => {
                if *precondition != Precondition::Any {
                    return Err(StoreError::Corrupt { key: key.clone(), reason });
                }
                self.remove_object(key, &lock, highest_data_dir_version(&obj))?;
                drop(lock);
                self.announce(key);
                Ok(())
            }
            LinkState::Present { version, .. } => {
                check_delete_precondition(key, precondition, Some(version))?;
                self.remove_object(key, &lock, Some(version))?;
                drop(lock);
                self.announce(key);
                Ok(())
            }
        }
    }

    fn ensure_namespace_dir(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let dir = self.namespace_dir(key.namespace());
        match DirBuilder::new().mode(DIR_MODE).create(&dir) {
            Ok(()) => sync_dir(key, &self.root),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err(key.namespace(), &dir)(e)),
        }
    }

    fn lock(&self, key: &ObjectKey, kind: LockKind) -> Result<File, StoreError> {
        lock_file(&key.to_string(), &self.lock_path(key), kind)
    }

    /// Builds the whole object under a temp name and renames it into place, so the object appears
    /// complete (data, `..data`, key links) or not at all.
    fn create_object(
        &self,
        key: &ObjectKey,
        obj: &Path,
        version: u64,
        secret: &Secret,
        meta: &[u8],
    ) -> Result<(), StoreError> {
        let tmp = self.create_temp_dir(key);
        let who = key.to_string();
        let built = (|| {
            DirBuilder::new().mode(DIR_MODE).create(&tmp).map_err(io_err(&who, &tmp))?;
            let target = data_dir_name(version);
            write_data_dir(key, &tmp.join(&target), secret, meta)?;
            let link = tmp.join(DATA_LINK);
            symlink(&target, &link).map_err(io_err(&who, &link))?;
            for data_key in secret.data.keys() {
                let link = tmp.join(data_key);
                symlink(key_link_target(data_key), &link).map_err(io_err(&who, &link))?;
            }
            sync_dir(key, &tmp)?;
            fs::rename(&tmp, obj).map_err(io_err(&who, obj))
        })();
        if let Err(e) = built {
            // Not in place: remove the half-built object now (see `update_object`).
            let _ = remove_any(&who, &tmp);
            return Err(e);
        }
        sync_dir(key, &self.namespace_dir(key.namespace()))
    }

    /// Records the object's last version as the high-water mark, moves the object directory aside
    /// (the one step that makes it disappear) and removes it.
    fn remove_object(&self, key: &ObjectKey, lock: &File, last_version: Option<u64>) -> Result<(), StoreError> {
        let who = key.to_string();
        if let Some(last) = last_version
            && last > read_high_water(lock)
        {
            write_high_water(lock, last).map_err(io_err(&who, &self.lock_path(key)))?;
        }
        self.remove_leftovers_in_namespace(key)?;
        let obj = self.object_dir(key);
        let aside = self.delete_temp_dir(key);
        fs::rename(&obj, &aside).map_err(io_err(&who, &obj))?;
        sync_dir(key, &self.namespace_dir(key.namespace()))?;
        remove_any(&who, &aside).map(drop)
    }

    /// Removes every leftover of an interrupted write in the tree: the temporary create and
    /// delete directories beside objects, and `..data_tmp` links and data directories other than
    /// the current one inside them. Each object is cleaned under its exclusive lock, exactly as
    /// its next writer would clean it. Failures are logged and skipped: a leftover only costs
    /// space, and a store that cannot be tidied can still be opened.
    fn sweep_leftovers(&self) {
        let Ok(namespaces) = fs::read_dir(&self.root) else { return };
        for ns in namespaces.flatten() {
            let Some(namespace) = ns.file_name().to_str().map(str::to_string) else { continue };
            if !is_dns_label(&namespace) || !ns.path().is_dir() {
                continue;
            }
            let Ok(entries) = fs::read_dir(ns.path()) else { continue };
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .map(|n| {
                    // `.<name>_tmp` and `.<name>_del` belong to object `<name>`.
                    let temp = n.strip_prefix('.').and_then(|t| t.strip_suffix("_tmp").or(t.strip_suffix("_del")));
                    temp.map(str::to_string).unwrap_or(n)
                })
                .filter(|n| is_dns_subdomain(n))
                .collect();
            names.sort();
            names.dedup();
            for name in names {
                let Ok(key) = ObjectKey::new(&namespace, &name) else { continue };
                if let Err(e) = self.sweep_object(&key) {
                    tracing::warn!(object = %key, error = %e, "could not remove the leftovers of an interrupted write");
                }
            }
        }
    }

    fn sweep_object(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let _lock = self.lock(key, LockKind::Exclusive)?;
        self.remove_leftovers_in_namespace(key)?;
        let obj = self.object_dir(key);
        if let LinkState::Present { target, .. } = link_state(key, &obj)? {
            writer::remove_leftovers_in_object(key, &obj, &target)?;
        }
        Ok(())
    }

    /// Removes what a crashed create or delete of this object left in the namespace directory.
    fn remove_leftovers_in_namespace(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let who = key.to_string();
        remove_leftover(&who, &self.create_temp_dir(key))?;
        remove_leftover(&who, &self.delete_temp_dir(key))
    }
}

pub(crate) fn check_precondition(
    key: &ObjectKey,
    precondition: &Precondition,
    current: Option<u64>,
) -> Result<(), StoreError> {
    match (precondition, current) {
        (Precondition::Any, _) | (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.clone())),
        (Precondition::Version(_), None) => Err(StoreError::NotFound(key.clone())),
        (Precondition::Version(expected), Some(found)) if expected.0 == found.to_string() => Ok(()),
        (Precondition::Version(expected), Some(found)) => {
            Err(StoreError::Conflict { key: key.clone(), expected: expected.0.clone(), found: found.to_string() })
        }
    }
}

/// Like [`check_precondition`], except that an unconditional delete of nothing is `NotFound` (as
/// in Kubernetes), while "delete only if absent" of nothing is a successful no-op.
pub(crate) fn check_delete_precondition(
    key: &ObjectKey,
    precondition: &Precondition,
    current: Option<u64>,
) -> Result<(), StoreError> {
    match (precondition, current) {
        (Precondition::Any, None) => Err(StoreError::NotFound(key.clone())),
        _ => check_precondition(key, precondition, current),
    }
}

/// Maps an I/O error to a [`StoreError`] naming the path; permission problems become
/// [`StoreError::Forbidden`] because the fix (ownership, modes) differs from other I/O failures.
pub(crate) fn io_err<'a>(who: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            StoreError::Forbidden { key: who.to_string(), reason: format!("{}: {e}", path.display()) }
        } else {
            StoreError::Io { path: path.display().to_string(), source: e }
        }
    }
}

struct TreeObject {
    inner: Arc<Inner>,
    key: ObjectKey,
}

impl WatchedObject for TreeObject {
    fn current_version(&self) -> Result<Option<u64>, StoreError> {
        link_state(&self.key, &self.inner.object_dir(&self.key))?.version(&self.key)
    }

    fn read(&self) -> Result<Option<(u64, Secret)>, StoreError> {
        self.inner.read(&self.key)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::layout::{DATA_TMP_LINK, META_FILE};
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name).unwrap()
    }

    fn store() -> (tempfile::TempDir, DirStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path().join("root")).unwrap();
        (dir, store)
    }

    fn entries(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    }

    #[test]
    fn permission_errors_are_forbidden_others_io_with_the_path() {
        let p = Path::new("/x/y");
        let e = io_err("ns/a", p)(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(matches!(&e, StoreError::Forbidden { key, reason } if key == "ns/a" && reason.contains("/x/y")), "{e}");
        let e = io_err("ns/a", p)(io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(&e, StoreError::Io { path, .. } if path == "/x/y"), "{e}");
    }

    #[test]
    fn check_precondition_semantics() {
        let k = key("a");
        let v = |s: &str| Precondition::Version(ResourceVersion(s.to_string()));
        assert!(check_precondition(&k, &Precondition::Any, None).is_ok());
        assert!(check_precondition(&k, &Precondition::Any, Some(3)).is_ok());
        assert!(check_precondition(&k, &Precondition::Absent, None).is_ok());
        assert!(matches!(check_precondition(&k, &Precondition::Absent, Some(3)), Err(StoreError::AlreadyExists(_))));
        assert!(matches!(check_precondition(&k, &v("3"), None), Err(StoreError::NotFound(_))));
        assert!(check_precondition(&k, &v("3"), Some(3)).is_ok());
        match check_precondition(&k, &v("2"), Some(3)) {
            Err(StoreError::Conflict { key, expected, found }) => {
                assert_eq!((key, expected.as_str(), found.as_str()), (k, "2", "3"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn crash_leftovers_are_invisible_and_cleaned_by_the_next_writer() {
        let (_dir, store) = store();
        let k = key("a");
        let v1 = store.put(&k, &Secret::with_data([("x", "1")]), Precondition::Absent).await.unwrap();
        let obj = store.object_path(&k);
        let ns = obj.parent().unwrap().to_path_buf();

        // What crashes at each step of an update, a create and a delete leave behind.
        let orphan = obj.join(data_dir_name(99));
        fs::create_dir(&orphan).unwrap();
        fs::write(orphan.join("x"), "half").unwrap();
        symlink(orphan.file_name().unwrap(), obj.join(DATA_TMP_LINK)).unwrap();
        fs::create_dir(ns.join(".a_tmp")).unwrap();
        fs::create_dir(ns.join(".a_del")).unwrap();
        fs::create_dir(ns.join(".b_tmp")).unwrap();

        let got = store.get(&k).await.unwrap().unwrap();
        assert_eq!((got.value.get("x"), &got.version), (Some(&b"1"[..]), &v1));
        assert_eq!(store.list("ns").await.unwrap(), vec!["a"]);
        assert_eq!(fs::read(obj.join("x")).unwrap(), b"1");

        store.put(&k, &Secret::with_data([("y", "2")]), Precondition::Version(v1)).await.unwrap();
        let left = entries(&obj);
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.contains(DATA_LINK) && left.contains("y"));
        assert_eq!(fs::read(obj.join("y")).unwrap(), b"2");
        assert!(!obj.join("x").exists(), "the link of a removed key is gone");
        // Only `a`'s leftovers go: `.b_tmp` belongs to a create of `b` (it may be in progress).
        let ns_left = entries(&ns);
        assert_eq!(ns_left, BTreeSet::from([".a.lock", ".b_tmp", "a"].map(String::from)), "{ns_left:?}");
    }

    #[tokio::test]
    async fn versions_keep_growing_across_delete_and_recreate() {
        let (_dir, store) = store();
        let k = key("a");
        let s = Secret::with_data([("x", "1")]);
        store.put(&k, &s, Precondition::Absent).await.unwrap();
        let v2 = store.put(&k, &s, Precondition::Any).await.unwrap();
        store.delete(&k, Precondition::Any).await.unwrap();
        let v3 = store.put(&k, &s, Precondition::Absent).await.unwrap();
        assert_eq!((v2.0.as_str(), v3.0.as_str()), ("2", "3"));
        // A writer holding the old version 2 must not win against the re-created object.
        let err = store.put(&k, &s, Precondition::Version(v2)).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupt_objects_are_reported_not_panicked_on() {
        let (_dir, store) = store();
        let s = Secret::with_data([("x", "1")]).label("l", "v");

        // Unreadable meta file.
        let k = key("meta");
        store.put(&k, &s, Precondition::Absent).await.unwrap();
        let target = fs::read_link(store.object_path(&k).join(DATA_LINK)).unwrap();
        let meta = store.object_path(&k).join(target).join(META_FILE);
        fs::remove_file(&meta).unwrap();
        fs::write(&meta, "not json").unwrap();
        let err = store.get(&k).await.unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains(META_FILE)), "{err}");

        // Dangling `..data`.
        let k = key("dangling");
        store.put(&k, &s, Precondition::Absent).await.unwrap();
        let obj = store.object_path(&k);
        fs::remove_dir_all(obj.join(fs::read_link(obj.join(DATA_LINK)).unwrap())).unwrap();
        let err = store.get(&k).await.unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("does not exist")), "{err}");

        // `..data` pointing outside the object.
        let k = key("escape");
        store.put(&k, &s, Precondition::Absent).await.unwrap();
        let obj = store.object_path(&k);
        fs::remove_file(obj.join(DATA_LINK)).unwrap();
        symlink("/etc", obj.join(DATA_LINK)).unwrap();
        let err = store.get(&k).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!store.list("ns").await.unwrap().contains(&"escape".to_string()));

        // A foreign file and a foreign directory in place of an object.
        fs::write(store.object_path(&key("file")), "x").unwrap();
        fs::create_dir(store.object_path(&key("empty"))).unwrap();
        for name in ["file", "empty"] {
            let err = store.get(&key(name)).await.unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{name}: {err}");
        }

        // A compare-and-swap cannot be checked against an unreadable object ...
        let err = store.put(&key("escape"), &s, Precondition::Absent).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // ... but an unconditional write or delete replaces it, and versions keep growing.
        let v = store.put(&key("dangling"), &s, Precondition::Any).await.unwrap();
        assert_eq!(v.0, "2");
        assert_eq!(store.get(&key("dangling")).await.unwrap().unwrap().value, s);
        store.put(&key("file"), &s, Precondition::Any).await.unwrap();
        store.delete(&key("empty"), Precondition::Any).await.unwrap();
        assert!(store.get(&key("empty")).await.unwrap().is_none());
        assert_eq!(store.list("ns").await.unwrap(), vec!["dangling", "file", "meta"]);
    }

    #[tokio::test]
    async fn foreign_files_in_a_data_directory_are_corrupt() {
        let (_dir, store) = store();
        let k = key("a");
        store.put(&k, &Secret::with_data([("x", "1")]), Precondition::Absent).await.unwrap();
        let obj = store.object_path(&k);
        let data = obj.join(fs::read_link(obj.join(DATA_LINK)).unwrap());
        symlink("/etc/passwd", data.join("y")).unwrap();
        let err = store.get(&k).await.unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("not a regular file")), "{err}");
    }
}
