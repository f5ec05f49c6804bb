//! Vault mode end to end, against a real HashiCorp Vault started by the test (docs/peers.md):
//! two clusters whose intermediates Vault signs, cross-cluster mTLS through rotations, the
//! `csrPath` flow, a search of every file for the intermediate keys, and `ca-crl.pem` carrying
//! Vault's own CRL, following a revocation made in Vault, with an alert while it cannot be read.
#![allow(clippy::unwrap_used)]

mod common;
mod vault_support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::{Mgmt, json_file, openssl_verify_cacerts, valid_bundle, wait_until, write_secret};
use vault_support::{Storage, Vault, files_holding, key_needles, per_cluster, up_vault, up_vault_with, vault_policy};

fn rotations(status: &serde_json::Value) -> Vec<u64> {
    per_cluster(status, "intermediate_rotations")
}

/// `meshca up --ca vault`: two clusters, each a Vault agent (in process) writing `cacerts` to a
/// tmpfs folder and a workload CA serving from it, with workloads calling across clusters.
/// The agents log in with a child token holding only the minimal signer policy, so the
/// pre-flight checks are proven to work without privileges. While it runs: at least two
/// rotations per cluster, `openssl verify` of each cluster's `cacerts`, and every intermediate
/// key seen is searched for in every file under the test's folder (Vault's, the management
/// plane's store, the clusters' stores, logs) and the memory folders — found only in the latter.
/// After it stops: zero failed handshakes, the memory folders are gone, and so are the keys.
#[test]
fn two_clusters_in_vault_mode_rotate_without_a_failed_handshake_and_keys_stay_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    let token = vault.child_token(&["meshca-signer"], "2h");
    let token_file = dir.join("vault-token");
    write_secret(&token_file, &token);

    let shm = vault_support::ShmDir::new("e2e");
    let up_dir = dir.join("up");
    let mut up = up_vault(dir, &vault, &token_file, &shm, &up_dir, ("30s", "0.5", "100ms"));
    // The memory folders, once `up` made them.
    let mut memdirs: Vec<PathBuf> = Vec::new();
    wait_until(Duration::from_secs(90), "both clusters' cacerts in memory", || {
        memdirs = std::fs::read_dir(&shm.0)
            .into_iter()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.unwrap().path()).into_iter().flatten())
            .map(|e| e.unwrap().path())
            .collect();
        memdirs.sort();
        memdirs.len() == 2 && memdirs.iter().all(|d| valid_bundle(d).is_ok())
    });
    // Collect every intermediate key while the clusters rotate at least twice each.
    let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
    let status = up_dir.join("status.json");
    wait_until(Duration::from_secs(150), "two rotations in each cluster", || {
        for d in &memdirs {
            if let Ok(k) = std::fs::read(d.join("ca-key.pem")) {
                keys.insert(k);
            }
        }
        let r = json_file(&status).map(|s| rotations(&s)).unwrap_or_default();
        r.len() == 2 && r.iter().all(|n| *n >= 2)
    });
    assert!(keys.len() >= 6, "{} distinct intermediate keys seen", keys.len());
    let live = json_file(&status).unwrap();
    assert_eq!(live["handshakes_failed"], 0, "{live}");

    for d in &memdirs {
        openssl_verify_cacerts(d);
        assert_eq!(vault_support::memdir_backing(d), "tmpfs");
    }
    // `meshca status` shows the clusters' keys "in memory".
    let (ok, out, err) = common::run(&["status", "--credentials", up_dir.join("mgmt/operator").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("CA mode vault") && out.matches("in memory").count() == 2, "{out}");

    // Where are the keys? Only in the memory folders.
    let needles: Vec<Vec<u8>> = keys.iter().flat_map(|k| key_needles(k)).collect();
    let holders = files_holding(&[dir, &shm.0], &needles);
    assert!(!holders.is_empty(), "the search must find the current keys in the memory folders");
    for h in &holders {
        assert!(h.starts_with(&shm.0), "an intermediate key was found outside the memory folders: {}", h.display());
    }
    // ... and never the Vault token in meshca's own files (its logs, stores, status).
    let leaked = files_holding(&[&up_dir, &shm.0], &[token.as_bytes().to_vec()]);
    assert!(leaked.is_empty(), "the Vault token leaked into {leaked:?}");

    // Stop (SIGTERM, like Ctrl-C): the summary, no failed handshake, the memory folders gone.
    up.signal("TERM");
    up.wait_exit(Duration::from_secs(30));
    let summary = json_file(&up_dir.join("summary.json")).unwrap_or_else(|| panic!("no summary:\n{}", up.log_text()));
    assert_eq!(summary["handshakes_failed"], 0, "{summary}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 100, "{summary}");
    assert!(rotations(&summary).iter().all(|n| *n >= 2), "{summary}");
    assert!(std::fs::read_dir(&shm.0).unwrap().next().is_none(), "up removes its memory folders");
    let holders = files_holding(&[dir, &shm.0], &needles);
    assert!(holders.is_empty(), "after the run, intermediate keys remain in {holders:?}");
}

/// Vault mode's `ca-crl.pem`: the cluster's own CRL and the CRL Vault's PKI publishes for the
/// issuer (`pki/issuer/default/crl`), which OpenSSL verifies against Vault's root; a revocation
/// made in Vault (`pki/revoke`) reaches `ca-crl.pem` within half the CRL lifetime, and the
/// cluster replaces the revoked intermediate at once; no handshake fails.
#[test]
fn vault_mode_ca_crl_pem_carries_vaults_crl_and_follows_a_revocation_made_in_vault() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    let token = vault.child_token(&["meshca-signer"], "2h");
    let token_file = dir.join("vault-token");
    write_secret(&token_file, &token);
    let shm = vault_support::ShmDir::new("crl");
    let up_dir = dir.join("up");
    let timing = ("1h", "0.2", "200ms");
    let mut up = up_vault_with(dir, &vault, &token_file, &shm, &up_dir, timing, &["--crl-ttl", "20s"]);
    let crls = |d: &PathBuf| {
        std::fs::read(d.join("ca-crl.pem")).map(|p| meshca_pki::Crl::parse_pem_bundle(&p).unwrap()).unwrap_or_default()
    };
    let mut memdirs: Vec<PathBuf> = Vec::new();
    wait_until(Duration::from_secs(90), "both clusters' cacerts with a ca-crl.pem covering the chain", || {
        memdirs = std::fs::read_dir(&shm.0)
            .into_iter()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.unwrap().path()).into_iter().flatten())
            .map(|e| e.unwrap().path())
            .collect();
        memdirs.sort();
        memdirs.len() == 2
            && memdirs.iter().all(|d| {
                valid_bundle(d)
                    .is_ok_and(|b| meshca_pki::crl::check_chain_coverage(&crls(d), b.signer().chain()).is_ok())
            })
    });
    let d = &memdirs[0];
    let bundle = valid_bundle(d).unwrap();
    let root = bundle.signer().root().clone();
    let vault_crl = crls(d).into_iter().find(|c| c.verify_signed_by(&root).is_ok()).expect("Vault's CRL");
    std::fs::write(dir.join("vault.crl"), vault_crl.to_pem()).unwrap();
    std::fs::write(dir.join("vault-root.pem"), root.to_pem()).unwrap();
    let out = common::openssl_ok(dir, &["crl", "-in", "vault.crl", "-CAfile", "vault-root.pem", "-verify", "-noout"]);
    assert!(out.contains("verify OK"), "{out}");

    // Revoke the cluster's intermediate in Vault itself.
    let serial = bundle.ca_cert().serial_hex();
    // Vault names a serial by the integer's bytes, without the zero byte DER puts in front of a
    // serial whose top bit is set (half of all random serials): "95:ff:…", not "00:95:ff:…".
    let magnitude = serial.trim_start_matches("00");
    let colons: Vec<String> =
        magnitude.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).to_lowercase()).collect();
    vault.ok("POST", "pki/revoke", serde_json::json!({ "serial_number": colons.join(":") }));
    wait_until(Duration::from_secs(30), "ca-crl.pem to carry Vault's CRL naming the serial", || {
        crls(d).iter().any(|c| c.lists(&serial) && c.verify_signed_by(&root).is_ok())
    });
    wait_until(Duration::from_secs(30), "a new intermediate in place of the revoked one", || {
        valid_bundle(d).is_ok_and(|b| b.ca_cert().serial_hex() != serial)
    });

    // Vault's CRL cannot be read (Vault hung: SIGSTOP): at the next read (every half CRL
    // lifetime, 10 s) each agent reports it and the management plane raises an
    // UpstreamCrlUnavailable alert naming the cluster; once Vault answers again it clears.
    let creds = up_dir.join("mgmt").join("operator");
    let crl_alerts = || -> BTreeSet<String> {
        let (ok, out, err) = common::run(&["status", "-o", "json", "--credentials", creds.to_str().unwrap()]);
        assert!(ok, "{err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        st["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "UpstreamCrlUnavailable")
            .map(|a| a["cluster"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(crl_alerts().is_empty(), "no alert while Vault's CRL is read");
    vault.signal("STOP");
    wait_until(Duration::from_secs(60), "an UpstreamCrlUnavailable alert for both clusters", || {
        crl_alerts() == BTreeSet::from(["cluster-1".to_string(), "cluster-2".to_string()])
    });
    vault.signal("CONT");
    wait_until(Duration::from_secs(40), "the alerts cleared once Vault answers", || crl_alerts().is_empty());
    up.signal("TERM");
    up.wait_exit(Duration::from_secs(30));
    let summary = json_file(&up_dir.join("summary.json")).unwrap_or_else(|| panic!("no summary:\n{}", up.log_text()));
    assert_eq!(summary["handshakes_failed"], 0, "{summary}");
}

/// The `csrPath` flow: Vault generates the key (`pki_int/intermediate/generate/exported`) and
/// the root mount signs its CSR; over TLS (`-dev-tls`, the policy's `tls.caFile`) and AppRole.
#[test]
fn vault_generates_the_key_when_the_policy_has_a_csr_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::start(&dir.join("vault"), Storage::DevTls);
    vault.pki_root("pki", "87600h", "ec", 256);
    vault.pki_mount("pki_int", "87600h");
    vault.signer_policy("meshca-signer", "pki", Some("pki_int"));
    let (role_id, secret_id) = vault.approle("meshca", &["meshca-signer"], "1h");
    let sid = dir.join("secret-id");
    write_secret(&sid, &secret_id);
    let policy = vault_policy(
        dir,
        &format!(
            "server: '{}', caPath: pki/root/sign-intermediate, csrPath: pki_int/intermediate/generate/exported, \
             tls: {{ caFile: '{}' }}, auth: {{ appRole: {{ roleId: '{role_id}', secretIdFile: '{}' }} }}",
            vault.addr,
            vault.ca.as_ref().unwrap().display(),
            sid.display()
        ),
        "1h",
        0.2,
        "ecdsa-p256",
    );
    let m = Mgmt::start(dir, &["--policy", policy.to_str().unwrap()]);
    let (token, relay) = m.add_cluster(dir, "c1");
    let shm = vault_support::ShmDir::new("csr");
    let mem = shm.0.join("cacerts");
    let agent = vault_support::vault_agent(dir, &m, "c1", &mem, Some((&token, &relay)), &[]);
    wait_until(Duration::from_secs(60), "cacerts from the csrPath flow", || valid_bundle(&mem).is_ok());
    openssl_verify_cacerts(&mem);
    let log = vault_support::plain(&agent.log_text());
    assert!(log.contains("generated by Vault") && log.contains("method=AppRole"), "{log}");

    // The key is the one Vault generated for this intermediate, the profile is meshca's.
    let bundle = valid_bundle(&mem).unwrap();
    let cert = bundle.ca_cert();
    assert_eq!(cert.subject(), "CN=meshca intermediate,O=meshca,L=c1");
    assert_eq!(cert.uri_sans(), ["spiffe://cluster.local"]);
    assert_eq!(cert.path_len(), Some(0));
    // The policy's lifetime (1h), not the mount's default.
    let left = cert.not_after().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600), "{left:?}");
    let (ok, text) = common::openssl(&mem, &["x509", "-in", "ca-cert.pem", "-noout", "-ext", "keyUsage"]);
    assert!(ok && text.contains("Digital Signature, Certificate Sign, CRL Sign"), "{text}");

    // Status: the cluster with its key in memory.
    wait_until(Duration::from_secs(20), "status in memory", || {
        let st = m.status_json();
        st.to_string().contains("\"memory\"") && st.to_string().contains(&cert.serial_hex())
    });
    // The key is nowhere but in the memory folder (Vault keeps its copy in its own memory:
    // this dev server has no storage on disk).
    let key = std::fs::read(mem.join("ca-key.pem")).unwrap();
    let holders = files_holding(&[dir, &shm.0], &key_needles(&key));
    assert!(!holders.is_empty() && holders.iter().all(|h| h.starts_with(&shm.0)), "{holders:?}");
}
