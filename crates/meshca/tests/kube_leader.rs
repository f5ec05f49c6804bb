//! Leader election among three `meshca server` replicas against one real kube-apiserver, while
//! two workload clusters' agents keep renewing 30-second intermediates through a follower.
//!
//! Proven: only the leader signs (followers forward the agents' connections to it); a leader
//! sent SIGTERM exits cleanly and releases the Lease on its way out, so a follower holds it far
//! sooner than the lease duration (under half of it, as observed by the test — a behaviour
//! check, the figure itself is printed); after the new leader is SIGKILLed the last follower
//! holds the Lease within the lease duration; renewals continue under each new leader, the
//! agents reconnecting on their own; every `cacerts` observed in either cluster, before, during
//! and after both failovers, is valid; and the issued-serial logs show no serial and no key twice.
#![allow(clippy::unwrap_used)]

mod common;
mod kube_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret as KSecret;
use kube::Api;
use kube_support::*;
use meshca_kube::testing::ApiServer;
use meshca_pki::CaBundle;
use meshca_pki::bundle::BundleFiles;
use serde_json::json;

const LEASE: &str = "6s";
const LEASE_SECS: f64 = 6.0;

/// What the test saw of one cluster's `cacerts`, polled every 100 ms.
#[derive(Default)]
struct Seen {
    /// Serials in the order they appeared, with when.
    serials: Vec<(String, Instant)>,
    /// Observations after the first that were missing or invalid.
    bad: Vec<String>,
}

async fn holder(api: &ApiServer) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(api.admin().await, "meshca");
    leases.get_opt("meshca-leader").await.ok()??.spec?.holder_identity
}

fn serials_after(seen: &Arc<Mutex<Seen>>, t: Instant) -> usize {
    seen.lock().unwrap().serials.iter().filter(|(_, at)| *at > t).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_at_once_from_a_stopped_leader_and_within_the_lease_from_a_killed_one() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mgmt_api = cluster(d, "mgmt").await;
    let clusters = [("cluster-1", cluster(d, "cluster-1").await), ("cluster-2", cluster(d, "cluster-2").await)];
    install_management(&mgmt_api).await;
    // 30-second intermediates renewed at half life: agents renew every ~15 s.
    let mut policy: serde_json::Value = serde_saphyr::from_str(&manifest("management/policy.yaml")).unwrap();
    policy["spec"]["intermediateCertOptions"] = json!({"ttl": "30s", "secretRotationGracePeriodRatio": 0.5});
    mgmt_api.apply_value(&mgmt_api.admin().await, policy).await.unwrap();

    let token = sa_token_file(&mgmt_api, d, "meshca", "meshca-server").await;
    // Each replica's port is reserved (and held as long as it runs): it advertises its address
    // before it binds it.
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
                LEASE,
                "--renew-deadline",
                "4s",
                "--retry-period",
                "1s",
                "--shutdown-grace",
                "3s",
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
    let (c, _c_port) = start_replica("replica-c");
    assert_eq!(holder(&mgmt_api).await.as_deref(), Some("replica-a"), "the first replica still leads");

    // Agents reach the mesh through a follower, which forwards their connections to the leader.
    let mut agents = Vec::new();
    let mut agent_args = Vec::new();
    let mut seen = BTreeMap::new();
    for (name, api) in &clusters {
        install_workload_rbac(api).await;
        let agent_token = sa_token_file(api, d, "meshca-system", "meshca-agent").await;
        let (bootstrap, relay) = tokio::task::block_in_place(|| b.add_cluster(d, name));
        let flags = kube_flags(api, &agent_token);
        agents.push(kube_support::agent(d, name, &b.addr, &bootstrap, &relay, &flags));
        agent_args.push((*name, bootstrap, relay, flags));
        seen.insert(*name, Arc::new(Mutex::new(Seen::default())));
    }
    let mut pollers = Vec::new();
    for (name, api) in &clusters {
        let s = seen[name].clone();
        // A second handle on the same API server for the poller task.
        let client_api = ApiServerRef { url: api.url.clone(), ca: api.ca.clone(), token: api.admin_token_file.clone() };
        pollers.push(tokio::spawn(async move { client_api.watch(s).await }));
    }

    // Before the failover: each cluster got its first intermediate and renewed once.
    let t0 = Instant::now();
    for name in ["cluster-1", "cluster-2"] {
        let s = seen[name].clone();
        eventually(Duration::from_secs(60), &format!("{name} to renew before the failover"), || {
            let s = s.clone();
            async move { (serials_after(&s, t0) >= 2).then_some(()) }
        })
        .await;
    }
    let followers_before = [b.proc.log_text(), c.proc.log_text()];
    for log in &followers_before {
        assert!(!log.contains("issued cluster intermediate"), "a follower signed:\n{log}");
    }
    assert!(a.proc.log_text().contains("issued cluster intermediate"));

    // SIGTERM the leader: it drains, exits cleanly and releases the Lease, so a follower holds it
    // at its next look (every 1 s here) rather than after the 6 s lease duration.
    a.proc.signal("TERM");
    let termed = Instant::now();
    let first_successor =
        eventually(Duration::from_secs(30), "a follower to take the lease from a stopped leader", || async {
            holder(&mgmt_api).await.filter(|h| h != "replica-a")
        })
        .await;
    let handover = termed.elapsed();
    eprintln!("{first_successor} took the lease {handover:?} after the leader got SIGTERM (lease duration {LEASE})");
    assert!(
        handover.as_secs_f64() < LEASE_SECS / 2.0,
        "the stopped leader released its lease: handover took {handover:?}, the lease lasts {LEASE}"
    );
    let status = tokio::task::block_in_place(|| a.proc.wait_exit(Duration::from_secs(3 + 2 + 5)));
    assert!(status.success(), "the leader exits cleanly on SIGTERM: {status}\n{}", a.proc.log_text());
    assert!(a.proc.log_text().contains("released the leader lease"), "{}", a.proc.log_text());
    // Renewals continue under the new leader, the agents reconnecting through the follower.
    for name in ["cluster-1", "cluster-2"] {
        let s = seen[name].clone();
        eventually(Duration::from_secs(90), &format!("{name} to renew twice after the handover"), || {
            let s = s.clone();
            async move { (serials_after(&s, termed) >= 2).then_some(()) }
        })
        .await;
    }
    let (mut leader, last) = if first_successor == "replica-b" { (b, c) } else { (c, b) };
    assert!(leader.proc.log_text().contains("issued cluster intermediate"), "the new leader signs");

    // The agents now go through the replica that will remain (with their stored identity).
    drop(agents);
    let agents: Vec<_> = agent_args
        .iter()
        .map(|(name, bootstrap, relay, flags)| kube_support::agent(d, name, &last.addr, bootstrap, relay, flags))
        .collect();

    // Kill the new leader; the last follower must hold the lease within the lease duration.
    leader.proc.kill();
    let killed = Instant::now();
    let new_leader =
        eventually(Duration::from_secs(30), "a follower to take the lease from a killed leader", || async {
            holder(&mgmt_api).await.filter(|h| *h != first_successor)
        })
        .await;
    let takeover = killed.elapsed();
    eprintln!("{new_leader} took the lease {takeover:?} after the leader was killed (lease duration {LEASE})");
    assert!(takeover.as_secs_f64() <= LEASE_SECS + 1.0, "takeover took {takeover:?}");

    // Renewals continue under the last leader: two more intermediates per cluster.
    for name in ["cluster-1", "cluster-2"] {
        let s = seen[name].clone();
        eventually(Duration::from_secs(90), &format!("{name} to renew twice after the failover"), || {
            let s = s.clone();
            async move { (serials_after(&s, killed) >= 2).then_some(()) }
        })
        .await;
    }
    assert!(last.proc.log_text().contains("issued cluster intermediate"), "the last leader signs");

    // No cluster was ever without a valid cacerts, and nothing was issued twice.
    let admin = mgmt_api.admin().await;
    let secrets: Api<KSecret> = Api::namespaced(admin, "meshca");
    for name in ["cluster-1", "cluster-2"] {
        let log = secrets.get(&format!("issued-{name}")).await.unwrap();
        let s = seen[name].lock().unwrap();
        assert!(s.bad.is_empty(), "{name}: {:?}", s.bad);
        let log: serde_json::Value = serde_json::from_slice(&log.data.unwrap()["record.json"].0).unwrap();
        let records = log["records"].as_array().unwrap();
        let serial_set: BTreeSet<&str> = records.iter().map(|r| r["serial"].as_str().unwrap()).collect();
        let key_set: BTreeSet<&str> = records.iter().map(|r| r["public_key_sha256"].as_str().unwrap()).collect();
        assert_eq!(serial_set.len(), records.len(), "{name}: a serial twice in {log:#}");
        assert_eq!(key_set.len(), records.len(), "{name}: a key certified twice in {log:#}");
        for (serial, _) in &s.serials {
            assert!(serial_set.contains(serial.as_str()), "{name}: {serial} is in cacerts but not in the log");
        }
        eprintln!("{name}: {} intermediates issued, {} seen in cacerts, none twice", records.len(), s.serials.len());
    }
    for p in pollers {
        p.abort();
    }
    drop(agents);
    eprintln!("done in {:?}", started.elapsed());
}

