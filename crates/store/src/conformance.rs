//! Checks every [`Store`] backend must pass, shared by the backends' own test suites (the
//! directory store's and the Kubernetes store's), so both are held to exactly the same contract.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{ObjectKey, Precondition, Secret, Store, StoreError};

/// What [`racing_increments`] saw.
#[derive(Debug)]
pub struct RaceOutcome {
    /// Every value a successful write stored, sorted. With no lost update this is exactly
    /// `1..=stores × tasks × increments`: had two writers both succeeded from the same read, a
    /// value would repeat and the counter would fall short.
    pub written: Vec<u64>,
    /// How many writes lost a compare-and-swap and were retried (should be > 0, or nothing raced).
    pub conflicts: u64,
}

/// Runs `tasks_per_store` concurrent tasks on each of `stores` (instances sharing one backing
/// store, like two processes or two replicas), each adding 1 to the decimal counter in data key
/// `n` of `key` `increments` times: read, then write with `Precondition::Version` of what it read,
/// retrying on conflict. `key` must already hold `n`.
pub async fn racing_increments<S: Store + 'static>(
    stores: &[Arc<S>],
    key: &ObjectKey,
    tasks_per_store: usize,
    increments: u64,
) -> Result<RaceOutcome, StoreError> {
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for store in stores {
        for _ in 0..tasks_per_store {
            let (store, key, conflicts) = (Arc::clone(store), key.clone(), Arc::clone(&conflicts));
            tasks.push(tokio::spawn(async move {
                let mut written = Vec::new();
                for _ in 0..increments {
                    loop {
                        let current = store.get(&key).await?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
                        let n: u64 = current
                            .value
                            .get("n")
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| StoreError::Backend(format!("{key}: no decimal counter in data key n")))?;
                        let next = Secret::with_data([("n", (n + 1).to_string())]);
                        match store.put(&key, &next, Precondition::Version(current.version)).await {
                            Ok(_) => {
                                written.push(n + 1);
                                break;
                            }
                            Err(StoreError::Conflict { .. }) => {
                                conflicts.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(written)
            }));
        }
    }
    let mut written = Vec::new();
    for task in tasks {
        let part = task.await.map_err(|e| StoreError::Backend(format!("a racing task failed: {e}")))??;
        written.extend(part);
    }
    written.sort_unstable();
    Ok(RaceOutcome { written, conflicts: conflicts.load(Ordering::Relaxed) })
}
