//! Root rotation end to end: `meshca up` as a real process with 3 clusters, 30-second leaves and
//! its sample workloads making cross-cluster mutual-TLS calls throughout, driven the way an
//! operator drives it (`meshca rotate root [--abort]`, `meshca status -o json`), with every
//! cluster's `cacerts` watched from outside (every 50 ms) and the OpenSSL CLI checking what the
//! files hold.
//!
//! Proven: an operator's rotation completes; every cluster's `root-cert.pem` goes {A} → {A, B} →
//! {B} (OpenSSL lists the subjects), no write breaks the barrier, new leaves chain to B, a leaf
//! issued under A before the switch and one issued under B after it complete mutual TLS in
//! OpenSSL both ways; a second rotation aborted once clusters sign under the new root returns
//! everyone to the old one; the generated root also rotates by itself (`--root-ttl`); and not one
//! handshake or leaf request of the sample workloads fails in any of it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::rotation::*;
use common::*;
use meshca_pki::Cert;
use meshca_testsupport::rotation::{Held, check_barrier, root_set_history};

const CLUSTERS: [&str; 3] = ["cluster-1", "cluster-2", "cluster-3"];
/// Generous: a rotation with 30 s leaves takes about a minute on an idle machine.
const ROTATION: Duration = Duration::from_secs(360);

