//! Vault mode under faults, against a real HashiCorp Vault: Vault down for longer than a
//! renewal interval, a revoked token, token renewal and its max TTL, wrong AppRole credentials,
//! a `cacerts` folder on disk, and the pre-flight checks.
#![allow(clippy::unwrap_used)]

mod common;
mod vault_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Mgmt, Proc, json_file, valid_bundle, wait_until, write_secret};
use vault_support::{
    ShmDir, Storage, Vault, is_failed_attempt, per_cluster, plain, up_vault, vault_agent, vault_policy,
};

/// A Vault-mode policy signing at `pki/root/sign-intermediate`, logging in with the token in
/// `token_file`; P-256 intermediates of 1 h.
fn token_file_policy(dir: &Path, vault: &Vault, token_file: &Path) -> PathBuf {
    vault_policy(
        dir,
        &format!(
            "server: '{}', caPath: pki/root/sign-intermediate, auth: {{ token: {{ tokenFile: '{}' }} }}",
            vault.addr,
            token_file.display()
        ),
        "1h",
        0.2,
        "ecdsa-p256",
    )
}

/// Waits until every cluster has rotated at least once more than `since`; returns the counts.
fn wait_rotated(status: &Path, since: &[u64], timeout: Duration, what: &str) -> Vec<u64> {
    let mut now = Vec::new();
    wait_until(timeout, what, || {
        now = json_file(status).map(|s| per_cluster(&s, "intermediate_rotations")).unwrap_or_default();
        now.len() == since.len() && now.iter().zip(since).all(|(n, s)| n > s)
    });
    now
}

/// `retry_in=…` of the agent's failed attempts (its debug lines), in seconds, in log order.
fn retry_delays(log: &str) -> Vec<(i32, f64)> {
    plain(log)
        .lines()
        .filter(|l| is_failed_attempt(l))
        .filter_map(|l| {
            let attempts = l.split("attempts=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            let v = l.split("retry_in=").nth(1)?.split_whitespace().next()?;
            let secs = if let Some(ms) = v.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|x| x / 1000.0)
            } else {
                v.strip_suffix('s')?.parse().ok()
            }?;
            Some((attempts, secs))
        })
        .collect()
}

