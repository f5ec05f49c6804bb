//! The peer verifiers against CRLs, in process, at chosen times (rustls hands the verifier the
//! time; these tests pass it explicitly instead of waiting): a leaf under a revoked cluster
//! intermediate is refused as revoked once the grace after the revocation date is over, at once
//! when it was issued after the revocation or when the grace is zero; a leaf under a healthy
//! intermediate passes (its issuer published no CRL here: unknown status is allowed); a revoked
//! leaf has no grace; a CRL from another CA of the same name says nothing; CRLs are replaced at
//! run time. And the client's server verification (`ServerTrust::RootsWithCrls`) in a real TLS
//! handshake over a socket.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_pki::{
    CaSigner, Cert, Crl, CrlParams, IntermediateParams, KeyAlgorithm, LeafParams, PrivateKey, Reason, Revoked,
    RootParams, RootSet, SpiffeId, TrustDomain,
};
use meshca_tls::{ClientAuth, Identity, PeerPolicy, RevocationGrace, ServerTrust, SpiffeVerifier, Versions};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

const GRACE: RevocationGrace = RevocationGrace(Duration::from_secs(20));

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn at(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

struct Mesh {
    root: CaSigner,
    cluster1: CaSigner,
    cluster2: CaSigner,
}

fn intermediate(root: &CaSigner, cluster: &str, now: SystemTime) -> CaSigner {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = IntermediateParams::cluster("meshca", cluster, td());
    let cert = root.sign_intermediate(key.public_key_spki(), &params, now).unwrap().parse().unwrap();
    CaSigner::new(key, vec![cert, root.cert().clone()]).unwrap()
}

fn mesh() -> Mesh {
    let root =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("meshca"), t0())
            .unwrap();
    let cluster1 = intermediate(&root, "cluster-1", t0());
    let cluster2 = intermediate(&root, "cluster-2", t0());
    Mesh { root, cluster1, cluster2 }
}

/// A workload leaf from `ca` issued at `now`: its chain (leaf, intermediate) and key.
fn leaf(ca: &CaSigner, sa: &str, now: SystemTime) -> (Vec<Cert>, PrivateKey) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::workload(&td(), "default", sa).unwrap();
    let cert = ca
        .sign_leaf(key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(3600)), now)
        .unwrap()
        .parse()
        .unwrap();
    (vec![cert, ca.cert().clone()], key)
}

fn crl(by: &CaSigner, revoked: &[(&Cert, SystemTime)], now: SystemTime) -> Crl {
    let revoked = revoked
        .iter()
        .map(|(c, t)| Revoked { serial_hex: c.serial_hex(), revoked_at: *t, reason: Reason::KeyCompromise })
        .collect();
    by.sign_crl(&CrlParams { number: 1, this_update: now, next_update: now + Duration::from_secs(3600), revoked })
        .unwrap()
}

fn roots(m: &Mesh) -> RootSet {
    RootSet::from_pem(m.root.cert().to_pem().as_bytes()).unwrap()
}

fn verifier(m: &Mesh, grace: RevocationGrace) -> Arc<SpiffeVerifier> {
    SpiffeVerifier::with_revocation(&roots(m), PeerPolicy::TrustDomain(td()), true, grace).unwrap()
}

/// The verifier's verdict on `chain` as a client certificate, and as a server certificate (both
/// directions must agree), at `now`.
fn check(v: &SpiffeVerifier, chain: &[Cert], now: SystemTime) -> Result<(), rustls::Error> {
    let ders: Vec<CertificateDer<'static>> = chain.iter().map(|c| CertificateDer::from(c.der().to_vec())).collect();
    let as_client = v.verify_client_cert(&ders[0], &ders[1..], at(now)).map(|_| ());
    let name = ServerName::try_from("workload").unwrap();
    let as_server = v.verify_server_cert(&ders[0], &ders[1..], &name, &[], at(now)).map(|_| ());
    assert_eq!(format!("{as_client:?}"), format!("{as_server:?}"), "client and server verification differ");
    as_client
}

