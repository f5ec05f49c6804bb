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
    let (key, cert, subj) = (format!("{name}.key"), format!("{name}.pem"), format!("/O={name}"));
    openssl_ok(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    d.join(cert)
}

/// A CA and a `localhost` serving certificate under it, made with OpenSSL: the `https_web`
/// certificate an operator would get from their company or a public CA.
fn web_pki(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = openssl_ca(d, "web-ca");
    openssl_ok(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "web.key",
            "-out",
            "web.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(d.join("web.ext"), "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl_ok(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "web.csr",
            "-CA",
            "web-ca.pem",
            "-CAkey",
            "web-ca.key",
            "-CAcreateserial",
            "-out",
            "web.pem",
            "-days",
            "1",
            "-extfile",
            "web.ext",
        ],
    );
    (ca, d.join("web.pem"), d.join("web.key"))
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
