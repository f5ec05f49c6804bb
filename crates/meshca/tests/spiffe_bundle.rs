//! The SPIFFE bundle endpoint read by **Istio's own trust-bundle code**: the Go harness under
//! `interop/istio/` calls `pkg/spiffe.RetrieveSpiffeBundleRootCerts` — what istiod runs for
//! `MeshConfig.caCertificates[].spiffeBundleUrl` — against a real `meshca server` serving
//! `https_web` with a certificate from a CA made here with OpenSSL. The roots Istio loads are the
//! root set `meshca status` reports, before, during (A+B) and after (B) a root rotation, and the
//! sequence number (read in Istio's `bundleDoc` shape, go-jose v4) grows at each change.
//!
//! Lean by construction: a management plane without clusters (nothing to wait for) and a policy
//! whose rotation gates are a few seconds.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::rotation::{phase, rotate_root, status};
use common::*;
use meshca_pki::Cert;
use meshca_testsupport::openssl::openssl_ok;

const TD: &str = "mesh.example";

fn harness() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_ISTIO_INTEROP", "interop/istio/build.sh")
}

/// What Istio fetched: the sequence and the roots' fingerprints.
#[derive(Debug, PartialEq, Eq)]
struct Fetched {
    sequence: u64,
    roots: BTreeSet<String>,
}

/// `istio-interop spiffe-bundle`: Istio's fetch of the bundle at `url`, trusting `ca_file`.
fn istio_fetch(bin: &Path, url: &str, ca_file: &Path, timeout: &str) -> Result<Fetched, String> {
    let out = Command::new(bin)
        .args(["spiffe-bundle", "--trust-domain", TD, "--url", url, "--ca-file", ca_file.to_str().unwrap()])
        .args(["--timeout", timeout])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let sequence = stdout.lines().find_map(|l| l.strip_prefix("sequence ")).unwrap().parse().unwrap();
    let hint: u64 = stdout.lines().find_map(|l| l.strip_prefix("refresh-hint ")).unwrap().parse().unwrap();
    assert_eq!(hint, 120, "--bundle-refresh-hint 2m");
    let roots = Cert::parse_pem_bundle(stdout.as_bytes()).unwrap().iter().map(Cert::fingerprint).collect();
    Ok(Fetched { sequence, roots })
}

/// The root set `meshca status` reports.
fn status_roots(creds: &str) -> BTreeSet<String> {
    status(creds)["roots"].as_array().unwrap().iter().map(|r| r["fingerprint"].as_str().unwrap().to_string()).collect()
}

/// A self-signed CA `<name>.pem` (key `<name>.key`) made with OpenSSL.
fn openssl_ca(d: &Path, name: &str) -> PathBuf {
    let extensions = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign"];
    openssl::self_signed(d, name, OpensslKey::P256, &format!("/O={name}"), 2, &extensions).0
}

/// A CA and a `localhost` serving certificate under it, made with OpenSSL: the `https_web`
/// certificate an operator would get from their company or a public CA.
fn web_pki(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = openssl_ca(d, "web-ca");
    let extensions = ["subjectAltName=DNS:localhost", "extendedKeyUsage=serverAuth"];
    let (cert, key) = openssl::issue(d, "web", OpensslKey::P256, "/CN=localhost", "web-ca", 1, &extensions);
    (ca, cert, key)
}

#[test]
fn istio_loads_the_bundle_and_follows_a_root_rotation_through_its_sequence() {
    let bin = harness();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (web_ca, web_cert, web_key) = web_pki(d);
    let policy = write_file(
        d,
        "policy.yaml",
        &format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  trustDomain: \
             {TD}\n  config:\n    generated: {{}}\n  rootRotation: {{ maxLeafLifetime: 4s, skew: 1s }}\n"
        ),
    );
    let mut m = Mgmt::start(
        d,
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--bundle-endpoint-addr",
            "127.0.0.1:0",
            "--bundle-endpoint-cert",
            web_cert.to_str().unwrap(),
            "--bundle-endpoint-key",
            web_key.to_str().unwrap(),
            "--bundle-refresh-hint",
            "2m",
        ],
    );
    let line = m.proc.wait_for_log(Duration::from_secs(10), "SPIFFE bundle endpoint on ");
    let url = line.split_whitespace().next().unwrap().to_string();
    assert!(line.contains("https_web") && url.starts_with("https://localhost:"), "{line}");
    let creds = m.creds();

    // {A}, sequence 1: exactly meshca's root set.
    let a = status_roots(&creds);
    assert_eq!(a.len(), 1);
    let first =
        wait_for(Duration::from_secs(20), "Istio to load the bundle", || istio_fetch(&bin, &url, &web_ca, "1s").ok());
    assert_eq!(first, Fetched { sequence: 1, roots: a.clone() });

    // https_web authenticates the endpoint: trusting another CA, Istio refuses it.
    let other_ca = openssl_ca(d, "other-ca");
    let e = istio_fetch(&bin, &url, &other_ca, "1s").expect_err("not the endpoint's CA");
    assert!(e.contains("RetrieveSpiffeBundleRootCerts") && e.contains("certificate"), "{e}");

    // A root rotation: {A, B} (sequence 2), then {B} (sequence 3), each what meshca reports.
    let out = rotate_root(&creds, false);
    assert!(out.contains("Distributing"), "{out}");
    let both = wait_for(Duration::from_secs(30), "Istio to load {A, B}", || {
        istio_fetch(&bin, &url, &web_ca, "1s").ok().filter(|f| f.roots.len() == 2)
    });
    assert_eq!(both.sequence, 2);
    assert!(both.roots.is_superset(&a));
    let b: BTreeSet<String> = both.roots.difference(&a).cloned().collect();
    let last = wait_for(Duration::from_secs(60), "the rotation to end and Istio to load {B}", || {
        let f = istio_fetch(&bin, &url, &web_ca, "1s").ok()?;
        (f.roots == b && phase(&status(&creds)) == "Idle").then_some(f)
    });
    assert_eq!(last.sequence, 3);
    assert_eq!(last.roots, status_roots(&creds), "exactly the root set in force");
}

