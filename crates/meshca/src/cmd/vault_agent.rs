//! `meshca vault-agent`: the agent of a workload cluster in Vault mode (istiod-agent sidecar
//! role). It registers with the management plane like `meshca agent`, but obtains the cluster
//! intermediate from Vault and writes the four `cacerts` files only into a memory-backed folder
//! shared with the workload CA (or real istiod, at `/etc/cacerts`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meshca_store::dir::DirStore;
use meshca_store::single::SingleObjectDir;
use meshca_vault::{AuthMethod, Overrides, VaultSource};

use super::DurationArg;

/// Arguments of `meshca vault-agent`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    enrollment: super::agent::Enrollment,
    /// Where the agent keeps its own identity (its relay-CA client certificate). Never holds the
    /// cluster intermediate's key. In Kubernetes mode the identity is the Secret
    /// `--identity-secret` instead.
    #[arg(long, required_unless_present_any = ["kubeconfig", "kube_url", "in_cluster"])]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    kube: super::kube::KubeArgs,
    /// Kubernetes mode: the Secret the agent keeps its identity in (as the sidecar istiod's
    /// agent adds, in istiod's namespace).
    #[arg(long, value_name = "NAMESPACE/NAME", default_value = "istio-system/meshca-vault-agent-identity")]
    identity_secret: String,
    /// Stop once the first cacerts is written (the init container istiod waits for).
    #[arg(long)]
    once: bool,
    /// The memory-backed folder for `cacerts` (tmpfs/ramfs; in Kubernetes an emptyDir with
    /// medium: Memory mounted at /etc/cacerts). The four files are written at its root.
    #[arg(long)]
    memory_dir: PathBuf,
    /// Allow a `--memory-dir` that is not memory-backed (development only; logs a warning).
    #[arg(long)]
    allow_disk_key: bool,
    /// Longest retry delay when Vault or the management plane is unreachable.
    #[arg(long, default_value = "30s")]
    max_backoff: DurationArg,
    /// How long one Vault call may take.
    #[arg(long, default_value = "10s")]
    vault_timeout: DurationArg,
    // ---- local overrides of the policy's `vault` block (development) ----
    /// Overrides `vault.server`.
    #[arg(long)]
    vault_addr: Option<String>,
    /// Overrides `vault.tls.caFile`.
    #[arg(long)]
    vault_ca_file: Option<PathBuf>,
    /// Overrides `vault.namespace`.
    #[arg(long)]
    vault_namespace: Option<String>,
    /// Overrides `vault.caPath` (e.g. pki/root/sign-intermediate).
    #[arg(long)]
    vault_ca_path: Option<String>,
    /// Overrides `vault.csrPath` (e.g. pki_int/intermediate/generate/exported).
    #[arg(long)]
    vault_csr_path: Option<String>,
    /// Auth override: a file holding a Vault token.
    #[arg(long, group = "vault_auth")]
    vault_token_file: Option<PathBuf>,
    /// Auth override: AppRole role ID (with --vault-approle-secret-id-file).
    #[arg(long, group = "vault_auth", requires = "vault_approle_secret_id_file")]
    vault_approle_role_id: Option<String>,
    /// File holding the AppRole secret ID.
    #[arg(long, requires = "vault_approle_role_id")]
    vault_approle_secret_id_file: Option<PathBuf>,
    /// AppRole mount path.
    #[arg(long, requires = "vault_approle_role_id")]
    vault_approle_mount: Option<String>,
    /// Auth override: Kubernetes auth role.
    #[arg(long, group = "vault_auth")]
    vault_k8s_role: Option<String>,
    /// Kubernetes auth mount path.
    #[arg(long, requires = "vault_k8s_role")]
    vault_k8s_mount: Option<String>,
    /// File holding the service-account JWT.
    #[arg(long, requires = "vault_k8s_role")]
    vault_k8s_token_file: Option<PathBuf>,
    /// Trust domain, when the management plane's policy delivers none (overrides only).
    #[arg(long)]
    trust_domain: Option<String>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        let auth = if let Some(f) = &self.vault_token_file {
            Some(AuthMethod::Token { token_file: f.clone() })
        } else if let (Some(role_id), Some(file)) = (&self.vault_approle_role_id, &self.vault_approle_secret_id_file) {
            Some(AuthMethod::app_role(self.vault_approle_mount.as_deref(), role_id, file))
        } else {
            self.vault_k8s_role.as_ref().map(|role| {
                AuthMethod::kubernetes(self.vault_k8s_mount.as_deref(), role, self.vault_k8s_token_file.as_deref())
            })
        };
        Overrides {
            server: self.vault_addr.clone(),
            ca_file: self.vault_ca_file.clone(),
            namespace: self.vault_namespace.clone(),
            ca_path: self.vault_ca_path.clone(),
            csr_path: self.vault_csr_path.clone(),
            auth,
            trust_domain: self.trust_domain.clone(),
            timeout: Some(self.vault_timeout.0),
        }
    }
}

/// Runs the Vault agent until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // First, before anything else: the key may only ever be written to memory.
    let backing = meshca_vault::memdir::prepare(&args.memory_dir, args.allow_disk_key)?;
    let mut opts = args.enrollment.options()?;
    let state: Arc<dyn meshca_store::Store> = match (args.kube.client().await?, &args.state_dir) {
        (Some(client), _) => {
            opts.identity = super::kube::object_key(&args.identity_secret)?;
            Arc::new(meshca_kube::store::KubeStore::new(client))
        }
        (None, Some(dir)) => Arc::new(DirStore::open(dir).context("opening the state directory")?),
        (None, None) => anyhow::bail!("--state-dir is required outside Kubernetes mode"),
    };
    opts.once = args.once;
    let cacerts = SingleObjectDir::open(opts.cacerts.clone(), &args.memory_dir)
        .context("opening the memory-backed cacerts folder")?
        .with_others(state);
    opts.backoff_max = args.max_backoff.0;
    tracing::info!(memory_dir = %args.memory_dir.display(), filesystem = %backing, "cacerts goes only to this folder");
    let source = Arc::new(VaultSource::new(args.overrides(), opts.clock.clone()));
    meshca_agent::run_with(Arc::new(cacerts), opts, Some(source), super::shutdown_token()).await?;
    Ok(())
}
