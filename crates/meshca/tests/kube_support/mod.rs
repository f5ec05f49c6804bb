//! Helpers for the Kubernetes-mode end-to-end tests: real kube-apiservers (one per cluster, from
//! `meshca_kube::testing`), the `deploy/` manifests (rendered from the charts, and checked to be)
//! applied as they are, and meshca processes running with the service-account tokens those
//! manifests define.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret as KSecret;
use kube::Api;
use meshca_kube::testing::ApiServer;

use super::common::{Proc, repo, spawn_meshca};

/// A deploy/ manifest's text.
pub fn manifest(path: &str) -> String {
    std::fs::read_to_string(repo().join("deploy").join(path)).unwrap()
}

/// Starts an API server for cluster `name` under `dir/<name>`.
pub async fn cluster(dir: &Path, name: &str) -> ApiServer {
    ApiServer::start(&dir.join(format!("kube-{name}"))).await
}

/// Creates namespaces (what `helm install --create-namespace` and Istio's installer do).
pub async fn namespaces(api: &ApiServer, names: &[&str]) {
    for n in names {
        api.apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {n} }}\n")).await;
    }
}

/// The workload cluster's namespaces and RBAC (deploy/workload/rbac.yaml).
pub async fn install_workload_rbac(api: &ApiServer) {
    namespaces(api, &["meshca-system", "istio-system"]).await;
    api.apply_yaml(&manifest("workload/rbac.yaml")).await;
}

/// Installs the CRD and the management cluster's RBAC, and waits until the CRD is served.
pub async fn install_management(api: &ApiServer) {
    namespaces(api, &["meshca"]).await;
    api.apply_yaml(&manifest("crds/roottrustpolicies.meshca.io.yaml")).await;
    api.apply_yaml(&manifest("management/rbac.yaml")).await;
    api.wait_policies_served("meshca").await;
}

/// A token file for `ns/sa` authenticating to `api`.
pub async fn sa_token_file(api: &ApiServer, dir: &Path, ns: &str, sa: &str) -> PathBuf {
    let p = dir.join(format!("{}-{ns}-{sa}.token", api.dir.file_name().unwrap().to_string_lossy()));
    api.token_file(ns, sa, &p).await;
    p
}

/// `--kube-url/--kube-ca/--kube-token-file` for `api` with `token`.
pub fn kube_flags(api: &ApiServer, token: &Path) -> Vec<String> {
    vec![
        "--kube-url".into(),
        api.url.clone(),
        "--kube-ca".into(),
        api.ca.display().to_string(),
        "--kube-token-file".into(),
        token.display().to_string(),
    ]
}

/// A kubeconfig for `api` with an inline token.
pub fn kubeconfig(api: &ApiServer, token: &str, path: &Path) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{ cluster: c, user: u }}\ncurrent-context: c\n",
            api.url,
            api.ca.display()
        ),
    )
    .unwrap();
}

/// Starts `meshca agent` for `cluster` in Kubernetes mode with the agent's own service account.
pub fn agent(dir: &Path, cluster: &str, server: &str, token_file: &Path, relay: &Path, kube: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--cluster".into(),
        cluster.into(),
        "--server".into(),
        server.into(),
        "--max-backoff".into(),
        "2s".into(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--relay-ca".into(),
        relay.display().to_string(),
    ];
    args.extend(kube.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_meshca(&format!("agent-{cluster}"), dir, &args)
}

/// The Secret `istio-system/cacerts` of a cluster, as the admin reads it.
pub async fn cacerts(api: &ApiServer) -> Option<KSecret> {
    let secrets: Api<KSecret> = Api::namespaced(api.admin().await, "istio-system");
    secrets.get_opt("cacerts").await.unwrap()
}

/// Writes a Secret's data as files (what the kubelet's volume would show).
pub fn write_secret_dir(secret: &KSecret, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (k, v) in secret.data.iter().flatten() {
        std::fs::write(dir.join(k), &v.0).unwrap();
    }
    dir.to_path_buf()
}