#[test]
fn an_operators_rotation_completes_and_an_aborted_one_returns_to_the_old_root_with_zero_failed_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (proc, up) = start_up(d, &["--clusters", "3", "--leaf-ttl", "30s", "--intermediate-ttl", "1h"]);
    let creds = up["management_plane"]["credentials"].as_str().unwrap().to_string();
    let log = CacertsLog::start(&up);
    let names: Vec<String> = CLUSTERS.map(String::from).to_vec();
    wait_until(Duration::from_secs(30), "every cluster's cacerts", || CLUSTERS.iter().all(|c| log.latest(c).is_some()));
    let a = log.latest("cluster-1").unwrap().roots[0].clone();
    assert_eq!(phase(&status(&creds)), "Idle");

    // ---- A -> B, by an operator ----
    let out = rotate_root(&creds, false);
    assert!(out.contains("started") && out.contains("Distributing"), "{out}");
    let st = status(&creds);
    assert_eq!(phase(&st), "Distributing");
    assert_eq!(st["rootRotation"]["trigger"], "operator");
    let b = st["rootRotation"]["to"]["fingerprint"].as_str().unwrap().to_string();
    // A leaf issued under A once cluster-1 trusts {A, B}: its workload learns both roots.
    wait_until(ROTATION, "cluster-1 to trust {A, B}", || {
        log.latest("cluster-1").is_some_and(|h| h.roots == [a.clone(), b.clone()])
    });
    // The workload CA picks the new cacerts up on its next look (it polls every 200 ms).
    let before = wait_for(Duration::from_secs(10), "cluster-1's workload CA to hand out {A, B}", || {
        let leaf = Leaf::get(&up, d, "cluster-1", "before-switch");
        let learned: Vec<String> = leaf.trusted().iter().map(Cert::fingerprint).collect();
        (learned == [a.clone(), b.clone()]).then_some(leaf)
    });
    assert_eq!(before.chain_root(&before.trusted()), a, "issued under A");
    // While it distributes, status says what it waits for.
    let st = status(&creds);
    if phase(&st) == "Distributing" {
        assert!(!st["rootRotation"]["waitingFor"].as_array().unwrap().is_empty(), "{st:#}");
    }

    wait_until(ROTATION, "cluster-2 to sign under B", || log.latest("cluster-2").is_some_and(|h| h.chain_root == b));
    let after = wait_for(Duration::from_secs(10), "cluster-2's workload CA to sign under B", || {
        let leaf = Leaf::get(&up, d, "cluster-2", "after-switch");
        (leaf.chain_root(&leaf.trusted()) == b).then_some(leaf)
    });
    // Pre-switch leaf (under A) and post-switch leaf (under B), each trusting what its workload
    // learned: mutual TLS in OpenSSL, both ways.
    let r = openssl_mtls(d, &before.party(), &after.party());
    assert!(r.succeeded(), "A-leaf server, B-leaf client: {r:#?}");
    let r = openssl_mtls(d, &after.party(), &before.party());
    assert!(r.succeeded(), "B-leaf server, A-leaf client: {r:#?}");

    wait_for(ROTATION, "the rotation to complete", || {
        let st = status(&creds);
        (phase(&st) == "Idle" && CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()])))
            .then_some(())
    });
    check_barrier(&log.held(), &names, &a, &b);
    for (cluster, h) in root_set_history(&log.held(), &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    // OpenSSL's own reading of every root-cert.pem each cluster held: {A} -> {A, B} -> {B}.
    let a_subject = "O=meshca, CN=meshca Root CA".to_string();
    for c in CLUSTERS {
        let sets = log.openssl_root_sets(d, c);
        assert_eq!(sets.len(), 3, "{c}: {sets:?}");
        assert_eq!(sets[0], std::slice::from_ref(&a_subject), "{c}");
        assert_eq!(sets[1][0], a_subject, "{c}: A first");
        assert!(sets[1][1].starts_with("O=meshca, CN=meshca Root CA 20"), "{c}: {sets:?}");
        assert_eq!(sets[2], [sets[1][1].clone()], "{c}: B alone");
    }
    // A new leaf chains to B, and OpenSSL verifies it against the cluster's root-cert.pem ({B}).
    let fresh = wait_for(Duration::from_secs(10), "cluster-3's workload CA to hand out {B}", || {
        let leaf = Leaf::get(&up, d, "cluster-3", "fresh");
        (leaf.trusted().iter().map(Cert::fingerprint).collect::<Vec<_>>() == [b.clone()]).then_some(leaf)
    });
    let ca_file = PathBuf::from(up["clusters"][2]["workload_ca"]["ca_file"].as_str().unwrap());
    let (ok, out) = openssl_verify_leaf(d, &fresh.files, &ca_file);
    assert!(ok, "{out}");
    assert_eq!(fresh.trusted().iter().map(Cert::fingerprint).collect::<Vec<_>>(), std::slice::from_ref(&b));
    let st = status(&creds);
    assert!(st["rootRotation"]["note"].as_str().unwrap().contains("completed"), "{st:#}");
    assert_eq!(st["roots"].as_array().unwrap().len(), 1);

    // ---- B -> C, aborted once a cluster signs under C ----
    let seen_before_second = log.held().len();
    rotate_root(&creds, false);
    let c_root = status(&creds)["rootRotation"]["to"]["fingerprint"].as_str().unwrap().to_string();
    wait_until(ROTATION, "a cluster to sign under C", || log.held().iter().any(|h| h.chain_root == c_root));
    let out = rotate_root(&creds, true);
    assert!(out.contains("aborted") && out.contains("Switching"), "{out}");
    let st = status(&creds);
    assert_eq!(st["rootRotation"]["aborted"], true);
    wait_for(ROTATION, "every cluster back on B alone", || {
        let st = status(&creds);
        (phase(&st) == "Idle" && CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()])))
            .then_some(())
    });
    let second: Vec<Held> = log.held()[seen_before_second..].to_vec();
    check_barrier(&second, &names, &b, &c_root);
    check_barrier(&second, &names, &c_root, &b);
    for (cluster, h) in root_set_history(&second, &b, &c_root) {
        assert_eq!(h, ["AB", "A"], "{cluster}: {{B, C}} then {{B}} again");
    }
    assert!(status(&creds)["rootRotation"]["note"].as_str().unwrap().contains("aborted"));

    stop_and_check(proc, &d.join("up"));
}

