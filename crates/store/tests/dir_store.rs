//! The directory store through the [`Store`] trait, plus what istiod sees on disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshca_store::conformance;
use meshca_store::dir::DirStore;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned};

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name).unwrap()
}

fn open() -> (tempfile::TempDir, DirStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path().join("root")).unwrap();
    (dir, store)
}

use conformance::sample_cacerts as cacerts;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn put_get_round_trip_with_growing_versions() {
    let (_dir, store) = open();
    let k = key("istio-system", "cacerts");
    assert!(store.get(&k).await.unwrap().is_none());

    let s1 = cacerts("1").annotation("empty", "").label("l2", "v2");
    let v1 = store.put(&k, &s1, Precondition::Absent).await.unwrap();
    let got = store.get(&k).await.unwrap().unwrap();
    assert_eq!(got, Versioned { value: s1.clone(), version: v1.clone() });

    // Binary data, an empty value, and fewer keys than before.
    let s2 = Secret::with_data([("bin", vec![0u8, 255, 10, 0]), ("empty", vec![])]);
    let v2 = store.put(&k, &s2, Precondition::Version(v1.clone())).await.unwrap();
    let v3 = store.put(&k, &cacerts("3"), Precondition::Any).await.unwrap();
    let n = |v: &ResourceVersion| v.0.parse::<u64>().unwrap();
    assert!(n(&v1) < n(&v2) && n(&v2) < n(&v3), "{v1} {v2} {v3}");
    let got = store.get(&k).await.unwrap().unwrap();
    assert_eq!((got.value, got.version), (cacerts("3"), v3));
}

#[tokio::test]
async fn put_all_is_all_or_nothing() {
    let (_dir, store) = open();
    conformance::put_all(&store, "ns").await;
}

#[tokio::test]
async fn preconditions() {
    let (_dir, store) = open();
    conformance::preconditions(&store, "ns").await;
    let err = store.delete(&key("never", "written"), Precondition::Any).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(!store.root().join("never").exists(), "a delete does not create directories");
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
    for bad in ["", "A", "a/b", "..", "a.b"] {
        let err = store.list(bad).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn invalid_names_and_data_keys_are_rejected() {
    for (namespace, name) in
        [("ns", "../x"), ("ns", "A"), ("ns", "a/b"), ("ns", ""), ("", "a"), ("a/b", "a"), ("ns", ".a")]
    {
        let err = ObjectKey::new(namespace, name).unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{namespace:?}/{name:?}: {err}");
    }
    let (_dir, store) = open();
    let k = key("ns", "a");
    for bad in ["..data", "..meta.json", "a/b", "", ".", "..", "../x", "sp ace"] {
        let err = store.put(&k, &Secret::with_data([(bad, "x")]), Precondition::Any).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey(_)), "{bad:?}: {err}");
    }
    assert!(store.get(&k).await.unwrap().is_none(), "rejected writes write nothing");
    // Unusual but valid keys work, including a leading single dot.
    let odd = Secret::with_data([(".hidden", "1"), ("a_b-c.d", "2"), ("X", "3")]);
    store.put(&k, &odd, Precondition::Absent).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, odd);
}

#[tokio::test]
async fn directories_are_0700_and_files_0600() {
    let (_dir, store) = open();
    let k = key("istio-system", "cacerts");
    store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    let obj = store.object_path(&k);
    let data = obj.join(std::fs::read_link(obj.join("..data")).unwrap());
    for dir in [store.root(), obj.parent().unwrap(), &obj, &data] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
        files += 1;
    }
    assert_eq!(files, 5, "four keys and the meta file");
    assert_eq!(mode(&obj.parent().unwrap().join(".cacerts.lock")), 0o600);
}

/// What istiod does with `/etc/cacerts`: plain reads of plain names, through the links.
#[tokio::test]
async fn istiod_reads_plain_files_through_the_links() {
    let (_dir, store) = open();
    let k = key("istio-system", "cacerts");
    let mount = store.root().join("istio-system").join("cacerts");
    assert_eq!(store.object_path(&k), mount);

    store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    for (name, value) in &cacerts("1").data {
        assert_eq!(&std::fs::read(mount.join(name)).unwrap(), value);
    }
    let old_key = Secret::with_data([("old.pem", "x")]);
    store.put(&k, &old_key, Precondition::Any).await.unwrap();
    store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    for (name, value) in &cacerts("2").data {
        assert_eq!(&std::fs::read(mount.join(name)).unwrap(), value);
    }
    assert!(!mount.join("old.pem").exists(), "removed keys disappear");

    // Exactly the kubelet's entries: `..data`, one data directory, one link per key.
    let names: BTreeSet<String> =
        std::fs::read_dir(&mount).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let data_dirs: Vec<&String> = names.iter().filter(|n| n.starts_with("..v")).collect();
    assert_eq!(data_dirs.len(), 1, "{names:?}");
    let mut expected: BTreeSet<String> = cacerts("2").data.keys().cloned().collect();
    expected.insert("..data".to_string());
    expected.insert(data_dirs[0].clone());
    assert_eq!(names, expected);
    for name in cacerts("2").data.keys() {
        assert_eq!(std::fs::read_link(mount.join(name)).unwrap(), Path::new("..data").join(name));
    }
}

