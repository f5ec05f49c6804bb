//! `meshca cluster remove NAME`: the cluster's identity and issuance stop at once, and its
//! records are archived, not deleted.
//!
//! Order matters, so that a crash at any point loses nothing and leaves no way back in:
//! 1. the registration, issued log and last status are copied into one archive object
//!    (`archived.<name>.<unix time>`, created, never overwritten);
//! 2. the registration record is deleted — from this moment every certificate of the cluster's
//!    agent is refused on every call ([`crate::identities`]) and the issuer signs nothing for it;
//!    the audit log gets its one `cluster-removed` entry;
//! 3. its unused bootstrap tokens are deleted (they would register it again);
//! 4. the issued log and status are deleted (they are in the archive).
//!
//! The cluster can be added again later with a new bootstrap token; it starts from a fresh record.

use std::time::SystemTime;

use meshca_clock::unix;
use meshca_store::{Precondition, Secret, Store, StoreError, typed};

use crate::error::MgmtError;
use crate::records::{self, TokenRecord};

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The archive object's name (namespace [`records::NAMESPACE`]).
    pub archive: String,
    /// Unused bootstrap tokens deleted.
    pub tokens: usize,
}

/// Removes `cluster` at `now` on behalf of operator `by`. `Ok(None)`: it was not registered.
pub async fn remove(store: &dyn Store, cluster: &str, by: &str, now: SystemTime) -> Result<Option<Removed>, MgmtError> {
    let cluster_key = records::cluster(cluster)?;
    let Some(registration) = store.get(&cluster_key).await? else { return Ok(None) };
    let issued_key = records::issued(cluster)?;
    let status_key = records::status(cluster)?;
    let mut archive = Secret::default()
        .label(meshca_store::labels::MANAGED_BY.0, meshca_store::labels::MANAGED_BY.1)
        .annotation("meshca.io/removed-by", by)
        .annotation("meshca.io/removed-at", &unix(now).to_string())
        .annotation("meshca.io/cluster", cluster);
    archive.data.insert(records::ARCHIVED_CLUSTER_KEY.into(), record_bytes(&registration.value));
    // The issued log as one JSON record, whichever form it is stored in; one that cannot be
    // read is archived as stored (`issued.<key>`), so the removal loses nothing and goes on.
    match records::read_issued(store, cluster).await {
        Ok(Some(log)) => {
            let json = serde_json::to_vec_pretty(&log.value).map_err(|e| StoreError::Backend(e.to_string()))?;
            archive.data.insert("issued.json".into(), json);
        }
        Ok(None) => {}
        Err(StoreError::Corrupt { reason, .. }) => {
            tracing::warn!(%cluster, %reason, "archiving an issued log that cannot be read as stored");
            if let Some(v) = store.get(&issued_key).await? {
                for (k, bytes) in &v.value.data {
                    archive.data.insert(format!("issued.{k}"), bytes.clone());
                }
            }
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(v) = store.get(&status_key).await? {
        archive.data.insert("status.json".into(), record_bytes(&v.value));
    }
    let archive_key = records::archived_cluster(cluster, unix(now))?;
    store.put(&archive_key, &archive, Precondition::Absent).await?;
    // The registration goes only if nobody changed it since it was archived (a concurrent
    // renewal would otherwise be lost from the archive); the caller retries on a conflict.
    store.delete(&cluster_key, Precondition::Version(registration.version)).await?;
    // The removal has happened (a retry finds nothing to remove): one audit entry, whatever
    // happens to the clean-up below.
    let event =
        crate::audit::Event::new(crate::audit::Action::ClusterRemoved, by, cluster).with("archive", archive_key.name());
    crate::audit::record(store, event, now).await;

    let mut tokens = 0;
    for name in store.list(records::NAMESPACE).await? {
        let Some(id) = name.strip_prefix(records::TOKEN_PREFIX) else { continue };
        let key = records::token(id)?;
        let Some(t) = typed::get::<TokenRecord>(store, &key).await? else { continue };
        if t.value.cluster == cluster && t.value.used_at.is_none() {
            match store.delete(&key, Precondition::Version(t.version)).await {
                Ok(()) => tokens += 1,
                // Used or deleted meanwhile: nothing left to do with it.
                Err(StoreError::NotFound(_) | StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for key in [&issued_key, &status_key] {
        match store.delete(key, Precondition::Any).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Removed { archive: archive_key.name().to_string(), tokens }))
}

/// The archived form of a record object: its JSON as stored.
fn record_bytes(s: &Secret) -> Vec<u8> {
    s.get(typed::RECORD_KEY).map(<[u8]>::to_vec).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use meshca_store::ObjectKey;
    use meshca_store::sqlite::SqliteStore;

    use super::*;

    /// A cluster whose issued log cannot be read is still removed, and the log is archived
    /// byte for byte as it was stored, so an operator can look at it afterwards.
    #[tokio::test]
    async fn a_cluster_with_an_unreadable_issued_log_is_removed_and_its_log_archived_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db")).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let registration = Secret::with_data([(typed::RECORD_KEY, b"{}".to_vec())]);
        store.put(&records::cluster("cluster-1").unwrap(), &registration, Precondition::Absent).await.unwrap();
        let garbled =
            Secret::with_data([("records.0.json", b"[{\"serial\":".to_vec()), ("records.1.json", b"[]".to_vec())]);
        store.put(&records::issued("cluster-1").unwrap(), &garbled, Precondition::Absent).await.unwrap();
        assert!(matches!(records::read_issued(&store, "cluster-1").await, Err(StoreError::Corrupt { .. })));

        let removed = remove(&store, "cluster-1", "operator test", now).await.unwrap().expect("it was registered");
        let archive = store.get(&ObjectKey::new(records::NAMESPACE, &removed.archive).unwrap()).await.unwrap().unwrap();
        assert_eq!(archive.value.get("issued.records.0.json"), garbled.get("records.0.json"));
        assert_eq!(archive.value.get("issued.records.1.json"), garbled.get("records.1.json"));
        assert!(archive.value.get("issued.json").is_none());
        assert!(store.get(&records::cluster("cluster-1").unwrap()).await.unwrap().is_none(), "removed");
        assert!(store.get(&records::issued("cluster-1").unwrap()).await.unwrap().is_none(), "its log went too");
    }
}
