//! Proof against Istio's own code: the Go harness under `interop/istio/` loads every cluster's
//! `cacerts` with istiod's plug-in-cert code and requests certificates with istio-agent's CA
//! client, before, during and after intermediate rotations, for each CA mode that has landed.
//!
//! The harness binary comes from `$MESHCA_ISTIO_INTEROP` (CI builds it once) or is built here
//! with `interop/istio/build.sh` (Go and the module proxy are needed; a build failure fails the
//! test, it is never skipped).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use meshca_testsupport::openssl::ROOT_CA_EXTENSIONS;

/// The harness (`interop/istio/build.sh` builds it, or finds it cached, and prints its path).
fn harness() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_ISTIO_INTEROP", "interop/istio/build.sh")
}

/// Runs a harness subcommand; panics with Istio's own message on failure.
fn istio(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "Istio's code rejected meshca's output:\n{text}");
    text
}

fn cacerts_dirs(topo: &serde_json::Value) -> Vec<String> {
    topo["clusters"].as_array().unwrap().iter().map(|c| c["cacerts_dir"].as_str().unwrap().to_string()).collect()
}

fn serial_of(dir: &str) -> String {
    valid_bundle(Path::new(dir)).map(|b| b.ca_cert().serial_hex()).unwrap_or_default()
}

/// Drives a running `meshca up` through at least two rotations per cluster, running Istio's
/// checks the whole time, and Istio's multi-root rule between consecutive root sets.
fn through_rotations(bin: &Path, d: &Path, topo: &serde_json::Value, min_rotations: usize, deadline: Duration) {
    let topo_file = d.join("up/topology.json");
    let dirs = cacerts_dirs(topo);
    let mut seen: Vec<BTreeSet<String>> = vec![BTreeSet::new(); dirs.len()];
    let mut last_roots: Vec<Option<PathBuf>> = vec![None; dirs.len()];
    let end = Instant::now() + deadline;
    let mut n = 0;
    while seen.iter().any(|s| s.len() < min_rotations + 1) {
        assert!(Instant::now() < end, "not enough rotations seen: {seen:?}");
        istio(bin, &["check-topology", topo_file.to_str().unwrap()]);
        for (i, dir) in dirs.iter().enumerate() {
            seen[i].insert(serial_of(dir));
            // Istio's multi-root rule between consecutive root sets of a cluster.
            let snap = d.join(format!("roots-{i}-{n}.pem"));
            std::fs::copy(Path::new(dir).join("root-cert.pem"), &snap).unwrap();
            if let Some(prev) = &last_roots[i] {
                istio(bin, &["check-rootset", prev.to_str().unwrap(), snap.to_str().unwrap()]);
            }
            last_roots[i] = Some(snap);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// `meshca up` with 40-second intermediates renewed at half life and 20-second leaves, for 110 s.
fn start_rotating(d: &Path, extra: &[&str]) -> (Proc, serde_json::Value) {
    let mut args = vec!["--intermediate-ttl", "40s", "--grace-ratio", "0.5", "--leaf-ttl", "20s", "--duration", "110s"];
    args.extend_from_slice(extra);
    start_up(d, &args)
}

#[test]
fn istio_accepts_generated_root_cacerts_and_leaves_before_during_and_after_rotations() {
    let bin = harness();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_up, topo) = start_rotating(d, &[]);
    let dirs = cacerts_dirs(&topo);
    let mut args = vec!["check-cacerts"];
    args.extend(dirs.iter().map(String::as_str));
    let out = istio(&bin, &args);
    assert!(out.contains("chain-ends-at-root=true"), "{out}");
    through_rotations(&bin, d, &topo, 2, Duration::from_secs(100));
}

#[test]
fn istio_accepts_bring_your_own_intermediate_cacerts_and_four_level_leaves() {
    let bin = harness();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The user's PKI, made with OpenSSL: root -> intermediate (pathlen:1).
    let pki = d.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (root, _) =
        openssl::self_signed(&pki, "root", OpensslKey::P256, "/O=Corp/CN=Corp Root", 30, ROOT_CA_EXTENSIONS);
    let extensions = ["basicConstraints=critical,CA:true,pathlen:1", "keyUsage=critical,keyCertSign,cRLSign"];
    let (cert, key) = openssl::issue(&pki, "int", OpensslKey::P256, "/O=Corp/CN=Corp Mesh", "root", 20, &extensions);
    let from = d.join("intermediate");
    std::fs::create_dir_all(&from).unwrap();
    std::fs::copy(cert, from.join("ca-cert.pem")).unwrap();
    std::fs::copy(key, from.join("ca-key.pem")).unwrap();
    std::fs::copy(root, from.join("root-cert.pem")).unwrap();

    let (_up, topo) = start_rotating(d, &["--ca", "byo-intermediate", "--intermediate-from", from.to_str().unwrap()]);
    let out = istio(&bin, &["check-topology", d.join("up/topology.json").to_str().unwrap()]);
    assert!(out.contains("OK check-topology"), "{out}");
    // Istio's loader sees the three-certificate chain (cluster intermediate, user's, root).
    assert!(out.contains("chain-certs=3"), "{out}");
    through_rotations(&bin, d, &topo, 1, Duration::from_secs(100));
}
