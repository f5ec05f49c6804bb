//! The audit log in-process, over a real directory store on a manual clock: an issuance and a
//! revocation each leave exactly one entry (a repeated revocation none), two management planes
//! appending at once (a leader and its successor) never fork the chain, across segment
//! boundaries, and an entry changed, removed or moved in the store is named by `verify`. The
//! operator API and `meshca audit verify` over real mutual TLS are tested end to end in
//! `crates/meshca/tests/revocation_up.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::{Clock, ManualClock};
use meshca_mgmt::audit::{self, Action, Broken, Event, SEGMENT_ENTRIES, Segment};
use meshca_mgmt::issuer::Issuer;
use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
use meshca_mgmt::ratelimit::RateLimiter;
use meshca_mgmt::records::{self, ClusterRecord};
use meshca_mgmt::revocation;
use meshca_pki::{KeyAlgorithm, PrivateKey, Reason};
use meshca_policy::Policy;
use meshca_proto::IssueReason;
use meshca_store::dir::DirStore;
use meshca_store::{Precondition, Store, typed};

#[tokio::test]
async fn an_issuance_and_a_revocation_leave_one_entry_each_and_the_chain_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let store = Arc::new(DirStore::open(tmp.path()).unwrap());
    let source = Arc::new(StorePolicy::new(store.clone()));
    source
        .apply("apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: { name: mesh }\nspec:\n  config:\n    generated: {}\n")
        .await
        .unwrap();
    let fallback = Policy::generated_default(Duration::from_secs(3600));
    let (_loader, authority) =
        Loader::start(store.clone(), source, fallback, clock.shared(), Duration::from_secs(30)).await;
    let issuer = Issuer::new(store.clone(), authority, RateLimiter::new(5, 6.0, clock.shared()), None);
    let rec = ClusterRecord { name: "cluster-1".into(), registered_at: 1, ..Default::default() };
    typed::put(store.as_ref(), &records::cluster("cluster-1").unwrap(), &rec, Precondition::Absent).await.unwrap();

    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = meshca_agent::source::csr_for(&key, "meshca", "cluster-1").unwrap();
    let issued = issuer.issue("cluster-1", &csr, IssueReason::Initial, clock.now()).await.unwrap();
    for _ in 0..2 {
        revocation::revoke(store.as_ref(), "cluster-1", None, Reason::KeyCompromise, "operator admin", clock.now())
            .await
            .unwrap();
    }
    let log = audit::read(store.as_ref()).await.unwrap();
    audit::verify(&log).unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["intermediate-issued", "intermediate-revoked"], "one entry each, none for the repeat");
    assert_eq!(log[0].details["serial"], issued.serial);
    assert_eq!(log[0].actor, "agent of cluster cluster-1");
    assert_eq!(log[1].details["reason"], "keyCompromise");
    assert_eq!(log[1].actor, "operator admin");
    // A key's fingerprint, never the key.
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains("PRIVATE KEY") && !text.contains(&String::from_utf8_lossy(key.pkcs8_der()).to_string()));
}

/// Two management planes sharing one store append 260 entries at once (crossing two segment
/// boundaries): one chain, every seq once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_appending_at_once_never_fork_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let a: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
    let b: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
    let n = 130;
    let run = |store: Arc<dyn Store>, who: &'static str, clock: ManualClock| {
        tokio::spawn(async move {
            for i in 0..n {
                let e = Event::new(Action::BootstrapTokenCreated, who, "c").with("i", i.to_string());
                audit::append(store.as_ref(), &e, clock.now()).await.unwrap();
            }
        })
    };
    let (ta, tb) = (run(a.clone(), "replica a", clock.clone()), run(b, "replica b", clock.clone()));
    ta.await.unwrap();
    tb.await.unwrap();
    let log = audit::read(a.as_ref()).await.unwrap();
    assert_eq!(log.len(), 2 * n);
    assert!(log.len() > 2 * SEGMENT_ENTRIES);
    audit::verify(&log).unwrap();
    for who in ["replica a", "replica b"] {
        let mine: Vec<&str> = log.iter().filter(|e| e.actor == who).map(|e| e.details["i"].as_str()).collect();
        assert_eq!(
            mine,
            (0..n).map(|i| i.to_string()).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>()
        );
    }
}

/// Changing, removing or swapping an entry in the store itself is named by `verify`.
#[tokio::test]
async fn an_entry_changed_removed_or_moved_in_the_store_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let store = DirStore::open(tmp.path()).unwrap();
    for i in 0..5 {
        let e = Event::new(Action::PolicyApplied, "operator admin", "").with("policyGeneration", format!("g{i}"));
        audit::append(&store, &e, clock.now()).await.unwrap();
    }
    let key = audit::segment_key(0);
    let original = typed::get::<Segment>(&store, &key).await.unwrap().unwrap().value;
    let tamper = |f: &dyn Fn(&mut Segment)| {
        let mut s = original.clone();
        f(&mut s);
        s
    };
    let cases: [(Segment, Broken); 3] = [
        (
            tamper(&|s| s.entries[2].details.insert("policyGeneration".into(), "evil".into()).map(drop).unwrap_or(())),
            Broken::Changed { seq: 2 },
        ),
        (tamper(&|s| drop(s.entries.remove(1))), Broken::OutOfPlace { position: 1, seq: 2 }),
        (tamper(&|s| s.entries.swap(3, 4)), Broken::OutOfPlace { position: 3, seq: 4 }),
    ];
    for (segment, want) in cases {
        typed::put(&store, &key, &segment, Precondition::Any).await.unwrap();
        assert_eq!(audit::verify(&audit::read(&store).await.unwrap()), Err(want));
    }
    typed::put(&store, &key, &original, Precondition::Any).await.unwrap();
    audit::verify(&audit::read(&store).await.unwrap()).unwrap();
}
