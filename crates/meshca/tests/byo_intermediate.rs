//! Bring your own intermediate (option 3), end to end through `meshca up`: the user's PKI is made
//! here with the OpenSSL CLI; meshca is given the intermediate and its chain, never the root key.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::user_pki::{GOOD_EXT, user_pki};
use common::*;
use meshca_pki::{CaSigner, Cert, IntermediateParams, PrivateKey, TrustDomain};

/// `meshca up --ca byo-intermediate --intermediate-from FROM` with 20-second leaves.
fn start_byo(d: &Path, from: &Path, extra: &[&str]) -> (Proc, serde_json::Value) {
    let mut args = vec!["--ca", "byo-intermediate", "--intermediate-from", from.to_str().unwrap(), "--leaf-ttl", "20s"];
    args.extend_from_slice(extra);
    start_up(d, &args)
}

/// Requests a leaf with an OpenSSL-made key and CSR from a cluster of the topology; returns the
/// chain PEMs (leaf first).
fn leaf_from(topo: &serde_json::Value, cluster: usize, d: &Path) -> Vec<String> {
    let c = &topo["clusters"][cluster];
    let name = c["name"].as_str().unwrap();
    let key = format!("{name}-leaf.key");
    let csr = format!("{name}-leaf.csr");
    openssl::genkey(d, OpensslKey::P256, &key);
    openssl_ok(d, &["req", "-new", "-key", &key, "-subj", "/CN=ignored", "-out", &csr]);
    let token = std::fs::read_to_string(c["token_file"].as_str().unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use meshca_proto::istio::IstioCertificateRequest;
        use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
        meshca_tls::provider::install();
        let mut roots = rustls::RootCertStore::empty();
        for r in meshca_pki::RootSet::from_pem(&std::fs::read(c["workload_ca"]["ca_file"].as_str().unwrap()).unwrap())
            .unwrap()
            .iter()
        {
            roots.add(rustls_pki_types::CertificateDer::from(r.der().to_vec())).unwrap();
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let ch = meshca_tls::grpc::channel(
            c["workload_ca"]["address"].as_str().unwrap(),
            config,
            c["workload_ca"]["server_name"].as_str().unwrap(),
        )
        .unwrap();
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: std::fs::read_to_string(d.join(&csr)).unwrap(),
            validity_duration: 600,
            metadata: None,
        });
        req.metadata_mut().insert("authorization", format!("Bearer {}", token.trim()).parse().unwrap());
        IstioCertificateServiceClient::new(ch).create_certificate(req).await.unwrap().into_inner().cert_chain
    })
}

fn byo_end_to_end(kind: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let from = user_pki(d, kind, GOOD_EXT, 365);
    let (mut up, topo) = start_byo(d, &from, &["--duration", "30s"]);
    let user_int = Cert::from_pem(&std::fs::read(from.join("ca-cert.pem")).unwrap()).unwrap();
    let root_pem = std::fs::read(d.join("pki/root.pem")).unwrap();

    for (i, c) in topo["clusters"].as_array().unwrap().iter().enumerate() {
        let cacerts = PathBuf::from(c["cacerts_dir"].as_str().unwrap());
        openssl_verify_cacerts(&cacerts);
        // root-cert.pem is the user's root; cert-chain.pem is cluster int + user int + root.
        assert_eq!(
            Cert::parse_pem_bundle(&std::fs::read(cacerts.join("root-cert.pem")).unwrap()).unwrap(),
            Cert::parse_pem_bundle(&root_pem).unwrap()
        );
        let chain = Cert::parse_pem_bundle(&std::fs::read(cacerts.join("cert-chain.pem")).unwrap()).unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1], user_int);

        // A leaf's 4-level chain, leaf first and root last, verifies with OpenSSL.
        let pems = leaf_from(&topo, i, d);
        assert_eq!(pems.len(), 4, "leaf + cluster intermediate + user intermediate + root");
        write_all(d, "leaf.pem", &pems[0]);
        write_all(d, "mid.pem", &format!("{}{}", pems[1], pems[2]));
        write_all(d, "root.pem", &pems[3]);
        let (ok, out) = openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                "sslclient",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "mid.pem",
                "leaf.pem",
            ],
        );
        assert!(ok, "{out}");
        assert_eq!(Cert::from_pem(pems[3].as_bytes()).unwrap(), Cert::from_pem(&root_pem).unwrap());
    }

    // Cross-cluster mTLS kept working for the whole run.
    let status = up.wait_exit(Duration::from_secs(120));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("up/summary.json")).unwrap()).unwrap();
    assert!(status.success(), "{}", up.log_text());
    assert_eq!(summary["handshakes_failed"], 0, "{summary}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 20, "{summary}");

    // The root key was never given to meshca, and no file it wrote holds it.
    let root_key = std::fs::read_to_string(d.join("pki/root.key")).unwrap();
    let body: String = root_key.lines().nth(2).unwrap().to_string();
    for f in walk(&d.join("up")) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).into_owned();
        assert!(!text.contains(&body), "{} holds the root key", f.display());
    }
}

