//! Crash safety with real processes, for the directory store and the SQLite store alike: a writer
//! is SIGKILLed at random points, many times, and the store must always hold a whole generation
//! (or nothing, before the first create finished), never go backwards, hold at least every
//! generation the writer was told was written (durable before the answer), and be cleaned up by
//! the next writer. The same for a migration of a directory store into SQLite killed midway: the
//! next start finishes it and every object arrives intact.
#![allow(clippy::unwrap_used)]

#[path = "../src/bin/store-crash-writer/payload.rs"]
mod payload;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshca_store::dir::DirStore;
use meshca_store::sqlite::SqliteStore;
use meshca_store::{ObjectKey, Precondition, Store};

const ITERATIONS: u32 = 250;
/// The kill lands uniformly in this window after the writer reports it is ready to write.
const MAX_DELAY_MS: u64 = 30;
/// Every this many iterations the test deletes the object, so kills also land inside creates.
const DELETE_EVERY: u32 = 5;

/// A small xorshift: the kill schedule only needs to be varied and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn rng() -> Rng {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    eprintln!("crash test seed {seed} (rerun with CRASH_SEED={seed})");
    Rng(seed)
}

/// Starts the helper and waits for its `ready`.
fn start_writer(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    if ready.trim() != "ready" {
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("the writer did not start: {err}");
    }
    (child, out)
}

/// SIGKILLs the helper after `delay` and returns what it printed. Unless `may_finish`, it must
/// still be running then.
fn kill_after(
    mut child: Child,
    mut out: BufReader<std::process::ChildStdout>,
    delay: Duration,
    may_finish: bool,
    what: &str,
) -> String {
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap().filter(|s| !(may_finish && s.success())) {
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("{what}: the writer exited by itself ({status}): {err}");
    }
    let _ = child.kill(); // SIGKILL (an error: it had finished)
    child.wait().unwrap();
    let mut printed = String::new();
    out.read_to_string(&mut printed).unwrap();
    printed
}

/// The highest generation the writer was told was written, per object (`ack <key> <n>` lines).
fn acknowledged(printed: &str) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    for line in printed.lines() {
        let mut words = line.split(' ');
        if let (Some("ack"), Some(key), Some(n)) = (words.next(), words.next(), words.next()) {
            let n: u64 = n.parse().unwrap();
            let e = acked.entry(key.to_string()).or_insert(n);
            *e = (*e).max(n);
        }
    }
    acked
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Dir,
    Sqlite,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Dir => "dir",
            Backend::Sqlite => "sqlite",
        }
    }

    fn open(self, path: &Path) -> Arc<dyn Store> {
        match self {
            Backend::Dir => Arc::new(DirStore::open(path).unwrap()),
            Backend::Sqlite => Arc::new(SqliteStore::open(path).unwrap()),
        }
    }
}

#[tokio::test]
async fn a_directory_store_writer_killed_at_random_points_never_leaves_a_torn_object() {
    killed_writers(Backend::Dir).await;
}

#[tokio::test]
async fn a_sqlite_store_writer_killed_at_random_points_never_loses_an_acknowledged_write() {
    killed_writers(Backend::Sqlite).await;
}

