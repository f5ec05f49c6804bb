//! End to end: `meshca workload-ca` as a real process on 127.0.0.1 — Istio's CA API over TLS,
//! called by an in-test gRPC client the way istio-agent calls it, with keys and CSRs from the
//! OpenSSL CLI, service-account tokens from a demo issuer made in the test, and `cacerts`
//! written either by `meshca demo` or through the directory store.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use meshca_pki::bundle::BundleFiles;
use meshca_pki::{
    CaBundle, CaSigner, Cert, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet, TrustDomain,
};
use meshca_store::{ObjectKey, Precondition, Secret, Store};
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE};
use tonic::Code;

const ISSUER: &str = "https://idp.meshca.test/cluster-1";
const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const DAY: u64 = 86400;

/// A `meshca workload-ca` process.
struct WorkloadCa {
    proc: Proc,
    addr: String,
    metrics: Option<String>,
    /// A copy of the root-cert.pem it started with: what a client trusts.
    root_file: PathBuf,
}

impl WorkloadCa {
    /// Starts `meshca workload-ca` on `cacerts`, trusting `idp`'s tokens, with its log in
    /// `dir/<name>.log`. `extra` adds flags.
    fn start(dir: &Path, name: &str, cacerts: &Path, idp: &DemoIdp, extra: &[&str]) -> WorkloadCa {
        let jwks = write_file(dir, &format!("{name}-jwks.json"), &idp.jwks_json());
        let root_file = dir.join(format!("{name}-root.pem"));
        std::fs::copy(cacerts.join("root-cert.pem"), &root_file).unwrap();
        let mut args = vec![
            "workload-ca",
            "--cacerts",
            cacerts.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "cluster.local",
            "--jwt-issuer",
            idp.issuer(),
            "--jwks",
            jwks.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut proc = spawn_meshca(name, dir, &args);
        let (addr, metrics) = workload_ca_addrs(&mut proc);
        WorkloadCa { proc, addr, metrics, root_file }
    }

    /// A client trusting the root it started with; inside a tokio runtime.
    fn client(&self) -> CaClient {
        ca_client(&self.addr, &self.root_file, "istiod.istio-system.svc")
    }

    fn assert_running(&mut self) {
        self.proc.assert_running();
    }
}

/// `meshca demo --clusters 1` under `dir`: a generated root and a 30-day cluster intermediate.
fn demo_cacerts(dir: &Path) -> PathBuf {
    let out = dir.join("demo");
    let (ok, stdout, err) = run(&["demo", "--dir", out.to_str().unwrap(), "--clusters", "1"]);
    assert!(ok, "meshca demo: {stdout}{err}");
    out.join("cluster-1").join("cacerts")
}

/// A root made in the test, to issue cluster intermediates from.
struct TestRoot {
    signer: CaSigner,
    roots: RootSet,
}

impl TestRoot {
    fn new(org: &str) -> TestRoot {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let signer = CaSigner::new_root(key, &RootParams::new(org), SystemTime::now()).unwrap();
        let roots = RootSet::from_certs(vec![signer.cert().clone()]).unwrap();
        TestRoot { signer, roots }
    }

    /// A new cluster intermediate (new key) living `ttl`, and its `cacerts` files.
    fn intermediate(&self, ttl: Duration) -> (BundleFiles, Cert) {
        self.intermediate_trusting(ttl, &self.roots)
    }

    /// The same, with `roots` as the bundle's root set (e.g. during a root rotation).
    fn intermediate_trusting(&self, ttl: Duration, roots: &RootSet) -> (BundleFiles, Cert) {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut params =
            IntermediateParams::cluster("meshca-test", "cluster-1", TrustDomain::new("cluster.local").unwrap());
        params.ttl = ttl;
        let cert = self.signer.sign_intermediate(key.public_key_spki(), &params, SystemTime::now()).unwrap();
        let cert = cert.parse().unwrap();
        let files = CaBundle::assemble(&key, &cert, self.signer.chain(), roots);
        CaBundle::validate(&files, SystemTime::now()).expect("a valid bundle");
        (files, cert)
    }
}

/// Writes `files` as a plain `cacerts` directory.
fn write_cacerts(dir: &Path, files: &BundleFiles) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (name, data) in files.entries() {
        std::fs::write(dir.join(name), data).unwrap();
    }
    dir.to_path_buf()
}

/// `istio-system/cacerts` in a directory store, as the agent writes it.
struct CacertsObject {
    store: meshca_store::dir::DirStore,
    key: ObjectKey,
}

impl CacertsObject {
    fn open(root: &Path) -> CacertsObject {
        CacertsObject {
            store: meshca_store::dir::DirStore::open(root).unwrap(),
            key: ObjectKey::new("istio-system", "cacerts").unwrap(),
        }
    }

    /// The folder the workload CA reads (what istiod mounts as /etc/cacerts).
    fn path(&self) -> PathBuf {
        self.store.object_path(&self.key)
    }

