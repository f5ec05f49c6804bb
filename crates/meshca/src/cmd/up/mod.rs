//! `meshca up`: the whole mesh trust topology on one machine, on the embedded default (directory
//! stores, no Kubernetes). One process runs the management plane, N workload clusters (agent +
//! workload CA each), a demo identity provider, and two sample workloads per cluster making mTLS
//! connections across clusters. It shows each cluster's chain and a live count of handshakes.
//!
//! - [`mgmt`]: the management plane and its policy for the chosen root-of-trust mode;
//! - [`meshes`]: `--meshes N` (one RootTrustPolicy per mesh) and `--federate`;
//! - [`cluster`]: one cluster (agent, workload CA, sample workloads);
//! - [`workload`]: a sample workload; [`display`]: the live numbers; [`topology`]:
//!   `topology.json`; [`mod@token`]: `meshca token`.
//!
//! Every task runs in one `JoinSet` under one cancellation token: when `up` stops, all of them
//! end before it returns.

/// Prints a line to the display, ignoring a closed stdout (e.g. `meshca up | head`): the display
/// must never take the running topology down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod cluster;
pub mod display;
pub mod meshes;
pub mod mgmt;
pub mod token;
pub mod topology;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshca_clock::SharedClock;
use meshca_pki::TrustDomain;
use meshca_store::fsutil;
use meshca_workload_ca::DemoIdp;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::DurationArg;
use display::{MeshRun, Runs, cross_mesh_line, print_status};
use meshes::MeshPlan;
pub use token::{TokenArgs, token};
use topology::{Topology, TopologyMgmt};
use workload::Workload;

/// Arguments of `meshca up`.
#[derive(clap::Args)]
pub struct Args {
    /// Number of workload clusters.
    #[arg(long, default_value_t = 2)]
    clusters: usize,
    /// Number of meshes under the one management plane: each a RootTrustPolicy (`mesh-1`, …)
    /// with its own generated root and trust domain (`mesh-<k>.<--trust-domain>`), the clusters
    /// split evenly between them (consecutive, selected by the label `meshca.io/mesh`). Sample
    /// traffic stays within each mesh (it goes between clusters: give each mesh two or more);
    /// cross-mesh calls are probes, counted apart (refused unless --federate). 1: one mesh of
    /// every cluster in --trust-domain.
    #[arg(long, default_value_t = 1)]
    meshes: usize,
    /// With --meshes 2 or more: each mesh federates with every other through this management
    /// plane's own SPIFFE bundle endpoint (`https_web`, with a certificate for localhost from a
    /// CA `up` makes, `bundle-endpoint/ca.pem`), so cross-mesh calls are accepted.
    #[arg(long, conflicts_with = "bundle_endpoint_cert")]
    federate: bool,
    /// Folder for everything (stores, cacerts, credentials, topology.json); a fresh one under the
    /// working directory by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Lifetime of the cluster intermediates (e.g. 90s to watch them rotate).
    #[arg(long, default_value = "720h")]
    intermediate_ttl: DurationArg,
    /// Lifetime of the workload leaves (e.g. 30s).
    #[arg(long, default_value = "24h")]
    leaf_ttl: DurationArg,
    /// Lifetime of the CRLs in ca-crl.pem (e.g. 20s to watch them re-signed at half of it).
    #[arg(long, default_value = "24h")]
    crl_ttl: DurationArg,
    /// How long after an intermediate's revocation the sample workloads still accept leaves it
    /// signed before it (its cluster's workloads renew under the new intermediate as soon as
    /// the CRL reaches them; a leaf it signed after the revocation is refused at once).
    #[arg(long, default_value = "20s")]
    revocation_grace: DurationArg,
    /// Renew intermediates when less than this fraction of their lifetime remains.
    #[arg(long, default_value_t = 0.2)]
    grace_ratio: f64,
    /// Lifetime of the generated root (e.g. 10m to watch it rotate by itself: a rotation starts
    /// when less than --root-rotation-ratio of it remains).
    #[arg(long, default_value = "87600h")]
    root_ttl: DurationArg,
    /// Start a root rotation when less than this fraction of the generated root's lifetime
    /// remains (the policy's rootRotation.triggerRatio).
    #[arg(long, default_value_t = 0.2)]
    root_rotation_ratio: f64,
    /// The root rotation's allowance for skew and propagation (rootRotation.skew); its waits are
    /// half the leaf lifetime plus this, then the leaf lifetime plus this.
    #[arg(long, default_value = "5s")]
    rotation_skew: DurationArg,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<DurationArg>,
    /// Time between two calls of one workload.
    #[arg(long, default_value = "250ms")]
    call_interval: DurationArg,
    /// Trust domain (with --meshes 2 or more, each mesh's is `mesh-<k>.` followed by this).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// Address of the web dashboard (HTTPS; a free port by default). Its URL and login token
    /// are printed at start.
    #[arg(long, default_value = "127.0.0.1:0")]
    dashboard_addr: std::net::SocketAddr,
    /// Where the mesh's root of trust comes from.
    #[arg(long, value_enum, default_value_t = CaChoice::Generated)]
    ca: CaChoice,
    /// With `--ca byo-intermediate`: a folder with your intermediate made by your PKI —
    /// `ca-cert.pem` (the intermediate), `ca-key.pem` (its key), and `cert-chain.pem` and/or
    /// `root-cert.pem` (the chain up to the root). Your root key is never needed. Replacing the
    /// files while `up` runs moves every cluster to the new intermediate.
    #[arg(long, required_if_eq("ca", "byo-intermediate"))]
    intermediate_from: Option<PathBuf>,
    #[command(flatten)]
    bundle: crate::cmd::bundle_endpoint::BundleEndpointArgs,
    #[command(flatten)]
    vault: VaultArgs,
}

