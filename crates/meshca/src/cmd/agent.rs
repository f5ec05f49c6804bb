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
        // A file that does not exist is no token: in Kubernetes the bootstrap Secret is mounted
        // optionally and may be deleted once the agent has its identity.
        opts.bootstrap_token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => read_if_present(f)?.map(|b| String::from_utf8_lossy(&b).trim().to_string()),
            _ => None,
        };
        opts.relay_ca = match &self.relay_ca {
            Some(p) => read_if_present(p)?,
            None => None,
        };
        Ok(opts)
    }
}

fn read_if_present(path: &std::path::Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// How the agent manages istiod's Deployment (Kubernetes mode only; docs/kubernetes.md).
#[derive(clap::Args)]
pub struct IstiodArgs {
    /// Manage istiod's Deployment `NAMESPACE/NAME`: restart it after the first cacerts (and
    /// after every change with the policy's autoRestartPods), and in Vault mode add the Vault
    /// agent sidecar. Needs get and patch on it (the chart's istiod.manage).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    istiod_deployment: Option<String>,
    /// istiod's own container in that Deployment.
    #[arg(long, default_value = "discovery", requires = "istiod_deployment")]
    istiod_container: String,
    /// The meshca image for the Vault agent sidecar (Vault mode).
    #[arg(long, requires = "istiod_deployment")]
    vault_agent_image: Option<String>,
    /// The Secret in istiod's namespace with the sidecar's bootstrap `token` and `relay-ca.pem`.
    #[arg(long, default_value = "meshca-vault-bootstrap", requires = "istiod_deployment")]
    vault_agent_bootstrap_secret: String,
    /// The Secret in istiod's namespace the sidecar keeps its own identity in.
    #[arg(long, default_value = "meshca-vault-agent-identity", requires = "istiod_deployment")]
    vault_agent_identity_secret: String,
}

impl IstiodArgs {
    fn control(
        &self,
        client: Option<&meshca_kube::Client>,
        opts: &AgentOptions,
    ) -> anyhow::Result<Option<Arc<dyn meshca_agent::istiod::IstiodControl>>> {
        let Some(deployment) = &self.istiod_deployment else { return Ok(None) };
        let client =
            client.context("--istiod-deployment needs Kubernetes mode (--in-cluster, --kubeconfig or --kube-url)")?;
        let key = super::kube::object_key(deployment)?;
        let sidecar = self.vault_agent_image.as_ref().map(|image| meshca_kube::istiod::VaultSidecar {
            image: image.clone(),
            cluster: opts.cluster.clone(),
            server: opts.server.clone(),
            server_name: opts.server_name.clone(),
            bootstrap_secret: self.vault_agent_bootstrap_secret.clone(),
            identity_secret: self.vault_agent_identity_secret.clone(),
        });
        Ok(Some(Arc::new(meshca_kube::istiod::KubeIstiod::new(
            client.clone(),
            key.namespace(),
            key.name(),
            &self.istiod_container,
            sidecar,
        ))))
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
    #[command(flatten)]
    istiod: IstiodArgs,
}

/// Runs the agent until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.kube.client().await?;
    let store: Arc<dyn meshca_store::Store> = match (&client, &args.store_dir) {
        (Some(client), _) => Arc::new(meshca_kube::store::KubeStore::new(client.clone())),
        (None, Some(dir)) => Arc::new(DirStore::open(dir).context("opening the store")?),
        (None, None) => anyhow::bail!("--store-dir is required outside Kubernetes mode"),
    };
    let mut opts = args.enrollment.options()?;
    opts.istiod = args.istiod.control(client.as_ref(), &opts)?;
    opts.adopt_existing = args.adopt_existing;
    opts.backoff_max = args.max_backoff.0;
    meshca_agent::run(store, opts, super::shutdown_token()).await?;
    Ok(())
}