    /// One atomic update of all four files.
    async fn put(&self, files: &BundleFiles) {
        let secret = Secret::with_data(files.entries().map(|(k, v)| (k.to_string(), v.to_vec())));
        self.store.put(&self.key, &secret, Precondition::Any).await.unwrap();
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn leaf_of(chain: &[String]) -> Cert {
    Cert::from_pem(chain[0].as_bytes()).unwrap()
}

/// A token for `default/sleep` from `idp`, valid for ten minutes.
fn sleep_token(idp: &DemoIdp) -> String {
    idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(600), SystemTime::now()).unwrap()
}

/// Asserts `result` is the status `code` (with `needle` in its message, when given) — and so no
/// certificate — and that the server still answers a good request with a good leaf.
async fn refused_then_still_serving(
    what: &str,
    result: Result<Vec<String>, tonic::Status>,
    code: Code,
    needle: Option<&str>,
    client: &mut CaClient,
    good: &tonic::Request<meshca_proto::istio::IstioCertificateRequest>,
) {
    match result {
        Ok(chain) => panic!("{what}: expected {code:?}, got a certificate chain of {} element(s)", chain.len()),
        Err(s) => {
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            if let Some(n) = needle {
                assert!(s.message().contains(n), "{what}: {:?} should mention {n:?}", s.message());
            }
        }
    }
    let chain = create_certificate(client, clone_request(good))
        .await
        .unwrap_or_else(|s| panic!("after {what}, a good request failed: {:?} {}", s.code(), s.message()));
    assert_eq!(leaf_of(&chain).uri_sans(), [SLEEP_ID.to_string()], "after {what}");
}

fn clone_request(
    r: &tonic::Request<meshca_proto::istio::IstioCertificateRequest>,
) -> tonic::Request<meshca_proto::istio::IstioCertificateRequest> {
    let mut c = tonic::Request::new(r.get_ref().clone());
    *c.metadata_mut() = r.metadata().clone();
    c
}

/// The CSR in `dir/<csr>` with the last byte of its signature flipped, as PEM (made with the
/// OpenSSL CLI).
fn tampered_csr(dir: &Path, csr: &str) -> String {
    let (ok, out) = openssl(dir, &["req", "-in", csr, "-outform", "DER", "-out", "tampered.der"]);
    assert!(ok, "{out}");
    let mut der = std::fs::read(dir.join("tampered.der")).unwrap();
    *der.last_mut().unwrap() ^= 0x01;
    std::fs::write(dir.join("tampered.der"), der).unwrap();
    let (ok, b64) = openssl(dir, &["base64", "-in", "tampered.der"]);
    assert!(ok, "{b64}");
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n")
}

/// Hostile callers are each answered with the right gRPC status and no certificate, and the
/// server keeps serving good requests after every one: no token (UNAUTHENTICATED), a non-bearer
/// authorization, an expired token (UNAUTHENTICATED, says expired), a wrong audience
/// (UNAUTHENTICATED), a token signed by another key (UNAUTHENTICATED), garbage instead of a CSR
/// (INVALID_ARGUMENT), a CSR whose signature does not verify (INVALID_ARGUMENT), an Ed25519 key
/// (INVALID_ARGUMENT), a 1 MB request (OUT_OF_RANGE: gRPC's message-size limit, 64 KiB, refuses it
/// before any handler runs), an RSA-1024 key (INVALID_ARGUMENT, says too small), an RSA key with
/// public exponent 3 (INVALID_ARGUMENT), tokens from the trusted issuer with `exp` or `nbf` of
/// 2^63 and more (UNAUTHENTICATED, out of range — they used to panic the request task) and an
/// `ImpersonatedIdentity` request (PERMISSION_DENIED). A CSR wrapped at 76 columns is signed. A CSR asking for another identity's SAN,
/// a DNS name and CA:TRUE is signed — Istio clients send whatever CSR they like — but the leaf
/// carries only the caller's identity, CA:FALSE and no certificate-signing usage.
#[test]
fn hostile_callers_get_the_right_status_and_no_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cacerts = demo_cacerts(d);
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let mut wca = WorkloadCa::start(d, "workload-ca", &cacerts, &idp, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = wca.client();
        let csr = openssl_csr(d, "good", OpensslKey::P256, &[]);
        let token = sleep_token(&idp);
        let good = csr_request(&csr, Some(&token), Some("cluster-1"), 0);
        let first = create_certificate(&mut c, clone_request(&good)).await.expect("a good request");
        assert_eq!(leaf_of(&first).uri_sans(), [SLEEP_ID.to_string()]);
        let now = SystemTime::now();

        let r = create_certificate(&mut c, csr_request(&csr, None, Some("cluster-1"), 0)).await;
        refused_then_still_serving("no token", r, Code::Unauthenticated, Some("bearer"), &mut c, &good).await;

        let mut basic = csr_request(&csr, None, None, 0);
        basic.metadata_mut().insert("authorization", format!("Basic {token}").parse().unwrap());
        let r = create_certificate(&mut c, basic).await;
        refused_then_still_serving("a Basic authorization", r, Code::Unauthenticated, None, &mut c, &good).await;

        let expired = idp
            .mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(60), now - Duration::from_secs(3600))
            .unwrap();
        let r = create_certificate(&mut c, csr_request(&csr, Some(&expired), None, 0)).await;
        refused_then_still_serving("an expired token", r, Code::Unauthenticated, Some("expired"), &mut c, &good).await;

        let wrong_aud = idp.mint("default", "sleep", "kubernetes", Duration::from_secs(600), now).unwrap();
        let r = create_certificate(&mut c, csr_request(&csr, Some(&wrong_aud), None, 0)).await;
        refused_then_still_serving("a wrong audience", r, Code::Unauthenticated, Some("audience"), &mut c, &good).await;

