//! The audit log in-process, over a real directory store on a manual clock: two management planes
//! appending at once (a leader and its successor) never fork the chain, across segment
//! boundaries, and an entry changed, removed or moved in the store is named by `verify`. (An
//! issuance and a revocation leaving one entry each: `crates/mgmt/tests/revocation.rs`.) The
//! operator API and `meshca audit verify` over real mutual TLS are tested end to end in
//! `crates/meshca/tests/revocation_up.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use meshca_clock::{Clock, ManualClock};
use meshca_mgmt::audit::{self, Action, Broken, Event, SEGMENT_ENTRIES, Segment};
use meshca_store::dir::DirStore;
use meshca_store::{Precondition, Store, typed};

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

/// A policy source whose policies nobody else records (like the Kubernetes resource, which is
/// changed with `kubectl apply`): the store object, with the resource's audit actor. The real
/// RootTrustPolicy resource on a real API server: `crates/meshca/tests/kube_e2e.rs`.
struct Unrecorded(meshca_mgmt::loader::StorePolicy);

#[async_trait::async_trait]
impl meshca_mgmt::loader::PolicySource for Unrecorded {
    async fn read(&self) -> Result<Option<meshca_policy::Policy>, meshca_mgmt::error::MgmtError> {
        self.0.read().await
    }
    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        self.0.changes()
    }
    async fn apply(&self, text: &str) -> Result<(), meshca_mgmt::error::MgmtError> {
        self.0.apply(text).await
    }
    fn audit_actor(&self) -> Option<String> {
        Some("kubernetes RootTrustPolicy meshca/mesh".into())
    }
}

/// Two replicas load each policy from the resource (at start, on its change, on every resync):
/// one `policy-applied` entry per policy put in force, never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_the_resource_is_recorded_once_however_many_replicas_load_it() {
    use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let policy = |ttl: &str| {
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n    generated: {{}}\n  intermediateCertOptions: {{ ttl: {ttl} }}\n"
        )
    };
    let store: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
    let source = Arc::new(Unrecorded(StorePolicy::new(store.clone())));
    source.apply(&policy("1h")).await.unwrap();
    let fallback = meshca_policy::Policy::generated_default(std::time::Duration::from_secs(3600));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
        let (loader, rx) = Loader::start(
            replica,
            source.clone(),
            fallback.clone(),
            clock.shared(),
            std::time::Duration::from_secs(30),
        )
        .await;
        replicas.push((loader, rx));
    }
    let applied = || async {
        let log = audit::read(store.as_ref()).await.unwrap();
        audit::verify(&log).unwrap();
        log.into_iter().filter(|e| e.action == "policy-applied").collect::<Vec<_>>()
    };
    let first = applied().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].actor, "kubernetes RootTrustPolicy meshca/mesh");
    assert_eq!(first[0].details["policyGeneration"], replicas[0].1.borrow().generation);

    // The resource changes: both replicas reload it (at once, as replicas do), and reload again.
    source.apply(&policy("2h")).await.unwrap();
    for _ in 0..2 {
        let (a, b) = replicas.split_at_mut(1);
        tokio::join!(a[0].0.reload(), b[0].0.reload());
    }
    let second = applied().await;
    assert_eq!(second.len(), 2, "{second:?}");
    assert_eq!(second[1].details["policyGeneration"], replicas[1].1.borrow().generation);
    assert_ne!(second[0].details["policyGeneration"], second[1].details["policyGeneration"]);
}
