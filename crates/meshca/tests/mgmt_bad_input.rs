//! End to end, bad input: real `meshca server`, `meshca agent` and CLI processes on 127.0.0.1,
//! plus an in-test gRPC client speaking the management API the way a misbehaving (or malicious)
//! agent would. Every case must fail with a clear, specific error and leave nothing written.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use meshca_pki::name::NameAttr;
use meshca_pki::{CaSigner, Cert, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet, SpiffeId, TrustDomain};
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_proto::mgmt::registration_client::RegistrationClient;
use meshca_proto::mgmt::{
    ApplyPolicyRequest, GetStatusRequest, IssueIntermediateRequest, IssueIntermediateResponse, RegisterRequest,
    RevokeIntermediateRequest,
};
use tonic::Code;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// An in-test client of the management plane.
// ---------------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// A TLS 1.3 client config trusting the relay CA (`relay_pem`) for the server and presenting
/// `client` (certificate, chain above it, key) when given.
fn client_config(relay_pem: &[u8], client: Option<(&Cert, &[Cert], &PrivateKey)>) -> rustls::ClientConfig {
    meshca_tls::provider::install();
    let mut roots = rustls::RootCertStore::empty();
    for r in RootSet::from_pem(relay_pem).unwrap().iter() {
        roots.add(rustls_pki_types::CertificateDer::from(r.der().to_vec())).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    match client {
        Some((cert, chain, key)) => {
            let id = meshca_tls::Identity::new(cert, chain, key);
            builder.with_client_auth_cert(id.chain.clone(), id.key()).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

/// A channel to the management plane (must be created inside the runtime).
fn channel(m: &Mgmt, config: rustls::ClientConfig) -> Channel {
    meshca_tls::grpc::channel(&m.addr, config, "localhost").unwrap()
}

/// Registers a test identity with a bootstrap token, as an agent does: a P-256 key and a CSR.
async fn register(m: &Mgmt, relay_pem: &[u8], token: &str) -> (Cert, PrivateKey) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = meshca_pki::build_csr(&key, &[]).unwrap();
    let resp = RegistrationClient::new(channel(m, client_config(relay_pem, None)))
        .register(RegisterRequest { bootstrap_token: token.to_string(), identity_csr: csr, cluster: String::new() })
        .await
        .unwrap()
        .into_inner();
    (Cert::from_pem(resp.certificate.as_bytes()).unwrap(), key)
}

/// `cluster add` plus a registration of an in-test identity for it.
fn registered_identity(rt: &tokio::runtime::Runtime, d: &Path, m: &Mgmt, cluster: &str) -> (Vec<u8>, Cert, PrivateKey) {
    let (token, relay) = m.add_cluster(d, cluster);
    let relay_pem = std::fs::read(relay).unwrap();
    let token = std::fs::read_to_string(token).unwrap();
    let (cert, key) = rt.block_on(register(m, &relay_pem, token.trim()));
    assert_eq!(cert.uri_sans(), [format!("spiffe://meshca.internal/cluster/{cluster}")]);
    (relay_pem, cert, key)
}

fn issue(
    rt: &tokio::runtime::Runtime,
    client: &CertificateIssuerClient<Channel>,
    csr: &str,
) -> Result<IssueIntermediateResponse, tonic::Status> {
    let mut client = client.clone();
    rt.block_on(client.issue_intermediate(IssueIntermediateRequest {
        csr: csr.to_string(),
        reason: meshca_proto::IssueReason::Forced as i32,
    }))
    .map(|r| r.into_inner())
}

/// A well-formed cluster-intermediate CSR, as the agent makes them.
fn csr_for(alg: KeyAlgorithm, cluster: &str) -> String {
    let key = PrivateKey::generate(alg).unwrap();
    meshca_pki::build_csr(
        &key,
        &[
            (NameAttr::Organization, "meshca"),
            (NameAttr::CommonName, "meshca intermediate"),
            (NameAttr::Locality, cluster),
        ],
    )
    .unwrap()
}

/// Asserts `r` failed with `code` and a message containing every one of `needles`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needles: &[&str]) -> String {
    let s = r.expect_err("the call must be refused");
    assert_eq!(s.code(), code, "{s:?}");
    for n in needles {
        assert!(s.message().contains(n), "{:?} does not mention {n:?}", s.message());
    }
    s.message().to_string()
}

fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, out) = openssl(dir, args);
    assert!(ok, "openssl {args:?}: {out}");
    out
}

