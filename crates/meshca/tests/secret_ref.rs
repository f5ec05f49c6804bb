//! End to end, option 2 (`spec.config.secretRef`): the user's own root, made with the OpenSSL
//! CLI and stored as a secret in the management plane's store, signs every cluster's
//! intermediate; meshca never generates a root of its own. Real `meshca server` and `meshca
//! agent` processes on 127.0.0.1, directory stores, `openssl verify` on what lands in `cacerts`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use meshca_pki::{CaBundle, Cert};
use meshca_store::Secret;

fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, out) = openssl(dir, args);
    assert!(ok, "openssl {args:?}: {out}");
    out
}

/// Extension profiles for the OpenSSL CLI: a root and an Istio-style cluster intermediate (what
/// Istio's own `tools/certs` Makefiles produce), plus a subject for the root.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
O = Example Corp
CN = Example Corp Root CA
[v3_root]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_intermediate]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = URI:spiffe://cluster.local
";

/// A self-signed root made by the OpenSSL CLI from `key_file` (already generated in `dir`);
/// returns the certificate PEM exactly as OpenSSL wrote it.
fn openssl_root(dir: &Path, key_file: &str, cert_file: &str) -> Vec<u8> {
    write_file(dir, "openssl.cnf", OPENSSL_CNF);
    openssl_ok(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            key_file,
            "-sha256",
            "-days",
            "3650",
            "-config",
            "openssl.cnf",
            "-extensions",
            "v3_root",
            "-out",
            cert_file,
        ],
    );
    std::fs::read(dir.join(cert_file)).unwrap()
}

/// The DER of the single certificate in a PEM file.
fn der_of(pem: &[u8]) -> Vec<u8> {
    Cert::from_pem(pem).unwrap().der().to_vec()
}

/// Writes the user's root into the management plane's store (before the server starts, as an
/// operator would with `kubectl create secret`).
fn store_root(d: &Path, name: &str, secret: &Secret) {
    StoreView::open(&d.join("mgmt").join("store")).create("meshca", name, secret);
}

/// Starts the server with a `secretRef` policy from the start, and two agents; waits for both
/// clusters' `cacerts` and checks them against the user's root. Returns the server.
fn two_clusters_under(d: &Path, root_pem: &[u8], policy: &Path) -> (Mgmt, Vec<Proc>, Vec<CaBundle>) {
    let m = Mgmt::start(d, &["--policy", policy.to_str().unwrap()]);
    let mut agents = Vec::new();
    let mut bundles = Vec::new();
    for c in ["cluster-1", "cluster-2"] {
        let (t, relay) = m.add_cluster(d, c);
        agents.push(agent(d, &m, c, Some(&t), Some(&relay), &[]));
    }
    for c in ["cluster-1", "cluster-2"] {
        let b = wait_for(Duration::from_secs(30), &format!("{c} cacerts"), || valid_bundle(&cacerts_dir(d, c)).ok());
        let dir = cacerts_dir(d, c);
        let served = std::fs::read(dir.join("root-cert.pem")).unwrap();
        assert_eq!(der_of(&served), der_of(root_pem), "{c} trusts exactly the user's root");
        assert_eq!(served, root_pem, "{c}: root-cert.pem is byte-equal to the user's root file");
        openssl_verify_cacerts(&dir);
        let (_, text) = openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-issuer"]);
        assert!(text.contains("Example Corp Root CA"), "{c}: {text}");
        bundles.push(b);
    }
    assert_ne!(bundles[0].ca_cert().spki_der(), bundles[1].ca_cert().spki_der(), "each cluster has its own key");
    let mgmt = StoreView::mgmt(&m);
    assert!(mgmt.get("meshca", "root-ca").is_none(), "the server never generated a root of its own");
    let st = m.status_json();
    assert_eq!(st["caMode"], "secretRef", "{st}");
    assert_eq!(st["rootSetFingerprint"].as_str().unwrap(), bundles[0].roots().fingerprint(), "{st}");
    assert_eq!(st["policyError"], "", "{st}");
    (m, agents, bundles)
}

fn secret_ref_policy(d: &Path, name: &str, options: &str) -> std::path::PathBuf {
    write_file(d, "policy.yaml", &policy_yaml(&format!("    secretRef: {{ name: {name} }}"), options))
}