/// `meshca up --ca vault`: where Vault is and how the clusters' Vault agents log in.
#[derive(clap::Args)]
struct VaultArgs {
    /// With `--ca vault`: Vault's address.
    #[arg(long, env = "VAULT_ADDR", required_if_eq("ca", "vault"))]
    vault_addr: Option<String>,
    /// With `--ca vault`: a file holding the Vault token the clusters' agents use (a token with
    /// `update` on `<mount>/root/sign-intermediate`; see docs/vault.md).
    #[arg(long, required_if_eq("ca", "vault"))]
    vault_token_file: Option<PathBuf>,
    /// With `--ca vault`: the PKI mount holding the root; intermediates are signed at
    /// `<mount>/root/sign-intermediate`.
    #[arg(long, default_value = "pki")]
    vault_mount: String,
    /// With `--ca vault`: have Vault generate each intermediate's key at
    /// `<mount>/intermediate/generate/exported` (the policy's `csrPath`).
    #[arg(long)]
    vault_csr_mount: Option<String>,
    /// With `--ca vault`: CA file for Vault's TLS certificate.
    #[arg(long, env = "VAULT_CACERT")]
    vault_ca_file: Option<PathBuf>,
    /// With `--ca vault`: where each cluster's memory-backed `cacerts` folder is made (removed
    /// when `up` stops).
    #[arg(long, default_value = "/dev/shm")]
    memory_dir_root: PathBuf,
    /// With `--ca vault`: allow a `--memory-dir-root` that is not tmpfs/ramfs (development).
    #[arg(long)]
    allow_disk_key: bool,
}

/// Root-of-trust modes `meshca up` can run.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum CaChoice {
    /// meshca generates the root (option 1).
    Generated,
    /// Your PKI's intermediate signs the cluster intermediates (option 3).
    ByoIntermediate,
    /// The root lives in Vault; each cluster's Vault agent keeps its key in memory (option 4).
    Vault,
}

/// The demo issuer of a cluster's service-account tokens: one ES256 key for the demo, one issuer
/// URL per cluster (a token from one cluster is not accepted by another's workload CA).
pub fn issuer_for(cluster: &str) -> String {
    format!("https://idp.meshca.local/{cluster}")
}

/// Where the demo issuer key lives under an `up` folder.
pub fn idp_key_path(dir: &Path) -> PathBuf {
    dir.join("idp").join("key.pem")
}