/// Vault stopped for longer than a renewal interval, twice, in the two ways Vault can be down:
///
/// 1. **hung** — `SIGSTOP`: the kernel still accepts connections and nothing answers, so every
///    call must end by meshca's own timeout; `SIGCONT` resumes it;
/// 2. **gone** — the process killed (connection refused) and started again on the same port
///    with the same data. A dev server keeps everything in memory and would come back without
///    the PKI mount and the token, so this Vault is a real server with **file storage**,
///    initialised and unsealed by the test, and unsealed again after the restart.
///
/// Intermediates live 60 s and renew when 60 % is left (every ~24 s); each outage starts just
/// after both clusters rotated and lasts until the agents have failed to renew (a renewal falls
/// due ~24 s in, while the current intermediate still has ~36 s left). Throughout: zero failed
/// handshakes, and the workload CAs keep issuing leaves from the current intermediate; during the
/// outage no rotation happens and the agents retry with growing backoff; after it, both clusters
/// rotate again. The backoff rules themselves are unit-tested on a manual clock
/// (`meshca_agent::runner`); this test shows them against the real Vault.
#[test]
fn vault_down_longer_than_a_renewal_interval_keeps_serving_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut vault = Vault::with_signer(dir, Storage::File);
    let token_file = dir.join("vault-token");
    write_secret(&token_file, &vault.child_token(&["meshca-signer"], "4h"));
    let shm = ShmDir::new("outage");
    let up_dir = dir.join("up");
    let mut up = up_vault(dir, &vault, &token_file, &shm, &up_dir, ("60s", "0.6", "200ms"));
    let status = up_dir.join("status.json");
    wait_until(Duration::from_secs(90), "the topology to run", || json_file(&status).is_some());
    let mut rotations = per_cluster(&json_file(&status).unwrap(), "intermediate_rotations");

    let log = || plain(&std::fs::read_to_string(up_dir.join("meshca-up.log")).unwrap_or_default());
    // Failed attempts whose error contains `marker`.
    let failures = |marker: &str| log().lines().filter(|l| is_failed_attempt(l) && l.contains(marker)).count();
    // Vault stays down until the agents have noticed it (`attempts` failed attempts naming
    // `marker`), not for a fixed time: a renewal falls due ~24 s into the outage.
    let outage = |what: &str,
                  marker: &str,
                  attempts: usize,
                  rotations: &mut Vec<u64>,
                  down: &mut dyn FnMut(),
                  up_again: &mut dyn FnMut()| {
        // Start right after both clusters rotated.
        *rotations = wait_rotated(&status, rotations, Duration::from_secs(60), &format!("a rotation before {what}"));
        let before = json_file(&status).unwrap();
        let seen = failures(marker);
        let t0 = Instant::now();
        down();
        wait_until(Duration::from_secs(55), &format!("{what}: {attempts} failed attempts ({marker})"), || {
            failures(marker) >= seen + attempts
        });
        let during = json_file(&status).unwrap();
        assert_eq!(during["handshakes_failed"], 0, "{what}: {during}");
        assert_eq!(
            per_cluster(&during, "intermediate_rotations"),
            *rotations,
            "{what}: nothing rotates while Vault is down"
        );
        let leaves = |s: &serde_json::Value| per_cluster(s, "leaves_issued");
        assert!(
            leaves(&during).iter().zip(leaves(&before)).all(|(d, b)| *d >= b + 2),
            "{what}: the workload CAs keep issuing leaves from the current intermediate: {before} -> {during}"
        );
        up_again();
        *rotations = wait_rotated(&status, rotations, Duration::from_secs(40), &format!("recovery after {what}"));
        eprintln!("{what}: down for {:?} in all, recovered", t0.elapsed());
    };

    let pid = vault.pid();
    let signal = |sig: &str| common::signal(pid, sig);
    // The hung Vault is noticed by meshca's own timeout.
    outage(
        "Vault hung (SIGSTOP)",
        "is unreachable: no answer from 127.0.0.1",
        1,
        &mut rotations,
        &mut || signal("STOP"),
        &mut || signal("CONT"),
    );

    let vault_cell = std::cell::RefCell::new(&mut vault);
    outage(
        "Vault stopped and restarted (file storage)",
        "Connection refused",
        4,
        &mut rotations,
        &mut || vault_cell.borrow_mut().kill(),
        &mut || vault_cell.borrow_mut().restart(),
    );
    let log = log();
    assert!(log.contains("keeping the current cacerts (valid until"), "{log}");
    let delays = retry_delays(&log);
    assert!(delays.len() >= 4, "retries: {delays:?}");
    // The delays are the ones the agent computed and logged (not measured), with the attempts in
    // a row each follows. Both clusters fail at once, so which cluster's attempt is which depends
    // on timing; what holds whatever the timing and the jitter (×[0.5, 1)) is that the delay
    // doubles with each attempt: below the cap, delay / 2^(attempts-1) stays within one factor
    // of two. The exact schedule is shown on the manual clock in crates/agent/tests/lifecycle.rs.
    assert!(delays.iter().any(|(a, _)| *a >= 2), "some cluster failed twice in a row: {delays:?}");
    let per_attempt: Vec<f64> =
        delays.iter().filter(|(a, _)| (1..=3).contains(a)).map(|(a, d)| d / 2f64.powi(a - 1)).collect();
    let (min, max) = per_attempt.iter().fold((f64::MAX, 0f64), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
    assert!(max < 2.0 * min, "the delay doubles with each attempt: {delays:?}");
    assert!(delays.iter().all(|(_, d)| *d <= 5.0), "backoff is capped (up: 5 s): {delays:?}");

    up.signal("TERM");
    up.wait_exit(Duration::from_secs(30));
    let summary = json_file(&up_dir.join("summary.json")).unwrap_or_else(|| panic!("no summary:\n{}", up.log_text()));
    assert_eq!(summary["handshakes_failed"], 0, "{summary}");
}

/// Registers `cluster` and starts its Vault agent; returns (agent, memory folder).
fn agent_for(dir: &Path, m: &Mgmt, shm: &ShmDir, cluster: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let (token, relay) = m.add_cluster(dir, cluster);
    let mem = shm.0.join(cluster);
    (vault_agent(dir, m, cluster, &mem, Some((&token, &relay)), extra), mem)
}

