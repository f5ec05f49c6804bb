//! Test helper for `tests/crash.rs`, not a meshca tool: writes ever-newer generations of objects
//! into a store as fast as it can, forever, so the test can SIGKILL it at random points and check
//! that the store is never left torn and that every acknowledged write survived.
//!
//! Usage:
//! - `store-crash-writer <dir|sqlite> <path> <namespace> <name> <first-n>`: opens a [`DirStore`]
//!   rooted at `path` or a [`SqliteStore`] file at `path`, prints `ready`, then writes forever:
//!   one task writes `<namespace>/<name>` (generation N = max(first-n, stored N + 1), by
//!   compare-and-swap against the version just read) and [`payload::EXTRA_WRITERS`] more tasks
//!   do the same to `extra/<name>-<i>` concurrently (so the SQLite backend commits them in shared
//!   batches). After each write returns, it prints `ack <namespace>/<name> <N>`.
//! - `store-crash-writer migrate <data-dir>`: prints `ready`, moves the data folder's directory
//!   store into its database ([`meshca_store::migrate::open_management_store`]), prints `migrated`.
//!
//! Exits non-zero (the test then fails) on any store error.
#![forbid(unsafe_code)]

mod payload;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use meshca_store::dir::DirStore;
use meshca_store::sqlite::SqliteStore;
use meshca_store::{ObjectKey, Precondition, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store-crash-writer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| format!("stdout: {e}"))
}

async fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, data_dir] = args.as_slice()
        && mode == "migrate"
    {
        say("ready")?;
        meshca_store::migrate::open_management_store(data_dir.as_ref()).await.map_err(|e| e.to_string())?;
        return say("migrated");
    }
    let [backend, path, namespace, name, first] = args.as_slice() else {
        return Err("usage: store-crash-writer <dir|sqlite> <path> <namespace> <name> <first-n> | migrate <data-dir>"
            .to_string());
    };
    let first: u64 = first.parse().map_err(|e| format!("first-n {first:?}: {e}"))?;
    let store: Arc<dyn Store> = match backend.as_str() {
        "dir" => Arc::new(DirStore::open(path).map_err(|e| e.to_string())?),
        "sqlite" => Arc::new(SqliteStore::open(path).map_err(|e| e.to_string())?),
        other => return Err(format!("unknown backend {other:?}")),
    };
    let mut keys = vec![ObjectKey::new(namespace, name).map_err(|e| e.to_string())?];
    for i in 0..payload::EXTRA_WRITERS {
        keys.push(payload::extra_key(name, i));
    }
    // Tells the test that start-up is over, so its random kill delay measures time spent writing
    // (process start-up time varies with machine load; writes are what the test is about).
    say("ready")?;
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        tasks.spawn(write_forever(store.clone(), key, first));
    }
    match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(format!("a writer task failed: {e}")),
        None => Ok(()),
    }
}

async fn write_forever(store: Arc<dyn Store>, key: ObjectKey, first: u64) -> Result<(), String> {
    loop {
        let (n, precondition) = match store.get(&key).await.map_err(|e| format!("get {key}: {e}"))? {
            None => (first, Precondition::Absent),
            Some(current) => {
                let stored = payload::n_of(&current.value).ok_or("stored object has no generation label")?;
                (first.max(stored + 1), Precondition::Version(current.version))
            }
        };
        store
            .put(&key, &payload::secret(n), precondition)
            .await
            .map_err(|e| format!("put generation {n} of {key}: {e}"))?;
        say(&format!("ack {key} {n}"))?;
    }
}