/// Federation in, with real processes: mesh B's policy federates with mesh A's bundle endpoint
/// (`https_web`); B's management plane polls it and B's agent writes A's roots to
/// `istio-system/meshca-federated-bundles/a.example.pem` in its cluster — not into
/// `root-cert.pem` — where `openssl verify` accepts A's cluster intermediate against it (and not
/// against B's own roots). When A's endpoint goes down, B raises `FederationFailing` in
/// `meshca status -o json` and the file keeps the last good bundle.
#[test]
fn a_federated_bundle_reaches_the_clusters_and_survives_its_endpoint_going_down() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (web_ca, web_cert, web_key) = web_pki(d);
    let policy = |td: &str, federation: &str| {
        write_file(
            d,
            &format!("{td}.yaml"),
            &format!(
                "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  trustDomain: \
                 {td}\n  config:\n    generated: {{}}\n{federation}"
            ),
        )
    };
    let endpoint = ["--bundle-endpoint-addr", "127.0.0.1:0", "--bundle-endpoint-cert", web_cert.to_str().unwrap()];
    let key = ["--bundle-endpoint-key", web_key.to_str().unwrap(), "--bundle-refresh-hint", "30s"];
    let (da, db) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let pa = policy("a.example", "");
    let mut a = Mgmt::start(&da, &[&["--policy", pa.to_str().unwrap()][..], &endpoint, &key].concat());
    let line = a.proc.wait_for_log(Duration::from_secs(10), "SPIFFE bundle endpoint on ");
    let url = line.split_whitespace().next().unwrap().to_string();
    let ca_pem = serde_json::to_string(&std::fs::read_to_string(&web_ca).unwrap()).unwrap();
    let pb = policy(
        "b.example",
        &format!(
            "  federation:\n    - {{ trustDomain: a.example, bundleEndpointUrl: \"{url}\", profile: https_web, endpointCa: {ca_pem} }}\n"
        ),
    );
    let b = Mgmt::start(&db, &["--policy", pb.to_str().unwrap()]);

    // A cluster in each mesh.
    let (ta, ra) = a.add_cluster(&da, "a1");
    let _agent_a = agent(&da, &a, "a1", Some(&ta), Some(&ra), &[]);
    let (tb, rb) = b.add_cluster(&db, "b1");
    let _agent_b = agent(&db, &b, "b1", Some(&tb), Some(&rb), &[]);
    let federated = db.join("b1").join("istio-system").join("meshca-federated-bundles").join("a.example.pem");
    let (a_cacerts, b_cacerts) = (cacerts_dir(&da, "a1"), cacerts_dir(&db, "b1"));
    wait_for(Duration::from_secs(30), "A's bundle in cluster b1 and cacerts in a1 and b1", || {
        (federated.exists() && valid_bundle(&a_cacerts).is_ok() && valid_bundle(&b_cacerts).is_ok()).then_some(())
    });
    let a_roots = std::fs::read(a_cacerts.join("root-cert.pem")).unwrap();
    assert_eq!(std::fs::read(&federated).unwrap(), a_roots, "b1 holds exactly A's root set");
    let b_roots = std::fs::read_to_string(b_cacerts.join("root-cert.pem")).unwrap();
    assert_eq!(b_roots.matches("BEGIN CERTIFICATE").count(), 1, "root-cert.pem holds B's own root only");

    // openssl: A's cluster intermediate chains to the federated file, not to B's own roots.
    let intermediate = a_cacerts.join("ca-cert.pem");
    let out = openssl_ok(d, &["verify", "-CAfile", federated.to_str().unwrap(), intermediate.to_str().unwrap()]);
    assert!(out.contains(": OK"), "{out}");
    let b_root_file = b_cacerts.join("root-cert.pem");
    let (ok, out) = meshca_testsupport::openssl::openssl(
        d,
        &["verify", "-CAfile", b_root_file.to_str().unwrap(), intermediate.to_str().unwrap()],
    );
    assert!(!ok, "{out}");

    // A's endpoint goes down: B alerts at its next fetch (the 30 s refresh hint) and keeps A's roots.
    assert!(b.status_json()["alerts"].as_array().unwrap().iter().all(|x| x["kind"] != "FederationFailing"));
    a.proc.kill();
    let alert = wait_for(Duration::from_secs(60), "FederationFailing", || {
        b.status_json()["alerts"].as_array().unwrap().iter().find(|x| x["kind"] == "FederationFailing").cloned()
    });
    let msg = alert["message"].as_str().unwrap();
    assert!(
        msg.contains("federation with a.example") && msg.contains("the last good bundle (sequence 1) is kept"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&federated).unwrap(), a_roots, "the last good bundle stays in the cluster");
}
