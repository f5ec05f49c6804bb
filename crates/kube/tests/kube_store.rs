//! The Kubernetes store against a real kube-apiserver + etcd: the same contract as the
//! directory store (preconditions, atomic multi-key writes, labels, watch), compare-and-swap races
//! between two clients, creation allowed by a Role that names the one Secret, and the management
//! plane's audit log (blocks created only if absent, the head) appended by two clients at once.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshca_kube::store::KubeStore;
use meshca_kube::testing::ApiServer;
use meshca_store::conformance;
use meshca_store::{ObjectKey, Precondition, Secret, Store, StoreError, Versioned};
use serde_json::json;

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name).unwrap()
}

use conformance::sample_cacerts as cacerts;

type Item = Result<Option<Versioned<Secret>>, StoreError>;

async fn next_within(stream: &mut (impl futures::Stream<Item = Item> + Unpin)) -> Option<Versioned<Secret>> {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no watch event in time")
        .unwrap()
        .unwrap()
}

/// One API server for the whole file (each start costs ~5 s); every test uses its own namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_store_against_a_real_api_server() {
    let tmp = tempfile::tempdir().unwrap();
    let api = ApiServer::start(&tmp.path().join("kube")).await;
    for ns in ["contract", "race", "watch", "istio-system", "meshca"] {
        api.apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {ns} }}\n")).await;
    }
    let store = KubeStore::new(api.admin().await);

    contract(&store).await;
    racing_writers_lose_no_update(&api).await;
    two_replicas_append_one_audit_chain(&api).await;
    several_root_trust_policies_are_several_meshes(&api).await;
    watch(&store).await;
    a_role_naming_one_secret_lets_the_store_create_and_update_it_and_nothing_else(&api).await;
    a_watch_survives_an_api_server_restart(api, &store).await;
}

/// The API server goes away under a watch and comes back with etcd's history compacted, so the
/// watch cannot resume from the version it had (410 Gone): it reports the outage once, lists
/// again — yielding the current state — and goes on delivering changes.
async fn a_watch_survives_an_api_server_restart(mut api: ApiServer, store: &KubeStore) {
    let k = key("watch", "restart");
    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let mut w = store.watch(&k);
    assert_eq!(next_within(&mut w).await.unwrap().version, v1);
    // Later writes to other objects, then a compaction past the watch's version.
    store.put(&key("watch", "other"), &cacerts("1"), Precondition::Absent).await.unwrap();
    api.kill_apiserver();
    api.compact_etcd();
    let outage =
        tokio::time::timeout(Duration::from_secs(30), w.next()).await.expect("the outage is reported").unwrap();
    assert!(outage.is_err(), "{outage:?}");
    api.restart_apiserver().await;
    // The watch cannot resume from v1's version (compacted away): it lists again and yields the
    // current state once more ...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await.expect("a re-list after the restart").unwrap() {
            Ok(v) => {
                assert_eq!(v.unwrap().version, v1);
                break;
            }
            Err(e) => eprintln!("during the restart: {e}"),
        }
    }
    // ... and goes on delivering changes.
    let v2 = store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut w).await.unwrap().version, v2);
}

async fn contract(store: &KubeStore) {
    // The contract every backend shares (creates `missing`, deletes `a`).
    conformance::preconditions(store, "contract").await;
    conformance::put_all(store, "contract").await;

    // All four keys, the label and the annotation in one object of type Opaque; a put with
    // fewer keys than before removes the others (a replace, not a merge); binary data survives.
    let k = key("contract", "cacerts");
    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let got = store.get(&k).await.unwrap().unwrap();
    assert_eq!((&got.value, &got.version), (&cacerts("1"), &v1));
    let v2 = store
        .put(&k, &Secret::with_data([("bin", vec![0u8, 255, 10, 0])]), Precondition::Version(v1.clone()))
        .await
        .unwrap();
    let got = store.get(&k).await.unwrap().unwrap();
    assert_eq!(got.value, Secret::with_data([("bin", vec![0u8, 255, 10, 0])]));
    assert_eq!(got.version, v2);

    // Invalid keys are refused before any call.
    let err = store.put(&k, &Secret::with_data([("..data", "x")]), Precondition::Any).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey(_)), "{err}");

    assert_eq!(store.list("contract").await.unwrap(), vec!["cacerts", "missing"]);
    store.delete(&k, Precondition::Version(v2)).await.unwrap();
    assert_eq!(store.list("contract").await.unwrap(), vec!["missing"]);
}

