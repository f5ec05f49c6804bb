//! `meshca demo`: the PKI end to end in one process — a generated root, one cluster intermediate
//! per cluster from a CSR made with the cluster's own key, a workload leaf from each — written as
//! Istio `cacerts` directories and verified.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use meshca_pki::bundle::{self, BundleFiles, CaBundle};
use meshca_pki::chain::rfc3339;
use meshca_pki::{
    CaSigner, CsrPolicy, IntermediateParams, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet, SpiffeId,
    TrustDomain, Usage, build_csr, verify_chain, verify_csr,
};

/// Arguments of `meshca demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the cacerts directories.
    #[arg(long, default_value = "meshca-demo")]
    dir: PathBuf,
    /// How many workload clusters.
    #[arg(long, default_value_t = 2)]
    clusters: usize,
    /// Key algorithm for the root and the intermediates.
    #[arg(long, default_value = "ecdsa-p256")]
    key_algorithm: KeyAlgorithm,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
}

fn write_bundle(dir: &Path, files: &BundleFiles) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    for (name, data) in files.entries() {
        let mode = if name == bundle::CA_KEY { 0o600 } else { 0o644 };
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

/// Runs the demo and prints each cluster's chain.
pub fn run(args: Args) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let root = CaSigner::new_root(PrivateKey::generate(args.key_algorithm)?, &RootParams::new("meshca"), now)?;
    let roots = RootSet::from_certs(vec![root.cert().clone()])?;
    println!("root      {}  {}", root.cert().subject(), roots.fingerprint());
    let mut leaves = Vec::new();
    for i in 1..=args.clusters {
        let cluster = format!("cluster-{i}");
        // The cluster's key is generated "in the cluster"; only its CSR reaches the root.
        let key = PrivateKey::generate(args.key_algorithm)?;
        let csr = verify_csr(build_csr(&key, &[])?.as_bytes(), &CsrPolicy::exactly(args.key_algorithm.kind()))?;
        let params = IntermediateParams::cluster("meshca", &cluster, args.trust_domain.clone());
        let issued = root.sign_intermediate(csr.public_key_spki(), &params, now)?.parse()?;
        let files = CaBundle::assemble(&key, &issued, root.chain(), &roots);
        let dir = args.dir.join(&cluster).join("cacerts");
        write_bundle(&dir, &files).with_context(|| format!("writing {}", dir.display()))?;
        let bundle = CaBundle::validate(&super::read_bundle_dir(&dir)?, now)?;
        let leaf_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let id = SpiffeId::workload(&args.trust_domain, "default", &format!("sleep-{i}"))?;
        let leaf = bundle
            .signer()
            .sign_leaf(leaf_key.public_key_spki(), &LeafParams::workload(id.clone(), Duration::from_secs(3600)), now)?
            .parse()?;
        println!("{cluster} cacerts  {}", dir.display());
        println!("  intermediate  serial {}  expires {}", issued.serial_hex(), rfc3339(issued.not_after()));
        println!("  leaf          {id}  expires {}", rfc3339(leaf.not_after()));
        leaves.push((cluster, leaf, bundle));
    }
    // Every leaf verifies against the shared root through its own cluster's intermediate — the
    // property that lets a workload in one cluster authenticate a workload in another.
    for (cluster, leaf, bundle) in &leaves {
        let inter = [bundle.ca_cert().clone()];
        verify_chain(leaf, &inter, &roots, now, Usage::ClientAuth)?;
        verify_chain(leaf, &inter, &roots, now, Usage::ServerAuth)?;
        println!("verified  {cluster} leaf chains to the shared root (client and server auth)");
    }
    Ok(())
}
