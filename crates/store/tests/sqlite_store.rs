//! The SQLite store through the [`Store`] trait: the conformance suite the other backends pass,
//! group commit, what is on disk, and the move of a directory store into it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshca_store::conformance::{self, sample_cacerts as cacerts};
use meshca_store::dir::DirStore;
use meshca_store::migrate::{self, LEGACY_DIR, MIGRATED_DIR};
use meshca_store::sqlite::SqliteStore;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned};

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name).unwrap()
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("data").join("store.db")).unwrap();
    (dir, store)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn put_get_round_trip_with_growing_versions_and_binary_data() {
    let (_dir, store) = open();
    let k = key("istio-system", "cacerts");
    assert!(store.get(&k).await.unwrap().is_none());
    let s1 = cacerts("1").annotation("empty", "").label("l2", "v2");
    let v1 = store.put(&k, &s1, Precondition::Absent).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap().unwrap(), Versioned { value: s1, version: v1.clone() });

    // Binary data, an empty value, and fewer keys than before: the old keys are gone.
    let s2 = Secret::with_data([("bin", vec![0u8, 255, 10, 0]), ("empty", vec![])]);
    let v2 = store.put(&k, &s2, Precondition::Version(v1.clone())).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, s2);
    let v3 = store.put(&k, &cacerts("3"), Precondition::Any).await.unwrap();
    let n = |v: &ResourceVersion| v.0.parse::<u64>().unwrap();
    assert!(n(&v1) < n(&v2) && n(&v2) < n(&v3), "{v1} {v2} {v3}");
    // An object with no data keys at all still exists.
    let k2 = key("ns", "labels-only");
    store.put(&k2, &Secret::default().label("a", "b"), Precondition::Absent).await.unwrap();
    assert_eq!(store.get(&k2).await.unwrap().unwrap().value, Secret::default().label("a", "b"));
}

#[tokio::test]
async fn preconditions() {
    let (_dir, store) = open();
    conformance::preconditions(&store, "ns").await;
}

#[tokio::test]
async fn put_all_is_all_or_nothing() {
    let (_dir, store) = open();
    conformance::put_all(&store, "ns").await;
}