fn issued_count(st: &serde_json::Value, cluster: &str) -> usize {
    status_cluster(st, cluster).map(|c| c["issued"].as_array().unwrap().len()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Bootstrap tokens.
// ---------------------------------------------------------------------------------------------

/// An agent presenting a bootstrap token that was already used, has expired, was never issued
/// or is not a token at all exits non-zero with an error that says which, and nothing is
/// written: no identity or `cacerts` in its store, no registration in the management plane.
#[test]
fn reused_expired_unknown_and_malformed_bootstrap_tokens_register_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let mgmt = StoreView::mgmt(&m);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    wait_for(Duration::from_secs(30), "cluster-1 to register", || {
        a1.log_text().contains("registered with the management plane").then_some(())
    });
    let registration = mgmt.record("meshca", "cluster-cluster-1").unwrap();
    let used_token = std::fs::read_to_string(&t1).unwrap();
    let used_record = mgmt.record("meshca", &format!("bootstrap-token-{}", &used_token[..6])).unwrap();
    assert!(used_record["used_at"].is_i64(), "{used_record}");

    // A token for another cluster that expired an hour ago, minted straight into the management
    // plane's store (the expiry rule itself is tested on a manual clock in crates/mgmt/tests).
    let expiring = d.join("cluster-x.token");
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let t = mgmt.rt.block_on(meshca_mgmt::tokens::create(
        mgmt.store.as_ref(),
        "cluster-x",
        &Default::default(),
        Duration::from_secs(60),
        "operator test",
        an_hour_ago,
    ));
    std::fs::write(&expiring, t.unwrap().token).unwrap();
    let expiring_id = std::fs::read_to_string(&expiring).unwrap()[..6].to_string();

    // Each refused agent gets a fresh store of its own; it must exit, say why, and write nothing.
    let refused = |name: &str, cluster: &str, token_args: &[&str], needles: &[&str]| {
        let store = d.join(name);
        let mut a = agent_at(d, name, &store, &m, cluster, None, Some(&relay), token_args);
        let status = a.wait_exit(Duration::from_secs(30));
        let log = a.log_text();
        assert!(!status.success(), "{name} must exit non-zero:\n{log}");
        for n in needles {
            assert!(log.contains(n), "{name} does not say {n:?}:\n{log}");
        }
        assert!(!log.contains("registered with the management plane"), "{log}");
        let s = StoreView::open(&store);
        assert_eq!(s.list("meshca-system"), Vec::<String>::new(), "{name}: no agent identity");
        assert_eq!(s.list("istio-system"), Vec::<String>::new(), "{name}: no cacerts");
    };
    refused(
        "agent-reused",
        "cluster-1",
        &["--token-file", t1.to_str().unwrap()],
        &["Unauthenticated", "already used", "meshca cluster add"],
    );
    refused(
        "agent-expired",
        "cluster-x",
        &["--token-file", expiring.to_str().unwrap()],
        &["Unauthenticated", &format!("bootstrap token {expiring_id} expired"), "meshca cluster add"],
    );
    refused(
        "agent-unknown",
        "cluster-u",
        &["--token", "abcdef.0123456789abcdefghijklmn"],
        &["Unauthenticated", "unknown bootstrap token abcdef"],
    );
    refused(
        "agent-malformed",
        "cluster-m",
        &["--token", "not-a-token"],
        &["Unauthenticated", "malformed bootstrap token"],
    );

    // The management plane registered nobody new, and cluster-1's registration is untouched.
    let clusters: Vec<String> = mgmt.list("meshca").into_iter().filter(|n| n.starts_with("cluster-")).collect();
    assert_eq!(clusters, ["cluster-cluster-1"]);
    assert_eq!(mgmt.record("meshca", "cluster-cluster-1").unwrap(), registration, "cluster-1's registration untouched");
    assert_eq!(
        mgmt.record("meshca", &format!("bootstrap-token-{}", &used_token[..6])).unwrap(),
        used_record,
        "the used token's record is untouched"
    );
    let expired = mgmt.record("meshca", &format!("bootstrap-token-{expiring_id}")).unwrap();
    assert!(expired["used_at"].is_null(), "an expired token is not consumed: {expired}");
    let st = m.status_json();
    let names: Vec<&str> = st["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cluster-1"], "{st}");
    let log = m.proc.log_text();
    assert_eq!(log.matches("registration refused").count(), 4, "the server logs each refusal:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// The certificate issuer.
// ---------------------------------------------------------------------------------------------

/// A registered agent asking for an intermediate with a bad CSR is refused with a specific
/// error: another cluster's name (`PermissionDenied`, naming both), an RSA-1024 key from the
/// OpenSSL CLI, garbage, a P-384 key when the policy says P-256, a CSR whose signature does not
/// verify (all `InvalidArgument`, naming what is wrong) — and nothing is issued or recorded.
#[test]
fn bad_intermediate_csrs_are_refused_and_nothing_is_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A burst above the number of bad requests below: this test is about CSR checks, not the
    // rate limit (which counts refused requests too, and has a test of its own).
    let m = Mgmt::start(d, &["--issue-burst", "20"]);
    let rt = runtime();
    let (relay_pem, cert, key) = registered_identity(&rt, d, &m, "cluster-1");
    let issuer = rt.block_on(async {
        CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, Some((&cert, &[], &key)))))
    });

    // Asking in another cluster's name.
    let msg = assert_refused(
        issue(&rt, &issuer, &csr_for(KeyAlgorithm::EcdsaP256, "cluster-2")),
        Code::PermissionDenied,
        &["cluster-2", "cluster-1"],
    );
    assert!(msg.contains("names cluster"), "{msg}");

    // RSA-1024 from the OpenSSL CLI: the policy wants ECDSA P-256.
    openssl_ok(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "r1024.key",
            "-subj",
            "/L=cluster-1",
            "-out",
            "r1024.csr",
        ],
    );
    let rsa1024 = std::fs::read_to_string(d.join("r1024.csr")).unwrap();
    assert_refused(issue(&rt, &issuer, &rsa1024), Code::InvalidArgument, &["cluster-1", "RSA 1024", "ECDSA P-256"]);

    // Garbage, bare and PEM-framed.
    assert_refused(
        issue(&rt, &issuer, "this is not a CSR \u{1}\u{2}\u{3}"),
        Code::InvalidArgument,
        &["neither a PEM CERTIFICATE REQUEST nor a DER CSR"],
    );
    assert_refused(
        issue(&rt, &issuer, "-----BEGIN CERTIFICATE REQUEST-----\nAAECAwQFBgc=\n-----END CERTIFICATE REQUEST-----\n"),
        Code::InvalidArgument,
        &["malformed CSR"],
    );

    // P-384 where the policy wants P-256.
    assert_refused(
        issue(&rt, &issuer, &csr_for(KeyAlgorithm::EcdsaP384, "cluster-1")),
        Code::InvalidArgument,
        &["ECDSA P-384", "not allowed", "ECDSA P-256"],
    );

    // A CSR whose self-signature does not verify: no proof of possession of the key.
    openssl_ok(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "p256.key",
            "-subj",
            "/L=cluster-1",
            "-outform",
            "DER",
            "-out",
            "p256.der",
        ],
    );
    let mut der = std::fs::read(d.join("p256.der")).unwrap();
    *der.last_mut().unwrap() ^= 0x01; // inside the signature's last INTEGER: still valid DER
    std::fs::write(d.join("tampered.der"), &der).unwrap();
    let b64 = openssl_ok(d, &["base64", "-in", "tampered.der"]);
    let tampered = format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n");
    assert_refused(issue(&rt, &issuer, &tampered), Code::InvalidArgument, &["proof of possession"]);

    // With a policy asking for RSA 2048 intermediates, the same RSA-1024 CSR is too small.
    let rsa_policy = write_file(d, "rsa.yaml", &policy_yaml("    generated: {}", "{ keyAlgorithm: rsa-2048 }"));
    let (ok, out, err) = run(&["policy", "apply", rsa_policy.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(ok, "{out}{err}");
    assert_refused(
        issue(&rt, &issuer, &rsa1024),
        Code::InvalidArgument,
        &["RSA key of 1024 bits is too small", "at least 2048 bits"],
    );

    // Nothing was issued: no record in the store, none in the status, none in the log.
    assert_eq!(StoreView::mgmt(&m).get("meshca", "issued-cluster-1").map(|_| ()), None);
    let st = m.status_json();
    assert_eq!(issued_count(&st, "cluster-1"), 0, "{st}");
    assert!(!m.proc.log_text().contains("issued cluster intermediate"));
}

/// One cluster cannot make the issuer sign without bound: after its burst (5 by default) of
/// valid requests in a row, the next is refused with `ResourceExhausted` saying when to retry,
/// and is not recorded; other clusters are unaffected.
#[test]
fn the_issuer_rate_limits_each_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let rt = runtime();
    let (relay_pem, cert, key) = registered_identity(&rt, d, &m, "cluster-1");
    let issuer = rt.block_on(async {
        CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, Some((&cert, &[], &key)))))
    });
    for i in 0..5 {
        let r = issue(&rt, &issuer, &csr_for(KeyAlgorithm::EcdsaP256, "cluster-1"));
        assert!(r.is_ok(), "request {i} within the burst: {r:?}");
    }
    let msg = assert_refused(
        issue(&rt, &issuer, &csr_for(KeyAlgorithm::EcdsaP256, "cluster-1")),
        Code::ResourceExhausted,
        &["cluster cluster-1", "rate limit", "retry in"],
    );
    assert!(!msg.contains("retry in 0s"), "{msg}");
    assert_eq!(issued_count(&m.status_json(), "cluster-1"), 5, "the refused request is not recorded");

    let (relay_pem, cert, key) = registered_identity(&rt, d, &m, "cluster-2");
    let other = rt.block_on(async {
        CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, Some((&cert, &[], &key)))))
    });
    issue(&rt, &other, &csr_for(KeyAlgorithm::EcdsaP256, "cluster-2")).expect("cluster-2 has a bucket of its own");
}

