//! `meshca inspect`: a readable summary of a PEM file.

use std::path::PathBuf;

use anyhow::Context;
use meshca_pki::chain::rfc3339;
use meshca_pki::{Cert, PrivateKey};

/// Arguments of `meshca inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A PEM file: certificates, a bundle, or a private key (only its type is shown).
    file: PathBuf,
}

/// Prints each certificate (or the key type) in the file.
pub fn run(args: Args) -> anyhow::Result<()> {
    let data = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    if String::from_utf8_lossy(&data).contains("PRIVATE KEY-----") {
        let key = PrivateKey::from_pem(&data).with_context(|| format!("{}", args.file.display()))?;
        println!("private key: {} (contents not shown)", key.kind());
        return Ok(());
    }
    let certs = Cert::parse_pem_bundle(&data).with_context(|| format!("{}", args.file.display()))?;
    for (i, c) in certs.iter().enumerate() {
        println!("[{i}] subject   {}", if c.subject().is_empty() { "(empty)".into() } else { c.subject() });
        println!("    issuer    {}", c.issuer());
        println!("    serial    {}", c.serial_hex());
        println!("    validity  {} .. {}", rfc3339(c.not_before()), rfc3339(c.not_after()));
        println!("    key       {}", c.key_kind());
        match (c.is_ca(), c.path_len()) {
            (true, Some(n)) => println!("    CA        yes, pathlen {n}"),
            (true, None) => println!("    CA        yes"),
            _ => println!("    CA        no"),
        }
        for u in c.uri_sans() {
            println!("    URI SAN   {u}{}", if c.san_is_critical() { " (critical)" } else { "" });
        }
        for d in c.dns_sans() {
            println!("    DNS SAN   {d}");
        }
        println!("    sha256    {}", c.fingerprint());
    }
    Ok(())
}
