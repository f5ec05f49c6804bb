//! `meshca`: one binary for every role of the mesh CA — management plane, agent, workload CA,
//! Vault agent — and the operator's CLI.
#![forbid(unsafe_code)]

mod cmd;

use clap::{Parser, Subcommand};

/// Certificate-authority lifecycle manager for multi-cluster Istio meshes.
#[derive(Parser)]
#[command(name = "meshca", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a whole trust chain on this machine (root, one intermediate per cluster, leaves),
    /// write each cluster's `cacerts`, and verify everything.
    Demo(cmd::demo::Args),
    /// Print what a PEM file holds: certificates (subject, serial, validity, SANs) or a key's type.
    Inspect(cmd::inspect::Args),
    /// Validate a `cacerts` directory the way istiod does before it accepts it.
    Verify(cmd::verify::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Verify(a) => cmd::verify::run(a),
    }
}