fn approle_policy(dir: &Path, vault: &Vault, role_id: &str, secret_id_file: &Path, ttl: &str) -> PathBuf {
    vault_policy(
        dir,
        &format!(
            "server: '{}', caPath: pki/root/sign-intermediate, auth: {{ appRole: {{ roleId: '{role_id}', secretIdFile: '{}' }} }}",
            vault.addr,
            secret_id_file.display()
        ),
        ttl,
        0.2,
        "ecdsa-p256",
    )
}

/// A token revoked behind the agent's back: the next request is refused (403), the agent logs
/// in again with AppRole and carries on.
#[test]
fn a_revoked_token_is_replaced_by_a_fresh_approle_login() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    let (role_id, secret_id) = vault.approle("meshca", &["meshca-signer"], "1h");
    let sid = dir.join("secret-id");
    write_secret(&sid, &secret_id);
    let m = Mgmt::start(dir, &["--policy", approle_policy(dir, &vault, &role_id, &sid, "1h").to_str().unwrap()]);
    let shm = ShmDir::new("revoke");
    let (agent, mem) = agent_for(dir, &m, &shm, "c1", &[]);
    wait_until(Duration::from_secs(60), "the first cacerts", || valid_bundle(&mem).is_ok());
    let first = valid_bundle(&mem).unwrap().ca_cert().serial_hex();

    // Revoke every token AppRole issued (the agent's).
    vault.ok("PUT", "sys/leases/revoke-prefix/auth/approle/login", serde_json::json!({}));
    let (ok, out, err) = common::run(&["rotate", "c1", "--credentials", &m.creds()]);
    assert!(ok, "{out}{err}");
    wait_until(Duration::from_secs(30), "a new intermediate after the revocation", || {
        valid_bundle(&mem).is_ok_and(|b| b.ca_cert().serial_hex() != first)
    });
    let log = plain(&agent.log_text());
    assert!(log.contains("invalid token"), "{log}");
    assert!(log.contains("Vault refused the token (revoked or expired); logging in afresh"), "{log}");
    assert_eq!(log.matches("logged in to Vault").count(), 2, "{log}");
    assert!(!log.contains(&secret_id) && !log.contains(&role_id), "a credential is in the log");
}

/// A token is renewed at about half its lease (`auth/token/renew-self`), and replaced by a fresh
/// login when Vault caps the renewal at the role's `token_max_ttl`, or when renewal fails.
#[test]
fn the_token_is_renewed_at_half_its_lease_and_replaced_at_its_max_ttl_or_on_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    let _ = vault.api("POST", "sys/auth/approle", Some(serde_json::json!({"type": "approle"})));
    vault.ok(
        "POST",
        "auth/approle/role/short",
        serde_json::json!({"token_policies": ["meshca-signer"], "token_ttl": "10s", "token_max_ttl": "26s"}),
    );
    let role_id = vault.ok("GET", "auth/approle/role/short/role-id", serde_json::Value::Null)["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = vault.ok("POST", "auth/approle/role/short/secret-id", serde_json::json!({}))["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let sid = dir.join("secret-id");
    write_secret(&sid, &secret_id);
    let m = Mgmt::start(dir, &["--policy", approle_policy(dir, &vault, &role_id, &sid, "1h").to_str().unwrap()]);
    let shm = ShmDir::new("renew");
    let (agent, mem) = agent_for(dir, &m, &shm, "c1", &[]);
    wait_until(Duration::from_secs(60), "the first cacerts", || valid_bundle(&mem).is_ok());
    let first = valid_bundle(&mem).unwrap().ca_cert().serial_hex();

    // Past the first lease (10 s), the same login still signs: it was renewed.
    wait_until(Duration::from_secs(30), "two renewals", || {
        plain(&agent.log_text()).matches("Vault token renewed").count() >= 2
    });
    let (ok, _, err) = common::run(&["rotate", "c1", "--credentials", &m.creds()]);
    assert!(ok, "{err}");
    wait_until(Duration::from_secs(30), "a rotation on the renewed token", || {
        valid_bundle(&mem).is_ok_and(|b| b.ca_cert().serial_hex() != first)
    });
    let log = plain(&agent.log_text());
    assert_eq!(log.matches("logged in to Vault").count(), 1, "{log}");
    assert!(log.contains("lease_seconds=10"), "{log}");

    // Vault caps renewals at token_max_ttl (26 s): then a fresh login, before the token dies.
    wait_until(Duration::from_secs(40), "a fresh login at the max TTL", || {
        let log = plain(&agent.log_text());
        log.contains("reached its maximum lifetime; logging in afresh")
            && log.matches("logged in to Vault").count() == 2
    });
    assert!(!plain(&agent.log_text()).contains("WARN"), "no failure on the way:\n{}", agent.log_text());

    // A renewal that fails (the token was revoked in between): a fresh login right away.
    vault.ok("PUT", "sys/leases/revoke-prefix/auth/approle/login", serde_json::json!({}));
    wait_until(Duration::from_secs(20), "a fresh login after a failed renewal", || {
        let log = plain(&agent.log_text());
        log.contains("renewing the Vault token failed; logging in afresh")
            && log.matches("logged in to Vault").count() == 3
    });
    assert!(!agent.log_text().contains(&secret_id), "a credential is in the log");
}

