//! Root rotation in Vault mode (option 4), end to end against a real HashiCorp Vault (started by
//! the test, docs/peers.md) with two PKI mounts, each with its own root: `meshca up --ca vault`
//! (two clusters, each a Vault agent keeping `cacerts` in a memory folder, sample workloads
//! calling across clusters) runs on mount `pki`; the operator points the policy at `pki2`
//! (`meshca policy apply`). The management plane reads the new mount's root from Vault, and the
//! whole rotation runs: Vault signs under `pki` while every cluster learns {A, B}, then under
//! `pki2`, then A is dropped — with the barrier kept and not one failed handshake.
#![allow(clippy::unwrap_used)]

mod common;
mod vault_support;

use std::time::Duration;

use common::rotation::*;
use common::*;
use meshca_pki::Cert;
use meshca_testsupport::rotation::{check_barrier, root_set_history};
use vault_support::{ShmDir, Storage, Vault, up_vault};

#[test]
fn pointing_the_policy_at_a_vault_mount_with_another_root_runs_the_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    let b_pem = vault.pki_root("pki2", "87600h", "ec", 256);
    vault.signer_policy("meshca-signer-2", "pki2", None);
    let token = vault.child_token(&["meshca-signer", "meshca-signer-2"], "2h");
    let token_file = dir.join("vault-token");
    write_secret(&token_file, &token);
    let shm = ShmDir::new("rotation");
    let up_dir = dir.join("up");
    let mut proc = up_vault(dir, &vault, &token_file, &shm, &up_dir, ("1h", "0.5", "250ms"));
    let topology = wait_for(Duration::from_secs(90), "topology.json", || {
        proc.assert_running();
        json_file(&up_dir.join("topology.json"))
    });
    let creds = topology["management_plane"]["credentials"].as_str().unwrap().to_string();
    let clusters: Vec<String> =
        topology["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    let log = CacertsLog::start(&topology);
    wait_until(Duration::from_secs(60), "every cluster's cacerts", || clusters.iter().all(|c| log.latest(c).is_some()));
    let a = log.latest(&clusters[0]).unwrap().roots[0].clone();
    let b = Cert::from_pem(b_pem.as_bytes()).unwrap().fingerprint();
    assert_ne!(a, b);
    // The management plane has read pki's root: status knows the root set in Vault mode too.
    wait_until(Duration::from_secs(60), "the established root in status", || {
        status(&creds)["roots"].as_array().unwrap().iter().any(|r| r["fingerprint"] == a.as_str())
    });

    // The policy `meshca up` runs on, pointed at pki2.
    let policy = write_file(
        dir,
        "policy-pki2.yaml",
        &format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  trustDomain: cluster.local\n  config:\n    vault: {{ server: '{}', caPath: pki2/root/sign-intermediate, auth: {{ token: {{ tokenFile: '{}' }} }} }}\n  intermediateCertOptions: {{ ttl: 1h, secretRotationGracePeriodRatio: 0.5 }}\n  rootRotation: {{ maxLeafLifetime: 12s, skew: 5s }}\n",
            vault.addr,
            std::path::absolute(&token_file).unwrap().display()
        ),
    );
    let (ok, out, err) = run(&["policy", "apply", policy.to_str().unwrap(), "--credentials", &creds]);
    let up_log = || std::fs::read_to_string(up_dir.join("meshca-up.log")).unwrap_or_default();
    assert!(ok, "{out}{err}\n{}", up_log());
    let st = wait_for(Duration::from_secs(60), "the rotation to start", || {
        let st = status(&creds);
        (phase(&st) != "Idle").then_some(st)
    });
    assert_eq!(st["rootRotation"]["trigger"], "policy");
    assert_eq!(st["rootRotation"]["to"]["fingerprint"], b.as_str(), "pki2's root, read from Vault");
    wait_until(ROTATION, "the rotation to complete", || {
        phase(&status(&creds)) == "Idle"
            && clusters.iter().all(|c| log.latest(c).is_some_and(|h| h.roots == [b.clone()]))
    });
    check_barrier(&log.held(), &clusters, &a, &b);
    for (cluster, h) in root_set_history(&log.held(), &a, &b) {
        assert_eq!(h, ["A", "AB", "B"], "{cluster}");
    }
    for c in topology["clusters"].as_array().unwrap() {
        let mem = std::path::Path::new(c["cacerts_dir"].as_str().unwrap());
        openssl_verify_cacerts(mem);
        assert_eq!(vault_support::memdir_backing(mem), "tmpfs", "the key stayed in memory throughout");
    }
    stop_and_check(proc, &up_dir);
}

const ROTATION: Duration = Duration::from_secs(360);
