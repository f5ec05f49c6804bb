//! End to end: `meshca up` as a real process, driven the way scripts and other tools drive it —
//! through `topology.json` — with the OpenSSL CLI making the keys and CSRs, checking the chains
//! and speaking mutual TLS, so nothing on the checking side is meshca's own code.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use meshca_pki::Cert;
use serde_json::Value;

/// The identity of the token `meshca up` writes to each cluster's `token_file`.
const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// A running `meshca up` and its `topology.json`.
struct Up {
    proc: Proc,
    dir: PathBuf,
    topology: Value,
}

impl Up {
    /// Starts `meshca up --dir <d>/up <args>` and waits for `topology.json`.
    fn start(d: &Path, args: &[&str]) -> Up {
        let (proc, topology) = start_up(d, args);
        Up { proc, dir: d.join("up"), topology }
    }

    fn cluster(&self, name: &str) -> &Value {
        self.topology["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in topology.json: {}", self.topology))
    }

    /// A client of `cluster`'s workload CA, exactly as topology.json describes it.
    fn client(&self, cluster: &str) -> CaClient {
        let ca = &self.cluster(cluster)["workload_ca"];
        ca_client(
            ca["address"].as_str().unwrap(),
            Path::new(ca["ca_file"].as_str().unwrap()),
            ca["server_name"].as_str().unwrap(),
        )
    }

    /// `cluster`'s root-cert.pem (its `ca_file`).
    fn ca_file(&self, cluster: &str) -> PathBuf {
        PathBuf::from(self.cluster(cluster)["workload_ca"]["ca_file"].as_str().unwrap())
    }

    /// The token in `cluster`'s `token_file` (ns/default/sa/sleep).
    fn sleep_token(&self, cluster: &str) -> String {
        std::fs::read_to_string(self.cluster(cluster)["token_file"].as_str().unwrap()).unwrap().trim().to_string()
    }

    /// A fresh token from `meshca token` for `default/<sa>` of `cluster`.
    fn token(&self, cluster: &str, sa: &str) -> String {
        let (ok, out, err) = run(&[
            "token",
            "--dir",
            self.dir.to_str().unwrap(),
            "--cluster",
            cluster,
            "--namespace",
            "default",
            "--service-account",
            sa,
        ]);
        assert!(ok, "meshca token: {err}");
        out.trim().to_string()
    }

    fn json(&self, file: &str) -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join(file)).ok()?).ok()
    }
}

/// One cluster's entry of `status.json`/`summary.json`.
fn cluster_status<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

/// A leaf obtained with an OpenSSL key and CSR, written out for the OpenSSL CLI.
struct Leaf {
    key: PathBuf,
    files: ChainFiles,
    chain: Vec<String>,
}

impl Leaf {
    fn party<'a>(&'a self, trust: &'a Path) -> TlsParty<'a> {
        TlsParty { chain: &self.files, key: &self.key, trust }
    }

    /// The intermediate that signed it (the second element of the chain).
    fn issuer(&self) -> Cert {
        Cert::from_pem(self.chain[1].as_bytes()).unwrap()
    }
}

/// Gets a leaf from `cluster`'s workload CA for an OpenSSL key of type `key`.
async fn openssl_leaf(up: &Up, d: &Path, cluster: &str, name: &str, key: OpensslKey, token: &str) -> Leaf {
    let csr = openssl_csr(d, name, key, &[]);
    let chain = create_certificate(&mut up.client(cluster), csr_request(&csr, Some(token), Some(cluster), 0))
        .await
        .unwrap_or_else(|s| panic!("{cluster} refused {name}: {:?} {}", s.code(), s.message()));
    Leaf { key: d.join(format!("{name}.key")), files: write_chain(d, name, &chain), chain }
}

