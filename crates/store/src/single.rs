//! One object kept at the root of a directory of its own, in the kubelet's secret-volume layout.
//!
//! [`crate::dir::DirStore`] keeps `<root>/<namespace>/<name>/` per object and creates an object by
//! renaming a finished directory into place. That cannot serve a directory that is *given*: a
//! memory-backed volume mounted at `/etc/cacerts`, which real istiod reads as
//! `/etc/cacerts/ca-cert.pem`. [`SingleObjectDir`] maps exactly one key (in Vault mode, `cacerts`)
//! to such a directory and writes it in place, with the same layout, the same atomic `..data`
//! swap and the same code as the directory backend:
//!
//! ```text
//! <dir>/                          the given directory (e.g. a tmpfs mount); never renamed
//!   ..lock                        0600  flock(2) for compare-and-swap; the version high-water mark
//!   ..v0000000007_<random>/       0700  one complete, immutable version of the data
//!     ca-cert.pem ...             0600
//!     ..meta.json                 0600  labels and annotations
//!   ..data -> ..v0000000007_<random>    swapped with one rename(2)
//!   ca-cert.pem -> ..data/ca-cert.pem   one link per data key
//! ```
//!
//! The object is absent while `..data` is. Every other key is passed to an optional second store
//! (the agent's identity lives there), so the agent can run on one [`Store`] whose `cacerts` is
//! in the given directory and nowhere else. The directory is meshca's alone: a writer removes
//! symlinks it does not recognise as data keys, as the kubelet does.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::dir::{
    self, Attempt, DATA_LINK, DEFAULT_POLL_INTERVAL, LinkState, LockKind, MetaOut, io_err, run_blocking, versioned,
};
use crate::watch::{WatchedObject, watch_stream};
use crate::{ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned, WatchStream};

/// The lock file, inside the directory. `..`-prefixed like every bookkeeping entry, so it is
/// never taken for a data key or a key link.
const LOCK_FILE: &str = "..lock";

/// A [`Store`] holding one object at the root of a given directory; see the
/// [module documentation](self).
#[derive(Clone)]
pub struct SingleObjectDir {
    inner: Arc<SingleInner>,
    others: Option<Arc<dyn Store>>,
    poll_interval: Duration,
}

struct SingleInner {
    key: ObjectKey,
    dir: PathBuf,
    changes: broadcast::Sender<ObjectKey>,
}

impl fmt::Debug for SingleObjectDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleObjectDir")
            .field("key", &self.inner.key)
            .field("dir", &self.inner.dir)
            .field("others", &self.others.is_some())
            .finish()
    }
}

impl SingleObjectDir {
    /// Keeps `key` in `dir`, which must exist and be a directory (it is typically a mount point,
    /// so it is never created here). Other keys are refused until [`Self::with_others`].
    pub fn open(key: ObjectKey, dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Io {
                    path: dir.display().to_string(),
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                });
            }
            Err(e) => return Err(io_err(&key.to_string(), &dir)(e)),
        }
        let (changes, _) = broadcast::channel(16);
        Ok(SingleObjectDir {
            inner: Arc::new(SingleInner { key, dir, changes }),
            others: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
        })
    }

    /// Sends every key other than the one kept here to `store`.
    pub fn with_others(mut self, store: Arc<dyn Store>) -> Self {
        self.others = Some(store);
        self
    }

    /// Sets how often watches poll for out-of-process writes.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The directory holding the object's data keys as plain files.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// The key kept here.
    pub fn key(&self) -> &ObjectKey {
        &self.inner.key
    }

    fn other(&self, key: &ObjectKey) -> Result<&dyn Store, StoreError> {
        self.others.as_deref().ok_or_else(|| {
            StoreError::InvalidKey(format!(
                "{key}: this store holds only {} (in {})",
                self.inner.key,
                self.inner.dir.display()
            ))
        })
    }
}

impl SingleInner {
    fn who(&self) -> String {
        self.key.to_string()
    }

