//! Crash safety with real processes: a writer is SIGKILLed at random points, many times, and the
//! store must always hold a whole generation (or nothing, before the first create finished), never
//! go backwards, and be cleaned up by the next writer.
#![allow(clippy::unwrap_used)]

#[path = "../src/bin/store-crash-writer/payload.rs"]
mod payload;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshca_store::dir::DirStore;
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

#[tokio::test]
async fn a_writer_killed_at_random_points_never_leaves_a_torn_object() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    eprintln!("crash test seed {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let k = ObjectKey::new("istio-system", "cacerts").unwrap();
    let ns_dir = root.join(k.namespace());
    let obj_dir = ns_dir.join(k.name());

    // `last_n`: the newest generation known to be durable. `may_be_absent`: no create has
    // finished since the start or since the test's last delete.
    let (mut last_n, mut last_version, mut may_be_absent) = (0u64, 0u64, true);
    let (mut progressed, mut absent_seen) = (0u32, 0u32);
    let started = Instant::now();
    for i in 0..ITERATIONS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
            .args([root.to_str().unwrap(), k.namespace(), k.name(), &(last_n + 1).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        if ready.trim() != "ready" {
            let out = child.wait_with_output().unwrap();
            panic!("iteration {i}: the writer did not start: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(rng.next() % (MAX_DELAY_MS + 1)));
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("iteration {i}: the writer exited by itself ({status}): {}", String::from_utf8_lossy(&out.stderr));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = DirStore::open(&root).unwrap();
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
                for key in payload::KEYS {
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
        let store = DirStore::open(&root).unwrap();
        if i % DELETE_EVERY == DELETE_EVERY - 1 && precondition != Precondition::Absent {
            store.delete(&k, precondition).await.unwrap_or_else(|e| panic!("iteration {i}: delete: {e}"));
            assert_eq!(names(&ns_dir), BTreeSet::from([format!(".{}.lock", k.name())]), "iteration {i}");
            may_be_absent = true;
        } else {
            let n = last_n + 1;
            let v =
                store.put(&k, &payload::secret(n), precondition).await.unwrap_or_else(|e| panic!("iteration {i}: {e}"));
            let version: u64 = v.0.parse().unwrap();
            assert!(version > last_version, "iteration {i}: version {version} after {last_version}");
            (last_n, last_version, may_be_absent) = (n, version, false);
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
        "{ITERATIONS} kills in {elapsed:?}: the writer got at least one generation through in {progressed}, \
         the object was absent after {absent_seen}; last generation {last_n}, version {last_version}"
    );
    // A write (a read plus ~8 fsyncs) takes about as long as the kill window, so most kills land
    // inside the writer's first or second write, which is the point; but a run in which the
    // writer never got anything through would have tested nothing.
    assert!(progressed > ITERATIONS / 20, "only {progressed} of {ITERATIONS} runs wrote anything");
}
