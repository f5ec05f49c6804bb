//! Root rotation in the bring-your-own modes, end to end: the policy's CA changes to one under a
//! different root, and instead of being refused the change runs the whole rotation.
//!
//! - Your own root (option 2): `meshca server` and three `meshca agent` processes; the operator
//!   replaces the referenced secret's contents — first with a certificate that is not a CA (it is
//!   checked and refused, nothing moves), then with a new root made by the OpenSSL CLI.
//! - Your own intermediate (option 3): `meshca up --ca byo-intermediate` with its sample traffic;
//!   the operator replaces the intermediate with one from another root of their PKI (OpenSSL).
//!
//! Each time every cluster's `cacerts` goes {A} → {A, B} → {B} with the barrier kept (watched
//! from outside), and in `meshca up` not one handshake or leaf request fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::rotation::*;
use common::user_pki::{GOOD_EXT, user_pki};
use common::*;
use meshca_pki::Cert;
use meshca_store::Secret;
use meshca_testsupport::rotation::{check_barrier, root_set_history};

const CLUSTERS: [&str; 3] = ["cluster-1", "cluster-2", "cluster-3"];
const ROTATION: Duration = Duration::from_secs(360);

fn names() -> Vec<String> {
    CLUSTERS.map(String::from).to_vec()
}

/// The user's root in `<base>/pki` (made by the OpenSSL CLI), as a secret in the Kubernetes TLS
/// layout, and its fingerprint.
fn root_secret(base: &Path) -> (Secret, String) {
    user_pki(base, "p256", GOOD_EXT, 365);
    let cert = std::fs::read(base.join("pki/root.pem")).unwrap();
    let key = std::fs::read(base.join("pki/root.key")).unwrap();
    let fp = Cert::from_pem(&cert).unwrap().fingerprint();
    (Secret::with_data([("tls.crt", cert), ("tls.key", key)]), fp)
}

#[test]
fn replacing_your_own_root_runs_the_rotation_after_the_new_root_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (root_a, a) = root_secret(&d.join("a"));
    StoreView::open(&d.join("mgmt").join("store")).create("meshca", "my-root", &root_a);
    let policy = write_file(
        d,
        "policy.yaml",
        &policy_yaml("    secretRef: { name: my-root }", "{ ttl: 1h }").replace(
            "  intermediateCertOptions",
            "  rootRotation: { maxLeafLifetime: 10s, skew: 1s }\n  intermediateCertOptions",
        ),
    );
    let m = Mgmt::start(d, &["--policy", policy.to_str().unwrap()]);
    let mut agents = Vec::new();
    for c in CLUSTERS {
        let (token, relay) = m.add_cluster(d, c);
        agents.push(agent(d, &m, c, Some(&token), Some(&relay), &[]));
    }
    let log = CacertsLog::of_dirs(CLUSTERS.iter().map(|c| (c.to_string(), cacerts_dir(d, c))).collect());
    wait_until(Duration::from_secs(60), "every cluster under A", || {
        CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [a.clone()]))
    });
    let creds = m.creds();
    let mgmt = StoreView::mgmt(&m);

    // Not a CA: checked and refused; the mesh stays on A and status says why.
    let (not_ca, not_ca_key) = openssl::self_signed(
        d,
        "not-ca",
        OpensslKey::P256,
        "/CN=not a CA",
        30,
        &["basicConstraints=critical,CA:FALSE"],
    );
    let (leaf_pem, key_pem) = (std::fs::read(not_ca).unwrap(), std::fs::read(not_ca_key).unwrap());
    mgmt.put("meshca", "my-root", &Secret::with_data([("tls.crt", leaf_pem), ("tls.key", key_pem)]));
    let st = wait_for(Duration::from_secs(60), "the refusal in status", || {
        let st = status(&creds);
        st["policyError"].as_str().unwrap().contains("my-root").then_some(st)
    });
    assert_eq!(phase(&st), "Idle", "{st:#}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(log.held().iter().all(|h| h.roots == [a.clone()]), "nothing moved");

    // A new root: the rotation runs.
    let (root_b, b) = root_secret(&d.join("b"));
    assert_ne!(a, b);
    mgmt.put("meshca", "my-root", &root_b);
    let st = wait_for(Duration::from_secs(60), "the rotation to start", || {
        let st = status(&creds);
        (phase(&st) != "Idle").then_some(st)
    });
    assert_eq!(st["rootRotation"]["trigger"], "policy");
    assert_eq!(st["rootRotation"]["to"]["fingerprint"], b.as_str());
    wait_until(ROTATION, "the rotation to complete", || {
        phase(&status(&creds)) == "Idle"
            && CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()]))
    });
    check_barrier(&log.held(), &names(), &a, &b);
    for (cluster, h) in root_set_history(&log.held(), &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    for c in CLUSTERS {
        openssl_verify_cacerts(&cacerts_dir(d, c));
    }
    let st = status(&creds);
    assert_eq!(st["caMode"], "secretRef");
    assert_eq!(st["policyError"], "", "{st:#}");
    // meshca's copy of the CA in force is B's; the one it kept for the rotation is gone.
    wait_until(Duration::from_secs(30), "the rotation's copy to be removed", || {
        mgmt.get("meshca", "root-rotation-next").is_none()
    });
    let copy = mgmt.get("meshca", "root-rotation-established").unwrap();
    assert_eq!(Cert::from_pem(copy.get("ca-cert.pem").unwrap()).unwrap().fingerprint(), b);
    drop(agents);
}

