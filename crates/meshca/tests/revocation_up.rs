//! End to end: compromise response in `meshca up` (3 clusters, sample traffic) with the real CLI:
//! `meshca revoke --cluster cluster-2` puts the old serial in every cluster's `ca-crl.pem`, gives
//! cluster-2 a new intermediate whose leaves it serves, and OpenSSL (`verify -crl_check_all` with
//! the CRLs from `cacerts`) rejects a leaf under the revoked intermediate while a healthy
//! cluster's leaf passes; no handshake between the sample workloads fails. `meshca up`'s own
//! verifiers enforce the CRLs: a leaf minted with the revoked intermediate's key after the
//! revocation is refused as revoked at once, cluster-2's sample workloads renew under the new
//! intermediate, and once the revocation grace is over a leaf it signed before is refused as
//! revoked too (over real mTLS to a sample workload), while the sample traffic never failed.
//! Hostile and wrong input through the CLI: the same serial twice, an unknown serial, an unknown
//! reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use meshca_pki::{CaSigner, Cert, Crl, LeafParams, PrivateKey, RootSet, SpiffeId, TrustDomain};
use meshca_tls::{ClientAuth, Identity, PeerPolicy, ServerTrust, SpiffeVerifier, Versions};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn cluster<'a>(topology: &'a Value, name: &str) -> &'a Value {
    topology["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

fn cacerts(topology: &Value, name: &str) -> PathBuf {
    PathBuf::from(cluster(topology, name)["cacerts_dir"].as_str().unwrap())
}

/// `ca-crl.pem` of a cacerts directory, parsed (empty when absent).
fn crls(dir: &Path) -> Vec<Crl> {
    std::fs::read(dir.join("ca-crl.pem")).map(|p| Crl::parse_pem_bundle(&p).unwrap()).unwrap_or_default()
}

/// A leaf from `name`'s workload CA for an OpenSSL key, with its chain written out, or the
/// workload CA's refusal.
fn try_leaf(
    rt: &tokio::runtime::Runtime,
    topology: &Value,
    d: &Path,
    name: &str,
    file: &str,
) -> Result<(ChainFiles, Cert), tonic::Status> {
    let c = cluster(topology, name);
    let ca = &c["workload_ca"];
    let token = std::fs::read_to_string(c["token_file"].as_str().unwrap()).unwrap();
    let csr = openssl_csr(d, file, OpensslKey::P256, &[]);
    let chain = rt.block_on(async {
        let mut client = ca_client(
            ca["address"].as_str().unwrap(),
            Path::new(ca["ca_file"].as_str().unwrap()),
            ca["server_name"].as_str().unwrap(),
        );
        create_certificate(&mut client, csr_request(&csr, Some(token.trim()), Some(name), 0)).await
    })?;
    Ok((write_chain(d, file, &chain), Cert::from_pem(chain[1].as_bytes()).unwrap()))
}

fn leaf(rt: &tokio::runtime::Runtime, topology: &Value, d: &Path, name: &str, file: &str) -> (ChainFiles, Cert) {
    try_leaf(rt, topology, d, name, file).unwrap_or_else(|s| panic!("{name} refused a leaf: {s:?}"))
}

/// One mutual-TLS ping to a sample workload at `addr`, presenting `chain` (leaf first) and `key`:
/// the workload's answer, or the error (the workload's verifier refuses a client certificate
/// with a TLS alert, which in TLS 1.3 the client reads after its side of the handshake).
fn ping(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    chain: &[Cert],
    key: &PrivateKey,
    root: &Path,
) -> Result<String, String> {
    let roots = RootSet::from_pem(&std::fs::read(root).unwrap()).unwrap();
    let server =
        SpiffeVerifier::new(&roots, PeerPolicy::TrustDomain(TrustDomain::new("cluster.local").unwrap()), true).unwrap();
    let identity = Identity::new(&chain[0], &chain[1..], key);
    let config =
        meshca_tls::client_config(ServerTrust::Verifier(server), ClientAuth::Identity(identity), Versions::Tls13)
            .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("workload").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).await.map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
}

