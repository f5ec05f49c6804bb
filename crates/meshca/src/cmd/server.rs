//! `meshca server`: the management plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshca_mgmt::{ServerOptions, Settings};
use meshca_policy::Policy;
use meshca_store::dir::DirStore;

use super::DurationArg;

/// Arguments of `meshca server`.
#[derive(clap::Args)]
pub struct Args {
    /// Data directory: the store (`store/`) and the operator credentials (`operator/`).
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// DNS names on the serving certificate; agents connect with one of them as server name.
    #[arg(long = "hostname", default_values_t = vec!["localhost".to_string()])]
    hostnames: Vec<String>,
    /// A RootTrustPolicy (YAML) to put in force; without it the stored one is used, or a
    /// generated root for every cluster.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// How often agents report status.
    #[arg(long, default_value = "30s")]
    report_interval: DurationArg,
    /// Intermediate issuances a cluster may make at once.
    #[arg(long, default_value_t = 5)]
    issue_burst: u32,
    /// Issuances per cluster per minute, after the burst.
    #[arg(long, default_value_t = 6.0)]
    issue_per_minute: f64,
    /// Prometheus metrics address (status as gauges at /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File with the bearer token required on /metrics.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
}

/// Runs the management plane until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let store = Arc::new(DirStore::open(args.data_dir.join("store")).context("opening the store")?);
    let policy_yaml = match &args.policy {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if let Some(text) = &policy_yaml {
        Policy::from_yaml(text).map_err(|e| {
            anyhow::anyhow!("{}: {e}", args.policy.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        })?;
    }
    let metrics_token = match &args.metrics_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let opts = ServerOptions {
        listen: args.listen,
        hostnames: args.hostnames,
        policy_yaml,
        default_policy: Policy::generated_default(Duration::from_secs(720 * 3600)),
        operator_dir: Some(args.data_dir.join("operator")),
        settings: Settings { report_interval: args.report_interval.0, ..Settings::default() },
        issue_burst: args.issue_burst,
        issue_per_minute: args.issue_per_minute,
        metrics_listen: args.metrics_listen,
        metrics_token,
    };
    let creds = args.data_dir.join("operator");
    meshca_mgmt::serve(
        store,
        opts,
        move |addr| {
            eprintln!("management plane listening on {addr}; operator credentials in {}", creds.display());
        },
        super::ctrl_c(),
    )
    .await?;
    Ok(())
}
