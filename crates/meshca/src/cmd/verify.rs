//! `meshca verify`: istiod's load-time checks (plus meshca's stricter ones) on a `cacerts` dir.

use std::path::PathBuf;
use std::time::SystemTime;

use meshca_pki::CaBundle;
use meshca_pki::chain::rfc3339;

/// Arguments of `meshca verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory holding ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem.
    #[arg(long)]
    cacerts: PathBuf,
}

/// Validates the bundle and prints what it holds; fails with the reason otherwise.
pub fn run(args: Args) -> anyhow::Result<()> {
    let files = super::read_bundle_dir(&args.cacerts)?;
    let bundle = CaBundle::validate(&files, SystemTime::now())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.cacerts.display()))?;
    let ca = bundle.ca_cert();
    println!("{}: OK", args.cacerts.display());
    println!("  signing cert  {}  serial {}  expires {}", ca.subject(), ca.serial_hex(), rfc3339(ca.not_after()));
    println!("  chain         {} certificate(s) up to the root", bundle.signer().chain().len());
    println!("  root set      {} root(s), {}", bundle.roots().len(), bundle.roots().fingerprint());
    Ok(())
}
