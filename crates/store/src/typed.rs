//! Typed records on top of [`Store`]: a JSON value kept under one data key, read and updated
//! with compare-and-swap retries so concurrent writers (two management-plane replicas) never
//! lose each other's updates.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ObjectKey, Precondition, Secret, Store, StoreError, Versioned};

/// The data key JSON records are stored under.
pub const RECORD_KEY: &str = "record.json";

/// How many times a conflicting update is retried before giving up.
const MAX_ATTEMPTS: usize = 16;

/// Reads a JSON record; `Ok(None)` when the object does not exist.
pub async fn get<T: DeserializeOwned>(store: &dyn Store, key: &ObjectKey) -> Result<Option<Versioned<T>>, StoreError> {
    let Some(v) = store.get(key).await? else { return Ok(None) };
    let raw = v
        .value
        .get(RECORD_KEY)
        .ok_or_else(|| StoreError::Corrupt { key: key.clone(), reason: format!("no {RECORD_KEY} key") })?;
    let value = serde_json::from_slice(raw)
        .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: format!("{RECORD_KEY}: {e}") })?;
    Ok(Some(Versioned { value, version: v.version }))
}

/// Writes a JSON record if `precondition` holds.
pub async fn put<T: Serialize>(
    store: &dyn Store,
    key: &ObjectKey,
    value: &T,
    precondition: Precondition,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Backend(e.to_string()))?;
    store.put(key, &Secret::with_data([(RECORD_KEY, bytes)]), precondition).await.map(|_| ())
}

/// Read-modify-write with compare-and-swap: `f` gets the current value (or `None`) and returns
/// the new one, or `None` to leave the record as it is. Retries on conflicts.
pub async fn update<T, F>(store: &dyn Store, key: &ObjectKey, mut f: F) -> Result<Option<T>, StoreError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<&T>) -> Option<T>,
{
    let mut last = None;
    for _ in 0..MAX_ATTEMPTS {
        let current: Option<Versioned<T>> = get(store, key).await?;
        let pre = match &current {
            Some(v) => Precondition::Version(v.version.clone()),
            None => Precondition::Absent,
        };
        let Some(next) = f(current.as_ref().map(|v| &v.value)) else {
            return Ok(current.map(|v| v.value));
        };
        match put(store, key, &next, pre).await {
            Ok(()) => return Ok(Some(next)),
            Err(e @ (StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_))) => {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Backend(format!("{key}: too many conflicting updates"))))
}
