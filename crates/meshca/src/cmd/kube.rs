//! Flags shared by the commands that can run against Kubernetes (`server`, `agent`,
//! `workload-ca`), and the small pieces of wiring they share. See docs/kubernetes.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use meshca_kube::Connection;
use meshca_store::{ObjectKey, Precondition, Store};

/// How to reach the API server. Giving any of them switches the command to Kubernetes mode:
/// its store is Secrets instead of a directory.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KubeArgs {
    /// Kubernetes mode: a kubeconfig file (its current context unless --kube-context).
    #[arg(long, conflicts_with_all = ["kube_url", "in_cluster"])]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, requires = "kubeconfig")]
    pub kube_context: Option<String>,
    /// Kubernetes mode: the API server's URL (`https://host:port`), with --kube-ca and
    /// --kube-token-file.
    #[arg(long, conflicts_with = "in_cluster")]
    pub kube_url: Option<String>,
    /// PEM file of the CA that signed the API server's certificate (with --kube-url).
    #[arg(long, requires = "kube_url")]
    pub kube_ca: Option<PathBuf>,
    /// File with the bearer token for the API server, re-read when it changes (with --kube-url).
    #[arg(long, requires = "kube_url")]
    pub kube_token_file: Option<PathBuf>,
    /// Kubernetes mode with the pod's own service account (what the deploy/ manifests use).
    #[arg(long)]
    pub in_cluster: bool,
}

impl KubeArgs {
    /// The connection these flags describe; `None` when not in Kubernetes mode.
    pub fn connection(&self) -> Option<Connection> {
        if let Some(path) = &self.kubeconfig {
            return Some(Connection::Kubeconfig { path: path.clone(), context: self.kube_context.clone() });
        }
        if let Some(url) = &self.kube_url {
            return Some(Connection::Direct {
                url: url.clone(),
                ca_file: self.kube_ca.clone(),
                token_file: self.kube_token_file.clone(),
            });
        }
        self.in_cluster.then_some(Connection::InCluster)
    }

    /// A client, if in Kubernetes mode.
    pub async fn client(&self) -> anyhow::Result<Option<meshca_kube::Client>> {
        match self.connection() {
            Some(c) => Ok(Some(meshca_kube::connect(&c).await.context("connecting to the Kubernetes API server")?)),
            None => Ok(None),
        }
    }
}

/// Parses `NAMESPACE/NAME`.
pub fn object_key(s: &str) -> anyhow::Result<ObjectKey> {
    let (ns, name) = s.split_once('/').with_context(|| format!("{s:?} is not NAMESPACE/NAME"))?;
    Ok(ObjectKey::new(ns, name)?)
}

/// Mirrors the Secret `key` into the directory `dir` (the kubelet's secret-volume layout, one
/// atomic swap per change), for a workload CA running where no kubelet mounts `cacerts` for it.
/// Returns once the first copy is in place, with the mirroring task (the caller owns it: it ends
/// when the handle is aborted, when the caller stops).
pub async fn mirror_secret(
    store: Arc<dyn Store>,
    key: ObjectKey,
    dir: PathBuf,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    meshca_store::fsutil::create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let local = meshca_store::single::SingleObjectDir::open(key.clone(), &dir)?;
    let mut watch = store.watch(&key);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut first = Some(first_tx);
        while let Some(item) = watch.next().await {
            match item {
                Ok(Some(v)) => match local.put(&key, &v.value, Precondition::Any).await {
                    Ok(_) => {
                        tracing::info!(secret = %key, dir = %local.path().display(), version = %v.version, "mirrored cacerts");
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "mirroring cacerts failed"),
                },
                Ok(None) => {
                    tracing::warn!(secret = %key, "the cacerts Secret does not exist (yet); the last copy stays")
                }
                Err(e) => tracing::warn!(secret = %key, error = %e, "watching the cacerts Secret failed; retrying"),
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(300), first_rx).await;
    if first.is_err() || first.as_ref().is_ok_and(|r| r.is_err()) {
        task.abort();
    }
    first.context("no cacerts Secret appeared within 5 minutes")?.context("the mirror stopped")?;
    Ok(task)
}
