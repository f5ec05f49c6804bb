//! Root rotation in Kubernetes mode: two `meshca server` replicas electing a leader on a real
//! kube-apiserver (the store is Secrets, the policy the RootTrustPolicy resource), two workload
//! clusters (each its own real kube-apiserver, `cacerts` a Secret) whose agents reach the
//! management plane through the follower. The leader is SIGKILLed in the middle of the rotation;
//! the follower takes the lease, reads the journal from the API server and finishes the rotation.
//!
//! Proven: every `cacerts` Secret either cluster held (polled every 100 ms) keeps the barrier and
//! goes {A} → {A, B} → {B}; each phase is entered once in the journal across the failover; the
//! RootTrustPolicy's status carries the phase as the `RootRotation` condition with the phase's
//! transition time, and the journal of phase changes.
#![allow(clippy::unwrap_used)]

mod common;
mod kube_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rotation::{phase, rotate_root, status};
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret as KSecret;
use kube::Api;
use kube_support::*;
use meshca_pki::Cert;
use meshca_testsupport::rotation::{Held, check_barrier, root_set_history};
use serde_json::json;

const CLUSTERS: [&str; 2] = ["cluster-1", "cluster-2"];

async fn holder(api: &meshca_kube::testing::ApiServer) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(api.admin().await, "meshca");
    leases.get_opt("meshca-leader").await.ok()??.spec?.holder_identity
}