fn write_all(d: &Path, name: &str, data: &str) {
    std::fs::write(d.join(name), data).unwrap();
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_symlink() {
            continue;
        }
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_p256_user_intermediate_signs_every_cluster_and_leaves_carry_four_levels() {
    byo_end_to_end("p256");
}

#[test]
fn an_rsa4096_user_pki_works_the_same_way() {
    byo_end_to_end("rsa4096");
}

#[test]
fn replacing_the_user_intermediate_moves_every_cluster_with_zero_failed_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let from = user_pki(d, "p256", GOOD_EXT, 365);
    let (mut up, topo) = start_byo(d, &from, &["--duration", "45s", "--intermediate-ttl", "1h"]);
    std::thread::sleep(Duration::from_secs(5));
    // The operator replaces the intermediate (same root, new key) in the folder meshca follows.
    let next = user_pki(d, "p256", GOOD_EXT, 365);
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        let tmpf = from.join(format!(".{f}.new"));
        std::fs::copy(next.join(f), &tmpf).unwrap();
        std::fs::rename(&tmpf, from.join(f)).unwrap();
    }
    let new_int = Cert::from_pem(&std::fs::read(next.join("ca-cert.pem")).unwrap()).unwrap();
    for c in topo["clusters"].as_array().unwrap() {
        let cacerts = PathBuf::from(c["cacerts_dir"].as_str().unwrap());
        wait_for(Duration::from_secs(30), "every cluster on the new intermediate", || {
            let b = valid_bundle(&cacerts).ok()?;
            (b.signer().chain().get(1) == Some(&new_int)).then_some(())
        });
        openssl_verify_cacerts(&cacerts);
    }
    let status = up.wait_exit(Duration::from_secs(120));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("up/summary.json")).unwrap()).unwrap();
    assert!(status.success(), "{}", up.log_text());
    assert_eq!(summary["handshakes_failed"], 0, "{summary}");
    for c in summary["clusters"].as_array().unwrap() {
        assert!(c["intermediate_rotations"].as_u64().unwrap() >= 1, "{summary}");
    }
}

#[test]
fn a_user_intermediate_near_expiry_clamps_cluster_intermediates_and_raises_an_alert() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let from = user_pki(d, "p256", GOOD_EXT, 5);
    let (_up, topo) = start_byo(d, &from, &[]);
    let user_int = Cert::from_pem(&std::fs::read(from.join("ca-cert.pem")).unwrap()).unwrap();
    let cacerts = PathBuf::from(topo["clusters"][0]["cacerts_dir"].as_str().unwrap());
    let b = valid_bundle(&cacerts).unwrap();
    // The policy asks for 30 days; the user's intermediate ends in 5.
    assert!(b.ca_cert().not_after() <= user_int.not_after());
    let creds = topo["management_plane"]["credentials"].as_str().unwrap();
    let (ok, out, err) = run(&["status", "-o", "json", "--credentials", creds]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["caMode"], "intermediateRef");
    assert!(st["upstreamIntermediate"]["subject"].as_str().unwrap().contains("Corp Mesh Intermediate"));
    // The trust tree the dashboard draws: root → the user's intermediate → the cluster's.
    assert_eq!(st["upstreamIntermediate"]["fingerprint"], user_int.fingerprint());
    assert_eq!(st["upstreamIntermediate"]["serial"], user_int.serial_hex());
    assert_eq!(st["upstreamIntermediate"]["issuerFingerprint"], st["roots"][0]["fingerprint"], "{st}");
    let cluster = wait_for(Duration::from_secs(30), "cluster-1 to report its intermediate", || {
        let (_, out, _) = run(&["status", "-o", "json", "--credentials", creds]);
        let st: serde_json::Value = serde_json::from_str(&out).ok()?;
        let c = st["clusters"][0].clone();
        (c["intermediateSerial"] == b.ca_cert().serial_hex()).then_some(c)
    });
    assert_eq!(cluster["issuerFingerprint"], user_int.fingerprint());
    assert_eq!(
        cluster["intermediateCertNotBefore"],
        b.ca_cert().not_before().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    );
    let alert = st["alerts"].as_array().unwrap().iter().find(|a| a["kind"] == "UpstreamIntermediateExpiring").cloned();
    assert!(alert.is_some_and(|a| a["message"].as_str().unwrap().contains("spec.config.intermediateRef")), "{st}");
    let (ok, table, _) = run(&["status", "--credentials", creds]);
    assert!(ok && table.contains("upstream") && table.contains("UpstreamIntermediateExpiring"), "{table}");
}