/// An absolute path that keeps symlinks (root-cert.pem must stay the store's stable link, not
/// the versioned file it points at today).
fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fsutil::create_private_dir(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fsutil::write_atomic(path, data, mode).with_context(|| format!("writing {}", path.display()))
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

/// Removes the memory-backed `cacerts` folders when `up` ends, however it ends: the
/// intermediate keys existed only there, and they go with the topology.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo issuer's key under `dir`, made on first use.
fn idp_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = idp_key_path(dir);
    match std::fs::read(&path) {
        Ok(k) => Ok(k),
        Err(_) => {
            let idp = DemoIdp::generate("unused")?;
            write(&path, idp.key_pem().as_bytes(), 0o600)?;
            Ok(idp.key_pem().into_bytes())
        }
    }
}

/// Runs the topology until Ctrl-C or `--duration`.
pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.clusters == 0 {
        bail!("--clusters must be at least 1");
    }
    let plans = meshes::plan(a.meshes, a.clusters, &a.trust_domain)?;
    if a.federate && plans.len() < 2 {
        bail!("--federate needs --meshes 2 or more: one mesh has nothing to federate with");
    }
    if plans.len() > 1 && a.ca != CaChoice::Generated {
        bail!("--meshes {} runs generated roots only (each mesh its own); drop --ca or use --meshes 1", a.meshes);
    }
    if !(a.grace_ratio > 0.0 && a.grace_ratio < 1.0) {
        bail!("--grace-ratio must be in (0, 1)");
    }
    if !(a.root_rotation_ratio > 0.0 && a.root_rotation_ratio < 1.0) {
        bail!("--root-rotation-ratio must be in (0, 1)");
    }
    meshca_mgmt::revocation::check_crl_ttl(a.crl_ttl.0).map_err(|e| anyhow::anyhow!("--crl-ttl: {e}"))?;
    let clock = meshca_clock::system();
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(format!("meshca-up-{}", meshca_clock::unix(clock.now()))),
    };
    fsutil::create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A rerun in the same folder must not leave the previous run's addresses for scripts to find.
    for stale in ["topology.json", "status.json", "summary.json"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let log_file = dir.join("meshca-up.log");
    super::init_file_logging(&log_file)?;
    meshca_tls::provider::install();

    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let result = run_topology(&a, &plans, &dir, &log_file, &clock, &mut tasks, &stop).await;
    stop.cancel();
    // Every task ends with the token; none is left behind.
    while tasks.join_next().await.is_some() {}
    result
}