#[tokio::test]
async fn versions_keep_growing_across_delete_and_recreate() {
    let (_dir, store) = open();
    let k = key("ns", "a");
    let s = Secret::with_data([("x", "1")]);
    store.put(&k, &s, Precondition::Absent).await.unwrap();
    let v2 = store.put(&k, &s, Precondition::Any).await.unwrap();
    store.delete(&k, Precondition::Any).await.unwrap();
    let v3 = store.put(&k, &s, Precondition::Absent).await.unwrap();
    assert!(v3.0.parse::<u64>().unwrap() > v2.0.parse::<u64>().unwrap());
    let err = store.put(&k, &s, Precondition::Version(v2)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

#[tokio::test]
async fn list_is_sorted_per_namespace_and_skips_deleted_objects() {
    let (_dir, store) = open();
    assert!(store.list("ns").await.unwrap().is_empty());
    for name in ["b", "a.example", "c-1", "a"] {
        store.put(&key("ns", name), &cacerts("1"), Precondition::Absent).await.unwrap();
    }
    store.put(&key("other", "z"), &cacerts("1"), Precondition::Absent).await.unwrap();
    store.delete(&key("ns", "b"), Precondition::Any).await.unwrap();
    assert_eq!(store.list("ns").await.unwrap(), vec!["a", "a.example", "c-1"]);
    assert_eq!(store.list("other").await.unwrap(), vec!["z"]);
    assert_eq!(store.namespaces().await.unwrap(), vec!["ns", "other"]);
    for bad in ["", "A", "a/b", "..", "a.b"] {
        let err = store.list(bad).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn invalid_data_keys_are_rejected_and_nothing_is_written() {
    let (_dir, store) = open();
    let k = key("ns", "a");
    for bad in ["", ".", "..x", "a/b", "sp ace"] {
        let err = store.put(&k, &Secret::with_data([(bad, "v")]), Precondition::Any).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{bad:?}: {err}");
    }
    assert!(store.get(&k).await.unwrap().is_none());
}

/// Two instances on one file behave like two processes: only SQLite's locks order them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_compare_and_swap_loses_no_update() {
    const TASKS_PER_STORE: usize = 4;
    const INCREMENTS_PER_TASK: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let stores = [Arc::new(SqliteStore::open(&path).unwrap()), Arc::new(SqliteStore::open(&path).unwrap())];
    let k = key("ns", "counter");
    stores[0].put(&k, &Secret::with_data([("n", "0")]), Precondition::Absent).await.unwrap();
    let race = conformance::racing_increments(&stores, &k, TASKS_PER_STORE, INCREMENTS_PER_TASK).await.unwrap();
    let total = 2 * TASKS_PER_STORE as u64 * INCREMENTS_PER_TASK;
    assert_eq!(race.written, (1..=total).collect::<Vec<_>>());
    assert_eq!(stores[1].get(&k).await.unwrap().unwrap().value.get("n").unwrap(), total.to_string().as_bytes());
    assert!(race.conflicts > 0, "the test should actually race");
}

/// Writes queued while a commit is under way share the next commit: with the database locked by
/// another connection, 64 writers queue up behind the writer thread's first batch, and all of them
/// then go to disk in at most two commits (the batch already taken, and one for the rest), each
/// writer answered with its own outcome — a failed precondition among them undoes only that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_a_commit_and_fail_alone() {
    let (dir, store) = open();
    let path = dir.path().join("data").join("store.db");
    let lock = rusqlite_lock(&path);
    let stats0 = store.stats();
    let mut writes = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            // Writer 7 asks for a compare-and-swap on an object that does not exist.
            let pre = if i == 7 { Precondition::Version(ResourceVersion("1".into())) } else { Precondition::Absent };
            store.put(&key("ns", &format!("o-{i}")), &cacerts(&i.to_string()), pre).await
        }));
    }
    // Every writer is either in the batch the (blocked) writer thread holds or queued behind it.
    while store.queued_writes() as u64 + store.stats().received - stats0.received < 64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(lock);
    let mut ok = 0;
    for (i, w) in writes.into_iter().enumerate() {
        match w.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::NotFound(k)) if i == 7 => assert_eq!(k, key("ns", "o-7")),
            Err(e) => panic!("writer {i}: {e}"),
        }
    }
    assert_eq!(ok, 63);
    let stats = store.stats();
    assert_eq!(stats.answered - stats0.answered, 64, "{stats:?}");
    assert!(stats.commits - stats0.commits <= 2, "64 writes took {} commits", stats.commits - stats0.commits);
    assert_eq!(store.list("ns").await.unwrap().len(), 63);
    assert!(store.get(&key("ns", "o-7")).await.unwrap().is_none());
}

/// Holds the database's write lock from a connection of its own until dropped.
fn rusqlite_lock(path: &Path) -> impl Drop {
    struct Held(Option<std::thread::JoinHandle<()>>, std::sync::mpsc::Sender<()>);
    impl Drop for Held {
        fn drop(&mut self) {
            let _ = self.1.send(());
            if let Some(t) = self.0.take() {
                t.join().unwrap();
            }
        }
    }
    let (release, released) = std::sync::mpsc::channel();
    let (locked, is_locked) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    let t = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        c.execute_batch("ROLLBACK").unwrap();
    });
    is_locked.recv().unwrap();
    Held(Some(t), release)
}

#[tokio::test]
async fn the_database_is_private_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = data.join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    let v = store.put(&key("meshca", "root-ca"), &cacerts("1"), Precondition::Absent).await.unwrap();
    assert_eq!(mode(&data), 0o700);
    for f in ["store.db", "store.db-wal", "store.db-shm"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let got = store.get(&key("meshca", "root-ca")).await.unwrap().unwrap();
    assert_eq!((got.value, got.version), (cacerts("1"), v));
}

#[tokio::test]
async fn a_file_that_is_not_a_database_or_from_a_newer_meshca_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

    let path = dir.path().join("newer.db");
    drop(SqliteStore::open(&path).unwrap());
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("newer meshca"), "{err}");
}

type Item = Result<Option<Versioned<Secret>>, StoreError>;

async fn next_within(
    stream: &mut (impl futures::Stream<Item = Item> + Unpin),
    limit: Duration,
) -> Option<Versioned<Secret>> {
    tokio::time::timeout(limit, stream.next()).await.expect("no watch event in time").unwrap().unwrap()
}