/// Two clients (two connections, like two replicas) increment one counter with compare-and-swap.
/// Had two writers both succeeded from the same read, a value would repeat and the counter would
/// fall short.
async fn racing_writers_lose_no_update(api: &ApiServer) {
    const TASKS_PER_CLIENT: usize = 3;
    const INCREMENTS: u64 = 10;
    let stores = [KubeStore::new(api.admin().await), KubeStore::new(api.admin().await)];
    let k = key("race", "counter");
    // Both race to create it, too: exactly one create wins.
    let zero = Secret::with_data([("n", "0")]);
    let creates = futures::future::join_all(stores.iter().map(|s| s.put(&k, &zero, Precondition::Absent))).await;
    assert_eq!(creates.iter().filter(|r| r.is_ok()).count(), 1, "{creates:?}");
    assert!(creates.iter().any(|r| matches!(r, Err(StoreError::AlreadyExists(_)))), "{creates:?}");

    let stores = stores.map(Arc::new);
    let race = conformance::racing_increments(&stores, &k, TASKS_PER_CLIENT, INCREMENTS).await.unwrap();
    let total = 2 * TASKS_PER_CLIENT as u64 * INCREMENTS;
    assert_eq!(race.written, (1..=total).collect::<Vec<_>>());
    let last = stores[1].get(&k).await.unwrap().unwrap();
    assert_eq!(last.value.get("n").unwrap(), total.to_string().as_bytes());
    assert!(race.conflicts > 0, "the writers should actually have raced");
    eprintln!("race: {total} increments, {} conflicts resolved by resource version", race.conflicts);
}

/// Two management-plane replicas, each its own client, append to the audit log at once (as a
/// leader and its successor can): one chain, every entry once, the head at its end, and the newest
/// block deleted is named as cut off.
async fn two_replicas_append_one_audit_chain(api: &ApiServer) {
    use meshca_mgmt::audit::{self, Action, Broken, Event};
    const EACH: usize = 25;
    let stores = [Arc::new(KubeStore::new(api.admin().await)), Arc::new(KubeStore::new(api.admin().await))];
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let appends = stores.iter().enumerate().map(|(r, store)| async move {
        for i in 0..EACH {
            let e = Event::new(Action::BootstrapTokenCreated, format!("replica {r}"), "c").with("i", i.to_string());
            audit::append(store.as_ref(), &e, now).await.unwrap();
        }
    });
    futures::future::join_all(appends).await;
    let log = audit::read_log(stores[0].as_ref()).await.unwrap();
    assert_eq!(log.entries.len(), 2 * EACH);
    audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
    assert_eq!(log.head.as_ref().map(|h| h.count), Some(2 * EACH as u64));
    for r in 0..2 {
        let mine: Vec<&str> =
            log.entries.iter().filter(|e| e.actor == format!("replica {r}")).map(|e| e.details["i"].as_str()).collect();
        assert_eq!(mine, (0..EACH).map(|i| i.to_string()).collect::<Vec<_>>());
    }
    let newest = stores[0].list("meshca").await.unwrap().into_iter().rfind(|n| n.starts_with(audit::BLOCK_PREFIX));
    let newest = key("meshca", &newest.unwrap());
    let held = stores[0].get(&newest).await.unwrap().unwrap().value;
    stores[0].delete(&newest, Precondition::Any).await.unwrap();
    let cut = audit::read_log(stores[1].as_ref()).await.unwrap();
    assert!(
        matches!(audit::verify_anchored(&cut.entries, cut.head.as_ref()), Err(Broken::Truncated { anchored, .. }) if anchored == 2 * EACH as u64)
    );
    stores[0].put(&newest, &held, Precondition::Absent).await.unwrap();
}

async fn watch(store: &KubeStore) {
    let k = key("watch", "a");
    let mut w = store.watch(&k);
    assert!(next_within(&mut w).await.is_none(), "the current state (absent) comes first");
    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    let got = next_within(&mut w).await.unwrap();
    assert_eq!((got.value, got.version), (cacerts("1"), v1));
    // Writes to other objects are not reported.
    store.put(&key("watch", "b"), &cacerts("1"), Precondition::Absent).await.unwrap();
    let v2 = store.put(&k, &cacerts("2"), Precondition::Any).await.unwrap();
    assert_eq!(next_within(&mut w).await.unwrap().version, v2);
    store.delete(&k, Precondition::Any).await.unwrap();
    assert!(next_within(&mut w).await.is_none());
    // A new watch starts from the current state.
    let v3 = store.put(&k, &cacerts("3"), Precondition::Absent).await.unwrap();
    let mut w2 = store.watch(&k);
    assert_eq!(next_within(&mut w2).await.unwrap().version, v3);
    assert_eq!(next_within(&mut w).await.unwrap().version, v3);
}