/// Enough of an [`ApiServer`] to poll it from a spawned task.
struct ApiServerRef {
    url: String,
    ca: std::path::PathBuf,
    token: std::path::PathBuf,
}

impl ApiServerRef {
    async fn watch(self, seen: Arc<Mutex<Seen>>) {
        let conn =
            meshca_kube::Connection::Direct { url: self.url, ca_file: Some(self.ca), token_file: Some(self.token) };
        let client = meshca_kube::connect(&conn).await.unwrap();
        watch_cacerts_with(client, seen).await
    }
}

async fn watch_cacerts_with(client: kube::Client, seen: Arc<Mutex<Seen>>) {
    let secrets: Api<KSecret> = Api::namespaced(client, "istio-system");
    loop {
        let s = secrets.get_opt("cacerts").await;
        {
            let mut seen = seen.lock().unwrap();
            match s {
                Ok(Some(s)) => {
                    let data = s.data.clone().unwrap_or_default();
                    let files = BundleFiles::from_lookup(|k| data.get(k).map(|v| v.0.clone()));
                    match CaBundle::validate(&files, SystemTime::now()) {
                        Ok(b) => {
                            let serial = b.ca_cert().serial_hex();
                            if seen.serials.last().map(|(s, _)| s) != Some(&serial) {
                                seen.serials.push((serial, Instant::now()));
                            }
                        }
                        Err(e) => seen.bad.push(format!("invalid cacerts: {e}")),
                    }
                }
                Ok(None) if !seen.serials.is_empty() => seen.bad.push("cacerts disappeared".into()),
                Ok(None) => {}
                Err(e) if !seen.serials.is_empty() => seen.bad.push(format!("read failed: {e}")),
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
