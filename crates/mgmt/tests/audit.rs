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