async fn run_topology(
    a: &Args,
    plans: &[MeshPlan],
    dir: &Path,
    log_file: &Path,
    clock: &SharedClock,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mgmt = mgmt::start(a, plans, dir, clock, tasks, stop).await?;
    let _memory_guard = mgmt.memory_root.clone().map(RemoveOnDrop);
    let idp_key = idp_key(dir)?;
    let credentials = abs(&dir.join("mgmt").join("operator"));
    let several = plans.len() > 1;
    if several {
        say!("meshca up: {} clusters in {} meshes in {}", a.clusters, plans.len(), abs(dir));
    } else {
        say!("meshca up: {} clusters in {}", a.clusters, abs(dir));
    }
    say!("  management plane  {}  (meshca status --credentials {credentials})", mgmt.addr);
    say!("  dashboard         {}", mgmt.dashboard.login_url());
    say!(
        "                    (login token {}; the browser warns about the certificate: the management plane's relay CA, {}/relay-ca.pem, signed it)",
        mgmt.dashboard.token.secret(),
        credentials
    );
    say!("  SPIFFE bundle     {}", mgmt.bundle.describe());
    if let Some(ca) = &mgmt.bundle_ca {
        say!("                    (its certificate's CA: {})", abs(ca));
    }
    // Which records each mesh has (its root rotation's journal): the management plane recorded
    // them when it started its meshes, so this only reads.
    let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    let keys = meshca_mgmt::meshes::keyspaces(mgmt.store.as_ref(), &names).await?;
    let mut topology_meshes = Vec::new();
    let mut mesh_runs = Vec::new();
    for p in plans {
        let federates_with: Vec<String> =
            meshes::federated_with(plans, p, a.federate).iter().map(ToString::to_string).collect();
        let cluster_names: Vec<String> = p.clusters.iter().map(|i| format!("cluster-{i}")).collect();
        let bundle_url = format!("{}{}", mgmt.bundle.url, p.trust_domain);
        if several {
            say!("  mesh {}  trust domain {}  clusters {}", p.name, p.trust_domain, cluster_names.join(", "));
            say!("    bundle  {bundle_url}");
            if !federates_with.is_empty() {
                say!("    federates with  {}", federates_with.join(", "));
            }
        }
        mesh_runs.push(MeshRun {
            name: p.name.clone(),
            trust_domain: p.trust_domain.to_string(),
            keys: keys.get(&p.name).cloned().unwrap_or_else(|| meshca_mgmt::records::Keyspace::named(&p.name)),
        });
        topology_meshes.push(topology::TopologyMesh {
            policy: p.name.clone(),
            trust_domain: p.trust_domain.to_string(),
            clusters: cluster_names,
            bundle_url,
            federates_with,
        });
    }

    mgmt::federate(&mgmt, plans, dir, clock).await?;

    let mut topo = Vec::new();
    let mut runs = Runs { meshes: mesh_runs, clusters: Vec::new(), federated: a.federate };
    let mut workloads: Vec<Arc<Workload>> = Vec::new();
    for p in plans {
        let member = cluster::Membership {
            mesh: p,
            several,
            labels: p.labels(several),
            federated_with: meshes::federated_with(plans, p, a.federate),
        };
        for &i in &p.clusters {
            let c = cluster::start(a, i, &member, dir, &mgmt, &idp_key, clock, tasks, stop)
                .await
                .with_context(|| format!("starting cluster-{i} (see {})", log_file.display()))?;
            topo.push(c.topology);
            runs.clusters.push(c.run);
            workloads.extend(c.workloads);
        }
    }
    for w in &workloads {
        say!("  workload  {:<45} {}  {}", w.id.to_string(), w.cluster, w.addr);
    }
    let topology = Topology {
        meshes: topology_meshes,
        clusters: topo,
        management_plane: TopologyMgmt {
            address: mgmt.addr.to_string(),
            credentials,
            dashboard: mgmt.dashboard.url.clone(),
            bundle_endpoint: topology::TopologyBundle {
                url: mgmt.bundle.url.clone(),
                profile: mgmt.bundle.profile.into(),
                spiffe_id: mgmt.bundle.spiffe_id.clone(),
                ca_file: mgmt.bundle_ca.as_deref().map(abs),
            },
        },
    };
    write(&dir.join("topology.json"), serde_json::to_string_pretty(&topology)?.as_bytes(), 0o644)?;
    say!("  topology  {}", abs(&dir.join("topology.json")));
    if several {
        say!("  policies  {}  (change them with meshca policy apply FILE)", abs(&dir.join("policies.yaml")));
    }
    say!("  logs      {}", abs(log_file));

    for w in &workloads {
        tasks.spawn(workload::traffic(w.clone(), workloads.clone(), a.call_interval.0, a.federate, stop.child_token()));
    }

    let started = Instant::now();
    let end = a.duration.map(|d| started + d.0);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_print = Instant::now() - Duration::from_secs(60);
    // One signal future for the whole run, so a Ctrl-C arriving while a tick is being handled
    // is not lost.
    let ctrl_c = super::ctrl_c();
    tokio::pin!(ctrl_c);
    let summary = loop {
        tokio::select! {
            _ = &mut ctrl_c => break runs.collect(&workloads, mgmt.store.as_ref(), started, clock.now()).await,
            _ = tick.tick() => {}
        }
        let s = runs.collect(&workloads, mgmt.store.as_ref(), started, clock.now()).await;
        write(&dir.join("status.json"), serde_json::to_string_pretty(&s)?.as_bytes(), 0o644)?;
        if last_print.elapsed() >= Duration::from_secs(10)
            || s.handshakes_failed > 0 && last_print.elapsed() >= Duration::from_secs(2)
        {
            print_status(&s);
            last_print = Instant::now();
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            break s;
        }
    };
    write(&dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes(), 0o644)?;
    say!(
        "stopped after {}s: {} handshakes ok, {} failed",
        summary.running_seconds,
        summary.handshakes_ok,
        summary.handshakes_failed
    );
    if let Some(c) = &summary.cross_mesh {
        say!("  {}", cross_mesh_line(c));
    }
    for c in &summary.clusters {
        say!("  {}  {} intermediate rotations, {} leaves issued", c.name, c.intermediate_rotations, c.leaves_issued);
    }
    if summary.handshakes_failed > 0 {
        bail!("{} handshakes failed (see {})", summary.handshakes_failed, log_file.display());
    }
    Ok(())
}