fn is_revoked(r: Result<(), rustls::Error>) -> bool {
    matches!(r, Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)))
}

#[test]
fn a_revoked_intermediates_leaves_pass_during_the_grace_and_fail_as_revoked_after_it() {
    meshca_tls::provider::install();
    let m = mesh();
    let v = verifier(&m, GRACE);
    let issued = t0() + Duration::from_secs(600);
    let (old2, _) = leaf(&m.cluster2, "sleep-2", issued);
    let (healthy1, _) = leaf(&m.cluster1, "sleep-1", issued);
    let revoked_at = t0() + Duration::from_secs(1000);

    check(&v, &old2, revoked_at).unwrap();
    // The root's CRL naming cluster-2's intermediate, and cluster-1's own CRL (naming nothing).
    v.set_crls(&[crl(&m.root, &[(m.cluster2.cert(), revoked_at)], revoked_at), crl(&m.cluster1, &[], revoked_at)])
        .unwrap();
    check(&v, &old2, revoked_at).expect("issued before the revocation: accepted during the grace");
    check(&v, &old2, revoked_at + GRACE.0 - Duration::from_secs(1)).expect("still within the grace");
    let after = check(&v, &old2, revoked_at + GRACE.0);
    assert!(is_revoked(after.clone()), "the grace is over: {after:?}");
    // The healthy cluster's leaves are unaffected, whether their issuer has a CRL here or not.
    check(&v, &healthy1, revoked_at + GRACE.0).unwrap();
    v.set_crls(&[crl(&m.root, &[(m.cluster2.cert(), revoked_at)], revoked_at)]).unwrap();
    check(&v, &healthy1, revoked_at + GRACE.0)
        .expect("no CRL from cluster-1's intermediate: unknown status is allowed");
    // Forgetting the CRLs (a new set without that entry) accepts the leaf again.
    v.set_crls(&[]).unwrap();
    check(&v, &old2, revoked_at + GRACE.0).unwrap();
}

#[test]
fn a_leaf_minted_with_the_revoked_key_after_the_revocation_fails_at_once() {
    meshca_tls::provider::install();
    let m = mesh();
    let v = verifier(&m, GRACE);
    let revoked_at = t0() + Duration::from_secs(1000);
    v.set_crls(&[crl(&m.root, &[(m.cluster2.cert(), revoked_at)], revoked_at)]).unwrap();
    // meshca backdates NotBefore by two minutes; a leaf issued one second after the revocation.
    let (stolen, _) = leaf(&m.cluster2, "mallory", revoked_at + Duration::from_secs(1));
    let r = check(&v, &stolen, revoked_at + Duration::from_secs(2));
    assert!(is_revoked(r.clone()), "{r:?}");
    // One issued a second before it is within the grace.
    let (before, _) = leaf(&m.cluster2, "sleep-2", revoked_at - Duration::from_secs(1));
    check(&v, &before, revoked_at + Duration::from_secs(2)).unwrap();
}

#[test]
fn without_a_grace_and_for_a_revoked_leaf_the_crl_is_enforced_at_once() {
    meshca_tls::provider::install();
    let m = mesh();
    let issued = t0() + Duration::from_secs(600);
    let revoked_at = t0() + Duration::from_secs(1000);
    let (old2, _) = leaf(&m.cluster2, "sleep-2", issued);
    let strict = verifier(&m, RevocationGrace::NONE);
    strict.set_crls(&[crl(&m.root, &[(m.cluster2.cert(), revoked_at)], revoked_at)]).unwrap();
    assert!(is_revoked(check(&strict, &old2, revoked_at)));

    let v = verifier(&m, GRACE);
    let (leaf1, _) = leaf(&m.cluster1, "sleep-1", issued);
    v.set_crls(&[crl(&m.cluster1, &[(&leaf1[0], revoked_at)], revoked_at)]).unwrap();
    assert!(is_revoked(check(&v, &leaf1, revoked_at)), "a revoked leaf has no grace");
}