/// Two instances on one root behave like two processes: only the file lock orders them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_compare_and_swap_loses_no_update() {
    const TASKS_PER_STORE: usize = 4;
    const INCREMENTS_PER_TASK: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let stores = [Arc::new(DirStore::open(dir.path()).unwrap()), Arc::new(DirStore::open(dir.path()).unwrap())];
    let k = key("ns", "counter");
    stores[0].put(&k, &Secret::with_data([("n", "0")]), Precondition::Absent).await.unwrap();
    let race = conformance::racing_increments(&stores, &k, TASKS_PER_STORE, INCREMENTS_PER_TASK).await.unwrap();
    let total = 2 * TASKS_PER_STORE as u64 * INCREMENTS_PER_TASK;
    assert_eq!(race.written, (1..=total).collect::<Vec<_>>());
    let last = stores[1].get(&k).await.unwrap().unwrap();
    assert_eq!(last.value.get("n").unwrap(), total.to_string().as_bytes());
    assert_eq!(last.version.0, (total + 1).to_string(), "one version per successful write");
    assert!(race.conflicts > 0, "the test should actually race");
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
    let store = DirStore::open(dir.path()).unwrap().with_poll_interval(Duration::from_secs(3600));
    let k = key("ns", "a");
    let mut watch = store.watch(&k);
    assert!(next_within(&mut watch, Duration::from_secs(5)).await.is_none(), "the current state comes first");

    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let got = next_within(&mut watch, Duration::from_secs(5)).await.unwrap();
    assert_eq!((got.value, got.version), (cacerts("1"), v1));

    // Writes to other objects wake nobody up needlessly, and are not reported.
    store.put(&key("ns", "b"), &cacerts("1"), Precondition::Absent).await.unwrap();
    let v2 = store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut watch, Duration::from_secs(5)).await.unwrap().version, v2);

    // A clone shares the notifications.
    let v3 = store.clone().put(&k, &cacerts("3"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut watch, Duration::from_secs(5)).await.unwrap().version, v3);

    store.delete(&k, Precondition::Any).await.unwrap();
    assert!(next_within(&mut watch, Duration::from_secs(5)).await.is_none());
}

#[tokio::test]
async fn watch_sees_writes_of_another_instance_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let (watcher, writer) = (DirStore::open(dir.path()).unwrap(), DirStore::open(dir.path()).unwrap());
    conformance::watch_another_instance(&watcher, &writer, "ns").await;
}

#[tokio::test]
async fn watch_reports_a_corrupt_object_once_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).unwrap().with_poll_interval(Duration::from_millis(20));
    let k = key("ns", "a");
    store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let mut watch = store.watch(&k);
    next_within(&mut watch, Duration::from_secs(1)).await.unwrap();

    let obj = store.object_path(&k);
    std::fs::remove_file(obj.join("..data")).unwrap();
    std::os::unix::fs::symlink("/nowhere", obj.join("..data")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(1), watch.next()).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    // Repeated polls of the same breakage stay quiet ...
    assert!(tokio::time::timeout(Duration::from_millis(200), watch.next()).await.is_err());
    // ... and a repair is reported.
    let v = store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut watch, Duration::from_secs(1)).await.unwrap().version, v);
}

#[tokio::test]
async fn permission_problems_are_forbidden() {
    // Root ignores file modes (and CI runs as root), so only an unprivileged run can check this.
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(true) {
        eprintln!("skipped: running as root");
        return;
    }
    let (_dir, store) = open();
    let k = key("ns", "a");
    store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let ns = store.root().join("ns");
    std::fs::set_permissions(&ns, std::fs::Permissions::from_mode(0o500)).unwrap();
    let result = store.put(&key("ns", "b"), &cacerts("1"), Precondition::Absent).await;
    std::fs::set_permissions(&ns, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Forbidden { .. }), "{err}");
}

/// What interrupted writes leave (a crash, a full disk: a half-written data directory with a key
/// in it, a `..data_tmp` link, a half-built object beside the real ones, an object moved aside
/// for deletion) is removed when the store is opened, and the objects themselves are untouched.
#[tokio::test]
async fn opening_the_store_removes_the_leftovers_of_interrupted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let k = key("istio-system", "cacerts");
    {
        let store = DirStore::open(&root).unwrap();
        store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
        store.put(&key("istio-system", "other"), &cacerts("o"), Precondition::Absent).await.unwrap();
    }
    let ns = root.join("istio-system");
    let obj = ns.join("cacerts");
    let stale = obj.join("..v0000000099_abc123");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("ca-key.pem"), "half a key").unwrap();
    std::os::unix::fs::symlink("..v0000000099_abc123", obj.join("..data_tmp")).unwrap();
    for leftover in [".cacerts_tmp", ".gone_del", ".never-finished_tmp"] {
        std::fs::create_dir_all(ns.join(leftover).join("..v0000000001_x")).unwrap();
        std::fs::write(ns.join(leftover).join("..v0000000001_x").join("ca-key.pem"), "key").unwrap();
    }

    let store = DirStore::open(&root).unwrap();
    let mut left: Vec<String> =
        std::fs::read_dir(&ns).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".cacerts.lock", ".gone.lock", ".never-finished.lock", ".other.lock", "cacerts", "other"]);
    assert!(!stale.exists() && std::fs::symlink_metadata(obj.join("..data_tmp")).is_err());
    let data_dirs = std::fs::read_dir(&obj)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("..v"))
        .count();
    assert_eq!(data_dirs, 1, "only the current version is left");
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, cacerts("1"));
    assert_eq!(store.list("istio-system").await.unwrap(), ["cacerts", "other"]);
}
