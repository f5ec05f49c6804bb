//! Revocation in-process, on a manual clock, over a real directory store: `revoke` records the
//! revocation and the rotation request together, is idempotent, refuses serials the cluster
//! never had; the CRL the publisher signs lists the serial, verifies with OpenSSL against the
//! root, and is re-signed (a new CRL number) at half its lifetime, before its nextUpdate; the
//! issuer refuses the revoked key; each action leaves one audit entry. The operator API's authentication of `RevokeIntermediate`
//! (agent credentials denied) is tested over real mutual TLS in
//! `crates/meshca/tests/revocation_up.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::{Clock, ManualClock, unix};
use meshca_mgmt::issuer::{Denied, Issuer};
use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
use meshca_mgmt::ratelimit::RateLimiter;
use meshca_mgmt::records::{self, ClusterRecord};
use meshca_mgmt::revocation::{self, RevokeError};
use meshca_pki::crl::{Crl, Reason};
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey};
use meshca_policy::Policy;
use meshca_proto::IssueReason;
use meshca_store::dir::DirStore;
use meshca_store::{Precondition, Store, typed};
use meshca_testsupport::openssl;

const TTL: Duration = Duration::from_secs(600);

struct Plane {
    _tmp: tempfile::TempDir,
    clock: ManualClock,
    store: Arc<DirStore>,
    _loader: Loader,
    authority: tokio::sync::watch::Receiver<Arc<meshca_mgmt::authority::Authority>>,
    issuer: Issuer,
}