/// The certificates of a PEM file (a workload's `cert-chain.pem`, a leaf written by OpenSSL).
fn certs(path: &Path) -> Vec<Cert> {
    Cert::parse_pem_bundle(&std::fs::read(path).unwrap_or_default()).unwrap_or_default()
}

/// The sample workloads of `name`: (SPIFFE ID, address, chain file).
fn workloads(topology: &Value, name: &str) -> Vec<(String, String, PathBuf)> {
    cluster(topology, name)["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap().to_string();
            (s("id"), s("address"), PathBuf::from(s("cert_chain")))
        })
        .collect()
}

/// `meshca audit`: one entry per action (the repeated revocation none), nothing secret in it, and
/// `meshca audit verify` naming the entry when one is changed or removed in the database, and
/// saying so when the newest entries are cut off.
fn audit_log_records_each_action_once_and_names_tampering(
    d: &Path,
    topology: &Value,
    creds: &str,
    revoked: &str,
    new_serial: &str,
) {
    let (ok, out, err) = run(&["audit", "-o", "json", "--credentials", creds]);
    assert!(ok, "{err}");
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    let count =
        |action: &str, f: &dyn Fn(&Value) -> bool| entries.iter().filter(|e| e["action"] == action && f(e)).count();
    assert_eq!(count("intermediate-revoked", &|e| e["details"]["serial"] == revoked), 1, "{out}");
    assert_eq!(count("intermediate-revoked", &|_| true), 1, "the repeat left no entry: {out}");
    for n in ["cluster-1", "cluster-2", "cluster-3"] {
        assert_eq!(count("cluster-registered", &|e| e["cluster"] == n), 1, "{n}: {out}");
        assert_eq!(count("bootstrap-token-created", &|e| e["cluster"] == n), 1, "{n}: {out}");
    }
    assert_eq!(count("intermediate-issued", &|e| e["details"]["serial"] == revoked), 1, "{out}");
    assert_eq!(count("intermediate-issued", &|e| e["details"]["serial"] == new_serial), 1, "{out}");
    // Nothing secret: no key, no token (the workloads' tokens, the bootstrap tokens' secrets).
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    for n in ["cluster-1", "cluster-2", "cluster-3"] {
        let token = std::fs::read_to_string(cluster(topology, n)["token_file"].as_str().unwrap()).unwrap();
        assert!(!out.contains(token.trim()), "a token is in the audit log");
        let key = std::fs::read_to_string(cacerts(topology, n).join("ca-key.pem")).unwrap();
        assert!(!out.contains(&key), "a key is in the audit log");
    }
    let (ok, table, err) = run(&["audit", "--credentials", creds]);
    assert!(ok && table.contains("intermediate-revoked") && table.contains("reason=keyCompromise"), "{table}{err}");
    let (ok, out, err) = run(&["audit", "verify", "--credentials", creds]);
    assert!(ok && out.contains(&format!("audit log intact: {} entries", entries.len())), "{out}{err}");

    // Tampering in the database itself (another process may open it while the server runs). The
    // log is in blocks (`audit-entries-<first seq>`), one per append batch.
    let db = StoreView::database(&d.join("up").join("mgmt"));
    let first = |name: &str| name.trim_start_matches("audit-entries-").parse::<usize>().unwrap();
    let blocks: Vec<String> = db.list("meshca").into_iter().filter(|n| n.starts_with("audit-entries-")).collect();
    let holding = |seq: usize| blocks.iter().rev().find(|n| first(n) <= seq).unwrap().clone();
    let verify = |says: &str| {
        let (ok, out, err) = run(&["audit", "verify", "--credentials", creds]);
        assert!(!ok && err.contains(says), "expected {says:?}: {out}{err}");
    };
    let block = holding(2);
    let original = db.get("meshca", &block).unwrap();
    let record: Value = serde_json::from_slice(original.get("record.json").unwrap()).unwrap();
    let mut changed = record.clone();
    changed["entries"][2 - first(&block)]["actor"] = "operator mallory".into();
    db.put(
        "meshca",
        &block,
        &meshca_store::Secret::with_data([("record.json", serde_json::to_vec(&changed).unwrap())]),
    );
    verify("entry 2 was changed");
    // Removed: the block holding entry 2 gone, the next entry is out of place.
    db.delete("meshca", &block);
    let held = record["entries"].as_array().unwrap().len();
    verify(&format!("entry {} carries seq {}", first(&block), first(&block) + held));
    db.create("meshca", &block, &original);
    // Cut off: the newest block gone; the chain alone would pass, the head says what is missing.
    let newest = blocks.last().unwrap();
    let kept = db.get("meshca", newest).unwrap();
    db.delete("meshca", newest);
    verify("the newest entries were removed");
    db.create("meshca", newest, &kept);
    let (ok, out, err) = run(&["audit", "verify", "--credentials", creds]);
    assert!(ok, "restored: {out}{err}");
}

