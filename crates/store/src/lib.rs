//! The store: namespaced secrets with a resource version, compare-and-swap updates, atomic
//! multi-key writes and change notification (docs/architecture.md, "Stores").
//!
//! Everything meshca persists goes through [`Store`]: `cacerts`, the management plane's root and
//! registry, issued-serial records and status. Backends: [`sqlite::SqliteStore`] (the management
//! plane's own state on a single machine: one transactional file, group commit),
//! [`dir::DirStore`] (a directory tree laid out like a kubelet secret volume, where files are the
//! interface: a cluster's `cacerts`, which istiod mounts) and, in Kubernetes mode, Secrets through
//! the API server. [`single::SingleObjectDir`] keeps one object at the root of a given directory
//! (Vault mode's memory-backed `cacerts` folder). [`migrate`] moves a management plane's
//! directory store into SQLite once.
#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod conformance;
pub mod dir;
pub mod fsutil;
pub mod labels;
pub mod migrate;
pub mod single;
pub mod sqlite;
pub mod typed;
mod watch;

use std::collections::BTreeMap;
use std::fmt;

use futures::stream::BoxStream;
use zeroize::Zeroize;

/// Names an object: a namespace and a name, both DNS-1123 labels/subdomains as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    namespace: String,
    name: String,
}

impl ObjectKey {
    /// Validates and builds a key. Names are DNS-1123 subdomains (lowercase alphanumerics, `-`,
    /// `.`, at most 253 characters, starting and ending alphanumeric); namespaces DNS-1123 labels
    /// (no `.`, at most 63). This also keeps every key a single safe path component.
    pub fn new(namespace: &str, name: &str) -> Result<Self, StoreError> {
        if !is_dns_label(namespace) {
            return Err(StoreError::InvalidKey(format!("namespace {namespace:?} is not a DNS-1123 label")));
        }
        if !is_dns_subdomain(name) {
            return Err(StoreError::InvalidKey(format!("name {name:?} is not a DNS-1123 subdomain")));
        }
        Ok(ObjectKey { namespace: namespace.to_string(), name: name.to_string() })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Whether `key` is a valid data key: `[-._a-zA-Z0-9]+`, not `.`/`..`, not starting with `..`
/// (reserved for the directory backend's bookkeeping), at most 253 characters — the rule
/// Kubernetes applies to Secret data keys.
pub fn is_valid_data_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && !key.starts_with("..")
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// A secret: data keys to bytes, plus labels and annotations. Data is wiped on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret {
    /// The data, by key (for `cacerts`: the four file names).
    pub data: BTreeMap<String, Vec<u8>>,
    /// Labels (e.g. `app.kubernetes.io/managed-by: meshca`).
    pub labels: BTreeMap<String, String>,
    /// Annotations (e.g. the policy generation a `cacerts` was issued under).
    pub annotations: BTreeMap<String, String>,
}

impl Drop for Secret {
    fn drop(&mut self) {
        for v in self.data.values_mut() {
            v.zeroize();
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys and sizes only: values may be private keys.
        let data: BTreeMap<&str, usize> = self.data.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("Secret")
            .field("data_sizes", &data)
            .field("labels", &self.labels)
            .field("annotations", &self.annotations)
            .finish()
    }
}

impl Secret {
    /// A secret with the given data entries.
    pub fn with_data<I, K, V>(entries: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<Vec<u8>>,
    {
        // Not `..Default::default()`: a type with `Drop` cannot be the base of a struct update.
        Secret {
            data: entries.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    /// A data value.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }
}

/// An opaque resource version: changes on every write; compare only for equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceVersion(pub String);

impl fmt::Display for ResourceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value with the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its resource version.
    pub version: ResourceVersion,
}

/// What must hold for a write to go ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The object must not exist (create).
    Absent,
    /// The object must be at exactly this version (compare-and-swap).
    Version(ResourceVersion),
    /// Unconditional.
    Any,
}

/// One write of a [`Store::put_all`] transaction.
#[derive(Debug, Clone)]
pub struct Write {
    /// The object.
    pub key: ObjectKey,
    /// Its new content (every data key, label and annotation).
    pub secret: Secret,
    /// What must hold for it (and so for the whole transaction) to go ahead.
    pub precondition: Precondition,
}

/// Store failures. No variant carries secret data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A namespace, name or data key is not valid.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A compare-and-swap lost: someone else wrote first.
    #[error("conflict on {key}: expected version {expected}, found {found}")]
    Conflict {
        /// The object.
        key: ObjectKey,
        /// The version the writer expected.
        expected: String,
        /// The version found. (A `Version` precondition on a missing object is `NotFound`.)
        found: String,
    },
    /// A create found the object already there.
    #[error("{0} already exists")]
    AlreadyExists(ObjectKey),
    /// A conditional update or delete found nothing.
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// Stored data does not read back (a corrupt or foreign file).
    #[error("{key} is corrupt: {reason}")]
    Corrupt {
        /// The object.
        key: ObjectKey,
        /// What is wrong.
        reason: String,
    },
    /// Access denied by the backend (file permissions, Kubernetes RBAC).
    #[error("permission denied on {key}: {reason}")]
    Forbidden {
        /// The object.
        key: String,
        /// The backend's message.
        reason: String,
    },
    /// An I/O error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Any other backend failure (e.g. the API server is unreachable).
    #[error("store backend: {0}")]
    Backend(String),
}

/// A stream of an object's state: the current state first, then each change. `None` means the
/// object does not exist (or was deleted).
pub type WatchStream = BoxStream<'static, Result<Option<Versioned<Secret>>, StoreError>>;

/// Namespaced secrets with optimistic concurrency, atomic multi-key writes and watch.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads an object.
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError>;

