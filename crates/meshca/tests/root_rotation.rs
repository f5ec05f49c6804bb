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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use meshca_pki::Cert;
use meshca_testsupport::rotation::{Held, check_barrier, root_set_history};
use serde_json::Value;

const CLUSTERS: [&str; 3] = ["cluster-1", "cluster-2", "cluster-3"];
/// Generous: a rotation with 30 s leaves takes about a minute on an idle machine.
const ROTATION: Duration = Duration::from_secs(360);

/// Every distinct `cacerts` version each cluster held, polled from outside.
struct CacertsLog {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Held, Vec<u8>)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacertsLog {
    /// Polls each cluster's directory store (`<cacerts_dir>/../..`) every 50 ms.
    fn start(up: &Value) -> CacertsLog {
        let clusters: Vec<(String, PathBuf)> = up["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let dir = PathBuf::from(c["cacerts_dir"].as_str().unwrap());
                (c["name"].as_str().unwrap().to_string(), dir.parent().unwrap().parent().unwrap().to_path_buf())
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(Held, Vec<u8>)>>> = Arc::default();
        let (s, log) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let views: Vec<(String, StoreView)> =
                clusters.iter().map(|(n, d)| (n.clone(), StoreView::open(d))).collect();
            while !s.load(Ordering::SeqCst) {
                for (name, view) in &views {
                    let Some(secret) = view.get("istio-system", "cacerts") else { continue };
                    let roots_pem = secret.get("root-cert.pem").unwrap_or_default().to_vec();
                    let chain = Cert::parse_pem_bundle(secret.get("cert-chain.pem").unwrap_or_default()).unwrap();
                    let held = Held {
                        cluster: name.clone(),
                        roots: Cert::parse_pem_bundle(&roots_pem).unwrap().iter().map(Cert::fingerprint).collect(),
                        chain_root: chain.last().unwrap().fingerprint(),
                    };
                    let mut log = log.lock().unwrap();
                    if log.iter().rev().find(|(h, _)| &h.cluster == name) != Some(&(held.clone(), roots_pem.clone())) {
                        log.push((held, roots_pem));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CacertsLog { stop, seen, thread: Some(thread) }
    }

    fn held(&self) -> Vec<Held> {
        self.seen.lock().unwrap().iter().map(|(h, _)| h.clone()).collect()
    }

    fn latest(&self, cluster: &str) -> Option<Held> {
        self.held().into_iter().rev().find(|h| h.cluster == cluster)
    }

    /// Each distinct root-cert.pem of `cluster`, in order, as the subjects OpenSSL lists.
    fn openssl_root_sets(&self, d: &Path, cluster: &str) -> Vec<Vec<String>> {
        let files: Vec<Vec<u8>> =
            self.seen.lock().unwrap().iter().filter(|(h, _)| h.cluster == cluster).map(|(_, p)| p.clone()).collect();
        let mut out: Vec<Vec<String>> = Vec::new();
        for (i, pem) in files.iter().enumerate() {
            let f = d.join(format!("{cluster}-roots-{i}.pem"));
            std::fs::write(&f, pem).unwrap();
            let (ok, text) = openssl(d, &["storeutl", "-noout", "-certs", "-text", f.to_str().unwrap()]);
            assert!(ok, "{text}");
            let subjects: Vec<String> =
                text.lines().filter_map(|l| l.trim().strip_prefix("Subject: ").map(str::to_string)).collect();
            if out.last() != Some(&subjects) {
                out.push(subjects);
            }
        }
        out
    }
}

impl Drop for CacertsLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `meshca status -o json`.
fn status(creds: &str) -> Value {
    let (ok, out, err) = run(&["status", "-o", "json", "--credentials", creds]);
    assert!(ok, "meshca status: {err}");
    serde_json::from_str(&out).unwrap()
}

fn phase(st: &Value) -> String {
    st["rootRotation"]["phase"].as_str().unwrap().to_string()
}

/// `meshca rotate root [--abort]`; its stdout.
fn rotate_root(creds: &str, abort: bool) -> String {
    let mut args = vec!["rotate", "root", "--credentials", creds];
    if abort {
        args.push("--abort");
    }
    let (ok, out, err) = run(&args);
    assert!(ok, "meshca {args:?}: {out}{err}");
    out
}

/// A leaf from `cluster`'s workload CA for an OpenSSL key, its chain written for OpenSSL.
struct Leaf {
    key: PathBuf,
    files: ChainFiles,
    chain: Vec<String>,
}

impl Leaf {
    fn get(up: &Value, d: &Path, cluster: &str, name: &str) -> Leaf {
        let c = up["clusters"].as_array().unwrap().iter().find(|c| c["name"] == cluster).unwrap();
        let ca = &c["workload_ca"];
        let token = std::fs::read_to_string(c["token_file"].as_str().unwrap()).unwrap();
        let csr = openssl_csr(d, name, OpensslKey::P256, &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let chain = rt.block_on(async {
            let mut client = ca_client(
                ca["address"].as_str().unwrap(),
                Path::new(ca["ca_file"].as_str().unwrap()),
                ca["server_name"].as_str().unwrap(),
            );
            create_certificate(&mut client, csr_request(&csr, Some(token.trim()), Some(cluster), 0)).await.unwrap()
        });
        Leaf { key: d.join(format!("{name}.key")), files: write_chain(d, name, &chain), chain }
    }

    /// The root its intermediate was issued under, by fingerprint.
    fn chain_root(&self, roots: &[Cert]) -> String {
        let int = Cert::from_pem(self.chain[1].as_bytes()).unwrap();
        roots.iter().find(|r| int.verify_signed_by(r).is_ok()).map(Cert::fingerprint).unwrap_or_default()
    }

    /// The roots in the last element (what the workload learns to trust).
    fn trusted(&self) -> Vec<Cert> {
        Cert::parse_pem_bundle(self.chain.last().unwrap().as_bytes()).unwrap()
    }

    fn party(&self) -> TlsParty<'_> {
        TlsParty { chain: &self.files, key: &self.key, trust: &self.files.root }
    }
}

/// Stops `meshca up` with Ctrl-C and checks its summary: not one failed handshake or leaf
/// request of the sample workloads, and plenty of successful ones.
fn stop_and_check(mut proc: Proc, dir: &Path) -> Value {
    proc.signal("INT");
    let status = proc.wait_exit(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.join("meshca-up.log")).unwrap_or_default();
    assert!(status.success(), "meshca up: {status}\n{}\n{log}", proc.log_text());
    let summary = json_file(&dir.join("summary.json")).expect("summary.json");
    eprintln!("summary.json: {summary:#}");
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}\n{log}");
    assert_eq!(summary["leaves_failed"], 0, "{summary:#}\n{log}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 300, "{summary:#}");
    summary
}

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
    let before = Leaf::get(&up, d, "cluster-1", "before-switch");
    let learned: Vec<String> = before.trusted().iter().map(Cert::fingerprint).collect();
    assert_eq!(learned, [a.clone(), b.clone()], "the last element is the root set, A first");
    assert_eq!(before.chain_root(&before.trusted()), a, "issued under A");
    // While it distributes, status says what it waits for.
    let st = status(&creds);
    if phase(&st) == "Distributing" {
        assert!(!st["rootRotation"]["waitingFor"].as_array().unwrap().is_empty(), "{st:#}");
    }

    wait_until(ROTATION, "cluster-2 to sign under B", || log.latest("cluster-2").is_some_and(|h| h.chain_root == b));
    let after = Leaf::get(&up, d, "cluster-2", "after-switch");
    assert_eq!(after.chain_root(&after.trusted()), b, "issued under B");
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
        assert_eq!(sets[0], [a_subject.clone()], "{c}");
        assert_eq!(sets[1][0], a_subject, "{c}: A first");
        assert!(sets[1][1].starts_with("O=meshca, CN=meshca Root CA 20"), "{c}: {sets:?}");
        assert_eq!(sets[2], [sets[1][1].clone()], "{c}: B alone");
    }
    // A new leaf chains to B, and OpenSSL verifies it against the cluster's root-cert.pem ({B}).
    let fresh = Leaf::get(&up, d, "cluster-3", "fresh");
    let ca_file = PathBuf::from(up["clusters"][2]["workload_ca"]["ca_file"].as_str().unwrap());
    let (ok, out) = openssl_verify_leaf(d, &fresh.files, &ca_file);
    assert!(ok, "{out}");
    assert_eq!(fresh.trusted().iter().map(Cert::fingerprint).collect::<Vec<_>>(), [b.clone()]);
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