#[test]
fn the_generated_root_rotates_by_itself_when_its_lifetime_runs_low_with_zero_failed_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A 5-minute root rotated with 75 % of its life left: the rotation starts 75 s in.
    let (proc, up) = start_up(
        d,
        &[
            "--clusters",
            "3",
            "--leaf-ttl",
            "30s",
            "--intermediate-ttl",
            "1h",
            "--root-ttl",
            "5m",
            "--root-rotation-ratio",
            "0.75",
        ],
    );
    let creds = up["management_plane"]["credentials"].as_str().unwrap().to_string();
    let log = CacertsLog::start(&up);
    let names: Vec<String> = CLUSTERS.map(String::from).to_vec();
    wait_until(Duration::from_secs(30), "every cluster's cacerts", || CLUSTERS.iter().all(|c| log.latest(c).is_some()));
    let a = log.latest("cluster-1").unwrap().roots[0].clone();
    let started = wait_for(ROTATION, "the automatic rotation to start", || {
        let st = status(&creds);
        (phase(&st) != "Idle").then_some(st)
    });
    assert_eq!(started["rootRotation"]["trigger"], "root-expiry");
    let b = started["rootRotation"]["to"]["fingerprint"].as_str().unwrap().to_string();
    wait_until(ROTATION, "every cluster on B alone", || {
        CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()]))
    });
    let held: Vec<Held> = log.held().into_iter().filter(|h| h.roots.iter().all(|r| *r == a || *r == b)).collect();
    check_barrier(&held, &names, &a, &b);
    for (cluster, h) in root_set_history(&held, &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    stop_and_check(proc, &d.join("up"));
}

