//! `meshca`: one binary for every role of the mesh CA — management plane, agent, workload CA,
//! Vault agent — and the operator's CLI.
#![forbid(unsafe_code)]

mod cmd;

use clap::{Parser, Subcommand};

/// Certificate-authority lifecycle manager for multi-cluster Istio meshes.
#[derive(Parser)]
#[command(name = "meshca", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = cmd::LogFormat::Text)]
    log_format: cmd::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the management plane: the root of trust and the certificate issuer service.
    Server(cmd::server::Args),
    /// Run a workload cluster's agent: obtains the cluster intermediate and keeps `cacerts` fresh.
    Agent(cmd::agent::Args),
    /// Run a cluster's workload CA (istiod's CA role): Istio's CreateCertificate API.
    WorkloadCa(cmd::workload_ca::Args),
    /// Run a workload cluster's agent in Vault mode: Vault signs the intermediate, and `cacerts`
    /// (key included) is written only to a memory-backed folder.
    VaultAgent(Box<cmd::vault_agent::Args>),
    /// Run the whole mesh trust topology on this machine: management plane, N clusters (agent +
    /// workload CA each) and sample workloads making mTLS calls across clusters.
    Up(cmd::up::Args),
    /// Print a fresh service-account token from the demo identity provider of `meshca up`.
    Token(cmd::up::TokenArgs),
    /// Manage clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Show every cluster's intermediate, trust and health, and the alerts that need a person.
    Status(cmd::operator::StatusArgs),
    /// Ask clusters to re-issue their intermediate now, or (`meshca rotate root`) rotate the
    /// mesh's root.
    Rotate(cmd::operator::RotateArgs),
    /// Revoke a cluster's intermediate (compromise response): it is listed in every cluster's
    /// CRL, and the cluster re-issues with a new key at once.
    Revoke(cmd::operator::RevokeArgs),
    /// Print the audit log (every intermediate issued or revoked, policy change, root-rotation
    /// phase, token and registration), or check its hash chain (`meshca audit verify`).
    Audit(cmd::operator::AuditArgs),
    /// Manage the RootTrustPolicy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Manage operator credentials.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Build a whole trust chain in one process (root, one intermediate per cluster, leaves),
    /// write each cluster's `cacerts`, and verify everything.
    Demo(cmd::demo::Args),
    /// Print what a PEM file holds: certificates (subject, serial, validity, SANs) or a key's type.
    Inspect(cmd::inspect::Args),
    /// Validate a `cacerts` directory the way istiod does before it accepts it.
    Verify(cmd::verify::Args),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create a single-use bootstrap token that registers a cluster.
    Add(cmd::operator::ClusterAddArgs),
    /// Remove a cluster: its agent's identity is refused and nothing is issued to it from now
    /// on; its registration, issued log and last status are archived.
    Remove(cmd::operator::ClusterRemoveArgs),
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Issue credentials for another operator (written to a folder, key 0600).
    Issue(cmd::operator::OperatorIssueArgs),
    /// Revoke operator credentials: every later call with them is refused.
    Revoke(cmd::operator::OperatorRevokeArgs),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a RootTrustPolicy and put it in force.
    Apply(cmd::operator::PolicyApplyArgs),
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", cmd::error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // `up` owns the terminal for its display and logs to a file of its own.
    if !matches!(cli.command, Command::Up(_)) {
        cmd::init_logging(cli.log_format);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(a) => cmd::server::run(a).await,
            Command::Agent(a) => cmd::agent::run(a).await,
            Command::WorkloadCa(a) => cmd::workload_ca::run(a).await,
            Command::VaultAgent(a) => cmd::vault_agent::run(*a).await,
            Command::Up(a) => cmd::up::run(a).await,
            Command::Token(a) => cmd::up::token(a),
            Command::Cluster(ClusterCmd::Add(a)) => cmd::operator::cluster_add(a).await,
            Command::Cluster(ClusterCmd::Remove(a)) => cmd::operator::cluster_remove(a).await,
            Command::Operator(OperatorCmd::Issue(a)) => cmd::operator::operator_issue(a).await,
            Command::Operator(OperatorCmd::Revoke(a)) => cmd::operator::operator_revoke(a).await,
            Command::Status(a) => cmd::operator::status(a).await,
            Command::Rotate(a) => cmd::operator::rotate(a).await,
            Command::Revoke(a) => cmd::operator::revoke(a).await,
            Command::Audit(a) => cmd::operator::audit(a).await,
            Command::Policy(PolicyCmd::Apply(a)) => cmd::operator::policy_apply(a).await,
            Command::Demo(a) => cmd::demo::run(a),
            Command::Inspect(a) => cmd::inspect::run(a),
            Command::Verify(a) => cmd::verify::run(a),
        }
    });
    // Every server has stopped its own tasks by now; a blocking call still running (a file read on
    // a hung mount) must not keep the process from exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