/// Scripts can drive `meshca up` through `topology.json` alone: with the address, `ca_file`,
/// `server_name` and `token_file` it lists, a CSR made by the OpenSSL CLI (RSA 2048 and P-256) is
/// answered with a chain — one PEM per element, leaf first, root last — that `openssl verify
/// -x509_strict` accepts, whose leaf carries exactly the token's SPIFFE ID as its only, critical
/// SAN, an empty subject, CA:FALSE, and the public key of the OpenSSL key. The endpoint's own
/// certificate verifies in OpenSSL for `server_name`; another cluster's token is refused
/// (UNAUTHENTICATED).
#[test]
fn a_csr_made_by_openssl_gets_a_leaf_via_topology_json_that_openssl_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let up = Up::start(d, &["--intermediate-ttl", "120s", "--leaf-ttl", "30s", "--grace-ratio", "0.5"]);
    let c1 = up.cluster("cluster-1");
    assert_eq!(c1["trust_domain"], "cluster.local");
    assert!(Path::new(c1["cacerts_dir"].as_str().unwrap()).join("ca-cert.pem").exists());
    let token = up.sleep_token("cluster-1");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The CA endpoint itself passes a TLS stack meshca does not use: OpenSSL, trusting only
    // ca_file, checks the serving certificate for server_name and negotiates gRPC's h2.
    let ca = &c1["workload_ca"];
    let (ok, out) = openssl(
        d,
        &[
            "s_client",
            "-connect",
            ca["address"].as_str().unwrap(),
            "-CAfile",
            ca["ca_file"].as_str().unwrap(),
            "-servername",
            ca["server_name"].as_str().unwrap(),
            "-verify_hostname",
            ca["server_name"].as_str().unwrap(),
            "-verify_return_error",
            "-alpn",
            "h2",
        ],
    );
    assert!(ok && out.contains("Verify return code: 0 (ok)") && out.contains("ALPN protocol: h2"), "{out}");
    assert!(out.contains("Verified peername: istiod.istio-system.svc"), "{out}");

    // Each cluster has its own token issuer: cluster-2's token means nothing to cluster-1.
    let csr = openssl_csr(d, "foreign", OpensslKey::P256, &[]);
    let foreign = up.sleep_token("cluster-2");
    let r = rt.block_on(async {
        create_certificate(&mut up.client("cluster-1"), csr_request(&csr, Some(&foreign), Some("cluster-1"), 0)).await
    });
    assert_eq!(r.map(|c| c.len()).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));

    for (name, key) in [("rsa2048", OpensslKey::Rsa(2048)), ("p256", OpensslKey::P256)] {
        let leaf = rt.block_on(openssl_leaf(&up, d, "cluster-1", name, key, &token));
        // Leaf, cluster intermediate, root: the root is the cluster's root-cert.pem.
        assert_eq!(leaf.chain.len(), 3, "{name}: {:?}", leaf.chain);
        let root = Cert::from_pem(leaf.chain[2].as_bytes()).unwrap();
        let trusted = Cert::parse_pem_bundle(&std::fs::read(up.ca_file("cluster-1")).unwrap()).unwrap();
        assert!(trusted.contains(&root), "{name}: the last element is the cluster's root");

        let (ok, out) = openssl_verify_leaf(d, &leaf.files, &leaf.files.root);
        assert!(ok, "{name}: openssl verify against the last element: {out}");
        let (ok, out) = openssl_verify_leaf(d, &leaf.files, &up.ca_file("cluster-1"));
        assert!(ok, "{name}: openssl verify against ca_file: {out}");

        let san = openssl_x509(d, &leaf.files.leaf, &["-ext", "subjectAltName"]);
        let san: Vec<&str> = san.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        assert_eq!(san, ["X509v3 Subject Alternative Name: critical", &format!("URI:{SLEEP_ID}")], "{name}");
        let subject = openssl_x509(d, &leaf.files.leaf, &["-subject", "-nameopt", "RFC2253"]);
        assert_eq!(subject.trim(), "subject=", "{name}: the CSR's CN must not reach the leaf");
        let bc = openssl_x509(d, &leaf.files.leaf, &["-ext", "basicConstraints"]);
        assert!(bc.contains("CA:FALSE") && !bc.contains("CA:TRUE"), "{name}: {bc}");
        assert!(openssl_key_matches(d, &leaf.key, &leaf.files.leaf), "{name}: the leaf certifies the OpenSSL key");

        // The same facts through meshca's parser: no DNS name, no second URI.
        let cert = Cert::from_pem(leaf.chain[0].as_bytes()).unwrap();
        assert_eq!(cert.uri_sans(), [SLEEP_ID.to_string()]);
        assert!(cert.dns_sans().is_empty() && cert.san_is_critical() && !cert.is_ca());
    }
}