/// The management plane SIGKILLed in each phase (directory store) and started again on the same
/// address and data: the rotation resumes from its journal, with the same phase, convergence
/// times and deadlines. An agent stopped during Distributing stalls the rotation with an alert
/// naming it, and no cluster switches until it is back. (Agents are paused with SIGSTOP to hold
/// the short Switching and Retiring phases open long enough to kill the management plane in them.)
/// No cacerts written at any point breaks the barrier.
#[test]
fn a_killed_management_plane_resumes_every_phase_and_a_stopped_agent_stalls_the_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 10 s leaves, 1 s skew: Distributing waits 6 s after the last cluster, Draining 11 s.
    let policy = write_file(
        d,
        "policy.yaml",
        &policy_yaml("    generated: {}", "{ ttl: 1h }").replace(
            "  intermediateCertOptions",
            "  rootRotation: { maxLeafLifetime: 10s, skew: 1s }\n  intermediateCertOptions",
        ),
    );
    let port = Ports::one();
    let args = ["--policy", policy.to_str().unwrap()];
    let mut m = Mgmt::start_on(d, &port, &args);
    let creds = m.creds();
    let mut agents = Vec::new();
    for c in CLUSTERS {
        let (token, relay) = m.add_cluster(d, c);
        agents.push(agent(d, &m, c, Some(&token), Some(&relay), &[]));
    }
    for c in CLUSTERS {
        wait_for(Duration::from_secs(60), "first cacerts", || valid_bundle(&cacerts_dir(d, c)).ok());
    }
    let log = CacertsLog::of_dirs(CLUSTERS.iter().map(|c| (c.to_string(), cacerts_dir(d, c))).collect());
    let names: Vec<String> = CLUSTERS.map(String::from).to_vec();
    wait_until(Duration::from_secs(30), "the log to see every cluster", || {
        CLUSTERS.iter().all(|c| log.latest(c).is_some())
    });
    let a = log.latest("cluster-1").unwrap().roots[0].clone();
    let restart = |m: &mut Mgmt| {
        m.proc.kill();
        *m = Mgmt::start_on(d, &port, &args);
    };

    // ---- Distributing, with cluster-3's agent stopped: a stall, with an alert naming it ----
    agents[2].kill();
    rotate_root(&creds, false);
    let st = status(&creds);
    let b = st["rootRotation"]["to"]["fingerprint"].as_str().unwrap().to_string();
    let id = st["rootRotation"]["id"].as_str().unwrap().to_string();
    let alert = wait_for(Duration::from_secs(60), "a stall alert naming cluster-3", || {
        stalled_alert(&status(&creds), "cluster-3")
    });
    assert!(alert.contains("cluster-3") && alert.contains("{A, B}") && alert.contains("not reporting"), "{alert}");
    let st = status(&creds);
    assert_eq!(phase(&st), "Distributing");
    assert_eq!(st["rootRotation"]["waitingFor"][0]["cluster"], "cluster-3", "{st:#}");
    // SIGKILL in Distributing; it comes back knowing the same rotation.
    let before = st["rootRotation"].clone();
    restart(&mut m);
    let st = status(&creds);
    assert_eq!(st["rootRotation"]["id"], id.as_str());
    assert_eq!(st["rootRotation"]["transitions"], before["transitions"]);
    assert_eq!(phase(&st), "Distributing");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(phase(&status(&creds)), "Distributing", "still stalled after the learning wait would be over");
    assert!(log.held().iter().all(|h| h.chain_root == a), "nobody signs under B while cluster-3 lacks it");
    agents[2] = agent(d, &m, "cluster-3", None, None, &[]);

    // ---- Switching, held open by pausing cluster-2's agent once it has converged ----
    wait_until(Duration::from_secs(60), "cluster-2 to trust {A, B}", || {
        log.latest("cluster-2").is_some_and(|h| h.roots.len() == 2)
    });
    wait_until(Duration::from_secs(30), "cluster-2's convergence to be recorded", || {
        status(&creds)["rootRotation"]["converged"].as_array().unwrap().iter().any(|c| c["cluster"] == "cluster-2")
    });
    agents[1].signal("STOP");
    wait_until(Duration::from_secs(60), "Switching", || phase(&status(&creds)) == "Switching");
    let before = status(&creds)["rootRotation"].clone();
    restart(&mut m);
    let st = status(&creds);
    assert_eq!(phase(&st), "Switching");
    assert_eq!(st["rootRotation"]["transitions"], before["transitions"]);
    agents[1].signal("CONT");

    // ---- Draining: killed as it waits for A's leaves; the deadline survives ----
    wait_until(Duration::from_secs(60), "Draining", || phase(&status(&creds)) == "Draining");
    let st = status(&creds);
    let deadline = st["rootRotation"]["nextStepAt"].as_i64().unwrap();
    // Pause cluster-1's agent so that Retiring waits for it, then kill the management plane.
    agents[0].signal("STOP");
    restart(&mut m);
    let st = status(&creds);
    assert_eq!(phase(&st), "Draining");
    assert_eq!(st["rootRotation"]["nextStepAt"].as_i64().unwrap(), deadline, "the same drain deadline");

    // ---- Retiring, held open by the paused agent ----
    wait_until(Duration::from_secs(60), "Retiring", || phase(&status(&creds)) == "Retiring");
    restart(&mut m);
    assert_eq!(phase(&status(&creds)), "Retiring");
    agents[0].signal("CONT");
    wait_until(ROTATION, "the rotation to complete", || {
        phase(&status(&creds)) == "Idle"
            && CLUSTERS.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()]))
    });
    let st = status(&creds);
    assert!(st["alerts"].as_array().unwrap().iter().all(|a| a["kind"] != "RootRotationStalled"), "{st:#}");
    check_barrier(&log.held(), &names, &a, &b);
    for (cluster, h) in root_set_history(&log.held(), &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    // One journal through four restarts: each phase entered once.
    let store = StoreView::mgmt(&m);
    let journal = store.record("meshca", "root-rotation").unwrap();
    let phases: Vec<&str> =
        journal["history"][0]["transitions"].as_array().unwrap().iter().map(|t| t["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["Distributing", "Switching", "Draining", "Retiring"]);
    drop(agents);
}
