//! `meshca agent`: one per workload cluster.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meshca_agent::AgentOptions;
use meshca_store::dir::DirStore;

use super::DurationArg;

/// Arguments of `meshca agent`.
#[derive(clap::Args)]
pub struct Args {
    /// The cluster this agent serves.
    #[arg(long)]
    cluster: String,
    /// The management plane, `host:port`.
    #[arg(long)]
    server: String,
    /// TLS server name of the management plane.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The cluster's store directory (`cacerts` goes to `<dir>/istio-system/cacerts/`).
    #[arg(long)]
    store_dir: PathBuf,
    /// Bootstrap token from `meshca cluster add` (first start only).
    #[arg(long, env = "MESHCA_BOOTSTRAP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The relay CA written by `meshca cluster add` (first start only).
    #[arg(long)]
    relay_ca: Option<PathBuf>,
    /// Replace a `cacerts` that meshca did not write.
    #[arg(long)]
    adopt_existing: bool,
    /// Longest retry delay when the management plane is unreachable.
    #[arg(long, default_value = "30s")]
    max_backoff: DurationArg,
}

/// Runs the agent until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let store = Arc::new(DirStore::open(&args.store_dir).context("opening the store")?);
    let mut opts = AgentOptions::new(&args.cluster, &args.server)?;
    opts.server_name = args.server_name;
    opts.adopt_existing = args.adopt_existing;
    opts.backoff_max = args.max_backoff.0;
    opts.bootstrap_token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string())
        }
        _ => None,
    };
    opts.relay_ca = match &args.relay_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        super::ctrl_c().await;
        let _ = tx.send(true);
    });
    meshca_agent::run(store, opts, rx).await?;
    Ok(())
}