#[test]
fn an_intermediate_from_another_root_of_your_pki_runs_the_rotation_with_zero_failed_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let from = user_pki(&d.join("a"), "p256", GOOD_EXT, 365);
    let (proc, up) = start_up(
        d,
        &[
            "--ca",
            "byo-intermediate",
            "--intermediate-from",
            from.to_str().unwrap(),
            "--clusters",
            "3",
            "--leaf-ttl",
            "30s",
            "--intermediate-ttl",
            "1h",
        ],
    );
    let creds = up["management_plane"]["credentials"].as_str().unwrap().to_string();
    let log = CacertsLog::start(&up);
    wait_until(Duration::from_secs(30), "every cluster's cacerts", || CLUSTERS.iter().all(|c| log.latest(c).is_some()));
    let a = log.latest("cluster-1").unwrap().roots[0].clone();
    std::thread::sleep(Duration::from_secs(5));

    // The operator moves to an intermediate under another root of their PKI.
    let next = user_pki(&d.join("b"), "p256", GOOD_EXT, 365);
    let b = Cert::from_pem(&std::fs::read(d.join("b/pki/root.pem")).unwrap()).unwrap().fingerprint();
    assert_ne!(a, b);
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        let tmpf = from.join(format!(".{f}.new"));
        std::fs::copy(next.join(f), &tmpf).unwrap();
        std::fs::rename(&tmpf, from.join(f)).unwrap();
    }
    let st = wait_for(Duration::from_secs(60), "the rotation to start", || {
        let st = status(&creds);
        (phase(&st) != "Idle").then_some(st)
    });
    assert_eq!(st["rootRotation"]["trigger"], "policy");
    wait_until(ROTATION, "the rotation to complete", || {
        phase(&status(&creds)) == "Idle"
            && CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()]))
    });
    check_barrier(&log.held(), &names(), &a, &b);
    for (cluster, h) in root_set_history(&log.held(), &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    // The new cluster intermediates hang under the user's new intermediate.
    let new_int = Cert::from_pem(&std::fs::read(next.join("ca-cert.pem")).unwrap()).unwrap();
    for c in up["clusters"].as_array().unwrap() {
        let cacerts = Path::new(c["cacerts_dir"].as_str().unwrap());
        let bundle = valid_bundle(cacerts).unwrap();
        assert_eq!(bundle.signer().chain().get(1), Some(&new_int));
        openssl_verify_cacerts(cacerts);
    }
    stop_and_check(proc, &d.join("up"));
}
