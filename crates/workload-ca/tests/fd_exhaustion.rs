//! The workload CA out of file descriptors while its `cacerts` rotates: the process's own
//! open-file limit is lowered below the next free descriptor (this file is its own test binary,
//! with one test, so nothing else in the process is affected), and the reload must neither take
//! the unreadable files for a missing bundle nor drop the bundle in service — it says what
//! happened, keeps the last good bundle, and loads the new one once descriptors are back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use meshca_clock::system;
use meshca_pki::{CaBundle, CaSigner, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet, TrustDomain};
use meshca_workload_ca::Metrics;
use meshca_workload_ca::ca::{CaHolder, Pending};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Writes a new cluster intermediate under `root` into `dir`; returns its serial.
fn write_intermediate(root: &CaSigner, roots: &RootSet, dir: &Path) -> String {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = IntermediateParams::cluster("t", "cluster-1", TrustDomain::new("cluster.local").unwrap());
    let cert = root.sign_intermediate(key.public_key_spki(), &params, SystemTime::now()).unwrap().parse().unwrap();
    let files = CaBundle::assemble(&key, &cert, root.chain(), roots);
    for (name, data) in files.entries() {
        std::fs::write(dir.join(name), data).unwrap();
    }
    cert.serial_hex()
}

#[test]
fn out_of_descriptors_the_last_good_bundle_stays_and_the_error_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = CaSigner::new_root(
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        &RootParams::new("t"),
        SystemTime::now(),
    )
    .unwrap();
    let roots = RootSet::from_certs(vec![root.cert().clone()]).unwrap();
    let first = write_intermediate(&root, &roots, dir.path());
    let metrics = Metrics::new();
    let holder = CaHolder::load(dir.path(), metrics.clone(), system()).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    let second = write_intermediate(&root, &roots, dir.path());

    // The lowest free descriptor becomes the limit: the next open fails with EMFILE.
    let saved = getrlimit(Resource::Nofile);
    let next_free = {
        use std::os::fd::AsRawFd;
        let probe = std::fs::File::open("/dev/null").unwrap();
        probe.as_raw_fd() as u64
    };
    setrlimit(Resource::Nofile, Rlimit { current: Some(next_free), maximum: saved.maximum }).unwrap();
    let mut pending = None;
    let swapped = holder.poll(&mut pending);
    let again = holder.poll(&mut pending);
    setrlimit(Resource::Nofile, saved).unwrap();

    assert!(!swapped && !again, "nothing replaces the bundle in service while it cannot be read");
    assert_eq!(holder.current().bundle.ca_cert().serial_hex(), first, "the last good bundle stays in service");
    match &pending {
        Some(Pending::Unreadable { error }) => {
            assert!(error.contains("out of file descriptors") && error.contains("EMFILE"), "{error}");
            assert!(!error.to_lowercase().contains("missing"), "not taken for a missing bundle: {error}");
        }
        other => panic!("expected an unreadable directory, got {other:?}"),
    }
    assert_eq!(metrics.reload_failures.get(), 1, "reported once, not on every poll");

    // Descriptors are back: the rotated bundle is read and loaded.
    assert!(holder.poll(&mut pending), "the new bundle is loaded once it can be read");
    assert_eq!(holder.current().bundle.ca_cert().serial_hex(), second);
}
