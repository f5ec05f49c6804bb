//! End to end: `meshca server` and `meshca agent` as real processes on 127.0.0.1, directory
//! stores, the OpenSSL CLI checking what lands in `cacerts`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn two_agents_get_valid_cacerts_under_one_root_with_their_own_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let (t2, _) = m.add_cluster(d, "cluster-2");
    let _a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let _a2 = agent(d, &m, "cluster-2", Some(&t2), Some(&relay), &[]);
    let b1 = wait_for(Duration::from_secs(30), "cluster-1 cacerts", || valid_bundle(&cacerts_dir(d, "cluster-1")).ok());
    let b2 = wait_for(Duration::from_secs(30), "cluster-2 cacerts", || valid_bundle(&cacerts_dir(d, "cluster-2")).ok());

    for c in ["cluster-1", "cluster-2"] {
        let dir = cacerts_dir(d, c);
        openssl_verify_cacerts(&dir);
        let mode = std::fs::metadata(dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{c} ca-key.pem mode");
        let (_, text) = openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-subject"]);
        assert!(text.contains(&format!("L = {c}")), "{text}");
    }
    assert_eq!(b1.roots().fingerprint(), b2.roots().fingerprint(), "same root");
    assert_ne!(b1.ca_cert().serial_hex(), b2.ca_cert().serial_hex());
    assert_ne!(b1.ca_cert().spki_der(), b2.ca_cert().spki_der(), "each cluster has its own key");

    // Status shows both, connected and ready, with what they serve.
    let st = wait_for(Duration::from_secs(20), "both clusters to report", || {
        let st = m.status_json();
        let ready = st["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["phase"] == "Ready" && c["connected"] == true)
            .count();
        (ready == 2).then_some(st)
    });
    let serials: BTreeSet<String> = st["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["intermediateSerial"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(serials, BTreeSet::from([b1.ca_cert().serial_hex(), b2.ca_cert().serial_hex()]));
    assert_eq!(st["alerts"].as_array().unwrap().len(), 0, "{st}");
    // The issuer's record matches what the cluster serves.
    let c1 = st["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "cluster-1").unwrap();
    assert_eq!(c1["issued"][0]["serial"], b1.ca_cert().serial_hex());
}

#[test]
fn intermediates_rotate_before_expiry_with_new_keys_and_no_invalid_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 60 s intermediates renewed when less than half remains: a renewal about every 30 s.
    let policy = short_policy(d, "60s", 0.5);
    let m = Mgmt::start(d, &["--policy", policy.to_str().unwrap()]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let (t2, _) = m.add_cluster(d, "cluster-2");
    let _a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let _a2 = agent(d, &m, "cluster-2", Some(&t2), Some(&relay), &[]);
    for c in ["cluster-1", "cluster-2"] {
        wait_for(Duration::from_secs(30), "first cacerts", || valid_bundle(&cacerts_dir(d, c)).ok());
    }
    // Watch both clusters' cacerts continuously: every read must be a bundle istiod accepts,
    // and each cluster must go through at least three intermediates (two renewals).
    let mut seen: Vec<Vec<(String, Vec<u8>, std::time::SystemTime)>> = vec![Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(110);
    while Instant::now() < deadline && seen.iter().any(|s| s.len() < 3) {
        for (i, c) in ["cluster-1", "cluster-2"].iter().enumerate() {
            let b =
                valid_bundle(&cacerts_dir(d, c)).unwrap_or_else(|e| panic!("{c} cacerts invalid during rotation: {e}"));
            let serial = b.ca_cert().serial_hex();
            if seen[i].last().map(|s| &s.0) != Some(&serial) {
                seen[i].push((serial, b.ca_cert().spki_der().to_vec(), b.ca_cert().not_after()));
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    for (i, s) in seen.iter().enumerate() {
        assert!(s.len() >= 3, "cluster-{} saw only {} intermediates", i + 1, s.len());
        let keys: BTreeSet<&Vec<u8>> = s.iter().map(|x| &x.1).collect();
        assert_eq!(keys.len(), s.len(), "every renewal uses a new key");
        // Each renewal happened before the previous intermediate expired.
        for w in s.windows(2) {
            assert!(w[1].2 > w[0].2, "NotAfter moves forward");
        }
    }
    openssl_verify_cacerts(&cacerts_dir(d, "cluster-1"));
}

#[test]
fn agents_ride_out_a_management_plane_outage_and_a_restart_without_a_new_token() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let policy = short_policy(d, "60s", 0.5);
    let port = Ports::one();
    let mut m = Mgmt::start_on(d, &port, &["--policy", policy.to_str().unwrap()]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let mut a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let first = wait_for(Duration::from_secs(30), "cacerts", || valid_bundle(&cacerts_dir(d, "cluster-1")).ok());

    // Stop the management plane until the renewal due ~30 s after issuance has come and found it
    // unreachable (an event, not a fixed time: the backoff rules themselves are tested on a
    // manual clock in crates/agent/tests/lifecycle.rs; this shows them against the real process).
    m.proc.kill();
    let due = || a1.log_text().contains("a new intermediate is due but the management plane is unreachable");
    let outage_end = Instant::now() + Duration::from_secs(60);
    while !due() {
        assert!(Instant::now() < outage_end, "no renewal fell due within 60 s of the outage:\n{}", a1.log_text());
        // The agent keeps serving the current cacerts; it never deletes or breaks it.
        let b = valid_bundle(&cacerts_dir(d, "cluster-1"));
        match b {
            Ok(b) => assert_eq!(b.ca_cert().serial_hex(), first.ca_cert().serial_hex()),
            Err(e) => panic!("cacerts invalid during the outage: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = a1.log_text();
    assert!(log.contains("unreachable"), "the agent reports the outage:\n{log}");
    assert!(log.contains("keeping the current cacerts"), "{log}");

    // The management plane comes back on the same address: the agent renews.
    let m2 = Mgmt::start_on(d, &port, &[]);
    let renewed = wait_for(Duration::from_secs(60), "renewal after the outage", || {
        valid_bundle(&cacerts_dir(d, "cluster-1"))
            .ok()
            .filter(|b| b.ca_cert().serial_hex() != first.ca_cert().serial_hex())
    });
    assert_eq!(renewed.roots().fingerprint(), first.roots().fingerprint(), "the root survived the restart");

    // Kill the agent and start it again with no token: it resumes with its stored identity.
    a1.kill();
    std::fs::remove_file(&t1).unwrap();
    let _a1b = agent(d, &m2, "cluster-1", None, None, &[]);
    wait_for(Duration::from_secs(30), "the restarted agent to report", || {
        let st = m2.status_json();
        let c = st["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "cluster-1").cloned()?;
        (c["connected"] == true && c["phase"] == "Ready").then_some(())
    });
    let log = std::fs::read_to_string(d.join("agent-cluster-1.log")).unwrap();
    assert_eq!(log.matches("registered with the management plane").count(), 1, "registered once only:\n{log}");
}

/// TLS to the management plane at `addr`, trusting the relay CA in `relay`, offering HTTP/2.
async fn tls_to(addr: &str, relay: &std::path::Path) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let roots = meshca_pki::RootSet::from_pem(&std::fs::read(relay).unwrap()).unwrap();
    let mut config = meshca_tls::client_config(
        meshca_tls::ServerTrust::Roots(&roots),
        meshca_tls::ClientAuth::None,
        meshca_tls::Versions::Tls13,
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS with the management plane")
}

/// SIGTERM with a connected agent (its WatchTrust stream open) and, beside it, two hostile
/// clients: one that finished TLS but never sends its HTTP/2 preface, one whose `Register` call
/// sent its headers but never its body (a call in flight that never ends). Before, either kept a
/// stopping server alive for ever, and the agent's open stream kept it running until SIGKILL.
/// The server exits cleanly within `--shutdown-grace` plus the 2 s its own tasks get, the hostile
/// call cut at the deadline; the agent notices at once, keeps its cacerts valid, and when the
/// server is started again on the same address it reconnects and keeps renewing.
#[test]
fn sigterm_with_a_connected_agent_stops_the_server_in_time_and_the_agent_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let policy = short_policy(d, "30s", 0.5);
    let port = Ports::one();
    let mut m = Mgmt::start_on(d, &port, &["--policy", policy.to_str().unwrap(), "--shutdown-grace", "3s"]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let first = wait_for(Duration::from_secs(30), "cacerts", || valid_bundle(&cacerts_dir(d, "cluster-1")).ok());
    wait_for(Duration::from_secs(30), "the agent to be connected", || {
        status_cluster(&m.status_json(), "cluster-1").filter(|c| c["connected"] == true).map(|_| ())
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_silent, _body, answer) = rt.block_on(async {
        let silent = tls_to(&m.addr, &relay).await;
        let io = hyper_util::rt::TokioIo::new(tls_to(&m.addr, &relay).await);
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let (body, frames) =
            futures::channel::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(1);
        let request = http::Request::post("https://localhost/meshca.v1alpha1.Registration/Register")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::StreamBody::new(frames))
            .unwrap();
        let answer = tokio::spawn(sender.send_request(request));
        (silent, body, answer)
    });
    // The call's headers must have reached the server before it is told to stop, or there is no
    // call in flight to cut: over loopback that takes microseconds, but on a loaded machine the
    // task sending them may not have run yet (the test failed once that way, the server having
    // drained with nothing in flight). Nothing on the wire says the server has them, so: a moment.
    std::thread::sleep(Duration::from_millis(500));

    m.proc.signal("TERM");
    let sent = Instant::now();
    let status = m.proc.wait_exit(Duration::from_secs(3 + 2 + 5));
    eprintln!("meshca server exited {:?} after SIGTERM ({status})", sent.elapsed());
    assert!(status.success(), "a clean exit: {status}\n{}", m.proc.log_text());
    let log = m.proc.log_text();
    assert!(log.contains("stopping: no new connections"), "{log}");
    assert!(log.contains("calls still in flight at the end of the drain"), "the half-sent call was cut: {log}");
    let cut = rt.block_on(answer).unwrap();
    assert!(cut.is_err() || cut.is_ok_and(|r| r.headers().get("grpc-status").is_some()), "the hostile call got an end");
    wait_for(Duration::from_secs(10), "the agent to notice", || {
        a1.log_text().contains("lost the trust stream").then_some(())
    });
    let kept = valid_bundle(&cacerts_dir(d, "cluster-1")).expect("cacerts stays valid while the server is down");
    assert_eq!(kept.ca_cert().serial_hex(), first.ca_cert().serial_hex());

    // Back on the same address: the agent reconnects on its own and keeps renewing.
    let m2 = Mgmt::start_on(d, &port, &[]);
    wait_for(Duration::from_secs(60), "a renewal through the restarted server", || {
        valid_bundle(&cacerts_dir(d, "cluster-1"))
            .ok()
            .filter(|b| b.ca_cert().serial_hex() != first.ca_cert().serial_hex())
    });
    wait_for(Duration::from_secs(30), "the agent to be connected again", || {
        status_cluster(&m2.status_json(), "cluster-1").filter(|c| c["connected"] == true).map(|_| ())
    });
}

#[test]
fn a_foreign_cacerts_is_left_alone_unless_adoption_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = Mgmt::start(d, &[]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    // Somebody else's cacerts (written by `meshca demo`, i.e. another root), in the cluster's
    // store, written through the store so it looks like any other Secret.
    let (ok, _, err) = run(&["demo", "--dir", d.join("foreign").to_str().unwrap(), "--clusters", "1"]);
    assert!(ok, "{err}");
    let src = d.join("foreign/cluster-1/cacerts");
    let store_dir = d.join("cluster-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use meshca_store::{ObjectKey, Precondition, Secret, Store};
        let store = meshca_store::dir::DirStore::open(&store_dir).unwrap();
        let files = read_bundle(&src);
        let secret = Secret::with_data(files.entries().map(|(k, v)| (k.to_string(), v.to_vec())));
        store.put(&ObjectKey::new("istio-system", "cacerts").unwrap(), &secret, Precondition::Absent).await.unwrap();
    });
    let before = read_bundle(&cacerts_dir(d, "cluster-1")).ca_cert;

    let mut a = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    wait_for(Duration::from_secs(20), "the refusal", || a.log_text().contains("--adopt-existing").then_some(()));
    // Once refused it stays refused: the agent never asks for an intermediate over a foreign
    // cacerts (meshca_agent::runner's unit tests show it for every later step), so there is no
    // need to wait and see.
    assert_eq!(read_bundle(&cacerts_dir(d, "cluster-1")).ca_cert, before, "untouched");
    let st = m.status_json();
    let c = st["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "cluster-1").unwrap().clone();
    assert!(c["lastError"].as_str().unwrap().contains("not written by meshca"), "{c}");
    a.kill();

    // The foreign root is unrelated to meshca's, so adopting it is a root-set change Istio
    // refuses (A -> B): the agent must refuse it too, rather than break istiod.
    let mut a = agent(d, &m, "cluster-1", None, None, &["--adopt-existing"]);
    wait_for(Duration::from_secs(20), "the root-set refusal", || {
        a.log_text().contains("root set change refused").then_some(())
    });
    assert_eq!(read_bundle(&cacerts_dir(d, "cluster-1")).ca_cert, before, "still untouched");
    a.kill();
}

/// The serials a cacerts directory's `ca-crl.pem` lists.
fn crl_lists(dir: &std::path::Path, serial: &str) -> bool {
    std::fs::read(dir.join("ca-crl.pem"))
        .ok()
        .and_then(|p| meshca_pki::Crl::parse_pem_bundle(&p).ok())
        .is_some_and(|crls| crls.iter().any(|c| c.lists(serial)))
}

/// `meshca revoke`, then SIGKILL of the management plane — once right after the CLI answered,
/// once at a random moment while it runs — and a restart on the same address: the revoked
/// cluster ends on a new intermediate (a new key), every cluster's `ca-crl.pem` names the serial,
/// and `meshca audit verify` passes with at most one revocation entry for it (exactly one when
/// the kill came after the answer). A kill before the revocation was stored loses it, so the
/// operator's repeat after the restart (the same serial, idempotent) is part of the recovery.
#[test]
fn a_management_plane_killed_during_or_right_after_meshca_revoke_finishes_it_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let policy = short_policy(d, "1h", 0.2);
    let port = Ports::one();
    let mut m = Mgmt::start_on(d, &port, &["--policy", policy.to_str().unwrap()]);
    let (t1, relay) = m.add_cluster(d, "cluster-1");
    let (t2, _) = m.add_cluster(d, "cluster-2");
    let _a1 = agent(d, &m, "cluster-1", Some(&t1), Some(&relay), &[]);
    let _a2 = agent(d, &m, "cluster-2", Some(&t2), Some(&relay), &[]);
    let serial_of = |c: &str| valid_bundle(&cacerts_dir(d, c)).ok().map(|b| b.ca_cert().serial_hex());
    // Both clusters hold an intermediate and have reported it (revoke picks the one reported).
    wait_for(Duration::from_secs(30), "both clusters reporting their intermediates", || {
        let st = m.status_json();
        ["cluster-1", "cluster-2"]
            .iter()
            .all(|c| {
                let reported =
                    status_cluster(&st, c).and_then(|x| x["intermediateSerial"].as_str().map(str::to_string));
                reported.is_some() && reported == serial_of(c)
            })
            .then_some(())
    });
    let creds = m.creds();

    let check_recovered = |cluster: &str, serial: &str, exactly_one: bool| {
        // The operator repeats the command after the restart: a no-op if it had been stored.
        let (ok, out, err) = run(&["revoke", "--cluster", cluster, "--serial", serial, "--credentials", &creds]);
        assert!(ok, "{out}{err}");
        wait_for(Duration::from_secs(60), &format!("{cluster} on a new intermediate"), || {
            serial_of(cluster).filter(|s| s != serial)
        });
        wait_for(Duration::from_secs(60), "every ca-crl.pem naming the serial", || {
            ["cluster-1", "cluster-2"].iter().all(|c| crl_lists(&cacerts_dir(d, c), serial)).then_some(())
        });
        let (ok, out, err) = run(&["audit", "verify", "--credentials", &creds]);
        assert!(ok && out.contains("audit log intact"), "{out}{err}");
        let (ok, out, err) = run(&["audit", "-o", "json", "--credentials", &creds]);
        assert!(ok, "{err}");
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let n = entries
            .iter()
            .filter(|e| e["action"] == "intermediate-revoked" && e["details"]["serial"] == serial)
            .count();
        if exactly_one {
            assert_eq!(n, 1, "{out}");
        } else {
            assert!(n <= 1, "{out}");
        }
    };

    // 1. Killed right after `meshca revoke` answered.
    let s2 = serial_of("cluster-2").unwrap();
    let (ok, out, err) = run(&["revoke", "--cluster", "cluster-2", "--credentials", &creds]);
    assert!(ok && out.contains(&s2), "{out}{err}");
    m.proc.kill();
    m = Mgmt::start_on(d, &port, &[]);
    check_recovered("cluster-2", &s2, true);

    // 2. Killed at a random moment while `meshca revoke` runs (its round trip is tens of ms).
    let s1 = serial_of("cluster-1").unwrap();
    let mut cli = std::process::Command::new(meshca())
        .args(["revoke", "--cluster", "cluster-1", "--credentials", &creds])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut b = [0u8; 1];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    let delay = Duration::from_millis(u64::from(b[0]) % 60);
    std::thread::sleep(delay);
    m.proc.kill();
    let _ = cli.wait();
    eprintln!("killed {delay:?} into meshca revoke");
    m = Mgmt::start_on(d, &port, &[]);
    check_recovered("cluster-1", &s1, false);
    drop(m);
}