        let forger = DemoIdp::generate(ISSUER).unwrap();
        let forged = forger.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(600), now).unwrap();
        let r = create_certificate(&mut c, csr_request(&csr, Some(&forged), None, 0)).await;
        refused_then_still_serving("another key's token", r, Code::Unauthenticated, None, &mut c, &good).await;

        let r = create_certificate(&mut c, csr_request("this is not a CSR", Some(&token), None, 0)).await;
        refused_then_still_serving("garbage", r, Code::InvalidArgument, Some("CSR"), &mut c, &good).await;
        let framed =
            "-----BEGIN CERTIFICATE REQUEST-----\nTm90IGEgQ1NSIGF0IGFsbA==\n-----END CERTIFICATE REQUEST-----\n";
        let r = create_certificate(&mut c, csr_request(framed, Some(&token), None, 0)).await;
        refused_then_still_serving("PEM-framed garbage", r, Code::InvalidArgument, Some("CSR"), &mut c, &good).await;

        // 1 MB: over the gRPC decoding limit (64 KiB), refused by tonic as OUT_OF_RANGE.
        let huge = format!("{csr}{}", "A".repeat(1 << 20));
        let r = create_certificate(&mut c, csr_request(&huge, Some(&token), None, 0)).await;
        refused_then_still_serving("a 1 MB request", r, Code::OutOfRange, None, &mut c, &good).await;

        // Proof of possession: a CSR whose signature does not verify (someone else's public key).
        let forged_csr = tampered_csr(d, "good.csr");
        let r = create_certificate(&mut c, csr_request(&forged_csr, Some(&token), None, 0)).await;
        refused_then_still_serving("a bad CSR signature", r, Code::InvalidArgument, Some("signature"), &mut c, &good)
            .await;

        let (ok, out) = openssl(
            d,
            &["req", "-new", "-newkey", "ed25519", "-nodes", "-keyout", "ed.key", "-out", "ed.csr", "-subj", "/"],
        );
        assert!(ok, "{out}");
        let ed = std::fs::read_to_string(d.join("ed.csr")).unwrap();
        let r = create_certificate(&mut c, csr_request(&ed, Some(&token), None, 0)).await;
        refused_then_still_serving("an Ed25519 key", r, Code::InvalidArgument, Some("key"), &mut c, &good).await;

        let small = openssl_csr(d, "rsa1024", OpensslKey::Rsa(1024), &[]);
        let r = create_certificate(&mut c, csr_request(&small, Some(&token), None, 0)).await;
        refused_then_still_serving("RSA-1024", r, Code::InvalidArgument, Some("too small"), &mut c, &good).await;

        // An RSA key with public exponent 3 (OpenSSL makes it on request): refused for a leaf.
        let (ok, out) = openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-pkeyopt",
                "rsa_keygen_pubexp:3",
                "-out",
                "e3.key",
            ],
        );
        assert!(ok, "{out}");
        let (ok, out) = openssl(d, &["req", "-new", "-key", "e3.key", "-subj", "/CN=e3", "-out", "e3.csr"]);
        assert!(ok, "{out}");
        let e3 = std::fs::read_to_string(d.join("e3.csr")).unwrap();
        let r = create_certificate(&mut c, csr_request(&e3, Some(&token), None, 0)).await;
        refused_then_still_serving("RSA e=3", r, Code::InvalidArgument, Some("exponent 3"), &mut c, &good).await;

        // A token from the trusted issuer whose exp is 2^63 (and one whose nbf is): refused,
        // and the server is still there to answer the next request.
        for (claim, value) in [("exp", serde_json::json!(1u64 << 63)), ("nbf", serde_json::json!(u64::MAX))] {
            let t = unix(now);
            let mut claims = serde_json::json!({
                "iss": ISSUER, "sub": "system:serviceaccount:default:sleep", "aud": [ISTIO_CA_AUDIENCE],
                "iat": t, "nbf": t, "exp": t + 600,
            });
            claims[claim] = value;
            let huge = idp.sign_claims(&claims).unwrap();
            let r = create_certificate(&mut c, csr_request(&csr, Some(&huge), None, 0)).await;
            refused_then_still_serving(
                &format!("a huge {claim}"),
                r,
                Code::Unauthenticated,
                Some("out of range"),
                &mut c,
                &good,
            )
            .await;
        }

        // The same CSR with its base64 wrapped at 76 columns (RFC 7468 allows it): signed.
        let (ok, b64) = openssl(d, &["req", "-in", "good.csr", "-outform", "DER", "-out", "good.der"]);
        assert!(ok, "{b64}");
        let (ok, b64) = openssl(d, &["base64", "-A", "-in", "good.der"]);
        assert!(ok, "{b64}");
        let lines: Vec<&str> = b64.trim().as_bytes().chunks(76).map(|l| std::str::from_utf8(l).unwrap()).collect();
        let wide =
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", lines.join("\n"));
        let chain = create_certificate(&mut c, csr_request(&wide, Some(&token), None, 0)).await.expect("76 columns");
        assert_eq!(leaf_of(&chain).uri_sans(), [SLEEP_ID.to_string()]);

        let mut imp = csr_request(&csr, Some(&token), None, 0);
        let mut md = prost_types::Struct::default();
        md.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    "spiffe://cluster.local/ns/istio-system/sa/istiod".into(),
                )),
            },
        );
        imp.get_mut().metadata = Some(md);
        let r = create_certificate(&mut c, imp).await;
        refused_then_still_serving("ImpersonatedIdentity", r, Code::PermissionDenied, None, &mut c, &good).await;

        // Asks for istiod's identity, a DNS name and a CA certificate: the issuer decides.
        let greedy = openssl_csr(
            d,
            "greedy",
            OpensslKey::P256,
            &[
                "-addext",
                "subjectAltName=URI:spiffe://cluster.local/ns/istio-system/sa/istiod,DNS:istiod.istio-system.svc",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        let (_, text) = openssl(d, &["req", "-in", "greedy.csr", "-noout", "-text"]);
        assert!(text.contains("CA:TRUE") && text.contains("istiod"), "the CSR really asks: {text}");
        let chain = create_certificate(&mut c, csr_request(&greedy, Some(&token), None, 0))
            .await
            .expect("issued, with the issuer's profile");
        let files = write_chain(d, "greedy", &chain);
        let san = openssl_x509(d, &files.leaf, &["-ext", "subjectAltName"]);
        let san: Vec<&str> = san.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        assert_eq!(san, ["X509v3 Subject Alternative Name: critical", &format!("URI:{SLEEP_ID}")]);
        let ext = openssl_x509(d, &files.leaf, &["-ext", "basicConstraints,keyUsage"]);
        assert!(ext.contains("CA:FALSE") && !ext.contains("CA:TRUE"), "{ext}");
        assert!(!ext.contains("Certificate Sign") && !ext.contains("CRL Sign"), "{ext}");
        let leaf = leaf_of(&chain);
        assert!(!leaf.is_ca() && leaf.dns_sans().is_empty() && leaf.subject().is_empty());
        let (ok, out) = openssl_verify_leaf(d, &files, &cacerts.join("root-cert.pem"));
        assert!(ok, "{out}");
    });
    wca.assert_running();
}

