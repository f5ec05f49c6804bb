//! The management plane's store on a single machine, and the one-time move of an older data
//! folder's directory store into it (docs/architecture.md, "Stores").
//!
//! A data folder holds `store.db` (a [`SqliteStore`]). A data folder written by an earlier meshca
//! holds `store/` (a [`DirStore`]) instead; [`open_management_store`] then copies every object of
//! `store/` into `store.db` and renames `store/` to `store.migrated/` (kept, not deleted: it is
//! the operator's backup), all before the management plane serves anything.
//!
//! Crash safety without one big transaction: the copy is idempotent (an object already in the
//! database with the same content is left alone, any other is written), and `store/` keeps its
//! name until every copy is durable. A crash during the copy leaves `store/` in place, so the next
//! start copies again and finishes; a crash after the rename finds nothing left to do. Resource
//! versions are not carried over: they are opaque, and nothing holds one across a restart.

use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};

use crate::dir::DirStore;
use crate::sqlite::SqliteStore;
use crate::{ObjectKey, Precondition, Store, StoreError};

/// The database file in a data folder.
pub const DB_FILE: &str = "store.db";
/// An earlier meshca's directory store in a data folder.
pub const LEGACY_DIR: &str = "store";
/// Where the directory store goes once its objects are in the database.
pub const MIGRATED_DIR: &str = "store.migrated";

/// Copies in flight at once: enough for the writer thread to commit them in shared batches.
const PARALLEL_COPIES: usize = 256;

/// What [`copy_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Objects found in the directory store.
    pub objects: usize,
    /// Of those, the ones written (the others were in the database already, unchanged).
    pub written: usize,
}

/// What [`open_management_store`] did with an older directory store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The copy.
    pub copied: Copied,
    /// Where the directory store is now.
    pub moved_to: PathBuf,
}

/// Opens the management plane's store in `data_dir` (created 0700 if missing), first moving an
/// older directory store there into it; see the [module documentation](self).
pub async fn open_management_store(data_dir: &Path) -> Result<(SqliteStore, Option<Migrated>), StoreError> {
    let db_path = data_dir.join(DB_FILE);
    let db = crate::dir::run_blocking(move || SqliteStore::open(db_path)).await?;
    let legacy = data_dir.join(LEGACY_DIR);
    if !legacy.is_dir() {
        return Ok((db, None));
    }
    let copied = copy_all(&DirStore::open(&legacy)?, &db).await?;
    let moved_to = free_name(data_dir);
    let who = legacy.display().to_string();
    std::fs::rename(&legacy, &moved_to).map_err(crate::dir::io_err(&who, &legacy))?;
    crate::dir::sync_dir(&who, data_dir)?;
    tracing::info!(
        from = %legacy.display(),
        to = %db.path().display(),
        objects = copied.objects,
        written = copied.written,
        kept = %moved_to.display(),
        "moved the directory store into the database"
    );
    Ok((db, Some(Migrated { copied, moved_to })))
}

/// `store.migrated`, or `store.migrated.N` if an earlier migration left one.
fn free_name(data_dir: &Path) -> PathBuf {
    let first = data_dir.join(MIGRATED_DIR);
    if !first.exists() {
        return first;
    }
    (2..).map(|n| data_dir.join(format!("{MIGRATED_DIR}.{n}"))).find(|p| !p.exists()).unwrap_or(first)
}

/// What happened to one entry of the directory store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    NoObject,
    AlreadyThere,
    Written,
}

/// Copies every object of `from` into `to` unless `to` holds it with the same content
/// (data, labels, annotations). Idempotent; never deletes anything from `to`. An object `from`
/// cannot read stops the copy with its error (naming it), rather than being left behind.
pub async fn copy_all(from: &DirStore, to: &dyn Store) -> Result<Copied, StoreError> {
    let mut keys = Vec::new();
    for namespace in from.namespaces().await? {
        for name in from.names_on_disk(&namespace).await? {
            keys.push(ObjectKey::new(&namespace, &name)?);
        }
    }
    let written = futures::stream::iter(keys)
        .map(|key| async move {
            let Some(source) = from.get(&key).await? else {
                return Ok::<_, StoreError>(Copy::NoObject); // a crashed create's leftovers
            };
            match to.get(&key).await? {
                Some(there) if there.value == source.value => Ok(Copy::AlreadyThere),
                _ => to.put(&key, &source.value, Precondition::Any).await.map(|_| Copy::Written),
            }
        })
        .buffer_unordered(PARALLEL_COPIES)
        .try_fold((0, 0), |(objects, written), c| async move {
            Ok((objects + usize::from(c != Copy::NoObject), written + usize::from(c == Copy::Written)))
        })
        .await?;
    Ok(Copied { objects: written.0, written: written.1 })
}
