//! Checks every [`Store`] backend must pass, shared by the backends' own test suites (the
//! directory store's and the Kubernetes store's), so both are held to exactly the same contract.
//! Test support: a failed check panics with what was wrong, like an assertion in a test.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;

use crate::{ObjectKey, Precondition, Secret, Store, StoreError, Versioned, WatchStream, Write};

/// The next watch item, which must come within `limit` and not be an error.
pub async fn next_within(stream: &mut WatchStream, limit: Duration) -> Option<Versioned<Secret>> {
    tokio::time::timeout(limit, stream.next()).await.expect("no watch event in time").unwrap().unwrap()
}

/// The watch contract for writes of another instance (another process) on the same backing
/// store, seen by polling: the current state first, then each update, delete and re-create of
/// `namespace/a` (which must not exist), and nothing while nothing changes.
pub async fn watch_another_instance<S: Store + ?Sized, W: Store + ?Sized>(watcher: &S, writer: &W, namespace: &str) {
    let k = ObjectKey::new(namespace, "a").unwrap();
    let limit = Duration::from_secs(5);
    let v1 = writer.put(&k, &sample_cacerts("1"), Precondition::Absent).await.unwrap();
    let mut watch = watcher.watch(&k);
    assert_eq!(next_within(&mut watch, limit).await.unwrap().version, v1);
    let v2 = writer.put(&k, &sample_cacerts("2"), Precondition::Any).await.unwrap();
    let got = next_within(&mut watch, limit).await.unwrap();
    assert_eq!((got.value, got.version), (sample_cacerts("2"), v2));
    writer.delete(&k, Precondition::Any).await.unwrap();
    assert!(next_within(&mut watch, limit).await.is_none());
    let v3 = writer.put(&k, &sample_cacerts("3"), Precondition::Absent).await.unwrap();
    assert_eq!(next_within(&mut watch, limit).await.unwrap().version, v3);
    // Nothing changes: nothing is reported.
    assert!(tokio::time::timeout(Duration::from_millis(700), watch.next()).await.is_err());
}

/// The contract of [`Store::put_all`], on objects `t1` and `t2` of `namespace` (which must hold
/// neither). A backend with transactions writes all or nothing: a refused precondition anywhere
/// (also on a later write, and one that only fails because of an earlier write of the same
/// transaction) leaves every object as it was and names its key; then both land with their
/// versions. A backend without them says so and writes nothing.
pub async fn put_all<S: Store + ?Sized>(store: &S, namespace: &str) {
    let (k1, k2) = (ObjectKey::new(namespace, "t1").unwrap(), ObjectKey::new(namespace, "t2").unwrap());
    let write =
        |key: &ObjectKey, g: &str, precondition| Write { key: key.clone(), secret: sample_cacerts(g), precondition };
    if !store.transactions() {
        let refused = store.put_all(vec![write(&k1, "1", Precondition::Absent)]).await;
        assert!(matches!(refused, Err(StoreError::Backend(_))), "{refused:?}");
        assert!(store.get(&k1).await.unwrap().is_none(), "a store without transactions wrote part of one");
        return;
    }
    let v1 = store.put(&k1, &sample_cacerts("1"), Precondition::Absent).await.unwrap();
    // The second write's precondition fails: the first does not land either.
    let refused = store
        .put_all(vec![
            write(&k1, "2", Precondition::Version(v1.clone())),
            write(&k2, "2", Precondition::Version(v1.clone())),
        ])
        .await;
    assert!(matches!(&refused, Err(StoreError::NotFound(k)) if *k == k2), "{refused:?}");
    // A precondition that only the transaction's own earlier write breaks.
    let refused = store
        .put_all(vec![
            write(&k1, "2", Precondition::Version(v1.clone())),
            write(&k1, "3", Precondition::Version(v1.clone())),
        ])
        .await;
    assert!(matches!(&refused, Err(StoreError::Conflict { key, .. }) if *key == k1), "{refused:?}");
    let refused =
        store.put_all(vec![write(&k2, "2", Precondition::Absent), write(&k1, "2", Precondition::Absent)]).await;
    assert!(matches!(&refused, Err(StoreError::AlreadyExists(k)) if *k == k1), "{refused:?}");
    let now = store.get(&k1).await.unwrap().unwrap();
    assert_eq!((now.value, now.version), (sample_cacerts("1"), v1.clone()), "a refused transaction changed {k1}");
    assert!(store.get(&k2).await.unwrap().is_none(), "a refused transaction created {k2}");
    // Every precondition holds: both land, each at the version returned.
    let versions = store
        .put_all(vec![write(&k1, "2", Precondition::Version(v1)), write(&k2, "2", Precondition::Absent)])
        .await
        .unwrap();
    assert_eq!(versions.len(), 2);
    for (k, v) in [&k1, &k2].into_iter().zip(versions) {
        let got = store.get(k).await.unwrap().unwrap();
        assert_eq!((got.value, got.version), (sample_cacerts("2"), v), "{k}");
    }
}

