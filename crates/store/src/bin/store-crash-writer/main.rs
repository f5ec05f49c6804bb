//! Test helper for `tests/crash.rs`, not a meshca tool: writes ever-newer generations of one
//! object into a [`DirStore`] as fast as it can, forever, so the test can SIGKILL it at random
//! points and check that the store is never left torn.
//!
//! Usage: `store-crash-writer <root> <namespace> <name> <first-n>`. Prints `ready` once the store
//! is open, then writes forever. Each write is generation
//! N = max(first-n, stored N + 1), written with compare-and-swap against the version just read.
//! Exits non-zero (the test then fails) on any store error.
#![forbid(unsafe_code)]

mod payload;

use std::io::Write;
use std::process::ExitCode;

use meshca_store::dir::DirStore;
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

async fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, namespace, name, first] = args.as_slice() else {
        return Err("usage: store-crash-writer <root> <namespace> <name> <first-n>".to_string());
    };
    let first: u64 = first.parse().map_err(|e| format!("first-n {first:?}: {e}"))?;
    let key = ObjectKey::new(namespace, name).map_err(|e| e.to_string())?;
    let store = DirStore::open(root).map_err(|e| e.to_string())?;
    // Tells the test that start-up is over, so its random kill delay measures time spent writing
    // (process start-up time varies with machine load; writes are what the test is about).
    println!("ready");
    std::io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    loop {
        let (n, precondition) = match store.get(&key).await.map_err(|e| format!("get: {e}"))? {
            None => (first, Precondition::Absent),
            Some(current) => {
                let stored = payload::n_of(&current.value).ok_or("stored object has no generation label")?;
                (first.max(stored + 1), Precondition::Version(current.version))
            }
        };
        store.put(&key, &payload::secret(n), precondition).await.map_err(|e| format!("put generation {n}: {e}"))?;
    }
}
