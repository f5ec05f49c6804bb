//! One module per subcommand.
pub mod agent;
pub mod dashboard;
pub mod demo;
pub mod inspect;
pub mod kube;
pub mod operator;
pub mod server;
pub mod up;
pub mod vault_agent;
pub mod verify;
pub mod workload_ca;

use std::str::FromStr;
use std::time::Duration;

use std::path::Path;

use anyhow::Context;
use meshca_pki::bundle::BundleFiles;

/// Reads the four `cacerts` files from a directory; missing files read as empty, which bundle
/// validation reports by name.
pub fn read_bundle_dir(dir: &Path) -> anyhow::Result<BundleFiles> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    meshca_workload_ca::ca::read_cacerts_dir(dir).with_context(|| format!("reading cacerts from {}", dir.display()))
}

/// A duration flag: `90s`, `720h`, `1h30m`.
#[derive(Debug, Clone, Copy)]
pub struct DurationArg(pub Duration);

impl FromStr for DurationArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        meshca_policy::duration::parse(s)
            .filter(|d| !d.is_zero())
            .map(DurationArg)
            .ok_or_else(|| format!("{s:?} is not a positive duration (examples: 90s, 30m, 720h, 1h30m)"))
    }
}

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,rustls=warn"));
    // Colour only on a terminal: escape codes in a redirected log file make it hard to grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Logs to `path` (info by default, `RUST_LOG` overrides).
pub fn init_file_logging(path: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,rustls=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
    Ok(())
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        ctrl_c().await;
        t.cancel();
    });
    token
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn ctrl_c() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}