async fn killed_writers(backend: Backend) {
    let mut rng = rng();
    let dir = tempfile::tempdir().unwrap();
    let root = match backend {
        Backend::Dir => dir.path().join("store"),
        Backend::Sqlite => dir.path().join("store.db"),
    };
    let k = ObjectKey::new("istio-system", "cacerts").unwrap();
    let ns_dir = root.join(k.namespace());
    let obj_dir = ns_dir.join(k.name());

    // `last_n`: the newest generation known to be durable. `may_be_absent`: no create has
    // finished since the start or since the test's last delete.
    let (mut last_n, mut last_version, mut may_be_absent) = (0u64, 0u64, true);
    let (mut progressed, mut absent_seen) = (0u32, 0u32);
    let started = Instant::now();
    // The extra writers' objects: the newest generation acknowledged to them so far.
    let mut extra_acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked_total = 0usize;
    for i in 0..ITERATIONS {
        let n_arg = (last_n + 1).to_string();
        let (child, out) = start_writer(&[backend.name(), root.to_str().unwrap(), k.namespace(), k.name(), &n_arg]);
        let delay = Duration::from_millis(rng.next() % (MAX_DELAY_MS + 1));
        let acked = acknowledged(&kill_after(child, out, delay, false, &format!("iteration {i}")));
        acked_total += acked.len();

        let store = backend.open(&root);
        // Durable before the answer: every acknowledged generation (or a newer one) is there.
        for (key, n) in &acked {
            let (ns, name) = key.split_once('/').unwrap();
            let got = store.get(&ObjectKey::new(ns, name).unwrap()).await.unwrap();
            let stored = got.as_ref().and_then(|v| payload::n_of(&v.value));
            assert!(stored >= Some(*n), "iteration {i}: {key} was acknowledged at {n} but holds {stored:?}");
            if ns == "extra" {
                let v = got.unwrap();
                assert!(v.value == payload::secret(stored.unwrap()), "iteration {i}: {key} is torn");
                extra_acked.insert(key.clone(), stored.unwrap());
            }
        }
        for (key, n) in &extra_acked {
            let (ns, name) = key.split_once('/').unwrap();
            let got = store.get(&ObjectKey::new(ns, name).unwrap()).await.unwrap().unwrap();
            assert!(payload::n_of(&got.value) >= Some(*n), "iteration {i}: {key} went back from {n}");
            assert!(got.value == payload::secret(payload::n_of(&got.value).unwrap()), "iteration {i}: {key} is torn");
        }
        let listed = store.list(k.namespace()).await.unwrap();
        let got = store.get(&k).await.unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        let precondition = match got {
            None => {
                assert!(may_be_absent, "iteration {i}: the object vanished after a completed create");
                assert!(listed.is_empty(), "iteration {i}: list shows an absent object: {listed:?}");
                absent_seen += 1;
                Precondition::Absent
            }
            Some(current) => {
                let n = payload::n_of(&current.value).unwrap_or_else(|| panic!("iteration {i}: no generation label"));
                assert!(current.value == payload::secret(n), "iteration {i}: generation {n} is torn or mixed");
                assert!(n > last_n || (n == last_n && !may_be_absent), "iteration {i}: went back from {last_n} to {n}");
                let version: u64 = current.version.0.parse().unwrap();
                assert!(version >= last_version, "iteration {i}: version went back from {last_version} to {version}");
                assert_eq!(listed, vec![k.name().to_string()], "iteration {i}");
                // What istiod reads: plain files, through the links.
                for key in payload::KEYS.iter().filter(|_| backend == Backend::Dir) {
                    assert_eq!(
                        std::fs::read(obj_dir.join(key)).unwrap(),
                        current.value.get(key).unwrap(),
                        "iteration {i}: {key}"
                    );
                }
                if n > last_n {
                    progressed += 1;
                }
                (last_n, last_version) = (n, version);
                Precondition::Version(current.version)
            }
        };

        // The next writer (a fresh store, as after a restart) must succeed and clean up.
        drop(store);
        let store = backend.open(&root);
        if i % DELETE_EVERY == DELETE_EVERY - 1 && precondition != Precondition::Absent {
            store.delete(&k, precondition).await.unwrap_or_else(|e| panic!("iteration {i}: delete: {e}"));
            if backend == Backend::Dir {
                assert_eq!(names(&ns_dir), BTreeSet::from([format!(".{}.lock", k.name())]), "iteration {i}");
            }
            may_be_absent = true;
        } else {
            let n = last_n + 1;
            let v =
                store.put(&k, &payload::secret(n), precondition).await.unwrap_or_else(|e| panic!("iteration {i}: {e}"));
            let version: u64 = v.0.parse().unwrap();
            assert!(version > last_version, "iteration {i}: version {version} after {last_version}");
            (last_n, last_version, may_be_absent) = (n, version, false);
            if backend != Backend::Dir {
                continue;
            }
            assert_eq!(
                names(&ns_dir),
                BTreeSet::from([format!(".{}.lock", k.name()), k.name().to_string()]),
                "iteration {i}"
            );
            let left = names(&obj_dir);
            let data_dirs = left.iter().filter(|n| n.starts_with("..v")).count();
            assert_eq!(data_dirs, 1, "iteration {i}: leftover data directories: {left:?}");
            assert!(!left.contains("..data_tmp"), "iteration {i}: {left:?}");
            assert_eq!(left.len(), 2 + payload::KEYS.len(), "iteration {i}: {left:?}");
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{backend:?}: {ITERATIONS} kills in {elapsed:?}: the writer got at least one generation through in {progressed}, \
         the object was absent after {absent_seen}; last generation {last_n}, version {last_version}; \
         {acked_total} acknowledged objects checked"
    );
    // A write (a read plus ~8 fsyncs) takes about as long as the kill window, so most kills land
    // inside the writer's first or second write, which is the point; but a run in which the
    // writer never got anything through would have tested nothing.
    assert!(progressed > ITERATIONS / 20, "only {progressed} of {ITERATIONS} runs wrote anything");
    assert!(acked_total > 0, "no write was ever acknowledged before a kill: nothing was checked for durability");
    // The concurrent writers got through too, and what they left is whole.
    let store = backend.open(&root);
    for i in 0..payload::EXTRA_WRITERS {
        let k = payload::extra_key(k.name(), i);
        let got = store.get(&k).await.unwrap().unwrap_or_else(|| panic!("{k} was never written"));
        assert!(got.value == payload::secret(payload::n_of(&got.value).unwrap()), "{k} is torn");
    }
}

/// Objects in the directory store a migration moves.
const MIGRATION_OBJECTS: usize = 200;
/// Migrations killed.
const MIGRATION_KILLS: u32 = 6;

#[tokio::test]
async fn a_migration_killed_at_random_points_is_finished_by_the_next_start() {
    use meshca_store::migrate::{LEGACY_DIR, MIGRATED_DIR, open_management_store};
    let mut rng = rng();
    // A SIGKILL loses nothing the kernel already has, so memory-backed files show the same as a
    // disk here; they only spare the test the seeding's thousands of fsyncs.
    let tmp = match Path::new("/dev/shm") {
        shm if shm.is_dir() => tempfile::tempdir_in(shm).unwrap(),
        _ => tempfile::tempdir().unwrap(),
    };
    let seed = tmp.path().join("seed");
    let expected: BTreeMap<ObjectKey, meshca_store::Secret> = (0..MIGRATION_OBJECTS)
        .map(|i| {
            let ns = ["meshca", "istio-system", "other"][i % 3];
            (ObjectKey::new(ns, &format!("object-{i}")).unwrap(), payload::secret(i as u64))
        })
        .collect();
    {
        let legacy = DirStore::open(seed.join(LEGACY_DIR)).unwrap();
        let writes = expected.iter().map(|(k, v)| {
            let legacy = legacy.clone();
            async move { legacy.put(k, v, Precondition::Absent).await }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }
    let copy_seed = |to: &Path| {
        let ok = Command::new("cp").arg("-a").arg(&seed).arg(to).status().unwrap().success();
        assert!(ok, "cp -a {} {}", seed.display(), to.display());
    };

    // One whole migration, to spread the kills over its duration.
    let probe = tmp.path().join("probe");
    copy_seed(&probe);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
        .args(["migrate", probe.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = started.elapsed();

    let mut interrupted = 0;
    for i in 0..MIGRATION_KILLS {
        let data = tmp.path().join(format!("run-{i}"));
        copy_seed(&data);
        let (child, out) = start_writer(&["migrate", data.to_str().unwrap()]);
        let delay = Duration::from_micros(rng.next() % (whole.as_micros() as u64 + 1));
        let printed = kill_after(child, out, delay, true, &format!("migration {i}"));
        if !printed.contains("migrated") {
            interrupted += 1;
        }

        // The next start finishes the job (or finds it done) ...
        let (db, _) = open_management_store(&data).await.unwrap_or_else(|e| panic!("migration {i}: {e}"));
        assert!(!data.join(LEGACY_DIR).exists(), "migration {i}: the directory store is still in place");
        let kept = DirStore::open(data.join(MIGRATED_DIR)).unwrap();
        let mut versions = BTreeMap::new();
        for (k, v) in &expected {
            let got = db.get(k).await.unwrap().unwrap_or_else(|| panic!("migration {i}: {k} is missing"));
            assert!(got.value == *v, "migration {i}: {k} differs");
            assert!(kept.get(k).await.unwrap().unwrap().value == *v, "migration {i}: the kept copy of {k} differs");
            versions.insert(k.clone(), got.version);
        }
        for ns in ["meshca", "istio-system", "other"] {
            let want: Vec<String> =
                expected.keys().filter(|k| k.namespace() == ns).map(|k| k.name().to_string()).collect();
            let mut want = want;
            want.sort();
            assert_eq!(db.list(ns).await.unwrap(), want, "migration {i}: namespace {ns}");
        }
        drop(db);
        // ... and another start changes nothing.
        let (db, again) = open_management_store(&data).await.unwrap();
        assert_eq!(again, None, "migration {i}: nothing left to migrate");
        for (k, version) in &versions {
            assert_eq!(&db.get(k).await.unwrap().unwrap().version, version, "migration {i}: {k} was rewritten");
        }
    }
    eprintln!(
        "{MIGRATION_KILLS} migrations of {MIGRATION_OBJECTS} objects killed within {whole:?}; {interrupted} before they finished"
    );
}