/// Seconds since the epoch.
fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An RSA-3072 root with a PKCS#1 key (`openssl genrsa -traditional`), stored in the
/// Kubernetes TLS layout (`tls.crt`/`tls.key`), signs both clusters' intermediates: each
/// cluster trusts exactly that root (byte for byte), passes `openssl verify -x509_strict`, and
/// no root is generated. Changing the intermediate lifetime with `meshca policy apply` then
/// re-issues both clusters with the new lifetime (Gloo Mesh ignores such a change).
#[test]
fn an_openssl_rsa_root_with_a_pkcs1_key_signs_every_cluster_and_a_new_ttl_reissues_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    openssl_ok(d, &["genrsa", "-traditional", "-out", "root.key", "3072"]);
    let key_pem = std::fs::read(d.join("root.key")).unwrap();
    assert!(key_pem.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"), "a PKCS#1 key");
    let root_pem = openssl_root(d, "root.key", "root.crt");
    store_root(d, "my-root", &Secret::with_data([("tls.crt", root_pem.clone()), ("tls.key", key_pem)]));
    let policy = secret_ref_policy(d, "my-root", "{ ttl: 720h }");
    let (m, _agents, before) = two_clusters_under(d, &root_pem, &policy);
    for b in &before {
        let left = unix(b.ca_cert().not_after()) - unix(SystemTime::now());
        assert!((720 * 3600 - 120..=720 * 3600).contains(&left), "a 720h intermediate: {left}s left");
    }
    let generation = m.status_json()["policyGeneration"].as_str().unwrap().to_string();

    // A new intermediate lifetime: both clusters re-issue, under the same root.
    let policy = secret_ref_policy(d, "my-root", "{ ttl: 100h }");
    let applied_at = unix(SystemTime::now());
    let (ok, out, err) = run(&["policy", "apply", policy.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(ok, "{out}{err}");
    for (c, old) in ["cluster-1", "cluster-2"].iter().zip(&before) {
        let b = wait_for(Duration::from_secs(30), &format!("{c} to re-issue"), || {
            valid_bundle(&cacerts_dir(d, c)).ok().filter(|b| b.ca_cert().serial_hex() != old.ca_cert().serial_hex())
        });
        let expected = applied_at + 100 * 3600;
        let not_after = unix(b.ca_cert().not_after());
        assert!(
            (expected - 5..=expected + 60).contains(&not_after),
            "{c}: NotAfter {not_after}, expected ≈ {expected}"
        );
        assert_ne!(b.ca_cert().spki_der(), old.ca_cert().spki_der(), "{c}: a new key");
        assert_eq!(std::fs::read(cacerts_dir(d, c).join("root-cert.pem")).unwrap(), root_pem, "{c}: same root");
        openssl_verify_cacerts(&cacerts_dir(d, c));
    }
    let st = wait_for(Duration::from_secs(20), "both clusters to report the new generation", || {
        let st = m.status_json();
        let done = ["cluster-1", "cluster-2"].iter().all(|c| {
            status_cluster(&st, c)
                .is_some_and(|c| c["policyGeneration"] == st["policyGeneration"] && c["phase"] == "Ready")
        });
        done.then_some(st)
    });
    assert_ne!(st["policyGeneration"], generation.as_str(), "the generation moved");
    for c in ["cluster-1", "cluster-2"] {
        let c = status_cluster(&st, c).unwrap();
        assert_eq!(c["issued"][0]["reason"], "policy-change", "{c}");
    }
    assert!(StoreView::mgmt(&m).get("meshca", "root-ca").is_none(), "still no generated root");
}

/// A P-256 root in the Istio layout (`ca-cert.pem`/`ca-key.pem`, the key as `openssl ecparam
/// -genkey` writes it, EC PARAMETERS block included) signs both clusters' intermediates, and
/// each cluster trusts exactly that root.
#[test]
fn an_openssl_p256_root_in_the_istio_layout_signs_every_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    openssl_ok(d, &["ecparam", "-name", "prime256v1", "-genkey", "-out", "ca-key.pem"]);
    let key_pem = std::fs::read(d.join("ca-key.pem")).unwrap();
    assert!(key_pem.starts_with(b"-----BEGIN EC PARAMETERS-----"), "{}", String::from_utf8_lossy(&key_pem));
    let root_pem = openssl_root(d, "ca-key.pem", "ca-cert.pem");
    store_root(d, "istio-root", &Secret::with_data([("ca-cert.pem", root_pem.clone()), ("ca-key.pem", key_pem)]));
    let policy = secret_ref_policy(d, "istio-root", "{ ttl: 24h }");
    let (_m, _agents, bundles) = two_clusters_under(d, &root_pem, &policy);
    for b in &bundles {
        assert_eq!(b.roots().len(), 1);
        assert_eq!(b.signer().chain().len(), 2, "cert-chain.pem: the intermediate and the root");
    }
}

/// A `cacerts` that meshca did not write — here an intermediate made with the OpenSSL CLI from
/// the same user root, stored without meshca's label — is left untouched (and the agent says
/// why) unless the agent runs with `--adopt-existing`; then it is replaced by a meshca-issued,
/// labeled one under the same root.
#[test]
fn a_foreign_cacerts_from_the_same_root_is_adopted_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    openssl_ok(d, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "root.key"]);
    let root_key = std::fs::read(d.join("root.key")).unwrap();
    let root_pem = openssl_root(d, "root.key", "root.crt");
    store_root(d, "my-root", &Secret::with_data([("tls.crt", root_pem.clone()), ("tls.key", root_key)]));

    // The cluster's existing cacerts, made the way Istio's documentation makes one.
    openssl_ok(d, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "int.key"]);
    openssl_ok(
        d,
        &[
            "req",
            "-new",
            "-key",
            "int.key",
            "-subj",
            "/O=Example Corp/CN=Intermediate CA/L=cluster-3",
            "-out",
            "int.csr",
        ],
    );
    openssl_ok(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.crt",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "v3_intermediate",
            "-out",
            "int.crt",
        ],
    );
    let int_pem = std::fs::read(d.join("int.crt")).unwrap();
    let mut chain = int_pem.clone();
    chain.extend_from_slice(&root_pem);
    let foreign = Secret::with_data([
        ("ca-cert.pem", int_pem.clone()),
        ("ca-key.pem", std::fs::read(d.join("int.key")).unwrap()),
        ("cert-chain.pem", chain),
        ("root-cert.pem", root_pem.clone()),
    ]);
    let cluster_store = StoreView::open(&d.join("cluster-3"));
    cluster_store.create("istio-system", "cacerts", &foreign);
    let dir = cacerts_dir(d, "cluster-3");
    valid_bundle(&dir).expect("the foreign cacerts is one istiod accepts");
    openssl_verify_cacerts(&dir);

    let m = Mgmt::start(d, &["--policy", secret_ref_policy(d, "my-root", "{ ttl: 24h }").to_str().unwrap()]);
    let (t3, relay) = m.add_cluster(d, "cluster-3");

    // Without --adopt-existing: untouched, and the agent says why and what to do.
    let mut a = agent(d, &m, "cluster-3", Some(&t3), Some(&relay), &[]);
    wait_for(Duration::from_secs(20), "the refusal", || {
        let log = a.log_text();
        (log.contains("was not written by meshca") && log.contains("--adopt-existing")).then_some(())
    });
    let c = wait_for(Duration::from_secs(20), "cluster-3 to report the refusal", || {
        status_cluster(&m.status_json(), "cluster-3").filter(|c| c["lastError"] != "")
    });
    assert!(c["lastError"].as_str().unwrap().contains("--adopt-existing"), "{c}");
    // The agent has reported the refusal, so it has decided; it never issues over a foreign
    // cacerts later either (meshca_agent::runner's unit tests).
    let still = cluster_store.get("istio-system", "cacerts").unwrap();
    assert_eq!(still.get("ca-cert.pem").unwrap(), int_pem.as_slice(), "untouched");
    assert!(still.labels.is_empty(), "{still:?}");
    assert!(!a.log_text().contains("cacerts written"));
    a.kill();

    // With --adopt-existing (and the identity it already has): replaced by a meshca-issued one.
    let a = agent(d, &m, "cluster-3", None, None, &["--adopt-existing"]);
    let adopted = wait_for(Duration::from_secs(30), "the adoption", || {
        let s = cluster_store.get("istio-system", "cacerts")?;
        (s.labels.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("meshca")).then_some(s)
    });
    assert_ne!(adopted.get("ca-cert.pem").unwrap(), int_pem.as_slice());
    assert_eq!(adopted.get("root-cert.pem").unwrap(), root_pem.as_slice(), "the root is unchanged");
    let b = valid_bundle(&dir).unwrap();
    let (_, text) = openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-subject"]);
    assert!(text.contains("L = cluster-3") && text.contains("meshca intermediate"), "{text}");
    openssl_verify_cacerts(&dir);
    let st = wait_for(Duration::from_secs(20), "cluster-3 to report Ready", || {
        let st = m.status_json();
        (status_cluster(&st, "cluster-3")?["phase"] == "Ready").then_some(st)
    });
    let c = status_cluster(&st, "cluster-3").unwrap();
    assert_eq!(c["intermediateSerial"], b.ca_cert().serial_hex(), "{c}");
    assert_eq!(c["lastError"], "", "{c}");
    assert!(a.log_text().contains("cacerts written"));
    assert!(StoreView::mgmt(&m).get("meshca", "root-ca").is_none(), "no generated root");
}