/// Each bad user intermediate: `meshca up` refuses to start, names the policy field and the
/// problem, and issues nothing.
#[test]
fn bad_user_intermediates_are_refused_with_the_reason_and_nothing_is_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "pathlen0",
            user_pki(
                d,
                "p256",
                "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
                30,
            ),
            "pathlen:0",
        ),
        (
            "no-keycertsign",
            user_pki(d, "p256", "basicConstraints=critical,CA:true\nkeyUsage=critical,digitalSignature\n", 30),
            "keyCertSign",
        ),
        ("mismatch", user_pki(d, "p256", GOOD_EXT, 30), "does not match"),
        ("no-root", user_pki(d, "p256", GOOD_EXT, 30), "does not reach a self-signed root"),
        ("expired", user_pki(d, "p256", GOOD_EXT, 30), "expired"),
    ];
    // Key mismatch: another key. No root: the chain without the root.
    let other = user_pki(d, "p256", GOOD_EXT, 30);
    std::fs::copy(other.join("ca-key.pem"), cases[2].1.join("ca-key.pem")).unwrap();
    std::fs::copy(cases[3].1.join("ca-cert.pem"), cases[3].1.join("cert-chain.pem")).unwrap();
    // Expired: re-sign the intermediate with the user's root key as of two months ago, 30 days.
    let root = Cert::from_pem(&std::fs::read(d.join("pki/root.pem")).unwrap()).unwrap();
    let root_key = PrivateKey::from_pem(&std::fs::read(d.join("pki/root.key")).unwrap()).unwrap();
    let signer = CaSigner::new(root_key, vec![root]).unwrap();
    let int_key = PrivateKey::from_pem(&std::fs::read(cases[4].1.join("ca-key.pem")).unwrap()).unwrap();
    let mut p = IntermediateParams::cluster("Corp", "x", TrustDomain::new("cluster.local").unwrap());
    p.path_len = 1;
    p.ttl = Duration::from_secs(30 * 86400);
    let old = signer
        .sign_intermediate(int_key.public_key_spki(), &p, SystemTime::now() - Duration::from_secs(60 * 86400))
        .unwrap();
    std::fs::write(cases[4].1.join("ca-cert.pem"), old.to_pem()).unwrap();
    std::fs::write(cases[4].1.join("cert-chain.pem"), format!("{}{}", old.to_pem(), signer.cert().to_pem())).unwrap();

    for (name, from, needle) in &cases {
        let dir = d.join(format!("up-{name}"));
        let (ok, out, err) = run(&[
            "up",
            "--dir",
            dir.to_str().unwrap(),
            "--ca",
            "byo-intermediate",
            "--intermediate-from",
            from.to_str().unwrap(),
            "--duration",
            "5s",
        ]);
        assert!(!ok, "{name}: started anyway:\n{out}");
        assert!(err.contains("spec.config.intermediateRef") && err.contains(needle), "{name}: {err}");
        assert!(!dir.join("cluster-1").exists(), "{name}: nothing may be issued");
    }
}