/// The agent's permissions, reduced to their core: a Role on `resourceNames: [cacerts]`. The store
/// creates and updates `cacerts` with it (create through an apply to the named URL), and every
/// other Secret is denied with 403 — including creating one.
async fn a_role_naming_one_secret_lets_the_store_create_and_update_it_and_nothing_else(api: &ApiServer) {
    api.apply_yaml(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: writer, namespace: istio-system }\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: { name: writer, namespace: istio-system }\n\
         rules: [{ apiGroups: [''], resources: [secrets], resourceNames: [cacerts], verbs: [get, create, update, patch] }]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: { name: writer, namespace: istio-system }\n\
         roleRef: { apiGroup: rbac.authorization.k8s.io, kind: Role, name: writer }\n\
         subjects: [{ kind: ServiceAccount, name: writer, namespace: istio-system }]\n",
    )
    .await;
    let token = api.token("istio-system", "writer", None, Duration::from_secs(600)).await;
    let store = KubeStore::new(api.client_with_token(&token).await);
    let k = key("istio-system", "cacerts");
    let v1 = store.put(&k, &cacerts("1"), Precondition::Absent).await.unwrap();
    store.put(&k, &cacerts("2"), Precondition::Version(v1)).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, cacerts("2"));

    let other = key("istio-system", "istio-ca-secret");
    for result in [
        store.put(&other, &cacerts("1"), Precondition::Absent).await.map(|_| ()),
        store.put(&other, &cacerts("1"), Precondition::Any).await.map(|_| ()),
        store.get(&other).await.map(|_| ()),
        store.list("istio-system").await.map(|_| ()),
        store.delete(&k, Precondition::Any).await,
    ] {
        assert!(matches!(&result, Err(StoreError::Forbidden { .. })), "{result:?}");
    }
    // And a plain POST of another Secret, as kubectl would send it, is denied too.
    let (code, body) = api
        .raw(
            &token,
            "POST",
            "/api/v1/namespaces/istio-system/secrets",
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other"}})),
        )
        .await;
    assert_eq!(code, 403, "{body}");
}

/// Every RootTrustPolicy object in the namespace is a mesh of its own: the policy source reads
/// them as one set (the CRD's schema takes `clusterSelector` and refuses an empty one), a mistake
/// that involves two objects is refused naming both, each mesh's status goes to its own object,
/// and `--policy-resource NAME` (a source of one name) reads only that object.
async fn several_root_trust_policies_are_several_meshes(api: &ApiServer) {
    use meshca_kube::policy::CrdPolicy;
    use meshca_mgmt::authority::{Authority, Capability};
    use meshca_mgmt::loader::PolicySource;
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/crds/roottrustpolicies.meshca.io.yaml"
    ))
    .unwrap();
    api.apply_yaml(&crd).await;
    api.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: { name: policies }\n").await;
    api.wait_policies_served("policies").await;
    let admin = api.admin().await;
    let policy = |name: &str, td: &str, select: serde_json::Value| {
        json!({
            "apiVersion": "meshca.io/v1alpha1", "kind": "RootTrustPolicy",
            "metadata": { "name": name, "namespace": "policies" },
            "spec": { "trustDomain": td, "config": { "generated": {} } },
        })
        .as_object()
        .cloned()
        .map(|mut o| {
            o["spec"].as_object_mut().unwrap().extend(select.as_object().unwrap().clone());
            serde_json::Value::Object(o)
        })
        .unwrap()
    };
    // The CRD takes a label selector, and refuses an empty one at admission.
    let empty = policy("empty", "empty.example", json!({ "clusterSelector": { "matchLabels": {} } }));
    assert!(api.apply_value(&admin, empty).await.is_err(), "an empty selector would select every cluster");
    for p in [
        policy("prod", "prod.example", json!({ "clusters": ["east-1", "east-2"] })),
        policy("staging", "staging.example", json!({ "clusterSelector": { "matchLabels": { "env": "staging" } } })),
    ] {
        api.apply_value(&admin, p).await.unwrap();
    }
    let all = CrdPolicy::new(admin.clone(), "policies", None);
    let set = all.read().await.unwrap().expect("two policies");
    let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["prod", "staging"]);
    assert_eq!(set.get("staging").unwrap().trust_domain.as_str(), "staging.example");
    let only = CrdPolicy::new(admin.clone(), "policies", Some("staging"));
    let one = only.read().await.unwrap().expect("one policy");
    assert_eq!(one.policies().len(), 1);
    assert_eq!(one.policies()[0].name, "staging");
    // Each mesh's status goes to its own object.
    for p in set.policies() {
        let authority =
            Authority::new(p.clone(), Capability::Unavailable { reason: "not loaded in this test".into() }, None);
        let st = meshca_proto::mgmt::MeshStatus {
            trust_domain: p.trust_domain.to_string(),
            policy: p.name.clone(),
            ..Default::default()
        };
        all.publish_status(&st, &authority).await.unwrap();
    }
    let rtp = kube::Api::<kube::api::DynamicObject>::namespaced_with(
        admin.clone(),
        "policies",
        &meshca_kube::policy::api_resource(),
    );
    for (name, td) in [("prod", "prod.example"), ("staging", "staging.example")] {
        let obj = rtp.get(name).await.unwrap();
        assert_eq!(obj.data["status"]["trustDomain"], td, "{name}: {:?}", obj.data["status"]);
    }
    // A third object listing a cluster prod lists: the set is refused, naming both.
    api.apply_value(&admin, policy("dup", "dup.example", json!({ "clusters": ["east-2"] }))).await.unwrap();
    let e = all.read().await.expect_err("overlap").to_string();
    assert!(e.contains("east-2") && e.contains("dup") && e.contains("prod"), "{e}");
}