/// Every issuer and operator call needs a client certificate from the relay CA, for the right
/// role: no certificate is `Unauthenticated`; a certificate from another CA (even one claiming
/// a registered cluster's identity) fails the TLS handshake, which the server logs and survives;
/// an operator may not ask for intermediates and an agent may not use the operator API (not even
/// to revoke an intermediate).
#[test]
fn calls_without_a_relay_ca_client_certificate_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let rt = runtime();
    let (relay_pem, agent_cert, agent_key) = registered_identity(&rt, d, &m, "cluster-1");
    let csr = csr_for(KeyAlgorithm::EcdsaP256, "cluster-1");

    // No client certificate.
    let anonymous = rt.block_on(async { CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, None))) });
    assert_refused(issue(&rt, &anonymous, &csr), Code::Unauthenticated, &["client certificate"]);
    let r = rt.block_on(async {
        OperatorClient::new(channel(&m, client_config(&relay_pem, None))).get_status(GetStatusRequest::default()).await
    });
    assert_refused(r, Code::Unauthenticated, &["client certificate"]);

    // A client certificate for the identity of the registered cluster-1 from another CA: once
    // from a CA named exactly like the relay CA (the signature gives it away), once from an
    // unrelated one (unknown issuer). The handshake fails; the server logs why and carries on.
    for (common_name, reason) in [("meshca relay CA", "BadSignature"), ("Some Other CA", "UnknownIssuer")] {
        let now = SystemTime::now();
        let params = RootParams {
            organization: "meshca".into(),
            common_name: common_name.into(),
            ttl: Duration::from_secs(86400),
        };
        let foreign_ca =
            CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &params, now).unwrap();
        let forged_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::new(TrustDomain::new("meshca.internal").unwrap(), "cluster/cluster-1").unwrap();
        let forged = foreign_ca
            .sign_leaf(forged_key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(3600)), now)
            .unwrap()
            .parse()
            .unwrap();
        let forger = rt.block_on(async {
            CertificateIssuerClient::new(channel(
                &m,
                client_config(&relay_pem, Some((&forged, &[foreign_ca.cert().clone()], &forged_key))),
            ))
        });
        // The TLS 1.3 client learns of the refusal from the server's alert, as a transport error.
        let e = issue(&rt, &forger, &csr).expect_err("a foreign client certificate must not get through");
        assert!(matches!(e.code(), Code::Unknown | Code::Unavailable), "{e:?}");
        wait_for(Duration::from_secs(10), "the server to log the failed handshake", || {
            let log = m.proc.log_text();
            log.lines()
                .any(|l| {
                    l.contains("TLS handshake failed") && l.contains(&format!("invalid peer certificate: {reason}"))
                })
                .then_some(())
        });
    }

    // The right CA, the wrong role.
    let op_dir = m.data.join("operator");
    let op_cert = Cert::from_pem(&std::fs::read(op_dir.join("operator.pem")).unwrap()).unwrap();
    let op_key = PrivateKey::from_pem(&std::fs::read(op_dir.join("operator-key.pem")).unwrap()).unwrap();
    let operator_as_agent = rt.block_on(async {
        CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, Some((&op_cert, &[], &op_key)))))
    });
    assert_refused(
        issue(&rt, &operator_as_agent, &csr),
        Code::PermissionDenied,
        &["operator admin", "certificate issuer"],
    );
    let r = rt.block_on(async {
        OperatorClient::new(channel(&m, client_config(&relay_pem, Some((&agent_cert, &[], &agent_key)))))
            .get_status(GetStatusRequest::default())
            .await
    });
    assert_refused(r, Code::PermissionDenied, &["agent of cluster cluster-1", "operator API"]);
    // A stolen agent identity cannot revoke intermediates (its own or another cluster's).
    let r = rt.block_on(async {
        OperatorClient::new(channel(&m, client_config(&relay_pem, Some((&agent_cert, &[], &agent_key)))))
            .revoke_intermediate(RevokeIntermediateRequest { cluster: "cluster-1".into(), ..Default::default() })
            .await
    });
    assert_refused(r, Code::PermissionDenied, &["agent of cluster cluster-1", "operator API"]);

    // The management plane still serves, and issued nothing.
    let (ok, out, err) = run(&["status", "--credentials", &m.creds()]);
    assert!(ok && out.contains("cluster-1"), "{out}{err}");
    assert_eq!(issued_count(&m.status_json(), "cluster-1"), 0);
    assert!(StoreView::mgmt(&m).get("meshca", "issued-cluster-1").is_none());
}

