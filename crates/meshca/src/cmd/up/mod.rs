//! `meshca up`: the whole mesh trust topology on one machine, on the embedded default (directory
//! stores, no Kubernetes). One process runs the management plane, N workload clusters (agent +
//! workload CA each), a demo identity provider, and two sample workloads per cluster making mTLS
//! connections across clusters. It shows each cluster's chain and a live count of handshakes.

pub mod workload;

/// Prints a line to the display, ignoring a closed stdout (e.g. `meshca up | head`): the display
/// must never take the running topology down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use meshca_agent::AgentOptions;
use meshca_mgmt::{ServerOptions, Settings};
use meshca_pki::chain::rfc3339;
use meshca_pki::{CaBundle, SpiffeId, TrustDomain};
use meshca_policy::Policy;
use meshca_store::dir::DirStore;
use meshca_store::fsutil;
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE, JwtAuthenticator, Metrics, Options, TtlPolicy};
use serde::Serialize;
use tokio::sync::watch;

use super::DurationArg;
use workload::{CaEndpoint, Workload};

/// Arguments of `meshca up`.
#[derive(clap::Args)]
pub struct Args {
    /// Number of workload clusters.
    #[arg(long, default_value_t = 2)]
    clusters: usize,
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
    /// Renew intermediates when less than this fraction of their lifetime remains.
    #[arg(long, default_value_t = 0.2)]
    grace_ratio: f64,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<DurationArg>,
    /// Time between two calls of one workload.
    #[arg(long, default_value = "250ms")]
    call_interval: DurationArg,
    /// Trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
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

/// Name of the secret `up` keeps the user's intermediate in.
const USER_INTERMEDIATE: &str = "user-intermediate";
/// Files read from `--intermediate-from`.
const INTERMEDIATE_FILES: [&str; 7] =
    ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "tls.crt", "tls.key", "ca.crt"];

/// Reads the user's intermediate folder as a secret; `None` when it holds none of the files.
fn read_intermediate_dir(dir: &Path) -> Option<meshca_store::Secret> {
    let entries: Vec<(String, Vec<u8>)> =
        INTERMEDIATE_FILES.iter().filter_map(|n| std::fs::read(dir.join(n)).ok().map(|d| (n.to_string(), d))).collect();
    (!entries.is_empty()).then(|| meshca_store::Secret::with_data(entries))
}

/// Copies the user's intermediate into the management store whenever the folder changes; the
/// management plane validates it and, if good, moves every cluster to it.
async fn follow_intermediate_dir(dir: PathBuf, store: Arc<DirStore>) {
    use meshca_store::{ObjectKey, Precondition, Store};
    let Ok(key) = ObjectKey::new("meshca", USER_INTERMEDIATE) else { return };
    let mut last = read_intermediate_dir(&dir);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read_intermediate_dir(&dir);
        if now != last {
            if let Some(secret) = &now {
                match store.put(&key, secret, Precondition::Any).await {
                    Ok(_) => {
                        tracing::info!(dir = %dir.display(), "the user's intermediate changed; handed to the management plane")
                    }
                    Err(e) => tracing::error!(error = %e, "storing the user's intermediate failed"),
                }
            }
            last = now;
        }
    }
}

/// `topology.json`: what scripts and other tools need to drive the demo.
#[derive(Serialize)]
struct Topology {
    clusters: Vec<TopologyCluster>,
    management_plane: TopologyMgmt,
}

#[derive(Serialize)]
struct TopologyCluster {
    name: String,
    trust_domain: String,
    cacerts_dir: String,
    workload_ca: TopologyCa,
    token_file: String,
    jwt_issuer: String,
}

#[derive(Serialize)]
struct TopologyCa {
    address: String,
    ca_file: String,
    server_name: String,
    metrics: String,
    metrics_token_file: String,
}

#[derive(Serialize)]
struct TopologyMgmt {
    address: String,
    credentials: String,
}

/// The live (and final) numbers, also written to `status.json`.
#[derive(Serialize, Default, Clone)]
struct Summary {
    handshakes_ok: u64,
    handshakes_failed: u64,
    clusters: Vec<ClusterSummary>,
    running_seconds: u64,
}