#[tokio::test]
async fn watch_sees_writes_through_the_same_store_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Polling so rare it cannot explain anything this test sees: only the in-process notification can.
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap().with_poll_interval(Duration::from_secs(3600));
    let k = key("ns", "a");
    let mut watch = store.watch(&k);
    assert!(next_within(&mut watch, Duration::from_secs(5)).await.is_none(), "the current state comes first");
    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let got = next_within(&mut watch, Duration::from_secs(5)).await.unwrap();
    assert_eq!((got.value, got.version), (cacerts("1"), v1));
    store.put(&key("ns", "b"), &cacerts("1"), Precondition::Absent).await.unwrap();
    let v2 = store.clone().put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut watch, Duration::from_secs(5)).await.unwrap().version, v2);
    store.delete(&k, Precondition::Any).await.unwrap();
    assert!(next_within(&mut watch, Duration::from_secs(5)).await.is_none());
}

#[tokio::test]
async fn watch_sees_writes_of_another_instance_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let watcher = SqliteStore::open(&path).unwrap().with_poll_interval(Duration::from_millis(50));
    conformance::watch_another_instance(&watcher, &SqliteStore::open(&path).unwrap(), "ns").await;
}

/// A data folder from an earlier meshca: its directory store is moved into the database once,
/// every object (data, labels, annotations) arrives unchanged, the directory is kept aside, and
/// opening again changes nothing.
#[tokio::test]
async fn a_directory_store_is_moved_in_once_and_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let legacy = DirStore::open(data.join(LEGACY_DIR)).unwrap();
    let mut expected = BTreeMap::new();
    for (ns, name, secret) in [
        ("meshca", "root-ca", cacerts("root")),
        ("meshca", "cluster-c1", Secret::with_data([("record.json", "{}")]).label("a", "b")),
        ("meshca", "bootstrap-token-abc", Secret::with_data([("record.json", vec![0u8, 1, 2])])),
        ("other", "x", Secret::default().annotation("k", "v")),
    ] {
        legacy.put(&key(ns, name), &secret, Precondition::Absent).await.unwrap();
        expected.insert(key(ns, name), secret);
    }
    // A namespace directory with nothing in it, and a deleted object, are not objects.
    legacy.put(&key("empty", "gone"), &cacerts("x"), Precondition::Absent).await.unwrap();
    legacy.delete(&key("empty", "gone"), Precondition::Any).await.unwrap();
    drop(legacy);

    let (db, migrated) = migrate::open_management_store(data).await.unwrap();
    let migrated = migrated.unwrap();
    assert_eq!((migrated.copied.objects, migrated.copied.written), (4, 4));
    assert_eq!(migrated.moved_to, data.join(MIGRATED_DIR));
    assert!(!data.join(LEGACY_DIR).exists());
    for (k, v) in &expected {
        assert_eq!(&db.get(k).await.unwrap().unwrap().value, v, "{k}");
    }
    assert_eq!(db.list("meshca").await.unwrap(), vec!["bootstrap-token-abc", "cluster-c1", "root-ca"]);
    assert!(db.list("empty").await.unwrap().is_empty());
    let kept = DirStore::open(data.join(MIGRATED_DIR)).unwrap();
    assert_eq!(kept.get(&key("meshca", "root-ca")).await.unwrap().unwrap().value, cacerts("root"));

    let versions: Vec<_> =
        futures::future::join_all(expected.keys().map(|k| db.get(k))).await.into_iter().map(|g| g.unwrap()).collect();
    drop(db);
    let (db, again) = migrate::open_management_store(data).await.unwrap();
    assert_eq!(again, None);
    for (k, before) in expected.keys().zip(versions) {
        assert_eq!(db.get(k).await.unwrap(), before, "{k} unchanged by a second open");
    }

    // The copy itself is idempotent: a second pass over the same directory writes nothing.
    let copied = migrate::copy_all(&kept, &db).await.unwrap();
    assert_eq!((copied.objects, copied.written), (4, 0));
}

/// An object the directory store cannot read stops the move, names the object, and leaves the
/// directory store where it was, so nothing is lost.
#[tokio::test]
async fn a_corrupt_directory_store_object_stops_the_move_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let legacy = DirStore::open(data.join(LEGACY_DIR)).unwrap();
    legacy.put(&key("meshca", "good"), &cacerts("1"), Precondition::Absent).await.unwrap();
    std::fs::create_dir(legacy.object_path(&key("meshca", "broken"))).unwrap();
    let err = migrate::open_management_store(data).await.unwrap_err();
    assert!(err.to_string().contains("meshca/broken"), "{err}");
    assert!(data.join(LEGACY_DIR).join("meshca").join("good").is_dir(), "the directory store stays");
}