/// The attack: an anonymous client floods the workload CA with requests carrying no token or a
/// forged one, over 16 connections from one address (127.0.0.2), while a real workload on
/// another address (127.0.0.1) keeps asking for certificates. With the default limits (no flag
/// given), every one of the real workload's requests is answered with a certificate; the flood
/// is answered RESOURCE_EXHAUSTED with a retry hint once its address's pre-authentication budget
/// is spent, so only that budget's worth of its tokens is ever verified (the authentication
/// failure counter says so); and the real identity's issuance budget is untouched by it.
#[test]
fn an_anonymous_flood_beside_a_real_workload_leaves_the_workload_served() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cacerts = demo_cacerts(d);
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let wca = WorkloadCa::start(d, "workload-ca", &cacerts, &idp, &["--metrics-listen", "127.0.0.1:0"]);
    let csr = openssl_csr(d, "flood", OpensslKey::P256, &[]);
    let token = sleep_token(&idp);
    let forged = sleep_token(&DemoIdp::generate(ISSUER).unwrap());
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let stop = Arc::new(AtomicBool::new(false));
    let (unauthenticated, exhausted, other) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    let flood_start = Instant::now();
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let mut c = ca_client_from(attacker, &wca.addr, &wca.root_file, "istiod.istio-system.svc");
            let (csr, forged) = (csr.clone(), forged.clone());
            let (stop, unauthenticated, exhausted, other) =
                (stop.clone(), unauthenticated.clone(), exhausted.clone(), other.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    n += 1;
                    // Every other request with no token at all, the rest with a forged one.
                    let token = (!n.is_multiple_of(2)).then_some(forged.as_str());
                    match create_certificate(&mut c, csr_request(&csr, token, None, 0)).await {
                        Err(s) if s.code() == Code::Unauthenticated => unauthenticated.fetch_add(1, Relaxed),
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            assert!(meshca_serve::pushback::retry_after(&s).is_some(), "no retry hint: {s:?}");
                            exhausted.fetch_add(1, Relaxed)
                        }
                        r => {
                            other.lock().unwrap().push(format!("{:?}", r.map(|c| c.len())));
                            0
                        }
                    };
                }
            })
        })
        .collect();
    // The real workload: 20 certificates, one every 200 ms, each on a fresh connection half the
    // time (istio-agent keeps one; a restarted one dials anew).
    let served = rt.block_on(async {
        let mut c = wca.client();
        let mut served = 0;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if i % 2 == 0 {
                c = wca.client();
            }
            let chain = create_certificate(&mut c, csr_request(&csr, Some(&token), Some("cluster-1"), 0))
                .await
                .unwrap_or_else(|s| panic!("real request {i} during the flood: {:?} {}", s.code(), s.message()));
            assert_eq!(leaf_of(&chain).uri_sans(), [SLEEP_ID.to_string()]);
            served += 1;
        }
        served
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        rt.block_on(f).unwrap();
    }
    let flood_time = flood_start.elapsed();
    let (unauth, exh) = (unauthenticated.load(Relaxed), exhausted.load(Relaxed));
    eprintln!("real workload: {served} certificates; flood: {unauth} UNAUTHENTICATED, {exh} RESOURCE_EXHAUSTED");
    assert_eq!(served, 20);
    // The default budget: 100 at once, 20 a second — that many of the flood's tokens were
    // verified (one more second covers rounding), the rest refused before their token was read.
    let bound = 100.0 + 20.0 * (flood_time.as_secs_f64() + 1.0);
    assert!(
        exh > 0 && (unauth as f64) <= bound,
        "{unauth} of the flood's tokens verified in {flood_time:?}, at most {bound} allowed; {exh} refused"
    );
    let (code, body) = http_get(wca.metrics.as_ref().unwrap(), "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        other.lock().unwrap().is_empty(),
        "the flood got other answers: {:?}\n{}\n{body}",
        other.lock().unwrap(),
        wca.proc.log_text().lines().filter(|l| !l.contains("not authenticated")).collect::<Vec<_>>().join("\n")
    );
    let failures = metric(&body, "citadel_server_authentication_failure_total").unwrap();
    assert_eq!(failures as u64, unauth, "every UNAUTHENTICATED is a verified token, and no more were verified");
    let refused = metric_labelled(&body, "meshca_workload_ca_requests_refused_total", "peer_rate").unwrap();
    assert_eq!(refused as u64, exh, "{body}");
    // The identity's own budget (burst 50) is intact: 20 used, 25 more still pass at once.
    rt.block_on(async {
        let mut c = wca.client();
        for _ in 0..25 {
            create_certificate(&mut c, csr_request(&csr, Some(&token), None, 0))
                .await
                .expect("within the identity's burst");
        }
    });
}

