//! One module per subcommand.
pub mod agent;
pub mod bundle_endpoint;
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

/// How an ordinary error ends the program: `Error: <what>` and the chain of causes, one per line,
/// and never a stack trace. Returning the error from `main` would print it with `Debug`, which for
/// anyhow includes the backtrace it captured whenever `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`)
/// is set, as it often is on developers' machines; a bad flag or an unreachable server is not a
/// bug, and a trace only buries the message. Panics (bugs) still print theirs.
pub fn error_report(e: &anyhow::Error) -> String {
    // Errors carry text from elsewhere (a server's message, a file name): escaped for the terminal.
    let text = |e: &dyn std::fmt::Display| meshca_proto::text::terminal_safe(&e.to_string()).into_owned();
    let mut out = format!("Error: {}", text(e));
    let causes: Vec<String> = e.chain().skip(1).map(|c| text(&c)).collect();
    if !causes.is_empty() {
        out.push_str("\n\nCaused by:");
        // The layout anyhow's `Debug` uses, minus the trace: numbered only when there are several.
        match causes.as_slice() {
            [one] => out.push_str(&format!("\n    {one}")),
            many => many.iter().enumerate().for_each(|(i, c)| out.push_str(&format!("\n    {i}: {c}"))),
        }
    }
    out
}

/// Reads the bearer token a metrics endpoint requires (`--metrics-token-file`). Surrounding
/// whitespace is not part of the token. An empty file is refused rather than taken for "no token
/// needed": the operator asked for a protected endpoint, and silently serving an open one (or one
/// no scraper can match) would hide the mistake.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "{} is empty: it must hold the bearer token scrapers send (omit the flag for no metrics token)",
        path.display()
    );
    anyhow::ensure!(
        token.chars().all(|c| c.is_ascii_graphic()),
        "{} holds spaces or control characters inside the token; an HTTP bearer token cannot carry them",
        path.display()
    );
    Ok(token.to_string())
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

/// How a server treats its connections: `meshca server` and `meshca workload-ca` share these.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Most connections at once (0: up to 16384). Always kept under the open-file limit
    /// (`ulimit -n`) with room for the files the server must still open, so a flood of sockets
    /// cannot take the descriptors it reads `cacerts` or its store with.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Most connections from one address (IPv6: one /64) before a client certificate names the
    /// caller; past it the address's oldest idle connection is closed, or the new one refused
    /// when all are busy (0: no per-address cap). Behind a proxy or NAT that hides client
    /// addresses, raise it.
    #[arg(long, default_value_t = meshca_serve::server::DEFAULT_MAX_PER_PEER)]
    max_connections_per_peer: usize,
    /// How long a client may take to finish its TLS handshake.
    #[arg(long, default_value = "10s")]
    tls_handshake_timeout: DurationArg,
    /// How long a client may take, after TLS, to send its HTTP/2 connection preface.
    #[arg(long, default_value = "10s")]
    http2_preface_timeout: DurationArg,
    /// A connection with no call in flight for this long gets a GOAWAY (clients reconnect when
    /// they next call).
    #[arg(long, default_value = "5m")]
    idle_timeout: DurationArg,
    /// On SIGTERM or Ctrl-C: the listener closes at once and calls in flight have this long to
    /// finish; then their connections are closed and the process exits (its own tasks get at most
    /// 2 s more). Keep it below Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, default_value = "10s")]
    shutdown_grace: DurationArg,
}

impl ServeArgs {
    /// The serving configuration, with `per_identity` as the per-identity cap.
    pub fn config(&self, per_identity: usize) -> meshca_serve::ServeConfig {
        let d = meshca_serve::ServeConfig::default();
        let wanted = if self.max_connections == 0 {
            meshca_serve::server::DEFAULT_MAX_CONNECTIONS
        } else {
            self.max_connections
        };
        let total = meshca_serve::fd::connections_within(meshca_serve::fd::open_file_limit(), wanted);
        if self.max_connections > total {
            tracing::warn!(
                asked = self.max_connections,
                allowed = total,
                limit = ?meshca_serve::fd::open_file_limit(),
                "--max-connections lowered to fit under the open-file limit"
            );
        }
        meshca_serve::ServeConfig {
            caps: meshca_serve::Caps { total, per_peer: self.max_connections_per_peer, per_identity },
            handshake_timeout: self.tls_handshake_timeout.0,
            preface_timeout: self.http2_preface_timeout.0,
            idle_timeout: self.idle_timeout.0,
            drain_timeout: self.shutdown_grace.0,
            ..d
        }
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