/// Polls a cluster's `cacerts` Secret every 100 ms, recording each distinct version.
async fn poll_cacerts(
    url: String,
    ca: std::path::PathBuf,
    token: std::path::PathBuf,
    name: String,
    seen: Arc<Mutex<Vec<Held>>>,
) {
    let conn = meshca_kube::Connection::Direct { url, ca_file: Some(ca), token_file: Some(token) };
    let client = meshca_kube::connect(&conn).await.unwrap();
    let secrets: Api<KSecret> = Api::namespaced(client, "istio-system");
    loop {
        if let Ok(Some(s)) = secrets.get_opt("cacerts").await {
            let data = s.data.unwrap_or_default();
            let certs = |k: &str| data.get(k).map(|v| Cert::parse_pem_bundle(&v.0).unwrap()).unwrap_or_default();
            let (roots, chain) = (certs("root-cert.pem"), certs("cert-chain.pem"));
            if let Some(last) = chain.last() {
                let held = Held {
                    cluster: name.clone(),
                    roots: roots.iter().map(Cert::fingerprint).collect(),
                    chain_root: last.fingerprint(),
                };
                let mut seen = seen.lock().unwrap();
                if seen.iter().rev().find(|h| h.cluster == name) != Some(&held) {
                    seen.push(held);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_survives_the_leader_being_killed_and_the_status_carries_its_phases() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mgmt_api = cluster(d, "mgmt").await;
    let clusters = [("cluster-1", cluster(d, "cluster-1").await), ("cluster-2", cluster(d, "cluster-2").await)];
    install_management(&mgmt_api).await;
    // 10 s leaves and 1 s of skew: Distributing waits 6 s after the last cluster, Draining 11 s.
    let mut policy: serde_json::Value = serde_saphyr::from_str(&manifest("management/policy.yaml")).unwrap();
    policy["spec"]["intermediateCertOptions"] = json!({"ttl": "1h"});
    policy["spec"]["rootRotation"] = json!({"maxLeafLifetime": "10s", "skew": "1s"});
    mgmt_api.apply_value(&mgmt_api.admin().await, policy).await.unwrap();

    let token = sa_token_file(&mgmt_api, d, "meshca", "meshca-server").await;
    let start_replica = |name: &str| {
        let port = Ports::one();
        let addr = port.addr(0);
        let mut extra = kube_flags(&mgmt_api, &token);
        extra.extend(
            [
                "--replica-id",
                name,
                "--advertise-address",
                &addr,
                "--lease-duration",
                "6s",
                "--renew-deadline",
                "4s",
                "--retry-period",
                "1s",
            ]
            .map(String::from),
        );
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let m = tokio::task::block_in_place(|| Mgmt::start_on(&dir, &port, &extra));
        (m, port)
    };
    let (mut a, _a_port) = start_replica("replica-a");
    assert_eq!(holder(&mgmt_api).await.as_deref(), Some("replica-a"));
    let (b, _b_port) = start_replica("replica-b");

    let seen: Arc<Mutex<Vec<Held>>> = Arc::default();
    let mut agents = Vec::new();
    let mut pollers = Vec::new();
    for (name, api) in &clusters {
        install_workload_rbac(api).await;
        let agent_token = sa_token_file(api, d, "meshca-system", "meshca-agent").await;
        let (bootstrap, relay) = tokio::task::block_in_place(|| b.add_cluster(d, name));
        agents.push(kube_support::agent(d, name, &b.addr, &bootstrap, &relay, &kube_flags(api, &agent_token)));
        let (url, ca, admin) = (api.url.clone(), api.ca.clone(), api.admin_token_file.clone());
        pollers.push(tokio::spawn(poll_cacerts(url, ca, admin, name.to_string(), seen.clone())));
    }
    let latest = |c: &str| seen.lock().unwrap().iter().rev().find(|h| h.cluster == c).cloned();
    eventually(Duration::from_secs(90), "both clusters' first cacerts", || async {
        CLUSTERS.iter().all(|c| latest(c).is_some()).then_some(())
    })
    .await;
    let a_root = latest("cluster-1").unwrap().roots[0].clone();

    // The rotation starts on the leader; it is killed once every cluster trusts {A, B}.
    let out = tokio::task::block_in_place(|| rotate_root(&a.creds(), false));
    assert!(out.contains("Distributing"), "{out}");
    let st = tokio::task::block_in_place(|| status(&a.creds()));
    let b_root = st["rootRotation"]["to"]["fingerprint"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "both clusters to trust {A, B}", || async {
        CLUSTERS.iter().all(|c| latest(c).is_some_and(|h| h.roots.len() == 2)).then_some(())
    })
    .await;
    a.proc.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(30), "replica-b to take the lease", || async {
        (holder(&mgmt_api).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    eprintln!("replica-b leads {:?} after the kill", killed.elapsed());

    // The new leader continues the same rotation from the journal in the API server.
    let creds = b.creds();
    let st = tokio::task::block_in_place(|| status(&creds));
    assert_eq!(st["rootRotation"]["to"]["fingerprint"], b_root.as_str(), "{st:#}");
    let rtp: Api<kube::api::DynamicObject> =
        Api::namespaced_with(mgmt_api.admin().await, "meshca", &meshca_kube::policy::api_resource());
    let condition = |obj: &kube::api::DynamicObject| {
        obj.data["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "RootRotation").cloned())
    };
    // While it runs, the RootTrustPolicy's status says so.
    let running = eventually(Duration::from_secs(60), "the RootRotation condition to be True", || async {
        let obj = rtp.get("mesh").await.ok()?;
        condition(&obj).filter(|c| c["status"] == "True").map(|c| (c, obj.data["status"]["rootRotation"].clone()))
    })
    .await;
    assert!(
        ["Distributing", "Switching", "Draining", "Retiring"].contains(&running.0["reason"].as_str().unwrap()),
        "{running:?}"
    );
    assert!(running.0["lastTransitionTime"].as_str().is_some());
    assert_eq!(running.1["phase"], running.0["reason"], "{running:?}");
    assert!(!running.1["transitions"].as_array().unwrap().is_empty(), "{running:?}");

    eventually(Duration::from_secs(180), "the rotation to complete under the new leader", || async {
        let done = tokio::task::block_in_place(|| phase(&status(&creds))) == "Idle"
            && CLUSTERS.iter().all(|c| latest(c).is_some_and(|h| h.roots == [b_root.clone()]));
        done.then_some(())
    })
    .await;
    let held = seen.lock().unwrap().clone();
    let names: Vec<String> = CLUSTERS.map(String::from).to_vec();
    check_barrier(&held, &names, &a_root, &b_root);
    for (cluster, h) in root_set_history(&held, &a_root, &b_root) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    // One journal, in the API server, across the failover: each phase entered once.
    let secrets: Api<KSecret> = Api::namespaced(mgmt_api.admin().await, "meshca");
    let journal = secrets.get("root-rotation").await.unwrap();
    let journal: serde_json::Value = serde_json::from_slice(&journal.data.unwrap()["record.json"].0).unwrap();
    let phases: Vec<&str> =
        journal["history"][0]["transitions"].as_array().unwrap().iter().map(|t| t["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["Distributing", "Switching", "Draining", "Retiring"]);
    assert!(b.proc.log_text().contains("root rotation complete"), "the new leader finished it");
    // And the status says it is over.
    let idle = eventually(Duration::from_secs(60), "the RootRotation condition to be False", || async {
        let obj = rtp.get("mesh").await.ok()?;
        condition(&obj).filter(|c| c["status"] == "False")
    })
    .await;
    assert_eq!(idle["reason"], "Idle");
    for p in pollers {
        p.abort();
    }
    drop(agents);
    eprintln!("done in {:?}", started.elapsed());
}