/// The attack: a bounded loop holds as many idle sockets as it can — half plain TCP that never
/// speaks, half finished TLS that never sends the HTTP/2 preface — from two addresses
/// (127.0.0.2, 127.0.0.3), reconnecting each one the server closes, against a workload CA whose
/// open-file limit is lowered to 256 (`ulimit -n`). Before, the server took connections until it
/// ran out of descriptors: real callers timed out and the rotated `cacerts` could not be read.
/// Now, with the default caps (the total sized under the open-file limit, 128 per address), the
/// flood sheds its own oldest idle sockets: a real caller on 127.0.0.1 gets every certificate
/// it asks for, each time on a new connection; a new intermediate written mid-flood is picked up
/// and signs; the server never runs out of descriptors; and the metrics count what was shed.
#[test]
fn idle_sockets_held_by_a_bounded_loop_do_not_starve_a_real_caller() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let root = TestRoot::new("meshca-test");
    let (files1, _) = root.intermediate(Duration::from_secs(30 * DAY));
    let obj = CacertsObject::open(&d.join("store"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(obj.put(&files1));
    let jwks = write_file(d, "jwks.json", &idp.jwks_json());
    let cacerts = obj.path();
    let mut proc = spawn_meshca_with_nofile(
        "workload-ca",
        d,
        256,
        &[
            "workload-ca",
            "--cacerts",
            cacerts.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--jwt-issuer",
            idp.issuer(),
            "--jwks",
            jwks.to_str().unwrap(),
        ],
    );
    let (addr, metrics) = workload_ca_addrs(&mut proc);
    let target: std::net::SocketAddr = addr.parse().unwrap();
    let root_file = write_file(d, "root.pem", &root.roots.to_pem());
    let csr = openssl_csr(d, "idle", OpensslKey::P256, &[]);
    let token = sleep_token(&idp);

    // The flood: 2 addresses × 150 sockets, each reconnected as soon as the server closes it.
    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut tls = trusting(&root_file);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let flood: Vec<_> = (0..300u32)
        .map(|i| {
            let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 2) as u8);
            let (stop, reconnects, connector) = (stop.clone(), reconnects.clone(), connector.clone());
            rt.spawn(async move {
                use tokio::io::AsyncReadExt;
                let name = rustls::pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
                while !stop.load(Relaxed) {
                    let Ok(tcp) = connect_from(source, target).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let mut buf = [0u8; 64];
                    // Hold it until the server closes it (read returns), then dial again.
                    if i % 4 < 2 {
                        let mut tcp = tcp;
                        let _ = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut buf)).await;
                    } else if let Ok(mut tls) = connector.connect(name.clone(), tcp).await {
                        let _ = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf)).await;
                    }
                    reconnects.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    // A real caller, a new connection for every certificate; halfway, a new intermediate.
    let (files2, int2) = root.intermediate(Duration::from_secs(20 * DAY));
    rt.block_on(async {
        for i in 0..16 {
            if i == 8 {
                obj.put(&files2).await;
            }
            let mut c = ca_client(&addr, &root_file, "istiod.istio-system.svc");
            let chain = tokio::time::timeout(
                Duration::from_secs(20),
                create_certificate(&mut c, csr_request(&csr, Some(&token), Some("cluster-1"), 0)),
            )
            .await
            .unwrap_or_else(|_| panic!("real request {i} hung during the flood"))
            .unwrap_or_else(|s| panic!("real request {i} during the flood: {:?} {}", s.code(), s.message()));
            assert_eq!(leaf_of(&chain).uri_sans(), [SLEEP_ID.to_string()]);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The rotated bundle was read and is in service, under the flood.
        let c = ca_client(&addr, &root_file, "istiod.istio-system.svc");
        eventually(Duration::from_secs(10), "the new intermediate to sign under the flood", || {
            let (mut c, csr, token, serial) = (c.clone(), &csr, &token, int2.serial_hex());
            async move {
                let chain = create_certificate(&mut c, csr_request(csr, Some(token), None, 0)).await.ok()?;
                (Cert::from_pem(chain[1].as_bytes()).ok()?.serial_hex() == serial).then_some(())
            }
        })
        .await;
    });
    let (code, body) = http_get(metrics.as_ref().unwrap(), "/metrics", None);
    stop.store(true, Relaxed);
    for f in flood {
        f.abort();
    }
    assert_eq!(code, 200, "{body}");
    let shed = metric_labelled(&body, "meshca_workload_ca_connections_closed_total", "shed").unwrap_or(0.0);
    eprintln!("flood reconnected {} times; the server shed {shed}", reconnects.load(Relaxed));
    assert!(shed > 0.0, "the caps engaged: {body}");
    assert_eq!(
        metric(&body, "meshca_workload_ca_accept_resource_exhaustion_total"),
        Some(0.0),
        "never out of descriptors"
    );
    let log = proc.log_text();
    assert!(!log.contains("Too many open files"), "the server ran out of descriptors:\n{log}");
    assert!(!log.contains("cannot read the cacerts directory"), "{log}");
    proc.assert_running();
}

/// `validity_duration` follows Istio's rules: 0 or negative → 24 h, 3600 → 1 h, 200 days →
/// clamped to 90 days; and a leaf never outlives its signer: under a 30-day intermediate
/// (`meshca demo`), 200 days ends exactly at the intermediate's NotAfter.
#[test]
fn leaf_lifetimes_follow_istios_rules_and_never_outlive_the_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let long = TestRoot::new("meshca-test").intermediate(Duration::from_secs(365 * DAY));
    let long_dir = write_cacerts(&d.join("long"), &long.0);
    let short_dir = demo_cacerts(d);
    let short_int = Cert::from_pem(&std::fs::read(short_dir.join("ca-cert.pem")).unwrap()).unwrap();
    let wca_long = WorkloadCa::start(d, "wca-long", &long_dir, &idp, &[]);
    let wca_short = WorkloadCa::start(d, "wca-short", &short_dir, &idp, &[]);
    let csr = openssl_csr(d, "ttl", OpensslKey::P256, &[]);
    let token = sleep_token(&idp);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = wca_long.client();
        for (asked, want) in [(0, DAY), (-5, DAY), (3600, 3600), (200 * DAY as i64, 90 * DAY)] {
            let before = unix(SystemTime::now());
            let chain = create_certificate(&mut c, csr_request(&csr, Some(&token), None, asked)).await.unwrap();
            let after = unix(SystemTime::now());
            let not_after = unix(leaf_of(&chain).not_after());
            assert!(
                (before + want..=after + want + 1).contains(&not_after),
                "asked {asked}s: NotAfter {not_after}, want now + {want}s ({before}..{after})"
            );
        }
        let mut c = wca_short.client();
        let chain = create_certificate(&mut c, csr_request(&csr, Some(&token), None, 200 * DAY as i64)).await.unwrap();
        assert_eq!(leaf_of(&chain).not_after(), short_int.not_after(), "clamped to the signer's NotAfter");
        let before = unix(SystemTime::now());
        let chain = create_certificate(&mut c, csr_request(&csr, Some(&token), None, 0)).await.unwrap();
        assert!(unix(leaf_of(&chain).not_after()) >= before + DAY, "24 h fits under a 30-day signer");
    });
}