#[test]
fn a_crl_from_another_ca_of_the_same_name_says_nothing_and_a_stale_crl_still_revokes() {
    meshca_tls::provider::install();
    let m = mesh();
    let v = verifier(&m, RevocationGrace::NONE);
    let (old2, _) = leaf(&m.cluster2, "sleep-2", t0());
    let revoked_at = t0() + Duration::from_secs(1000);
    // Another root with the same name (a re-keyed root, as during a root rotation, or an
    // impostor) signs a CRL naming cluster-2's intermediate: it is not the issuer's, so it says
    // nothing — neither "revoked" nor an error (rustls-webpki alone would pick it by name and
    // fail the chain on its signature).
    let same_name =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("meshca"), t0())
            .unwrap();
    assert_eq!(same_name.cert().subject(), m.root.cert().subject());
    v.set_crls(&[crl(&same_name, &[(m.cluster2.cert(), revoked_at)], revoked_at)]).unwrap();
    check(&v, &old2, revoked_at).expect("a CRL its issuer did not sign says nothing");
    // Both in the set, the other one first: the issuer's own is the one checked.
    v.set_crls(&[crl(&same_name, &[], revoked_at), crl(&m.root, &[(m.cluster2.cert(), revoked_at)], revoked_at)])
        .unwrap();
    assert!(is_revoked(check(&v, &old2, revoked_at)));
    // The real root's CRL (valid for a minute), read ten minutes later: what it revoked stays
    // revoked.
    let entry = Revoked { serial_hex: m.cluster2.cert().serial_hex(), revoked_at, reason: Reason::KeyCompromise };
    let short = CrlParams {
        number: 2,
        this_update: revoked_at,
        next_update: revoked_at + Duration::from_secs(60),
        revoked: vec![entry],
    };
    v.set_crls(&[m.root.sign_crl(&short).unwrap()]).unwrap();
    assert!(is_revoked(check(&v, &old2, revoked_at + Duration::from_secs(600))));
}

/// A server presenting a leaf under a revoked intermediate, over a real socket, to a client
/// whose server trust carries the CRLs: the handshake fails as revoked; without the CRLs, or
/// with CRLs naming nothing (one from a same-named successor intermediate), it succeeds.
#[tokio::test]
async fn the_clients_server_verification_checks_the_crls_over_a_real_handshake() {
    meshca_tls::provider::install();
    let now = SystemTime::now();
    let root =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("meshca"), now)
            .unwrap();
    let cluster2 = intermediate(&root, "cluster-2", now);
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = LeafParams { identity: None, dns_names: vec!["ca.example".into()], ttl: Duration::from_secs(3600) };
    let serving = cluster2.sign_leaf(key.public_key_spki(), &params, now).unwrap().parse().unwrap();
    let identity = Identity::new(&serving, &[cluster2.cert().clone()], &key);
    let server = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let roots = RootSet::from_pem(root.cert().to_pem().as_bytes()).unwrap();
    let dial = |crls: Vec<Crl>| {
        let roots = roots.clone();
        async move {
            let config = meshca_tls::client_config(
                ServerTrust::RootsWithCrls(&roots, &crls),
                ClientAuth::None,
                Versions::Tls13And12,
            )
            .unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("ca.example").unwrap(), tcp)
                .await
                .map(|_| ())
        }
    };
    dial(vec![]).await.expect("no CRL: the chain is trusted");
    let healthy_crl = crl(&root, &[], now);
    dial(vec![healthy_crl]).await.expect("a CRL naming nothing; no CRL from the intermediate: allowed");
    // cluster-2's next intermediate has the same name; the CRL it signs says nothing about the
    // server's chain under the current one (rustls' own CRL support would pick it by name and
    // fail the handshake on its signature).
    let next2 = intermediate(&root, "cluster-2", now);
    assert_eq!(next2.cert().subject(), cluster2.cert().subject());
    dial(vec![crl(&next2, &[], now), crl(&root, &[], now)]).await.expect("the successor's CRL says nothing here");
    let revoking = crl(&root, &[(cluster2.cert(), now)], now);
    let err = dial(vec![revoking]).await.unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
}
