//! `meshca agent`: one per workload cluster.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meshca_agent::AgentOptions;
use meshca_store::dir::DirStore;

use super::DurationArg;

/// How an agent (`meshca agent`, `meshca vault-agent`) finds the management plane and enrolls
/// with it the first time.
#[derive(clap::Args)]
pub struct Enrollment {
    /// The cluster this agent serves.
    #[arg(long)]
    cluster: String,
    /// The management plane, `host:port`.
    #[arg(long)]
    server: String,
    /// TLS server name of the management plane.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Bootstrap token from `meshca cluster add` (first start only).
    #[arg(long, env = "MESHCA_BOOTSTRAP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The relay CA written by `meshca cluster add` (first start only).
    #[arg(long)]
    relay_ca: Option<PathBuf>,
}

impl Enrollment {
    /// The agent's options with these filled in (files read now, so a typo fails at start).
    pub fn options(&self) -> anyhow::Result<AgentOptions> {
        let mut opts = AgentOptions::new(&self.cluster, &self.server)?;
        opts.server_name = self.server_name.clone();
        opts.bootstrap_token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => {
                Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string())
            }
            _ => None,
        };
        opts.relay_ca = match &self.relay_ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(opts)
    }
}

/// Arguments of `meshca agent`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    enrollment: Enrollment,
    /// The cluster's store directory (`cacerts` goes to `<dir>/istio-system/cacerts/`); not
    /// used in Kubernetes mode, where `cacerts` is the Secret `istio-system/cacerts`.
    #[arg(long, required_unless_present_any = ["kubeconfig", "kube_url", "in_cluster"])]
    store_dir: Option<PathBuf>,
    #[command(flatten)]
    kube: super::kube::KubeArgs,
    /// Replace a `cacerts` that meshca did not write.
    #[arg(long)]
    adopt_existing: bool,
    /// Longest retry delay when the management plane is unreachable.
    #[arg(long, default_value = "30s")]
    max_backoff: DurationArg,
}

/// Runs the agent until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let store: Arc<dyn meshca_store::Store> = match (args.kube.client().await?, &args.store_dir) {
        (Some(client), _) => Arc::new(meshca_kube::store::KubeStore::new(client)),
        (None, Some(dir)) => Arc::new(DirStore::open(dir).context("opening the store")?),
        (None, None) => anyhow::bail!("--store-dir is required outside Kubernetes mode"),
    };
    let mut opts = args.enrollment.options()?;
    opts.adopt_existing = args.adopt_existing;
    opts.backoff_max = args.max_backoff.0;
    meshca_agent::run(store, opts, super::shutdown_token()).await?;
    Ok(())
}
