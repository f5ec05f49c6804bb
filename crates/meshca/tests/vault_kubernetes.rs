//! Vault's Kubernetes auth method with a real kube-apiserver (`meshca_kube::testing`): Vault
//! reviews the agent's service-account JWT with TokenReview, and the agent logs in with it.
#![allow(clippy::unwrap_used)]

mod common;
mod vault_support;

use std::time::Duration;

use common::{Mgmt, valid_bundle, wait_until, write_secret};
use meshca_kube::testing::ApiServer;
use serde_json::json;
use vault_support::{ShmDir, Storage, Vault, plain, vault_agent, vault_policy};

/// The setup of docs/vault.md: a reviewer service account bound to `system:auth-delegator`
/// whose JWT Vault uses for TokenReview, a Vault role bound to `meshca/meshca-agent` with
/// audience `vault`, and the agent's JWT from TokenRequest in a file (as a projected token would
/// be). Then: the agent logs in and gets its intermediate; a wrong Vault role and a JWT of
/// another service account are refused with errors naming the method and mount, not the JWT.
#[test]
fn the_agent_logs_in_with_a_service_account_jwt_from_a_real_api_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kube = rt.block_on(ApiServer::start(&dir.join("kube")));
    rt.block_on(kube.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: meshca }\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: meshca-agent, namespace: meshca }\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: vault-reviewer, namespace: meshca }\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: intruder, namespace: meshca }\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: { name: vault-reviewer-auth-delegator }\n\
         roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: 'system:auth-delegator' }\n\
         subjects: [{ kind: ServiceAccount, name: vault-reviewer, namespace: meshca }]\n",
    ));
    let day = Duration::from_secs(86400);
    let sa_token = |sa: &str, audience: Option<&str>| rt.block_on(kube.token("meshca", sa, audience, day));

    let vault = Vault::with_signer(dir, Storage::Dev);
    vault.ok("POST", "sys/auth/kubernetes", json!({"type": "kubernetes"}));
    vault.ok(
        "POST",
        "auth/kubernetes/config",
        json!({
            "kubernetes_host": kube.url,
            "kubernetes_ca_cert": std::fs::read_to_string(&kube.ca).unwrap(),
            "token_reviewer_jwt": sa_token("vault-reviewer", None),
        }),
    );
    vault.ok(
        "POST",
        "auth/kubernetes/role/meshca",
        json!({"bound_service_account_names": ["meshca-agent"], "bound_service_account_namespaces": ["meshca"],
               "audience": "vault", "token_policies": ["meshca-signer"], "token_ttl": "1h"}),
    );
    let jwt = sa_token("meshca-agent", Some("vault"));
    let jwt_file = dir.join("sa-token");
    write_secret(&jwt_file, &jwt);

    let policy = vault_policy(
        dir,
        &format!(
            "server: '{}', caPath: pki/root/sign-intermediate, auth: {{ kubernetes: {{ role: meshca, tokenPath: '{}' }} }}",
            vault.addr,
            jwt_file.display()
        ),
        "1h",
        0.2,
        "ecdsa-p256",
    );
    let m = Mgmt::start(dir, &["--policy", policy.to_str().unwrap()]);
    let shm = ShmDir::new("k8s");

    let (token, relay) = m.add_cluster(dir, "c1");
    let mem = shm.0.join("c1");
    let agent = vault_agent(dir, &m, "c1", &mem, Some((&token, &relay)), &[]);
    wait_until(Duration::from_secs(60), "cacerts via Kubernetes auth", || valid_bundle(&mem).is_ok());
    common::openssl_verify_cacerts(&mem);
    let log = plain(&agent.log_text());
    assert!(log.contains("logged in to Vault (no token held) method=Kubernetes mount=kubernetes"), "{log}");
    // Vault saw who logged in: the token it issued carries the service account's metadata.
    // (Looked up through the accessor list with the root token, never the agent's token.)
    let (_, accessors) = vault.api("LIST", "auth/token/accessors", None);
    let found = accessors["data"]["keys"].as_array().unwrap().iter().any(|a| {
        let (_, t) = vault.api("POST", "auth/token/lookup-accessor", Some(json!({"accessor": a})));
        t["data"]["meta"]["service_account_name"] == "meshca-agent" && t["data"]["meta"]["role"] == "meshca"
    });
    assert!(found, "no Vault token for meshca/meshca-agent");

    // A wrong role, and the JWT of another service account: refused, clearly, without the JWT.
    let (token2, _) = m.add_cluster(dir, "c2");
    let bad_role = vault_agent(
        dir,
        &m,
        "c2",
        &shm.0.join("c2"),
        Some((&token2, &relay)),
        &["--vault-k8s-role", "nope", "--vault-k8s-token-file", jwt_file.to_str().unwrap()],
    );
    let intruder_file = dir.join("intruder-token");
    let intruder = sa_token("intruder", Some("vault"));
    write_secret(&intruder_file, &intruder);
    let (token3, _) = m.add_cluster(dir, "c3");
    let bad_sa = vault_agent(
        dir,
        &m,
        "c3",
        &shm.0.join("c3"),
        Some((&token3, &relay)),
        &["--vault-k8s-role", "meshca", "--vault-k8s-token-file", intruder_file.to_str().unwrap()],
    );
    for (agent, want) in [
        (&bad_role, "Vault Kubernetes login at auth/kubernetes failed (HTTP 400): invalid role name \"nope\""),
        (&bad_sa, "Vault Kubernetes login at auth/kubernetes failed (HTTP 403): service account name not authorized"),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !plain(&agent.log_text()).contains(want) {
            assert!(std::time::Instant::now() < deadline, "no {want:?} in:\n{}", plain(&agent.log_text()));
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = agent.log_text();
        assert!(!log.contains(&jwt) && !log.contains(&intruder), "a JWT is in the log");
    }
    assert!(valid_bundle(&shm.0.join("c2")).is_err() && valid_bundle(&shm.0.join("c3")).is_err());
}