/// Leaves from two clusters work with a TLS stack meshca does not use: `openssl s_server` with a
/// cluster-1 leaf and `openssl s_client` with a cluster-2 leaf (each with its own chain, keys
/// made by OpenSSL, tokens from `meshca token`), each trusting only its own cluster's
/// `root-cert.pem` and requiring the other's certificate, complete the handshake with verify
/// result 0 on both sides — and in the other direction too. A client trusting an unrelated root
/// fails, so the check is real. Ctrl-C then stops `meshca up` cleanly (exit 0, `summary.json`).
#[test]
fn leaves_of_two_clusters_complete_mutual_tls_in_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut up = Up::start(d, &["--intermediate-ttl", "120s", "--leaf-ttl", "30s", "--grace-ratio", "0.5"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t1 = up.token("cluster-1", "frontend");
    let t2 = up.token("cluster-2", "backend");
    let l1 = rt.block_on(openssl_leaf(&up, d, "cluster-1", "frontend", OpensslKey::P256, &t1));
    let l2 = rt.block_on(openssl_leaf(&up, d, "cluster-2", "backend", OpensslKey::Rsa(2048), &t2));
    assert_eq!(l1.issuer().issuer(), l2.issuer().issuer(), "both intermediates come from the one root");
    assert_ne!(l1.issuer().serial_hex(), l2.issuer().serial_hex(), "each cluster has its own intermediate");
    let (root1, root2) = (up.ca_file("cluster-1"), up.ca_file("cluster-2"));

    let r = openssl_mtls(d, &l1.party(&root1), &l2.party(&root2));
    assert!(r.succeeded(), "cluster-1 server, cluster-2 client: {r:#?}");
    let r = openssl_mtls(d, &l2.party(&root2), &l1.party(&root1));
    assert!(r.succeeded(), "cluster-2 server, cluster-1 client: {r:#?}");

    // Control: a client that trusts another root refuses the server.
    let (other, _) = openssl::self_signed(d, "other-root", OpensslKey::P256, "/CN=other root", 30, &[]);
    let r = openssl_mtls(d, &l1.party(&root1), &l2.party(&other));
    assert!(!r.succeeded() && !r.client_ok, "a client trusting another root must fail: {r:#?}");

    // Ctrl-C: `up` stops cleanly, with its summary written.
    up.proc.signal("INT");
    let status = up.proc.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "Ctrl-C: {status}\n{}", up.proc.log_text());
    let summary = up.json("summary.json").expect("summary.json after Ctrl-C");
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}");
}

/// Zero failed handshakes through rotation: with 45 s intermediates renewed at half life, `meshca
/// up`'s sample workloads keep making cross-cluster mTLS connections through at least three
/// intermediate rotations in every cluster; the run exits 0 and `summary.json` shows no failed
/// handshake. A leaf issued before a rotation stays valid after it: it still verifies with its own
/// chain against the cluster's root-cert.pem, and still completes an OpenSSL mTLS handshake with a
/// fresh leaf of the other cluster.
#[test]
fn sample_traffic_survives_three_rotations_with_zero_failed_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let started = Instant::now();
    let mut up =
        Up::start(d, &["--intermediate-ttl", "45s", "--leaf-ttl", "40s", "--grace-ratio", "0.5", "--duration", "100s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A leaf from cluster-1's current intermediate ...
    let old = rt.block_on(openssl_leaf(&up, d, "cluster-1", "before", OpensslKey::P256, &up.sleep_token("cluster-1")));
    let old_serial = old.issuer().serial_hex();
    // ... then cluster-1 rotates to a new intermediate.
    let rotated_to = wait_for(Duration::from_secs(60), "cluster-1 to rotate its intermediate", || {
        let st = up.json("status.json")?;
        let serial = cluster_status(&st, "cluster-1")["intermediate_serial"].as_str()?.to_string();
        (!serial.is_empty() && serial != old_serial).then_some(serial)
    });
    let root1 = up.ca_file("cluster-1");
    let cacerts1 = Path::new(up.cluster("cluster-1")["cacerts_dir"].as_str().unwrap()).to_path_buf();
    assert_eq!(valid_bundle(&cacerts1).unwrap().ca_cert().serial_hex(), rotated_to, "cacerts serves the new one");

    let (ok, out) = openssl_verify_leaf(d, &old.files, &root1);
    assert!(ok, "the pre-rotation leaf still verifies against root-cert.pem: {out}");
    let fresh =
        rt.block_on(openssl_leaf(&up, d, "cluster-2", "after", OpensslKey::P256, &up.token("cluster-2", "fresh")));
    let r = openssl_mtls(d, &old.party(&root1), &fresh.party(&up.ca_file("cluster-2")));
    assert!(r.succeeded(), "pre-rotation cluster-1 leaf vs fresh cluster-2 leaf: {r:#?}");
    // The workload CA polls cacerts every 200 ms: new leaves come from the new intermediate.
    wait_for(Duration::from_secs(3), "a leaf from the new intermediate", || {
        let l = rt.block_on(openssl_leaf(&up, d, "cluster-1", "new1", OpensslKey::P256, &up.sleep_token("cluster-1")));
        (l.issuer().serial_hex() == rotated_to).then_some(())
    });

    let status = up.proc.wait_exit(Duration::from_secs(150).saturating_sub(started.elapsed()));
    let log = std::fs::read_to_string(up.dir.join("meshca-up.log")).unwrap_or_default();
    assert!(status.success(), "meshca up failed ({status}):\n{}\n{log}", up.proc.log_text());
    let summary = up.json("summary.json").expect("summary.json");
    eprintln!("summary.json: {summary:#}");
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}\n{log}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 500, "{summary:#}");
    for c in summary["clusters"].as_array().unwrap() {
        assert!(c["intermediate_rotations"].as_u64().unwrap() >= 3, "{summary:#}");
        assert_eq!(c["handshakes_failed"], 0, "{summary:#}");
        assert!(c["handshakes_ok"].as_u64().unwrap() > 0, "{summary:#}");
    }
}