    /// Writes every data key, label and annotation of `secret` as one atomic update, if
    /// `precondition` holds. Readers see the old object or the new one, never a mix.
    async fn put(
        &self,
        key: &ObjectKey,
        secret: &Secret,
        precondition: Precondition,
    ) -> Result<ResourceVersion, StoreError>;

    /// Whether [`Store::put_all`] writes several objects as one transaction on this backend.
    fn transactions(&self) -> bool {
        false
    }

    /// Whether a put costs in proportion to the data keys it changes rather than to the whole
    /// object (SQLite leaves a row whose value is unchanged alone). A large record written often
    /// is then worth splitting across keys, so that each write touches little of it; where every
    /// put rewrites the whole object anyway (the directory tree writes and fsyncs a file per key,
    /// the Kubernetes API takes the Secret whole), splitting would only add files.
    fn partial_writes(&self) -> bool {
        false
    }

    /// Writes every one of `writes` as one atomic transaction, if every precondition holds: all of
    /// them land, or none does and the error is that of the first write that could not (a
    /// refused precondition names its key: `Conflict`, `AlreadyExists`, `NotFound`). Preconditions
    /// see the transaction's earlier writes. Returns each write's new version, in order. Only
    /// where [`Store::transactions`] says so (SQLite); elsewhere a `Backend` error and nothing
    /// written: the directory tree and the Kubernetes API have no multi-object transactions.
    async fn put_all(&self, writes: Vec<Write>) -> Result<Vec<ResourceVersion>, StoreError> {
        let keys: Vec<String> = writes.iter().map(|w| w.key.to_string()).collect();
        Err(StoreError::Backend(format!(
            "this store cannot write several objects as one transaction ({})",
            keys.join(", ")
        )))
    }

    /// Deletes an object, if `precondition` holds. As in Kubernetes, deleting a missing object
    /// with `Any` or `Version` is `NotFound`; with `Absent` it succeeds and does nothing.
    async fn delete(&self, key: &ObjectKey, precondition: Precondition) -> Result<(), StoreError>;

    /// Names of the objects in a namespace, sorted.
    async fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError>;

    /// Watches one object. A read error is yielded once and the stream keeps watching; the next
    /// change (or the fix) is yielded after it.
    fn watch(&self, key: &ObjectKey) -> WatchStream;
}