// ---------------------------------------------------------------------------------------------
// Policies.
// ---------------------------------------------------------------------------------------------

/// A bad RootTrustPolicy never goes into force, and the error names the field: `meshca policy
/// apply` (and the operator API itself, for a client that skips the local check) refuses two CA
/// modes, none, a ratio outside (0, 1) and an unknown key algorithm; a `secretRef` to a missing
/// secret, to a certificate that is not a CA or to an expired root is refused with
/// `FailedPrecondition`; `meshca server --policy` refuses to start with a bad policy. Through all of it the stored policy,
/// the policy generation and the cluster's intermediate stay as they were.
#[test]
fn bad_policies_are_refused_naming_the_field_and_the_previous_policy_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = write_file(d, "good.yaml", &policy_yaml("    generated: {}", "{ ttl: 1h }"));
    let port = Ports::one();
    let mut m = Mgmt::start_on(d, &port, &["--policy", good.to_str().unwrap()]);
    let mgmt = StoreView::mgmt(&m);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let first =
        wait_for(Duration::from_secs(30), "cluster-1 cacerts", || valid_bundle(&cacerts_dir(d, "cluster-1")).ok());
    let st0 = wait_for(Duration::from_secs(20), "cluster-1 to report", || {
        let st = m.status_json();
        (status_cluster(&st, "cluster-1")?["phase"] == "Ready").then_some(st)
    });
    let generation = st0["policyGeneration"].as_str().unwrap().to_string();
    let stored =
        |mgmt: &StoreView| mgmt.get("meshca", "root-trust-policy").unwrap().get("policy.yaml").unwrap().to_vec();
    let stored0 = stored(&mgmt);
    assert_eq!(stored0, std::fs::read(&good).unwrap());

    let invalid = [
        (
            "two-modes.yaml",
            policy_yaml("    generated: {}\n    secretRef: { name: my-root }", "{}"),
            "spec.config",
            "generated and secretRef",
        ),
        ("no-mode.yaml", policy_yaml("    {}", "{}"), "spec.config", "found none"),
        (
            "ratio.yaml",
            policy_yaml("    generated: {}", "{ secretRotationGracePeriodRatio: 1.5 }"),
            "spec.intermediateCertOptions.secretRotationGracePeriodRatio",
            "1.5 is outside (0, 1)",
        ),
        (
            "algorithm.yaml",
            policy_yaml("    generated: {}", "{ keyAlgorithm: ed25519 }"),
            "spec.intermediateCertOptions.keyAlgorithm",
            "ed25519",
        ),
        (
            "root-algorithm.yaml",
            policy_yaml("    generated: { keyAlgorithm: dsa-1024 }", "{}"),
            "spec.config.generated.keyAlgorithm",
            "dsa-1024",
        ),
    ];
    let op_dir = m.data.join("operator");
    let op_cert = Cert::from_pem(&std::fs::read(op_dir.join("operator.pem")).unwrap()).unwrap();
    let op_key = PrivateKey::from_pem(&std::fs::read(op_dir.join("operator-key.pem")).unwrap()).unwrap();
    let relay_pem = std::fs::read(&relay).unwrap();
    let rt = runtime();
    for (file, text, field, needle) in &invalid {
        let p = write_file(d, file, text);
        let (ok, out, err) = run(&["policy", "apply", p.to_str().unwrap(), "--credentials", &m.creds()]);
        assert!(!ok, "{file} must be refused: {out}");
        assert!(err.contains(&format!("{field}: ")) && err.contains(needle), "{file}: {err}");
        assert!(err.contains(file), "the error names the file: {err}");
        // The server checks too, for clients that do not.
        let r = rt.block_on(async {
            OperatorClient::new(channel(&m, client_config(&relay_pem, Some((&op_cert, &[], &op_key)))))
                .apply_policy(ApplyPolicyRequest { policy: text.clone() })
                .await
        });
        assert_refused(r, Code::InvalidArgument, &[field, needle]);
    }

    // secretRef to a secret that does not exist.
    let missing = write_file(d, "missing.yaml", &policy_yaml("    secretRef: { name: no-such-root }", "{ ttl: 1h }"));
    let (ok, out, err) = run(&["policy", "apply", missing.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(!ok, "{out}");
    for n in ["FailedPrecondition", "spec.config.secretRef", "meshca/no-such-root", "not found"] {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }

    // secretRef to a secret holding a leaf certificate (CA:FALSE) made with the OpenSSL CLI.
    write_file(
        d,
        "leaf.cnf",
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = www.example.com\n[v3_leaf]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n",
    );
    openssl_ok(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-days",
            "30",
            "-config",
            "leaf.cnf",
            "-extensions",
            "v3_leaf",
            "-out",
            "leaf.crt",
        ],
    );
    let leaf = meshca_store::Secret::with_data([
        ("tls.crt", std::fs::read(d.join("leaf.crt")).unwrap()),
        ("tls.key", std::fs::read(d.join("leaf.key")).unwrap()),
    ]);
    mgmt.create("meshca", "leaf-cert", &leaf);
    let not_ca = write_file(d, "not-ca.yaml", &policy_yaml("    secretRef: { name: leaf-cert }", "{ ttl: 1h }"));
    let (ok, out, err) = run(&["policy", "apply", not_ca.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(!ok, "{out}");
    for n in ["FailedPrecondition", "spec.config.secretRef", "meshca/leaf-cert", "www.example.com", "not a CA"] {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }

    // secretRef to a root that has expired (backdated with meshca's PKI core: the OpenSSL CLI
    // cannot make one without `openssl ca`).
    let then = SystemTime::now() - Duration::from_secs(2 * 86400);
    let params = RootParams { ttl: Duration::from_secs(86400), ..RootParams::new("Expired Corp") };
    let expired = CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &params, then).unwrap();
    let secret = meshca_store::Secret::with_data([
        ("ca-cert.pem", expired.cert().to_pem().into_bytes()),
        ("ca-key.pem", expired.key().to_pkcs8_pem().as_bytes().to_vec()),
    ]);
    mgmt.create("meshca", "expired-root", &secret);
    let p = write_file(d, "expired.yaml", &policy_yaml("    secretRef: { name: expired-root }", "{ ttl: 1h }"));
    let (ok, out, err) = run(&["policy", "apply", p.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(!ok, "an expired root must be refused: {out}");
    for n in
        ["FailedPrecondition", "spec.config.secretRef", "meshca/expired-root", "Expired Corp Root CA", "expired at"]
    {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }

    // The previous policy stays in force: same stored document, same generation, no error, and
    // cluster-1 keeps its intermediate. Agents act only on a new generation, which a refused
    // policy never produces (crates/mgmt/tests/issuer.rs shows that on a manual clock), so there
    // is nothing to wait for.
    assert_eq!(stored(&mgmt), stored0, "the stored policy is untouched");
    let st = m.status_json();
    assert_eq!(st["policyGeneration"], generation.as_str(), "{st}");
    assert_eq!(st["policyError"], "", "{st}");
    assert_eq!(st["alerts"].as_array().unwrap().len(), 0, "{st}");
    assert_eq!(issued_count(&st, "cluster-1"), issued_count(&st0, "cluster-1"), "nothing re-issued: {st}");
    let now = valid_bundle(&cacerts_dir(d, "cluster-1")).unwrap();
    assert_eq!(now.ca_cert().serial_hex(), first.ca_cert().serial_hex(), "cluster-1 keeps its intermediate");
    assert_eq!(a1.log_text().matches("cacerts written").count(), 1, "{}", a1.log_text());

    // `meshca server --policy` with a bad policy refuses to start, naming the file and the field,
    // and leaves the stored policy alone.
    m.proc.kill();
    for (file, _, field, needle) in &invalid[..3] {
        let p = d.join(file);
        let mut s = spawn_meshca(
            &format!("server-{file}"),
            d,
            &[
                "server",
                "--data-dir",
                m.data.to_str().unwrap(),
                "--listen",
                &port.addr(0),
                "--policy",
                p.to_str().unwrap(),
            ],
        );
        let status = s.wait_exit(Duration::from_secs(20));
        let log = s.log_text();
        assert!(!status.success(), "{log}");
        assert!(log.contains(&format!("{field}: ")) && log.contains(needle) && log.contains(file), "{log}");
        assert!(!log.contains("management plane listening"), "{log}");
    }
    assert_eq!(stored(&mgmt), stored0, "the stored policy is untouched");
}

/// A token for one cluster presented by the agent of another is refused and not consumed: the
/// right agent can still register with it.
#[test]
fn a_token_for_another_cluster_is_refused_and_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let mut wrong = agent_at(d, "wrong", &d.join("wrong"), &m, "cluster-2", Some(&t1), Some(&relay), &[]);
    let status = wrong.wait_exit(Duration::from_secs(30));
    let log = wrong.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("registers cluster cluster-1, not cluster-2"), "{log}");
    assert!(StoreView::open(&d.join("wrong")).get("meshca-system", "agent-identity").is_none());
    let right = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    wait_for(Duration::from_secs(30), "cluster-1 to register with the same token", || {
        valid_bundle(&cacerts_dir(d, "cluster-1")).ok()
    });
    assert!(right.log_text().contains("registered with the management plane"));
}

// ---------------------------------------------------------------------------------------------
// What reaches the operator (issue 19): reported text, unknown clusters, CLI errors.
// ---------------------------------------------------------------------------------------------

/// What an operator's terminal receives stays text: an agent's reported error full of ANSI/OSC
/// sequences (clear screen, window title, a forged "no alerts") is shown escaped by `meshca
/// status`; `meshca rotate` of an unknown cluster is `NotFound` (a malformed name
/// `InvalidArgument`) and the server logs no internal error for it; and with `RUST_BACKTRACE=1`
/// set, as on many developers' machines, an ordinary CLI error prints without a stack trace.
#[test]
fn the_operator_terminal_gets_escaped_reports_plain_not_found_and_no_backtraces() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let rt = runtime();
    let (relay_pem, cert, key) = registered_identity(&rt, d, &m, "cluster-1");
    let hostile = "\u{1b}[2J\u{1b}[H\u{1b}]0;all clear\u{7}\u{1b}[32mno alerts\u{1b}[0m\u{9b}1A";
    rt.block_on(async {
        CertificateIssuerClient::new(channel(&m, client_config(&relay_pem, Some((&cert, &[], &key)))))
            .report_status(meshca_proto::mgmt::ClusterStatus {
                phase: meshca_proto::Phase::Degraded as i32,
                last_error: hostile.into(),
                ..Default::default()
            })
            .await
            .unwrap()
    });
    let (ok, out, err) = run(&["status", "--credentials", &m.creds()]);
    assert!(ok, "{err}");
    let raw = |c: char| c != '\n' && meshca_proto::text::needs_escape(c);
    assert!(!out.chars().any(raw), "raw control characters: {out:?}");
    assert!(out.contains("\\x1b[2J\\x1b[H\\x1b]0;all clear\\x07"), "shown escaped:\n{out}");
    let (ok, json, _) = run(&["status", "-o", "json", "--credentials", &m.creds()]);
    assert!(ok && !json.contains('\u{1b}') && json.contains("\\\\x1b[2J"), "{json}");

    for (name, code, says) in [
        ("nope", "NotFound", "cluster nope is not registered"),
        ("Bad_Name", "InvalidArgument", "is not a DNS-1123 label"),
    ] {
        let out = std::process::Command::new(meshca())
            .args(["rotate", name, "--credentials", &m.creds()])
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with(&format!("Error: {code}: ")) && stderr.contains(says), "{stderr}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "an ordinary error, no stack trace:\n{stderr}");
    }
    let out = std::process::Command::new(meshca())
        .args(["status", "--credentials", d.join("missing").to_str().unwrap()])
        .env("RUST_BACKTRACE", "full")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("operator.pem"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace") && !stderr.contains("main.rs"), "{stderr}");
    let log = m.proc.log_text();
    assert!(!log.contains("internal error"), "a not-found is not an internal error:\n{log}");
}

/// `meshca cluster remove` stops a running agent at once (its identity is refused on its open
/// trust stream and every call; nothing more is issued) and archives the cluster's records;
/// `meshca operator issue` gives a second operator credentials of her own, and `meshca operator
/// revoke` makes every later call with them fail. The metrics endpoint refuses to start with an
/// empty token file and accepts the bearer scheme in any case.
#[test]
fn removing_a_cluster_stops_its_agent_and_revoked_operators_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let empty = write_file(d, "empty-token", "  \n");
    let data = d.join("refused");
    assert_refuses_to_start(
        "server-empty-token",
        d,
        &[
            "server",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-token-file",
            empty.to_str().unwrap(),
        ],
        "empty-token is empty",
    );

    let token = write_file(d, "metrics-token", "m3trics\n");
    let mut m = Mgmt::start(d, &["--metrics-listen", "127.0.0.1:0", "--metrics-token-file", token.to_str().unwrap()]);
    let line = m.proc.wait_for_log(Duration::from_secs(10), "metrics listening");
    let maddr = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(http_get_authorized(&maddr, "/metrics", Some("Bearer wrong")).0, 401);
    assert_eq!(http_get_authorized(&maddr, "/metrics", Some("bearer m3trics")).0, 200, "RFC 7235: any case");

    let (t, relay) = m.add_cluster(d, "cluster-1");
    let mut a = agent(d, &m, "cluster-1", Some(&t), Some(&relay), &[]);
    wait_for(Duration::from_secs(30), "cluster-1's cacerts", || valid_bundle(&cacerts_dir(d, "cluster-1")).ok());
    let (ok, out, err) = run(&["cluster", "remove", "cluster-1", "--credentials", &m.creds()]);
    assert!(ok && out.contains("cluster cluster-1 removed"), "{out}{err}");
    wait_for(Duration::from_secs(10), "the agent to be refused", || {
        let log = a.log_text();
        (log.contains("Unauthenticated") && log.contains("cluster cluster-1 is not registered")).then_some(())
    });
    a.assert_running();
    let (ok, out, _) = run(&["rotate", "cluster-1", "--credentials", &m.creds()]);
    assert!(!ok, "{out}");
    assert!(status_cluster(&m.status_json(), "cluster-1").is_none());
    let archived = StoreView::mgmt(&m).list("meshca");
    assert!(archived.iter().any(|n| n.starts_with("archived.cluster-1.")), "{archived:?}");
    assert!(!archived.iter().any(|n| n == "cluster-cluster-1" || n == "issued-cluster-1"), "{archived:?}");
    let (ok, _, err) = run(&["cluster", "remove", "cluster-1", "--credentials", &m.creds()]);
    assert!(!ok && err.contains("NotFound"), "{err}");

    let alice = d.join("alice");
    let (ok, out, err) =
        run(&["operator", "issue", "alice", "--out", alice.to_str().unwrap(), "--credentials", &m.creds()]);
    assert!(ok, "{out}{err}");
    let serial = out.split("serial ").nth(1).unwrap().split(',').next().unwrap().to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(alice.join("operator-key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, _, err) = run(&["status", "--credentials", alice.to_str().unwrap()]);
    assert!(ok, "alice's credentials work: {err}");
    let (ok, out, err) = run(&["operator", "revoke", &serial, "--credentials", &m.creds()]);
    assert!(ok && out.contains("revoked") && out.contains("alice"), "{out}{err}");
    let (ok, _, err) = run(&["status", "--credentials", alice.to_str().unwrap()]);
    assert!(!ok && err.contains("Unauthenticated") && err.contains("revoked"), "{err}");
    let (ok, _, err) = run(&["status", "--credentials", &m.creds()]);
    assert!(ok, "the admin is not affected: {err}");
}