/// Wrong AppRole credentials: the error names the auth method and its mount, never the role ID
/// or the secret ID; it reaches the status; the agent keeps retrying (and writes nothing).
#[test]
fn a_wrong_secret_id_or_role_id_is_a_clear_error_without_the_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::with_signer(dir, Storage::Dev);
    vault.ok("POST", "sys/auth/approle-mesh", serde_json::json!({"type": "approle"}));
    vault.ok("POST", "auth/approle-mesh/role/meshca", serde_json::json!({"token_policies": ["meshca-signer"]}));
    let role_id = vault.ok("GET", "auth/approle-mesh/role/meshca/role-id", serde_json::Value::Null)["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id =
        vault.ok("POST", "auth/approle-mesh/role/meshca/secret-id", serde_json::json!({}))["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
    let good_sid = dir.join("secret-id");
    write_secret(&good_sid, &secret_id);
    let wrong_secret = "0f0f0f0f-wrong-secret-id-0f0f0f0f";
    let bad_sid = dir.join("bad-secret-id");
    write_secret(&bad_sid, wrong_secret);
    let wrong_role = "12341234-wrong-role-id-43214321";
    let policy = vault_policy(
        dir,
        &format!(
            "server: '{}', caPath: pki/root/sign-intermediate, auth: {{ appRole: {{ mountPath: approle-mesh, roleId: '{role_id}', secretIdFile: '{}' }} }}",
            vault.addr,
            good_sid.display()
        ),
        "1h",
        0.2,
        "ecdsa-p256",
    );
    let m = Mgmt::start(dir, &["--policy", policy.to_str().unwrap()]);
    let shm = ShmDir::new("wrong");
    let cases = [("c1", role_id.as_str(), bad_sid.as_path()), ("c2", wrong_role, good_sid.as_path())];
    let mut agents = Vec::new();
    for (cluster, role, sid) in cases {
        let extra = [
            "--vault-approle-mount",
            "approle-mesh",
            "--vault-approle-role-id",
            role,
            "--vault-approle-secret-id-file",
            sid.to_str().unwrap(),
        ];
        agents.push(agent_for(dir, &m, &shm, cluster, &extra));
    }
    let want = "Vault AppRole login at auth/approle-mesh failed (HTTP 400): invalid role or secret ID";
    for (agent, mem) in &agents {
        wait_until(Duration::from_secs(30), "two failed attempts", || {
            plain(&agent.log_text()).matches(want).count() >= 2
        });
        let log = agent.log_text();
        for secret in [wrong_secret, &secret_id, wrong_role, &role_id] {
            assert!(!log.contains(secret), "a credential is in the log:\n{log}");
        }
        assert!(valid_bundle(mem).is_err(), "nothing is written");
    }
    wait_until(Duration::from_secs(20), "the errors in the status", || {
        let st = m.status_json().to_string();
        st.matches("auth/approle-mesh failed").count() == 2
    });
    let st = m.status_json().to_string();
    for secret in [wrong_secret, &secret_id, wrong_role, &role_id] {
        assert!(!st.contains(secret), "a credential is in the status");
    }
}

/// A disk-backed folder for the key, found on this machine (the test's temp folder may itself
/// be tmpfs on some systems).
fn disk_dir() -> PathBuf {
    for base in [env!("CARGO_TARGET_TMPDIR"), "/var/tmp", "/tmp"] {
        let b = Path::new(base);
        if meshca_vault::memdir::backing(b).is_ok_and(|k| !k.is_memory()) {
            return tempfile::tempdir_in(b).unwrap().keep();
        }
    }
    panic!("no disk-backed folder to test the refusal with");
}

/// `--memory-dir` on a disk-backed filesystem: refused before anything else happens, unless
/// `--allow-disk-key`, which warns and works.
#[test]
fn a_memory_dir_on_disk_is_refused_unless_explicitly_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk = disk_dir();
    let mem = disk.join("cacerts");
    let (ok, out, err) = common::run(&[
        "vault-agent",
        "--cluster",
        "c1",
        "--server",
        "127.0.0.1:1",
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--memory-dir",
        mem.to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(err.contains("not tmpfs or ramfs") && err.contains("--allow-disk-key"), "{err}");
    assert!(!dir.join("state").exists(), "refused before anything else");

    let vault = Vault::start(&dir.join("vault"), Storage::Dev);
    vault.pki_root("pki", "87600h", "ec", 256);
    let tf = dir.join("vault-token");
    write_secret(&tf, &vault.root_token);
    let policy = token_file_policy(dir, &vault, &tf);
    let m = Mgmt::start(dir, &["--policy", policy.to_str().unwrap()]);
    let (token, relay) = m.add_cluster(dir, "c1");
    let agent = vault_agent(dir, &m, "c1", &mem, Some((&token, &relay)), &["--allow-disk-key"]);
    wait_until(Duration::from_secs(60), "cacerts on disk, allowed", || valid_bundle(&mem).is_ok());
    assert!(
        plain(&agent.log_text()).contains(
            "--allow-disk-key: the cluster intermediate's private key will be written to a disk-backed folder"
        )
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&disk);
}

/// The pre-flight checks, each with its own cluster: a mount that does not exist, a TTL above
/// the mount's max lease TTL (which Vault would silently cap), and an RSA root for EC
/// intermediates. Each error says what to change; nothing is signed.
#[test]
fn preflight_errors_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vault = Vault::start(&dir.join("vault"), Storage::Dev);
    vault.pki_root("pki_short", "30m", "ec", 256);
    vault.pki_root("pki_rsa", "87600h", "rsa", 2048);
    let hcl = "path \"+/root/sign-intermediate\" { capabilities = [\"update\"] }\n\
               path \"auth/token/lookup-self\" { capabilities = [\"read\"] }\n";
    vault.ok("PUT", "sys/policies/acl/signer-any", serde_json::json!({ "policy": hcl }));
    let tf = dir.join("vault-token");
    let token = vault.child_token(&["signer-any"], "1h");
    write_secret(&tf, &token);
    let policy = token_file_policy(dir, &vault, &tf);
    let m = Mgmt::start(dir, &["--policy", policy.to_str().unwrap()]);
    let shm = ShmDir::new("preflight");
    let cases = [
        ("c1", "nope/root/sign-intermediate", "there is no secrets engine mounted at nope/"),
        (
            "c2",
            "pki_short/root/sign-intermediate",
            "the intermediate TTL 1h (spec.intermediateCertOptions.ttl) is longer than the max lease TTL 1800s of the PKI mount pki_short/; Vault would silently cap it",
        ),
        (
            "c3",
            "pki_rsa/root/sign-intermediate",
            "key type mismatch: the issuing CA CN=pki_rsa test root,O=meshca has a RSA 2048 key, but spec.intermediateCertOptions.keyAlgorithm asks for ecdsa-p256 intermediates",
        ),
    ];
    let agents: Vec<_> =
        cases.iter().map(|(c, path, _)| agent_for(dir, &m, &shm, c, &["--vault-ca-path", path])).collect();
    for ((agent, mem), (cluster, _, want)) in agents.iter().zip(&cases) {
        wait_until(Duration::from_secs(30), &format!("{cluster}: {want}"), || {
            plain(&agent.log_text()).matches(want).count() >= 2
        });
        assert!(valid_bundle(mem).is_err());
        assert!(!agent.log_text().contains(&token));
    }
    let (s, v) = vault.api("LIST", "pki_rsa/certs", None);
    assert_eq!(v["data"]["keys"].as_array().map(Vec::len), Some(1), "only the root: nothing was signed ({s} {v})");
}
