//! Real istiod on meshca's `cacerts` (issue 8, part 4): `interop/istio/istiod/run.sh` starts
//! Istio's own `pilot-discovery` (built from the Istio version the interop harness pins) against a
//! real kube-apiserver 1.36 + etcd, with the plugged-in CA folder pointed at the `cacerts` a
//! `meshca up` cluster's agent keeps fresh. It proves that istiod starts in plug-in CA mode, signs
//! a workload certificate over its CA gRPC API (Istio's own CA client, a TokenRequest token checked
//! by istiod with a TokenReview) whose chain is leaf ← meshca's intermediate ← meshca's root, and
//! after `meshca rotate` reloads the new intermediate without a restart and signs with it.
//! Everything is real; nothing is mocked. See `interop/istio/istiod/README.md`.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

/// A base port with the 9 ports run.sh uses (etcd, API server, istiod's listeners) free now,
/// below Linux's ephemeral range (32768+), so that no process of the check (meshca up, curl,
/// istiod's own clients) is handed one of them as its random port before istiod binds it.
fn free_port_base() -> u16 {
    let start = 20000 + (std::process::id() % 500) as u16 * 20;
    (0..100u16)
        .map(|i| 20000 + (start - 20000 + i * 20) % 12000)
        .find(|base| (0..9).all(|k| TcpListener::bind(("127.0.0.1", base + k)).is_ok()))
        .expect("no 9 free consecutive ports on 127.0.0.1")
}

#[test]
fn real_istiod_signs_from_meshcas_intermediate_and_follows_a_rotation_without_a_restart() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(repo.join("interop/istio/istiod/run.sh"))
        .env("MESHCA_BIN", env!("CARGO_BIN_EXE_meshca"))
        .env("ISTIOD_PORT_BASE", free_port_base().to_string())
        .output()
        .expect("running interop/istio/istiod/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "istiod check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("OK istiod"), "no OK line:\n{stdout}");
    // The log lines istiod itself printed, as run.sh relays them.
    for line in ["Use local CA certificate", "Added cacerts files watcher", "newly added intermediate CA"] {
        assert!(stderr.contains(line), "istiod did not log {line:?}:\n{stderr}");
    }
}