impl Plane {
    async fn start() -> Plane {
        let tmp = tempfile::tempdir().unwrap();
        let clock = ManualClock::at_2026();
        let store = Arc::new(DirStore::open(tmp.path()).unwrap());
        let source = Arc::new(StorePolicy::new(store.clone()));
        source
            .apply("apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: { name: mesh }\nspec:\n  config:\n    generated: {}\n  intermediateCertOptions: { ttl: 1h }\n")
            .await
            .unwrap();
        let fallback = Policy::generated_default(Duration::from_secs(3600));
        let (loader, authority) =
            Loader::start_single(store.clone(), source, fallback, clock.shared(), Duration::from_secs(30)).await;
        let issuer = Issuer::new(
            store.clone(),
            meshca_mgmt::meshes::single(authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
            RateLimiter::new(50, 60.0, clock.shared()),
            None,
        );
        Plane { _tmp: tmp, clock, store, _loader: loader, authority, issuer }
    }

    async fn register(&self, cluster: &str) {
        let rec = ClusterRecord { name: cluster.into(), registered_at: 1, ..Default::default() };
        typed::put(self.store.as_ref(), &records::cluster(cluster).unwrap(), &rec, Precondition::Absent).await.unwrap();
    }

    /// Issues `cluster` an intermediate; returns its key's CSR (to replay) and serial.
    async fn issue(&self, cluster: &str) -> (String, String) {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = meshca_agent::source::csr_for(&key, "meshca", cluster).unwrap();
        let issued = self.issuer.issue(cluster, &csr, IssueReason::Initial, self.clock.now()).await.unwrap();
        (csr, issued.serial)
    }

    async fn record(&self, cluster: &str) -> ClusterRecord {
        typed::get::<ClusterRecord>(self.store.as_ref(), &records::cluster(cluster).unwrap())
            .await
            .unwrap()
            .unwrap()
            .value
    }

    async fn publish(&self) -> records::CrlRecord {
        let auth = self.authority.borrow().clone();
        revocation::publish(
            self.store.as_ref(),
            &meshca_mgmt::records::Keyspace::legacy(),
            &auth,
            self.clock.now(),
            TTL,
        )
        .await
        .unwrap()
        .unwrap()
    }

    fn root(&self) -> Cert {
        self.authority.borrow().signing().unwrap().signer.root().clone()
    }
}

#[tokio::test]
async fn a_revocation_forces_a_reissue_once_is_idempotent_and_refuses_serials_the_cluster_never_had() {
    let p = Plane::start().await;
    p.register("cluster-1").await;
    p.register("cluster-2").await;
    let (_, s1) = p.issue("cluster-1").await;
    let (_, old) = p.issue("cluster-2").await;
    let (csr, current) = p.issue("cluster-2").await;
    let now = p.clock.now();

    // No serial: the newest (no report yet says which is in service).
    let out = revocation::revoke(p.store.as_ref(), "cluster-2", None, Reason::KeyCompromise, "operator/admin", now)
        .await
        .unwrap();
    assert!(!out.already);
    assert_eq!(out.revoked.serial, current);
    let rec = p.record("cluster-2").await;
    assert_eq!(rec.rotate_requests, 1, "the cluster is asked to re-issue in the same write");
    assert_eq!(rec.revoked.len(), 1);

    // Twice: the first revocation, nothing changes (no second re-issue).
    p.clock.advance(Duration::from_secs(5));
    let again = revocation::revoke(
        p.store.as_ref(),
        "cluster-2",
        Some(&current.to_ascii_lowercase()),
        Reason::Superseded,
        "operator/other",
        p.clock.now(),
    )
    .await
    .unwrap();
    assert!(again.already);
    assert_eq!((again.revoked.reason.as_str(), again.revoked.revoked_at), ("keyCompromise", unix(now)));
    assert_eq!(p.record("cluster-2").await.rotate_requests, 1);

    // cluster-1's serial is not cluster-2's; a made-up one is nobody's; an unknown cluster.
    for serial in [s1.as_str(), "0123456789ABCDEF"] {
        let e = revocation::revoke(p.store.as_ref(), "cluster-2", Some(serial), Reason::KeyCompromise, "o", now)
            .await
            .unwrap_err();
        assert!(matches!(e, RevokeError::UnknownSerial { .. }), "{e}");
        assert!(e.to_string().contains("never issued to cluster cluster-2"), "{e}");
    }
    let e = revocation::revoke(p.store.as_ref(), "cluster-9", None, Reason::KeyCompromise, "o", now).await.unwrap_err();
    assert!(matches!(e, RevokeError::NotRegistered(_)), "{e}");

    // An older serial of the cluster can be revoked too.
    let out =
        revocation::revoke(p.store.as_ref(), "cluster-2", Some(&old), Reason::Superseded, "o", now).await.unwrap();
    assert!(!out.already);

    // The revoked key is never certified again.
    let e = p.issuer.issue("cluster-2", &csr, IssueReason::Renewal, p.clock.now()).await.unwrap_err();
    assert!(matches!(e, Denied::KeyRevoked { ref serial, .. } if *serial == current), "{e}");
}

#[tokio::test]
async fn the_published_crl_lists_the_revoked_serial_verifies_with_openssl_and_is_resigned_before_next_update() {
    let p = Plane::start().await;
    p.register("cluster-2").await;
    let (_, serial) = p.issue("cluster-2").await;

    // Before any revocation there is a CRL all the same: istiod needs one from the root.
    let first = p.publish().await;
    assert_eq!(first.number, 1);
    let crls = Crl::parse_pem_bundle(first.pem.as_bytes()).unwrap();
    assert_eq!(crls.len(), 1);
    assert!(crls[0].revoked().is_empty());
    assert_eq!(p.publish().await, first, "nothing changed: the same CRL");

    revocation::revoke(p.store.as_ref(), "cluster-2", None, Reason::KeyCompromise, "o", p.clock.now()).await.unwrap();
    let second = p.publish().await;
    assert_eq!(second.number, 2);
    let crl = &Crl::parse_pem_bundle(second.pem.as_bytes()).unwrap()[0];
    assert!(crl.lists(&serial));
    assert_eq!(crl.revoked()[0].reason, Reason::KeyCompromise);
    assert_eq!(crl.next_update(), p.clock.now() + TTL);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.pem"), p.root().to_pem()).unwrap();
    std::fs::write(dir.path().join("crl.pem"), &second.pem).unwrap();
    let (ok, out) =
        openssl(dir.path(), &["crl", "-in", "crl.pem", "-CAfile", "root.pem", "-verify", "-noout", "-text"]);
    assert!(ok && out.contains("verify OK") && out.contains(&serial), "{out}");

    // Just before half its life: kept. At half its life: re-signed, well before nextUpdate.
    assert_eq!(revocation::refresh_at(&second, TTL), p.clock.now() + TTL / 2);
    p.clock.advance(TTL / 2 - Duration::from_secs(1));
    assert_eq!(p.publish().await.number, 2);
    p.clock.advance(Duration::from_secs(1));
    let third = p.publish().await;
    assert_eq!(third.number, 3);
    let crl = &Crl::parse_pem_bundle(third.pem.as_bytes()).unwrap()[0];
    assert!(crl.lists(&serial), "still listed");
    assert_eq!(crl.next_update(), p.clock.now() + TTL);
}

/// `meshca cluster remove` archives the cluster's record; the intermediates revoked before
/// stay listed in the CRL (a stolen key does not become good again when its cluster goes).
#[tokio::test]
async fn a_removed_clusters_revoked_serial_stays_in_the_crl() {
    let p = Plane::start().await;
    p.register("cluster-2").await;
    let (_, serial) = p.issue("cluster-2").await;
    revocation::revoke(p.store.as_ref(), "cluster-2", None, Reason::KeyCompromise, "o", p.clock.now()).await.unwrap();
    assert!(Crl::parse_pem_bundle(p.publish().await.pem.as_bytes()).unwrap()[0].lists(&serial));
    let removed = meshca_mgmt::removal::remove(p.store.as_ref(), "cluster-2", "operator/admin", p.clock.now())
        .await
        .unwrap()
        .expect("registered");
    assert!(removed.archive.starts_with(records::ARCHIVE_PREFIX), "{}", removed.archive);
    let after = p.publish().await;
    assert!(Crl::parse_pem_bundle(after.pem.as_bytes()).unwrap()[0].lists(&serial), "still revoked after removal");
}

/// The publisher task on the manual clock: it publishes at start, and again at half the CRL's
/// lifetime, with nobody calling it. It starts after a revocation whose CRL was never signed (a
/// management plane stopped right after recording it): its first CRL lists the serial.
#[tokio::test]
async fn the_publisher_task_resigns_on_the_injected_clock() {
    let p = Plane::start().await;
    p.register("cluster-2").await;
    let (_, serial) = p.issue("cluster-2").await;
    revocation::revoke(p.store.as_ref(), "cluster-2", None, Reason::KeyCompromise, "o", p.clock.now()).await.unwrap();
    assert!(
        revocation::published(p.store.as_ref(), &meshca_mgmt::records::Keyspace::legacy()).await.unwrap().is_none(),
        "stopped before publishing"
    );
    let (nudge, _) = tokio::sync::watch::channel(0u64);
    let mut published = nudge.subscribe();
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = revocation::Publisher {
        keys: meshca_mgmt::records::Keyspace::legacy(),
        store: p.store.clone(),
        authority: p.authority.clone(),
        nudge,
        clock: p.clock.shared(),
        ttl: TTL,
        leader: None,
    };
    let task = tokio::spawn(publisher.run(cancel.clone()));
    tokio::time::timeout(Duration::from_secs(10), published.changed()).await.unwrap().unwrap();
    let first =
        revocation::published(p.store.as_ref(), &meshca_mgmt::records::Keyspace::legacy()).await.unwrap().unwrap();
    assert_eq!(first.number, 1);
    assert!(Crl::parse_pem_bundle(first.pem.as_bytes()).unwrap()[0].lists(&serial));
    p.clock.advance(TTL / 2);
    tokio::time::timeout(Duration::from_secs(10), published.changed()).await.unwrap().unwrap();
    let second =
        revocation::published(p.store.as_ref(), &meshca_mgmt::records::Keyspace::legacy()).await.unwrap().unwrap();
    assert_eq!(second.number, 2);
    assert!(second.next_update > first.next_update);
    cancel.cancel();
    task.await.unwrap();
}

/// The audit log: an issuance and a revocation leave exactly one entry each (the repeated
/// revocation none), the chain verifies, and no key is in it.
#[tokio::test]
async fn an_issuance_and_a_revocation_leave_one_entry_each_in_the_audit_log() {
    let p = Plane::start().await;
    p.register("cluster-1").await;
    let (_, serial) = p.issue("cluster-1").await;
    for _ in 0..2 {
        revocation::revoke(p.store.as_ref(), "cluster-1", None, Reason::KeyCompromise, "operator admin", p.clock.now())
            .await
            .unwrap();
    }
    let log = meshca_mgmt::audit::read(p.store.as_ref()).await.unwrap();
    meshca_mgmt::audit::verify(&log).unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["intermediate-issued", "intermediate-revoked"], "one entry each, none for the repeat");
    assert_eq!(log[0].details["serial"], serial);
    assert_eq!(log[0].actor, "agent of cluster cluster-1");
    assert_eq!((log[1].details["reason"].as_str(), log[1].actor.as_str()), ("keyCompromise", "operator admin"));
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

/// Your own intermediate: the management plane signs with the intermediate it holds, and
/// publishes the CRLs of the CAs above it from `ca-crl.pem` in the intermediate's secret; until
/// that is there, the record says istiod would refuse the set (agents then write none).
#[tokio::test]
async fn with_your_own_intermediate_the_crls_above_it_come_from_its_secret() {
    use meshca_pki::{CaSigner, CrlParams, IntermediateParams, RootParams, TrustDomain};
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let store = Arc::new(DirStore::open(tmp.path()).unwrap());
    let now = clock.now();
    let root =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("yours"), now)
            .unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = IntermediateParams {
        path_len: 1,
        common_name: "your intermediate".into(),
        ..IntermediateParams::cluster("yours", "pki", TrustDomain::new("cluster.local").unwrap())
    };
    let cert = root.sign_intermediate(key.public_key_spki(), &params, now).unwrap().parse().unwrap();
    let yours = CaSigner::new(key, vec![cert, root.cert().clone()]).unwrap();
    let secret_key = meshca_store::ObjectKey::new("meshca", "your-intermediate").unwrap();
    let mut secret = meshca_mgmt::castore::secret_from_signer(&yours);
    store.put(&secret_key, &secret, Precondition::Absent).await.unwrap();
    let source = Arc::new(StorePolicy::new(store.clone()));
    source
        .apply("apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: { name: mesh }\nspec:\n  config:\n    intermediateRef: { namespace: meshca, name: your-intermediate }\n")
        .await
        .unwrap();
    let fallback = Policy::generated_default(Duration::from_secs(3600));
    let (_loader, authority) =
        Loader::start_single(store.clone(), source, fallback, clock.shared(), Duration::from_secs(30)).await;
    let auth = authority.borrow().clone();
    let first = revocation::publish(store.as_ref(), &meshca_mgmt::records::Keyspace::legacy(), &auth, now, TTL)
        .await
        .unwrap()
        .unwrap();
    let crls = Crl::parse_pem_bundle(first.pem.as_bytes()).unwrap();
    assert_eq!(crls.len(), 1);
    crls[0].verify_signed_by(yours.cert()).unwrap();
    assert!(first.note.contains("missing CRL signed by") && first.note.contains("Root CA"), "{}", first.note);

    // The root's CRL in the secret (made by the root's owner): published with it, nothing missing.
    let root_crl = root.sign_crl(&CrlParams { number: 9, this_update: now, next_update: now + TTL, revoked: vec![] });
    secret.data.insert("ca-crl.pem".into(), root_crl.unwrap().to_pem().into_bytes());
    store.put(&secret_key, &secret, Precondition::Any).await.unwrap();
    let second = revocation::publish(store.as_ref(), &meshca_mgmt::records::Keyspace::legacy(), &auth, now, TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.number, 2, "a new CRL from above is published at once");
    assert!(second.note.is_empty(), "{}", second.note);
    let crls = Crl::parse_pem_bundle(second.pem.as_bytes()).unwrap();
    meshca_pki::crl::check_chain_coverage(&crls, yours.chain()).unwrap();
}