#[derive(Serialize, Default, Clone)]
struct ClusterSummary {
    name: String,
    intermediate_serial: String,
    intermediate_not_after: String,
    intermediate_rotations: u64,
    leaves_issued: u64,
    handshakes_ok: u64,
    handshakes_failed: u64,
    last_error: String,
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

struct ClusterRun {
    name: String,
    cacerts: PathBuf,
    serial: String,
    rotations: u64,
}

/// Runs the topology until Ctrl-C or `--duration`.
pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.clusters == 0 {
        bail!("--clusters must be at least 1");
    }
    if !(a.grace_ratio > 0.0 && a.grace_ratio < 1.0) {
        bail!("--grace-ratio must be in (0, 1)");
    }
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            PathBuf::from(format!("meshca-up-{stamp}"))
        }
    };
    fsutil::create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A rerun in the same folder must not leave the previous run's addresses for scripts to find.
    for stale in ["topology.json", "status.json", "summary.json"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let log_file = dir.join("meshca-up.log");
    super::init_file_logging(&log_file)?;
    meshca_tls::provider::install();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_signal = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Management plane.
    let mgmt_store = Arc::new(DirStore::open(dir.join("mgmt").join("store"))?);
    let mut policy = Policy::generated_default(a.intermediate_ttl.0);
    policy.trust_domain = a.trust_domain.clone();
    policy.intermediate.grace_period_ratio = a.grace_ratio;
    if a.ca == CaChoice::ByoIntermediate {
        use meshca_store::{ObjectKey, Precondition, Store};
        let from = a.intermediate_from.clone().context("--intermediate-from is required with --ca byo-intermediate")?;
        let secret = read_intermediate_dir(&from)
            .with_context(|| format!("{} holds none of {}", from.display(), INTERMEDIATE_FILES.join(", ")))?;
        mgmt_store.put(&ObjectKey::new("meshca", USER_INTERMEDIATE)?, &secret, Precondition::Any).await?;
        policy.ca = meshca_policy::CaMode::IntermediateRef {
            secret: meshca_policy::SecretRef { namespace: "meshca".into(), name: USER_INTERMEDIATE.into() },
            expiry_warning: Duration::from_secs(720 * 3600),
        };
        let trial = meshca_mgmt::authority::load(mgmt_store.as_ref(), policy.clone(), SystemTime::now()).await;
        if let Some(e) = trial.error {
            bail!("{e}");
        }
        tokio::spawn(follow_intermediate_dir(from, mgmt_store.clone()));
    }
    let memory_root = if a.ca == CaChoice::Vault {
        policy.ca = meshca_policy::CaMode::Vault(Box::new(vault_doc(&a.vault)?));
        let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Some(a.vault.memory_dir_root.join(format!("meshca-up-{}-{stamp}", std::process::id())))
    } else {
        None
    };
    let _memory_guard = memory_root.clone().map(RemoveOnDrop);
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        hostnames: vec!["localhost".into()],
        policy_yaml: None,
        default_policy: policy,
        operator_dir: Some(dir.join("mgmt").join("operator")),
        settings: Settings { report_interval: Duration::from_secs(5), ..Settings::default() },
        issue_burst: 5,
        issue_per_minute: 30.0,
        metrics_listen: None,
        metrics_token: None,
    };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(meshca_mgmt::serve(
        mgmt_store.clone(),
        opts,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        stop_signal(),
    ));
    let mgmt_addr = match addr_rx.await {
        Ok(a) => a,
        Err(_) => {
            let e = server.await.map_err(|e| anyhow::anyhow!("{e}"))?.err().map(|e| e.to_string()).unwrap_or_default();
            bail!("the management plane did not start: {e}");
        }
    };
    let relay_ca = std::fs::read(dir.join("mgmt").join("operator").join("relay-ca.pem"))?;

    // Demo identity provider.
    let idp_path = idp_key_path(&dir);
    let idp_key = match std::fs::read(&idp_path) {
        Ok(k) => k,
        Err(_) => {
            let idp = DemoIdp::generate("unused")?;
            write(&idp_path, idp.key_pem().as_bytes(), 0o600)?;
            idp.key_pem().into_bytes()
        }
    };

    say!("meshca up: {} clusters in {}", a.clusters, abs(&dir));
    say!("  management plane  {mgmt_addr}  (meshca status --credentials {})", abs(&dir.join("mgmt").join("operator")));

    let mut topo = Vec::new();
    let mut runs = Vec::new();
    let mut workloads: Vec<Arc<Workload>> = Vec::new();
    for i in 1..=a.clusters {
        let name = format!("cluster-{i}");
        let cdir = dir.join(&name);
        let store = Arc::new(DirStore::open(cdir.join("store"))?);
        let cacerts_key = meshca_store::ObjectKey::new("istio-system", "cacerts")?;
        let mut cacerts = store.object_path(&cacerts_key);
        // Agent: registered with a bootstrap token minted directly in the management store.
        let token =
            meshca_mgmt::tokens::create(mgmt_store.as_ref(), &name, Duration::from_secs(600), SystemTime::now())
                .await?;
        let mut ao = AgentOptions::new(&name, &mgmt_addr.to_string())?;
        ao.bootstrap_token = Some(token.token);
        ao.relay_ca = Some(relay_ca.clone());
        ao.backoff_max = Duration::from_secs(5);
        let mut agent_store: Arc<dyn meshca_store::Store> = store.clone();
        let mut source: Option<Arc<dyn meshca_agent::source::IntermediateSource>> = None;
        if let Some(root) = &memory_root {
            // Vault mode: cacerts (key included) only in a memory-backed folder; the agent's
            // identity stays in the cluster's store.
            cacerts = root.join(&name);
            meshca_vault::memdir::prepare(&cacerts, a.vault.allow_disk_key)?;
            agent_store = Arc::new(
                meshca_store::single::SingleObjectDir::open(cacerts_key, &cacerts)?.with_others(store.clone()),
            );
            source = Some(Arc::new(meshca_vault::VaultSource::new(Default::default())));
        }
        let rx = stop_rx.clone();
        let agent_name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = meshca_agent::run_with(agent_store, ao, source, rx).await {
                tracing::error!(cluster = %agent_name, error = %e, "agent stopped");
                eprintln!("agent of {agent_name} stopped: {e}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let bundle = loop {
            if let Ok(b) = CaBundle::validate(&workload_files(&cacerts), SystemTime::now()) {
                break b;
            }
            if Instant::now() > deadline {
                bail!("{name}: no valid cacerts after 60 s (see {})", log_file.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };

        // Workload CA trusting this cluster's issuer.
        let issuer = issuer_for(&name);
        let idp = Arc::new(DemoIdp::from_key(&idp_key, &issuer)?);
        write(&cdir.join("idp").join("jwks.json"), idp.jwks_json().as_bytes(), 0o644)?;
        let auth = Arc::new(JwtAuthenticator::from_jwks(&issuer, &idp.jwks_json(), ISTIO_CA_AUDIENCE)?);
        let metrics_token = random_token();
        let metrics_token_file = cdir.join("metrics-token");
        write(&metrics_token_file, metrics_token.as_bytes(), 0o600)?;
        let wopts = Options {
            cacerts_dir: cacerts.clone(),
            listen: "127.0.0.1:0".parse()?,
            metrics_listen: Some("127.0.0.1:0".parse()?),
            metrics_token: Some(metrics_token),
            trust_domain: a.trust_domain.clone(),
            auth,
            ttl: TtlPolicy::default(),
            max_per_second: 0,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(meshca_workload_ca::serve(
            wopts,
            Metrics::new(),
            move |addr, m| {
                let _ = tx.send((addr, m));
            },
            stop_signal(),
        ));
        let (ca_addr, metrics_addr) = rx.await.context("the workload CA did not start")?;

        // A token for ns/default/sa/sleep of this cluster, for scripts.
        let token_file = cdir.join("token-default-sleep");
        let sleep_token =
            idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(24 * 3600), SystemTime::now())?;
        write(&token_file, sleep_token.as_bytes(), 0o600)?;

        let endpoint = CaEndpoint {
            address: ca_addr.to_string(),
            root_file: cacerts.join("root-cert.pem"),
            cluster: name.clone(),
            idp,
        };
        for sa in ["sleep", "httpbin"] {
            let id = SpiffeId::workload(&a.trust_domain, "default", &format!("{sa}-{i}"))?;
            workloads.push(Workload::start(&name, id, &a.trust_domain, endpoint.clone(), a.leaf_ttl.0).await?);
        }

        let ca = bundle.ca_cert();
        say!("  {name}");
        say!("    root          {}", bundle.roots().iter().next().map(|r| r.subject()).unwrap_or_default());
        for above in bundle.signer().chain().iter().skip(1).filter(|c| !c.is_self_issued()) {
            say!("    your CA       {}  expires {}", above.subject(), rfc3339(above.not_after()));
        }
        say!(
            "    intermediate  {}  serial {}  expires {}",
            ca.subject(),
            short(&ca.serial_hex()),
            rfc3339(ca.not_after())
        );
        say!("    workload CA   {ca_addr}  cacerts {}", abs(&cacerts));
        topo.push(TopologyCluster {
            name: name.clone(),
            trust_domain: a.trust_domain.to_string(),
            cacerts_dir: abs(&cacerts),
            workload_ca: TopologyCa {
                address: ca_addr.to_string(),
                ca_file: abs(&cacerts.join("root-cert.pem")),
                server_name: "istiod.istio-system.svc".into(),
                metrics: metrics_addr.map(|m| format!("http://{m}/metrics")).unwrap_or_default(),
                metrics_token_file: abs(&metrics_token_file),
            },
            token_file: abs(&token_file),
            jwt_issuer: issuer,
        });
        runs.push(ClusterRun { name, cacerts, serial: ca.serial_hex(), rotations: 0 });
    }
    for w in &workloads {
        say!("  workload  {:<45} {}  {}", w.id.to_string(), w.cluster, w.addr);
    }
    let topology = Topology {
        clusters: topo,
        management_plane: TopologyMgmt {
            address: mgmt_addr.to_string(),
            credentials: abs(&dir.join("mgmt").join("operator")),
        },
    };
    write(&dir.join("topology.json"), serde_json::to_string_pretty(&topology)?.as_bytes(), 0o644)?;
    say!("  topology  {}", abs(&dir.join("topology.json")));
    say!("  logs      {}", abs(&log_file));

    for w in &workloads {
        tokio::spawn(workload::traffic(w.clone(), workloads.clone(), a.call_interval.0));
    }

    let started = Instant::now();
    let end = a.duration.map(|d| started + d.0);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_print = Instant::now() - Duration::from_secs(60);
    // One signal future for the whole run, so a Ctrl-C arriving while a tick is being handled
    // is not lost.
    let stop = super::ctrl_c();
    tokio::pin!(stop);
    let summary = loop {
        tokio::select! {
            _ = &mut stop => break collect(&mut runs, &workloads, started).await,
            _ = tick.tick() => {}
        }
        let s = collect(&mut runs, &workloads, started).await;
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
    let _ = stop_tx.send(true);
    write(&dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes(), 0o644)?;
    say!(
        "stopped after {}s: {} handshakes ok, {} failed",
        summary.running_seconds,
        summary.handshakes_ok,
        summary.handshakes_failed
    );
    for c in &summary.clusters {
        say!("  {}  {} intermediate rotations, {} leaves issued", c.name, c.intermediate_rotations, c.leaves_issued);
    }
    // Give the servers a moment to drain.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if summary.handshakes_failed > 0 {
        bail!("{} handshakes failed (see {})", summary.handshakes_failed, log_file.display());
    }
    Ok(())
}

/// Removes the memory-backed `cacerts` folders when `up` ends, however it ends: the
/// intermediate keys existed only there, and they go with the topology.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The policy's `vault` block for `--ca vault`: a token from a file, the root at `<mount>`.
fn vault_doc(v: &VaultArgs) -> anyhow::Result<meshca_policy::VaultDoc> {
    use meshca_policy::{VaultAuthDoc, VaultDoc, VaultTlsDoc, VaultTokenDoc};
    let server = v.vault_addr.clone().context("--vault-addr (or VAULT_ADDR) is required with --ca vault")?;
    let token_file = v.vault_token_file.as_deref().context("--vault-token-file is required with --ca vault")?;
    let mount = v.vault_mount.trim_matches('/');
    Ok(VaultDoc {
        server,
        ca_path: format!("{mount}/root/sign-intermediate"),
        csr_path: v
            .vault_csr_mount
            .as_deref()
            .map(|m| format!("{}/intermediate/generate/exported", m.trim_matches('/'))),
        namespace: None,
        tls: v.vault_ca_file.as_deref().map(|f| VaultTlsDoc { ca_file: Some(abs(f)) }),
        auth: VaultAuthDoc {
            token: Some(VaultTokenDoc { secret_ref: None, token_file: Some(abs(token_file)) }),
            ..Default::default()
        },
    })
}

fn workload_files(cacerts: &Path) -> meshca_pki::BundleFiles {
    meshca_workload_ca::ca::read_dir(cacerts)
}

fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

async fn collect(runs: &mut [ClusterRun], workloads: &[Arc<Workload>], started: Instant) -> Summary {
    let mut s = Summary { running_seconds: started.elapsed().as_secs(), ..Default::default() };
    for r in runs.iter_mut() {
        let mut c = ClusterSummary { name: r.name.clone(), ..Default::default() };
        if let Ok(b) = CaBundle::validate(&workload_files(&r.cacerts), SystemTime::now()) {
            let serial = b.ca_cert().serial_hex();
            if serial != r.serial {
                r.rotations += 1;
                r.serial = serial;
            }
            c.intermediate_not_after = rfc3339(b.ca_cert().not_after());
        }
        c.intermediate_serial = r.serial.clone();
        c.intermediate_rotations = r.rotations;
        for w in workloads.iter().filter(|w| w.cluster == r.name) {
            c.handshakes_ok += w.counters.ok.load(Ordering::Relaxed);
            c.handshakes_failed += w.counters.failed.load(Ordering::Relaxed);
            c.leaves_issued += w.counters.leaves.load(Ordering::Relaxed);
            let e = w.counters.last_error.lock().await.clone();
            if !e.is_empty() {
                c.last_error = e;
            }
        }
        s.handshakes_ok += c.handshakes_ok;
        s.handshakes_failed += c.handshakes_failed;
        s.clusters.push(c);
    }
    s
}

fn print_status(s: &Summary) {
    say!("[{:>5}s] handshakes ok {}  failed {}", s.running_seconds, s.handshakes_ok, s.handshakes_failed);
    for c in &s.clusters {
        say!(
            "         {}  intermediate {} (until {}, {} rotations)  leaves {}  ok {}  failed {}{}",
            c.name,
            short(&c.intermediate_serial),
            c.intermediate_not_after,
            c.intermediate_rotations,
            c.leaves_issued,
            c.handshakes_ok,
            c.handshakes_failed,
            if c.last_error.is_empty() { String::new() } else { format!("  last error: {}", c.last_error) }
        );
    }
}

/// Arguments of `meshca token`.
#[derive(clap::Args)]
pub struct TokenArgs {
    /// The `meshca up` folder.
    #[arg(long)]
    dir: PathBuf,
    /// The cluster whose issuer signs the token.
    #[arg(long)]
    cluster: String,
    /// Namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Service account.
    #[arg(long)]
    service_account: String,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    ttl: DurationArg,
    /// Audience.
    #[arg(long, default_value = ISTIO_CA_AUDIENCE)]
    audience: String,
}

/// `meshca token`: a fresh token from the demo identity provider.
pub fn token(a: TokenArgs) -> anyhow::Result<()> {
    let key = std::fs::read(idp_key_path(&a.dir))
        .with_context(|| format!("reading the demo issuer key under {}", a.dir.display()))?;
    let idp = DemoIdp::from_key(&key, &issuer_for(&a.cluster))?;
    say!("{}", idp.mint(&a.namespace, &a.service_account, &a.audience, a.ttl.0, SystemTime::now())?);
    Ok(())
}