#[test]
fn meshca_revoke_reaches_every_cluster_and_openssl_rejects_leaves_under_the_revoked_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let started = Instant::now();
    let (mut proc, topology) =
        start_up(d, &["--clusters", "3", "--crl-ttl", "20s", "--call-interval", "200ms", "--duration", "55s"]);
    let creds = d.join("up").join("mgmt").join("operator");
    let creds = creds.to_str().unwrap();
    let names = ["cluster-1", "cluster-2", "cluster-3"];

    // Before anything is revoked every cacerts holds a ca-crl.pem istiod accepts: a CRL from the
    // cluster's intermediate and one from the root.
    wait_for(Duration::from_secs(30), "a ca-crl.pem covering the chain in every cluster", || {
        names
            .iter()
            .all(|n| {
                let dir = cacerts(&topology, n);
                let chain = valid_bundle(&dir).map(|b| b.signer().chain().to_vec()).unwrap_or_default();
                !chain.is_empty() && meshca_pki::crl::check_chain_coverage(&crls(&dir), &chain).is_ok()
            })
            .then_some(())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (old2, revoked_int) = leaf(&rt, &topology, d, "cluster-2", "old2");
    let (healthy1, _) = leaf(&rt, &topology, d, "cluster-1", "healthy1");
    let serial = revoked_int.serial_hex();
    // The CRL cluster-2's old intermediate signed (OpenSSL's -crl_check_all wants one from every CA).
    std::fs::copy(cacerts(&topology, "cluster-2").join("ca-crl.pem"), d.join("old2-own.crl")).unwrap();
    // The "stolen" key: the revoked intermediate as an attacker would hold it.
    let stolen = {
        let dir = cacerts(&topology, "cluster-2");
        let key = PrivateKey::from_pem(&std::fs::read(dir.join("ca-key.pem")).unwrap()).unwrap();
        CaSigner::new(key, Cert::parse_pem_bundle(&std::fs::read(dir.join("cert-chain.pem")).unwrap()).unwrap())
            .unwrap()
    };
    let old2_key = PrivateKey::from_pem(&std::fs::read(d.join("old2.key")).unwrap()).unwrap();
    let old2_chain = [certs(&old2.leaf), certs(&old2.middle)].concat();
    let root_file = PathBuf::from(cluster(&topology, "cluster-1")["workload_ca"]["ca_file"].as_str().unwrap());
    let (_, target1, _) = workloads(&topology, "cluster-1").remove(0);
    assert!(
        ping(&rt, &target1, &old2_chain, &old2_key, &root_file).unwrap().starts_with("pong"),
        "before the revocation"
    );

    let t0 = Instant::now();
    let (ok, out, err) = run(&["revoke", "--cluster", "cluster-2", "--credentials", creds]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("intermediate {serial} of cluster-2 revoked (keyCompromise)")), "{out}");

    let crl_everywhere = wait_for(Duration::from_secs(60), "every cluster's ca-crl.pem to list the serial", || {
        names.iter().all(|n| crls(&cacerts(&topology, n)).iter().any(|c| c.lists(&serial))).then(|| t0.elapsed())
    });
    // From here on nothing changes what the CRLs list: a new CRL number is a re-signing.
    let first_numbers: Vec<u64> = crls(&cacerts(&topology, "cluster-3")).iter().map(Crl::number).collect();
    let new_serial = wait_for(Duration::from_secs(60), "cluster-2's new intermediate", || {
        let s = valid_bundle(&cacerts(&topology, "cluster-2")).ok()?.ca_cert().serial_hex();
        (s != serial).then_some(s)
    });
    let reissued = t0.elapsed();
    eprintln!("revoke → CRL in every cacerts: {crl_everywhere:?}; → cluster-2's new intermediate: {reissued:?}");

    // A leaf the attacker mints with the revoked key after the revocation: cluster-1's workload
    // refuses it as revoked as soon as it has read the CRL, grace or not. (Dated a second on:
    // certificate and CRL times count whole seconds, and a leaf of the revocation's own second
    // counts as issued before it.)
    let mallory_key = PrivateKey::generate(meshca_pki::KeyAlgorithm::EcdsaP256).unwrap();
    let mallory_id = SpiffeId::workload(&TrustDomain::new("cluster.local").unwrap(), "default", "sleep-2").unwrap();
    let minted = stolen
        .sign_leaf(
            mallory_key.public_key_spki(),
            &LeafParams::workload(mallory_id, Duration::from_secs(3600)),
            std::time::SystemTime::now() + Duration::from_secs(1),
        )
        .unwrap()
        .parse()
        .unwrap();
    let minted_chain = [minted, stolen.cert().clone()];
    let refused = wait_for(Duration::from_secs(10), "cluster-1's workload to refuse the minted leaf", || {
        ping(&rt, &target1, &minted_chain, &mallory_key, &root_file).err()
    });
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    // cluster-2's sample workloads renew under the new intermediate as soon as the CRL names
    // their issuer, without waiting for half their (24 h) leaf lifetime.
    let renewed = wait_for(Duration::from_secs(15), "cluster-2's workloads' leaves from the new intermediate", || {
        workloads(&topology, "cluster-2")
            .iter()
            .all(|(_, _, file)| certs(file).get(1).is_some_and(|i| i.serial_hex() == new_serial))
            .then(|| t0.elapsed())
    });
    eprintln!("revoke → cluster-2's workloads on the new intermediate: {renewed:?}");
    // Its workload CA signs with the new one (it polls cacerts every 200 ms). Between the CRL
    // and the new intermediate it signs nothing (UNAVAILABLE): never with the revoked one.
    wait_for(Duration::from_secs(10), "a cluster-2 leaf from the new intermediate", || {
        match try_leaf(&rt, &topology, d, "cluster-2", "new2") {
            Ok((_, issuer)) => {
                assert_ne!(issuer.serial_hex(), serial, "a leaf signed by the revoked intermediate");
                (issuer.serial_hex() == new_serial).then_some(())
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                None
            }
        }
    });

    // OpenSSL, with the CRLs from cluster-1's cacerts (its own and the root's) plus the old
    // intermediate's: the leaf under the revoked intermediate fails, the healthy one passes.
    let crl1 = cacerts(&topology, "cluster-1").join("ca-crl.pem");
    std::fs::write(
        d.join("all.crl"),
        [std::fs::read(&crl1).unwrap(), std::fs::read(d.join("old2-own.crl")).unwrap()].concat(),
    )
    .unwrap();
    let root = cluster(&topology, "cluster-1")["workload_ca"]["ca_file"].as_str().unwrap().to_string();
    let verify = |chain: &ChainFiles| {
        openssl(
            d,
            &[
                "verify",
                "-crl_check_all",
                "-CAfile",
                &root,
                "-untrusted",
                chain.middle.to_str().unwrap(),
                "-CRLfile",
                "all.crl",
                chain.leaf.to_str().unwrap(),
            ],
        )
    };
    let (ok, out) = verify(&old2);
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let (ok, out) = verify(&healthy1);
    assert!(ok && out.contains(": OK"), "{out}");
    // Every CRL in every cacerts verifies against its issuer in OpenSSL.
    for n in names {
        let dir = cacerts(&topology, n);
        let chain = valid_bundle(&dir).unwrap().signer().chain().to_vec();
        for (i, c) in crls(&dir).iter().enumerate() {
            let issuer = chain.iter().find(|ca| c.verify_signed_by(ca).is_ok()).unwrap();
            std::fs::write(d.join(format!("{n}-{i}.crl")), c.to_pem()).unwrap();
            std::fs::write(d.join(format!("{n}-{i}.pem")), issuer.to_pem()).unwrap();
            let out = openssl_ok(
                d,
                &["crl", "-in", &format!("{n}-{i}.crl"), "-CAfile", &format!("{n}-{i}.pem"), "-verify", "-noout"],
            );
            assert!(out.contains("verify OK"), "{n}: {out}");
        }
    }

    // Twice: nothing changes. An unknown serial and an unknown reason are refused clearly.
    let (ok, out, err) = run(&["revoke", "--cluster", "cluster-2", "--serial", &serial, "--credentials", creds]);
    assert!(ok && out.contains("was already revoked"), "{out}{err}");
    let (ok, _, err) = run(&["revoke", "--cluster", "cluster-2", "--serial", "0ABC", "--credentials", creds]);
    assert!(!ok && err.contains("NotFound") && err.contains("never issued to cluster cluster-2"), "{err}");
    let (ok, _, err) = run(&["revoke", "--cluster", "cluster-1", "--serial", &serial, "--credentials", creds]);
    assert!(!ok && err.contains("never issued to cluster cluster-1"), "another cluster's serial: {err}");
    let (ok, _, err) =
        run(&["revoke", "--cluster", "cluster-2", "--reason", "certificateHold", "--credentials", creds]);
    assert!(!ok && err.contains("unknown revocation reason"), "{err}");
    // Status shows the revocation.
    let (ok, out, err) = run(&["status", "-o", "json", "--credentials", creds]);
    assert!(ok, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    let c2 = status_cluster(&st, "cluster-2").unwrap();
    let rec = c2["issued"].as_array().unwrap().iter().find(|r| r["serial"] == serial.as_str()).unwrap();
    assert_eq!(rec["revoked"]["reason"], "keyCompromise", "{rec}");

    audit_log_records_each_action_once_and_names_tampering(d, &topology, creds, &serial, &new_serial);

    // With a 20 s CRL lifetime, both CRLs of cluster-3 (untouched by the revocation) are
    // re-signed at half of it (on their timers: nothing else changed), each before its nextUpdate.
    wait_for(Duration::from_secs(25), "cluster-3's CRLs re-signed", || {
        let now = std::time::SystemTime::now();
        let held = crls(&cacerts(&topology, "cluster-3"));
        let grown = held.len() == 2 && held.iter().zip(&first_numbers).all(|(c, n)| c.number() > *n);
        (grown && held.iter().all(|c| c.next_update() > now)).then_some(())
    });

    // Once the grace (20 s by default) after the revocation date is over, the leaf the revoked
    // intermediate signed before it is refused as revoked by the sample workloads' verifier; a
    // healthy cluster's leaf still passes.
    let (_, target3, _) = workloads(&topology, "cluster-3").remove(0);
    let healthy1_chain = [certs(&healthy1.leaf), certs(&healthy1.middle)].concat();
    let healthy1_key = PrivateKey::from_pem(&std::fs::read(d.join("healthy1.key")).unwrap()).unwrap();
    let refused = wait_for(Duration::from_secs(40), "the old cluster-2 leaf refused after the grace", || {
        ping(&rt, &target1, &old2_chain, &old2_key, &root_file).err()
    });
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    let answer = ping(&rt, &target3, &healthy1_chain, &healthy1_key, &root_file).unwrap();
    assert!(answer.starts_with("pong"), "{answer}");

    // Healthy workloads kept working throughout.
    let status = proc.wait_exit(Duration::from_secs(120).saturating_sub(started.elapsed()));
    let log = std::fs::read_to_string(d.join("up").join("meshca-up.log")).unwrap_or_default();
    assert!(status.success(), "meshca up failed ({status}):\n{}\n{log}", proc.log_text());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("up").join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 100, "{summary:#}");
    let c2 = summary["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "cluster-2").unwrap();
    assert!(c2["workload_issuers"].as_array().unwrap().iter().all(|s| *s == new_serial.as_str()), "{summary:#}");
}