    /// `..data` absent means no object, unlike in a tree, where the object directory would be
    /// absent too.
    fn link_state(&self) -> Result<LinkState, StoreError> {
        match fs::symlink_metadata(self.dir.join(DATA_LINK)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LinkState::Absent),
            _ => dir::link_state(&self.key, &self.dir),
        }
    }

    fn read(&self) -> Result<Option<(u64, Secret)>, StoreError> {
        // Lock-free, as in the tree; only a delete racing the read can make it look broken,
        // and then `..data` is gone by the time we look again.
        for _ in 0..3 {
            if self.link_state()? == LinkState::Absent {
                return Ok(None);
            }
            match dir::read_attempt(&self.key, &self.dir) {
                Ok(Attempt::Done(found)) => return Ok(found),
                Ok(Attempt::Retry) => {}
                Err(e) if self.link_state()? == LinkState::Absent => {
                    tracing::debug!(error = %e, "object deleted while being read");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let _lock = dir::lock_file(&self.who(), &self.dir.join(LOCK_FILE), LockKind::Shared)?;
        match self.link_state()? {
            LinkState::Absent => Ok(None),
            _ => match dir::read_attempt(&self.key, &self.dir)? {
                Attempt::Done(found) => Ok(found),
                Attempt::Retry => Err(StoreError::Backend(format!(
                    "{} changed while its lock was held: something other than meshca writes {}",
                    self.key,
                    self.dir.display()
                ))),
            },
        }
    }

    /// The current object (its data folder and version) under the lock, for a write. A link
    /// nobody can read is an error for a conditional write; an unconditional one replaces it.
    fn current_for_write(&self, precondition: &Precondition) -> Result<Option<(String, u64)>, StoreError> {
        match self.link_state()? {
            LinkState::Present { target, version } => Ok(Some((target, version))),
            LinkState::Absent => Ok(None),
            LinkState::Broken(reason) => {
                if *precondition != Precondition::Any {
                    return Err(StoreError::Corrupt { key: self.key.clone(), reason });
                }
                dir::remove_any(&self.who(), &self.dir.join(DATA_LINK))?;
                Ok(None)
            }
        }
    }

    fn put(&self, secret: &Secret, precondition: &Precondition) -> Result<u64, StoreError> {
        let key = &self.key;
        if let Some(bad) = secret.data.keys().find(|k| !crate::is_valid_data_key(k)) {
            return Err(StoreError::InvalidKey(format!("data key {bad:?} of {key} is not a valid data key")));
        }
        let meta = serde_json::to_vec_pretty(&MetaOut { labels: &secret.labels, annotations: &secret.annotations })
            .map_err(|e| StoreError::Backend(format!("encoding the labels and annotations of {key}: {e}")))?;
        let lock = dir::lock_file(&self.who(), &self.dir.join(LOCK_FILE), LockKind::Exclusive)?;
        let current = self.current_for_write(precondition)?;
        dir::check_precondition(key, precondition, current.as_ref().map(|(_, v)| *v))?;
        let version = match &current {
            Some((_, v)) => v + 1,
            None => dir::read_high_water(&lock) + 1,
        };
        dir::update_object(key, &self.dir, current.as_ref().map(|(t, _)| t.as_str()), version, secret, &meta)?;
        drop(lock);
        let _ = self.changes.send(key.clone());
        Ok(version)
    }

    fn delete(&self, precondition: &Precondition) -> Result<(), StoreError> {
        let key = &self.key;
        let who = self.who();
        let lock = dir::lock_file(&who, &self.dir.join(LOCK_FILE), LockKind::Exclusive)?;
        let current = self.current_for_write(precondition)?;
        dir::check_delete_precondition(key, precondition, current.as_ref().map(|(_, v)| *v))?;
        let Some((target, version)) = current else { return Ok(()) };
        if version > dir::read_high_water(&lock) {
            dir::write_high_water(&lock, version).map_err(io_err(&who, &self.dir.join(LOCK_FILE)))?;
        }
        // Removing `..data` is the one step that makes the object disappear; the rest is tidying.
        let link = self.dir.join(DATA_LINK);
        fs::remove_file(&link).map_err(io_err(&who, &link))?;
        dir::sync_dir(key, &self.dir)?;
        dir::sync_key_links(key, &self.dir, &Secret::default())?;
        dir::remove_any(&who, &self.dir.join(target))?;
        dir::sync_dir(key, &self.dir)?;
        drop(lock);
        let _ = self.changes.send(key.clone());
        Ok(())
    }
}

impl WatchedObject for SingleInner {
    fn current_version(&self) -> Result<Option<u64>, StoreError> {
        SingleInner::link_state(self)?.version(&self.key)
    }

    fn read(&self) -> Result<Option<(u64, Secret)>, StoreError> {
        SingleInner::read(self)
    }
}

#[async_trait::async_trait]
impl Store for SingleObjectDir {
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError> {
        if *key != self.inner.key {
            return self.other(key)?.get(key).await;
        }
        let inner = Arc::clone(&self.inner);
        Ok(run_blocking(move || inner.read()).await?.map(versioned))
    }

    async fn put(
        &self,
        key: &ObjectKey,
        secret: &Secret,
        precondition: Precondition,
    ) -> Result<ResourceVersion, StoreError> {
        if *key != self.inner.key {
            return self.other(key)?.put(key, secret, precondition).await;
        }
        let (inner, secret) = (Arc::clone(&self.inner), secret.clone());
        let version = run_blocking(move || inner.put(&secret, &precondition)).await?;
        Ok(ResourceVersion(version.to_string()))
    }

    async fn delete(&self, key: &ObjectKey, precondition: Precondition) -> Result<(), StoreError> {
        if *key != self.inner.key {
            return self.other(key)?.delete(key, precondition).await;
        }
        let inner = Arc::clone(&self.inner);
        run_blocking(move || inner.delete(&precondition)).await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        let mut names = match &self.others {
            Some(o) => o.list(namespace).await?,
            None => Vec::new(),
        };
        if namespace == self.inner.key.namespace() {
            let inner = Arc::clone(&self.inner);
            if run_blocking(move || inner.link_state()).await? != LinkState::Absent {
                names.push(self.inner.key.name().to_string());
                names.sort();
                names.dedup();
            }
        }
        Ok(names)
    }

    fn watch(&self, key: &ObjectKey) -> WatchStream {
        if *key != self.inner.key {
            return match self.other(key) {
                Ok(o) => o.watch(key),
                Err(e) => Box::pin(futures::stream::once(async move { Err(e) })),
            };
        }
        let object: Arc<dyn WatchedObject> = self.inner.clone();
        watch_stream(object, key.clone(), self.inner.changes.subscribe(), self.poll_interval)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use futures::StreamExt;

    use super::*;
    use crate::dir::DirStore;

    fn cacerts() -> ObjectKey {
        ObjectKey::new("istio-system", "cacerts").unwrap()
    }

    fn entries(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    }

    fn bundle(n: &str) -> Secret {
        Secret::with_data([("ca-cert.pem", format!("cert {n}")), ("ca-key.pem", format!("key {n}"))])
            .label("app.kubernetes.io/managed-by", "meshca")
            .annotation("meshca.io/serial", n)
    }

    #[tokio::test]
    async fn the_object_lives_at_the_directory_root_in_the_kubelet_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SingleObjectDir::open(cacerts(), tmp.path()).unwrap();
        assert!(store.get(&cacerts()).await.unwrap().is_none());
        assert!(store.list("istio-system").await.unwrap().is_empty());

        let v1 = store.put(&cacerts(), &bundle("1"), Precondition::Absent).await.unwrap();
        assert_eq!(fs::read(tmp.path().join("ca-cert.pem")).unwrap(), b"cert 1");
        assert_eq!(fs::read_link(tmp.path().join("ca-key.pem")).unwrap(), Path::new("..data/ca-key.pem"));
        let target = fs::read_link(tmp.path().join(DATA_LINK)).unwrap();
        let key_file = tmp.path().join(&target).join("ca-key.pem");
        assert_eq!(fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

        let got = store.get(&cacerts()).await.unwrap().unwrap();
        assert_eq!((&got.value, &got.version), (&bundle("1"), &v1));
        assert_eq!(store.list("istio-system").await.unwrap(), vec!["cacerts"]);

        // Compare-and-swap, and a key that went away loses its link.
        let err = store.put(&cacerts(), &bundle("x"), Precondition::Absent).await.unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
        let only_cert = Secret::with_data([("ca-cert.pem", "cert 2")]);
        let v2 = store.put(&cacerts(), &only_cert, Precondition::Version(v1.clone())).await.unwrap();
        let err = store.put(&cacerts(), &bundle("y"), Precondition::Version(v1)).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        let left = entries(tmp.path());
        assert_eq!(left.len(), 4, "{left:?}"); // ..lock, ..data, one data dir, ca-cert.pem
        assert!(left.contains("ca-cert.pem") && !left.contains("ca-key.pem"), "{left:?}");

        // Delete, then re-create: versions keep growing.
        store.delete(&cacerts(), Precondition::Version(v2.clone())).await.unwrap();
        assert!(store.get(&cacerts()).await.unwrap().is_none());
        assert_eq!(entries(tmp.path()), BTreeSet::from([LOCK_FILE.to_string()]));
        let v3 = store.put(&cacerts(), &bundle("3"), Precondition::Absent).await.unwrap();
        assert!(v3.0.parse::<u64>().unwrap() > v2.0.parse::<u64>().unwrap());
    }

    #[tokio::test]
    async fn other_keys_go_to_the_other_store_or_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mem = tmp.path().join("mem");
        fs::create_dir(&mem).unwrap();
        let alone = SingleObjectDir::open(cacerts(), &mem).unwrap();
        let identity = ObjectKey::new("meshca-system", "agent-identity").unwrap();
        let err = alone.put(&identity, &bundle("i"), Precondition::Any).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{err}");

        let disk = Arc::new(DirStore::open(tmp.path().join("state")).unwrap());
        let store = alone.with_others(disk.clone());
        store.put(&identity, &bundle("i"), Precondition::Absent).await.unwrap();
        store.put(&cacerts(), &bundle("c"), Precondition::Absent).await.unwrap();
        assert!(disk.get(&identity).await.unwrap().is_some());
        assert!(disk.get(&cacerts()).await.unwrap().is_none(), "cacerts never reaches the other store");
        assert_eq!(entries(&mem).len(), 5, "{:?}", entries(&mem));
    }

    #[tokio::test]
    async fn crash_leftovers_are_invisible_and_removed_by_the_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SingleObjectDir::open(cacerts(), tmp.path()).unwrap();
        // What a writer killed before its `..data` rename leaves behind.
        let orphan = tmp.path().join("..v0000000009_dead");
        fs::create_dir(&orphan).unwrap();
        fs::write(orphan.join("ca-key.pem"), "half").unwrap();
        symlink("..v0000000009_dead", tmp.path().join("..data_tmp")).unwrap();
        assert!(store.get(&cacerts()).await.unwrap().is_none());
        store.put(&cacerts(), &bundle("1"), Precondition::Absent).await.unwrap();
        let left = entries(tmp.path());
        assert!(!left.contains("..v0000000009_dead") && !left.contains("..data_tmp"), "{left:?}");
        assert_eq!(store.get(&cacerts()).await.unwrap().unwrap().value, bundle("1"));
    }

    #[tokio::test]
    async fn watch_sees_writes_of_another_instance() {
        let tmp = tempfile::tempdir().unwrap();
        let reader =
            SingleObjectDir::open(cacerts(), tmp.path()).unwrap().with_poll_interval(Duration::from_millis(20));
        let writer = SingleObjectDir::open(cacerts(), tmp.path()).unwrap();
        let mut w = reader.watch(&cacerts());
        assert!(w.next().await.unwrap().unwrap().is_none());
        writer.put(&cacerts(), &bundle("1"), Precondition::Absent).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(seen.unwrap().value, bundle("1"));
    }
}
