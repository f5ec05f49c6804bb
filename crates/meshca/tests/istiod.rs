//! Real istiod on meshca's `cacerts` (issue 8, part 4): `interop/istio/istiod/run.sh` starts
//! Istio's own `pilot-discovery` (built from the Istio version the interop harness pins) against a
//! real kube-apiserver 1.36 + etcd, with the plugged-in CA folder pointed at the `cacerts` a
//! `meshca up` cluster's agent keeps fresh. It proves that istiod starts in plug-in CA mode, signs
//! a workload certificate over its CA gRPC API (Istio's own CA client, a TokenRequest token checked
//! by istiod with a TokenReview) whose chain is leaf ← meshca's intermediate ← meshca's root, and
//! after `meshca rotate` reloads the new intermediate without a restart and signs with it. Then,
//! with `ISTIO_MULTIROOT_MESH=true`, `meshca rotate root` takes `root-cert.pem` from {A} to
//! {A, B} to {B} and the intermediate from A to B: istiod accepts every step without a restart
//! (and refuses none), and Istio's own CA client gets a leaf chaining to A, then to B, each answer
//! carrying the roots of its phase. Between the two, `meshca revoke` replaces the intermediate:
//! istiod, which loaded meshca's `ca-crl.pem` from the start, takes the new intermediate and the
//! CRL naming the old serial without a restart, and writes that CRL into the `istio-ca-crl`
//! ConfigMap in the real API server.
//! Everything is real; nothing is mocked. See `interop/istio/istiod/README.md`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use meshca_testsupport::{Ports, repo};

#[test]
fn real_istiod_signs_from_meshcas_intermediate_and_follows_intermediate_and_root_rotations_without_a_restart() {
    // The 9 ports run.sh uses (etcd, API server, istiod's listeners), held until it is done:
    // neither istiod nor etcd can bind port 0 and say which port it got.
    let ports = Ports::reserve(9);
    let out = Command::new("bash")
        .arg(repo().join("interop/istio/istiod/run.sh"))
        .env("MESHCA_BIN", env!("CARGO_BIN_EXE_meshca"))
        .env("ISTIOD_PORT_BASE", ports.base().to_string())
        .output()
        .expect("running interop/istio/istiod/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "istiod check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("OK istiod"), "no OK line:\n{stdout}");
    assert!(stdout.contains("root rotation {A} -> {A,B} -> {B} followed without restart"), "{stdout}");
    assert!(stdout.contains("with ca-crl.pem and ConfigMap istio-ca-crl"), "{stdout}");
    assert!(!stderr.contains("Updating new ROOT-CA not supported"), "istiod refused a root-set step:\n{stderr}");
    // The log lines istiod itself printed, as run.sh relays them.
    for line in [
        "Use local CA certificate",
        "Added cacerts files watcher",
        "newly added intermediate CA",
        "Updating new ROOT-CA",
        "Detected CRL file",
        "Istiod has detected the newly added CRL file",
    ] {
        assert!(stderr.contains(line), "istiod did not log {line:?}:\n{stderr}");
    }
}