/// One call of the reload test's callers.
#[derive(Debug, Clone)]
struct Call {
    started: Instant,
    /// The issuing intermediate's serial, or the error.
    result: Result<String, String>,
}

/// Keeps calling until `stop`; with `fresh_connections`, each call dials a new TLS connection
/// (so it also meets the serving certificate re-issued on reload).
async fn keep_calling(
    wca_addr: String,
    root: PathBuf,
    csr: String,
    token: String,
    fresh_connections: bool,
    log: Arc<Mutex<Vec<Call>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut client = ca_client(&wca_addr, &root, "istiod.istio-system.svc");
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if fresh_connections {
            client = ca_client(&wca_addr, &root, "istiod.istio-system.svc");
        }
        let started = Instant::now();
        let r = create_certificate(&mut client, csr_request(&csr, Some(&token), Some("cluster-1"), 0)).await;
        let result = match r {
            Ok(chain) => {
                let leaf = leaf_of(&chain);
                let issuer = Cert::from_pem(chain[1].as_bytes()).unwrap();
                assert_eq!(leaf.authority_key_id(), issuer.subject_key_id(), "AKI names the returned issuer");
                assert!(leaf.verify_signed_by(&issuer).is_ok());
                Ok(issuer.serial_hex())
            }
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        };
        log.lock().unwrap().push(Call { started, result });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Hot reload through the directory store (the agent's way of writing `cacerts`): a new
/// intermediate under the same root is signing new leaves within 1 s of the atomic update, without
/// a restart and without a single failed call from callers on a long-lived connection or on new
/// connections. An invalid bundle (the key of another certificate) and then a bundle under a
/// different root (A → B, which Istio's multi-root rule forbids) are each REFUSED in the log, and
/// leaves keep coming from the last good intermediate. The allowed path A → A+B → B is followed.
#[test]
fn a_new_intermediate_signs_within_a_second_and_bad_bundles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let root_a = TestRoot::new("root-a");
    let (files1, int1) = root_a.intermediate(Duration::from_secs(30 * DAY));
    let obj = CacertsObject::open(&d.join("store"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(obj.put(&files1));
    // Two callers in a tight loop from one address and one identity: this test is about reload,
    // so the request limits (tested on their own) are off.
    let no_limits = ["--peer-requests-per-second", "0", "--identity-requests-per-second", "0"];
    let mut wca = WorkloadCa::start(d, "workload-ca", &obj.path(), &idp, &no_limits);
    let csr = openssl_csr(d, "reload", OpensslKey::P256, &[]);
    let token = sleep_token(&idp);

    let log = Arc::new(Mutex::new(Vec::<Call>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = [false, true]
        .into_iter()
        .map(|fresh| {
            rt.spawn(keep_calling(
                wca.addr.clone(),
                wca.root_file.clone(),
                csr.clone(),
                token.clone(),
                fresh,
                log.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let issued_since =
        |t: Instant| -> Vec<Call> { log.lock().unwrap().iter().filter(|c| c.started >= t).cloned().collect() };
    wait_for(Duration::from_secs(10), "calls from the first intermediate", || {
        (issued_since(Instant::now() - Duration::from_secs(60)).len() >= 10).then_some(())
    });

    // Same root, new intermediate.
    let (files2, int2) = root_a.intermediate(Duration::from_secs(20 * DAY));
    rt.block_on(obj.put(&files2));
    let put_at = Instant::now();
    let first_new = wait_for(Duration::from_secs(5), "a leaf from the new intermediate", || {
        let l = log.lock().unwrap();
        l.iter().find(|c| c.result.as_ref() == Ok(&int2.serial_hex())).map(|c| c.started)
    });
    assert!(first_new.saturating_duration_since(put_at) < Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(2));
    let after = issued_since(put_at + Duration::from_secs(1));
    assert!(after.len() >= 5, "calls kept flowing: {}", after.len());
    assert!(
        after.iter().all(|c| c.result.as_ref() == Ok(&int2.serial_hex())),
        "every call started 1 s after the put is signed by the new intermediate: {after:?}"
    );
    eprintln!(
        "first leaf from the new intermediate: call started {:?} after the put",
        first_new.saturating_duration_since(put_at)
    );

    // An invalid bundle: the key belongs to another certificate.
    let (files3, _) = root_a.intermediate(Duration::from_secs(20 * DAY));
    let (other, _) = root_a.intermediate(Duration::from_secs(20 * DAY));
    let bad = BundleFiles { ca_key: other.ca_key.clone(), ..files3 };
    assert!(CaBundle::validate(&bad, SystemTime::now()).is_err());
    rt.block_on(obj.put(&bad));
    let bad_at = Instant::now();
    wait_for(Duration::from_secs(5), "the refusal of a mismatched key", || {
        (wca.proc.log_text().matches("REFUSED").count() == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let after = issued_since(bad_at);
    assert!(after.len() >= 3 && after.iter().all(|c| c.result.as_ref() == Ok(&int2.serial_hex())), "{after:?}");

    // A different root: A -> B is never allowed in one step.
    let root_b = TestRoot::new("root-b");
    let (files_b, _) = root_b.intermediate(Duration::from_secs(30 * DAY));
    rt.block_on(obj.put(&files_b));
    let b_at = Instant::now();
    wait_for(Duration::from_secs(5), "the refusal of a root-set change", || {
        (wca.proc.log_text().matches("REFUSED").count() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let after = issued_since(b_at);
    assert!(after.len() >= 3 && after.iter().all(|c| c.result.as_ref() == Ok(&int2.serial_hex())), "{after:?}");
    let text = wca.proc.log_text();
    let refusals: Vec<&str> = text.lines().filter(|l| l.contains("REFUSED")).collect();
    assert!(refusals[1].to_lowercase().contains("root"), "the second refusal names the root set: {}", refusals[1]);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        rt.block_on(c).unwrap();
    }
    let all = log.lock().unwrap().clone();
    let failed: Vec<&Call> = all.iter().filter(|c| c.result.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} calls failed: {failed:?}", failed.len(), all.len());
    assert!(all.iter().any(|c| c.result.as_ref() == Ok(&int1.serial_hex())));

    // The rule is precise, not a blanket refusal: A -> A+B -> B, one step at a time, is followed.
    let both = root_a.roots.merge(&root_b.roots);
    let both_file = write_file(d, "roots-a-b.pem", &both.to_pem());
    let next = |files: &BundleFiles, int: &Cert, step: &str| {
        rt.block_on(obj.put(files));
        wait_for(Duration::from_secs(5), step, || {
            let chain = rt
                .block_on(async {
                    let mut c = ca_client(&wca.addr, &both_file, "istiod.istio-system.svc");
                    create_certificate(&mut c, csr_request(&csr, Some(&token), None, 0)).await
                })
                .unwrap_or_else(|s| panic!("{step}: {:?} {}", s.code(), s.message()));
            (chain[1] == int.to_pem()).then_some(chain)
        })
    };
    let (files_ab, int_ab) = root_a.intermediate_trusting(Duration::from_secs(30 * DAY), &both);
    next(&files_ab, &int_ab, "A -> A+B");
    let (files_b_ab, int_b_ab) = root_b.intermediate_trusting(Duration::from_secs(30 * DAY), &both);
    next(&files_b_ab, &int_b_ab, "an intermediate under B, trusting A+B");
    let (files_b_only, int_b_only) = root_b.intermediate(Duration::from_secs(30 * DAY));
    let chain = next(&files_b_only, &int_b_only, "A+B -> B");
    assert_eq!(chain.last().unwrap(), &root_b.signer.cert().to_pem(), "the chain now ends at root B");
    assert_eq!(wca.proc.log_text().matches("REFUSED").count(), 2, "no refusal along A -> A+B -> B");
    wca.assert_running();
}

/// Prometheus metrics on their own port, behind a bearer token: without it (or with a wrong one)
/// `/metrics` answers 401; with it, the istiod-named counters (`citadel_server_csr_total`,
/// `citadel_server_success_cert_issuance_total`, `citadel_server_authentication_failure_total`,
/// `citadel_server_csr_sign_err_total`) and the issuance latency histogram count what happened,
/// and `citadel_server_cert_chain_expiry_timestamp` moves to the new intermediate's NotAfter
/// after a reload (istiod's does not). The bearer scheme is matched case-insensitively, and an
/// empty token file stops the workload CA at start.
#[test]
fn metrics_need_the_token_count_requests_and_follow_a_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let idp = DemoIdp::generate(ISSUER).unwrap();
    let root = TestRoot::new("meshca-test");
    let (files1, int1) = root.intermediate(Duration::from_secs(30 * DAY));
    let obj = CacertsObject::open(&d.join("store"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(obj.put(&files1));
    let metrics_token = "s3cret-metrics-token";
    let token_file = write_file(d, "metrics-token", &format!("{metrics_token}\n"));
    let wca = WorkloadCa::start(
        d,
        "workload-ca",
        &obj.path(),
        &idp,
        &["--metrics-listen", "127.0.0.1:0", "--metrics-token-file", token_file.to_str().unwrap()],
    );
    let maddr = wca.metrics.clone().unwrap();
    assert_eq!(http_get(&maddr, "/metrics", None).0, 401, "no token");
    assert_eq!(http_get(&maddr, "/metrics", Some("wrong")).0, 401, "wrong token");
    // The scheme name is case-insensitive (RFC 7235): Prometheus and curl users write either.
    for scheme in ["bearer", "BEARER"] {
        let (code, body) = http_get_authorized(&maddr, "/metrics", Some(&format!("{scheme} {metrics_token}")));
        assert_eq!(code, 200, "{scheme}: {body}");
    }
    // An empty token file is refused at start, not taken as "no token".
    let empty = write_file(d, "empty-token", "\n");
    let jwks = write_file(d, "jwks-empty-token.json", &idp.jwks_json());
    assert_refuses_to_start(
        "workload-ca-empty-token",
        d,
        &[
            "workload-ca",
            "--cacerts",
            obj.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--jwt-issuer",
            ISSUER,
            "--jwks",
            jwks.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-token-file",
            empty.to_str().unwrap(),
        ],
        "empty-token is empty",
    );
    let scrape = || {
        let (code, body) = http_get(&maddr, "/metrics", Some(metrics_token));
        assert_eq!(code, 200, "{body}");
        body
    };
    let m = |body: &str, name: &str| metric(body, name).unwrap_or_else(|| panic!("{name} missing from:\n{body}"));

    let before = scrape();
    assert_eq!(m(&before, "citadel_server_cert_chain_expiry_timestamp"), unix(int1.not_after()) as f64);
    assert_eq!(m(&before, "citadel_server_root_cert_expiry_timestamp"), unix(root.signer.cert().not_after()) as f64);
    let csr = openssl_csr(d, "metrics", OpensslKey::P256, &[]);
    let token = sleep_token(&idp);
    let forged = DemoIdp::generate(ISSUER).unwrap();
    rt.block_on(async {
        let mut c = wca.client();
        for _ in 0..3 {
            create_certificate(&mut c, csr_request(&csr, Some(&token), None, 0)).await.unwrap();
        }
        let bad = sleep_token(&forged);
        assert!(create_certificate(&mut c, csr_request(&csr, Some(&bad), None, 0)).await.is_err());
        assert!(create_certificate(&mut c, csr_request("garbage", Some(&token), None, 0)).await.is_err());
    });
    let after = scrape();
    let delta = |name: &str| m(&after, name) - m(&before, name);
    assert_eq!(delta("citadel_server_csr_total"), 5.0, "every request is counted");
    assert_eq!(delta("citadel_server_success_cert_issuance_total"), 3.0);
    assert_eq!(delta("citadel_server_authentication_failure_total"), 1.0);
    assert_eq!(delta("citadel_server_csr_sign_err_total"), 1.0);
    assert_eq!(delta("meshca_workload_ca_issuance_seconds_count"), 3.0, "latency of each issuance");

    let (files2, int2) = root.intermediate(Duration::from_secs(20 * DAY));
    assert_ne!(unix(int1.not_after()), unix(int2.not_after()));
    rt.block_on(obj.put(&files2));
    let reloaded = wait_for(Duration::from_secs(5), "the expiry gauge to follow the reload", || {
        let body = scrape();
        (metric(&body, "citadel_server_cert_chain_expiry_timestamp") == Some(unix(int2.not_after()) as f64))
            .then_some(body)
    });
    assert_eq!(
        m(&reloaded, "meshca_workload_ca_cacerts_reloads_total")
            - m(&before, "meshca_workload_ca_cacerts_reloads_total"),
        1.0
    );
}