/// A `cacerts`-shaped object (the four Istio keys, the managed-by label, a generation
/// annotation) whose contents say which `generation` it is.
pub fn sample_cacerts(generation: &str) -> Secret {
    Secret::with_data([
        ("ca-cert.pem", format!("cert {generation}")),
        ("ca-key.pem", format!("key {generation}")),
        ("cert-chain.pem", format!("chain {generation}")),
        ("root-cert.pem", format!("root {generation}")),
    ])
    .label("app.kubernetes.io/managed-by", "meshca")
    .annotation("meshca.io/generation", generation)
}

/// The precondition contract of `put` and `delete`, on objects `a` and `missing` of `namespace`
/// (which must hold neither): `Absent` creates only, `Version` is compare-and-swap (a stale
/// writer loses, is told both versions and leaves no trace), `Any` creates or overwrites, and
/// deletes follow the same rules. Leaves `missing` behind and `a` deleted.
pub async fn preconditions<S: Store + ?Sized>(store: &S, namespace: &str) {
    let k = ObjectKey::new(namespace, "a").unwrap();
    let missing = ObjectKey::new(namespace, "missing").unwrap();
    assert!(store.get(&k).await.unwrap().is_none(), "{k} must not exist yet");

    let v1 = store.put(&k, &sample_cacerts("1"), Precondition::Absent).await.unwrap();
    let got = store.get(&k).await.unwrap().unwrap();
    assert_eq!((&got.value, &got.version), (&sample_cacerts("1"), &v1), "what was written is read back");
    let err = store.put(&k, &sample_cacerts("x"), Precondition::Absent).await.unwrap_err();
    assert!(matches!(&err, StoreError::AlreadyExists(got) if *got == k), "{err}");

    let v2 = store.put(&k, &sample_cacerts("2"), Precondition::Version(v1.clone())).await.unwrap();
    match store.put(&k, &sample_cacerts("stale"), Precondition::Version(v1.clone())).await {
        Err(StoreError::Conflict { key: got, expected, found }) => {
            assert_eq!((got, expected, found), (k.clone(), v1.0.clone(), v2.0.clone()));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, sample_cacerts("2"), "the losing write left no trace");

    let err = store.put(&missing, &sample_cacerts("1"), Precondition::Version(v1.clone())).await.unwrap_err();
    assert!(matches!(&err, StoreError::NotFound(got) if *got == missing), "{err}");
    assert!(store.get(&missing).await.unwrap().is_none());
    store.put(&missing, &sample_cacerts("1"), Precondition::Any).await.unwrap();
    store.put(&missing, &sample_cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(store.get(&missing).await.unwrap().unwrap().value, sample_cacerts("2"));
    // A write replaces the whole object: data keys it does not carry are gone, the others hold
    // the new values (of another size than the old).
    let fewer = Secret::with_data([("ca-cert.pem", "replaced, and longer than the value it replaces")]);
    store.put(&missing, &fewer, Precondition::Any).await.unwrap();
    assert_eq!(store.get(&missing).await.unwrap().unwrap().value, fewer, "a put left data keys behind");
    store.put(&missing, &sample_cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(store.get(&missing).await.unwrap().unwrap().value, sample_cacerts("2"));

    let err = store.delete(&k, Precondition::Version(v1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let err = store.delete(&k, Precondition::Absent).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
    store.delete(&k, Precondition::Version(v2.clone())).await.unwrap();
    assert!(store.get(&k).await.unwrap().is_none());
    let err = store.delete(&k, Precondition::Version(v2)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    let err = store.delete(&k, Precondition::Any).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    store.delete(&k, Precondition::Absent).await.unwrap();
}

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
