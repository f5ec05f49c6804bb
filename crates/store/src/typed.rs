//! Typed records on top of [`Store`]: a JSON value kept under one data key, read and updated
//! with compare-and-swap retries so concurrent writers (two management-plane replicas) never
//! lose each other's updates.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ObjectKey, Precondition, Secret, Store, StoreError, Versioned};

/// The data key JSON records are stored under.
pub const RECORD_KEY: &str = "record.json";

/// How many times a conflicting update is retried before giving up.
pub const MAX_ATTEMPTS: usize = 16;

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

/// A JSON record as the secret [`put`] stores (for a write of a [`Store::put_all`] transaction).
pub fn encode<T: Serialize>(value: &T) -> Result<Secret, StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Backend(e.to_string()))?;
    Ok(Secret::with_data([(RECORD_KEY, bytes)]))
}

/// [`encode`] without the indentation, for large records written often (a cluster's issued log:
/// 64 records, about 25 kB, rewritten at every issuance), where the indentation is a sixth of the
/// bytes encoded, stored and logged to the WAL. [`get`] reads both.
pub fn encode_compact<T: Serialize>(value: &T) -> Result<Secret, StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Backend(e.to_string()))?;
    Ok(Secret::with_data([(RECORD_KEY, bytes)]))
}

/// The precondition that a write of something read as `current` holds only if nobody wrote since.
pub fn unchanged_since<T>(current: Option<&Versioned<T>>) -> Precondition {
    match current {
        Some(v) => Precondition::Version(v.version.clone()),
        None => Precondition::Absent,
    }
}

/// Whether `e` is a refused precondition (someone else wrote first): worth reading again and
/// retrying.
pub fn is_conflict(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_))
}

/// Writes a JSON record if `precondition` holds.
pub async fn put<T: Serialize>(
    store: &dyn Store,
    key: &ObjectKey,
    value: &T,
    precondition: Precondition,
) -> Result<(), StoreError> {
    store.put(key, &encode(value)?, precondition).await.map(|_| ())
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
        let pre = unchanged_since(current.as_ref());
        let Some(next) = f(current.as_ref().map(|v| &v.value)) else {
            return Ok(current.map(|v| v.value));
        };
        match put(store, key, &next, pre).await {
            Ok(()) => return Ok(Some(next)),
            Err(e) if is_conflict(&e) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Backend(format!("{key}: too many conflicting updates"))))
}
