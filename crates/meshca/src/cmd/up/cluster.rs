//! One workload cluster of `meshca up`: its agent (registered with a bootstrap token minted in
//! the management store), its workload CA on the `cacerts` the agent writes, and two sample
//! workloads.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshca_agent::AgentOptions;
use meshca_clock::SharedClock;
use meshca_pki::chain::rfc3339;
use meshca_pki::{CaBundle, SpiffeId};
use meshca_store::dir::DirStore;
use meshca_workload_ca::{
    CachingAuthenticator, DemoIdp, ISTIO_CA_AUDIENCE, JwtAuthenticator, Metrics, Options, TtlPolicy,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::display::{ClusterRun, short};
use super::meshes::MeshPlan;
use super::mgmt::Started;
use super::topology::{TopologyCa, TopologyCluster, TopologyWorkload};
use super::workload::{CaEndpoint, Workload};
use super::{Args, abs, issuer_for, random_token, write};

/// A started cluster.
pub struct Cluster {
    pub run: ClusterRun,
    pub topology: TopologyCluster,
    pub workloads: Vec<Arc<Workload>>,
}

/// How long a cluster may take to hold its first valid `cacerts`.
const FIRST_CACERTS: Duration = Duration::from_secs(60);

/// How long a cluster may take to hold the bundles of the trust domains its mesh federates with
/// (`--federate`). A fetch that fails is retried after [`meshca_mgmt::federation::fetch::RETRY`].
const FIRST_FEDERATION: Duration = Duration::from_secs(75);

/// Which mesh a cluster is in.
pub struct Membership<'a> {
    /// Its mesh.
    pub mesh: &'a MeshPlan,
    /// Whether there are several meshes (the display names the cluster's).
    pub several: bool,
    /// The labels its record gets (the mesh's policy selects it by them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// With `--federate`: the other meshes' trust domains, whose bundles its agent must have
    /// written before its sample workloads start.
    pub federated_with: Vec<meshca_pki::TrustDomain>,
}

/// Starts cluster number `i` of mesh `member`, its tasks in `tasks`.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    a: &Args,
    i: usize,
    member: &Membership<'_>,
    dir: &Path,
    mgmt: &Started,
    idp_key: &[u8],
    clock: &SharedClock,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<Cluster> {
    let name = format!("cluster-{i}");
    let cdir = dir.join(&name);
    let store = Arc::new(DirStore::open(cdir.join("store"))?);
    let cacerts_key = meshca_store::ObjectKey::new("istio-system", "cacerts")?;
    let mut cacerts = store.object_path(&cacerts_key);
    let token = meshca_mgmt::tokens::create(
        mgmt.store.as_ref(),
        &name,
        &member.labels,
        Duration::from_secs(600),
        "meshca up",
        clock.now(),
    )
    .await?;
    let mut ao = AgentOptions::new(&name, &mgmt.addr.to_string())?;
    ao.bootstrap_token = Some(token.token);
    ao.relay_ca = Some(mgmt.relay_ca.clone());
    ao.backoff_max = Duration::from_secs(5);
    ao.clock = clock.clone();
    let mut agent_store: Arc<dyn meshca_store::Store> = store.clone();
    let mut source: Option<Arc<dyn meshca_agent::source::IntermediateSource>> = None;
    if let Some(root) = &mgmt.memory_root {
        // Vault mode: cacerts (key included) only in a memory-backed folder; the agent's
        // identity stays in the cluster's store.
        cacerts = root.join(&name);
        meshca_vault::memdir::prepare(&cacerts, a.vault.allow_disk_key)?;
        agent_store =
            Arc::new(meshca_store::single::SingleObjectDir::open(cacerts_key, &cacerts)?.with_others(store.clone()));
        source = Some(Arc::new(meshca_vault::VaultSource::new(Default::default(), clock.clone())));
    }
    let agent_name = name.clone();
    let agent_stop = stop.child_token();
    tasks.spawn(async move {
        if let Err(e) = meshca_agent::run_with(agent_store, ao, source, agent_stop).await {
            tracing::error!(cluster = %agent_name, error = %e, "agent stopped");
            eprintln!("agent of {agent_name} stopped: {e}");
        }
    });
    let bundle = first_bundle(&name, &cacerts, clock).await?;
    let federated_dir =
        store.object_path(&meshca_store::ObjectKey::new("istio-system", meshca_agent::federated::OBJECT)?);
    first_federation(&name, &federated_dir, &member.federated_with).await?;
    let td = &member.mesh.trust_domain;

    // Workload CA trusting this cluster's issuer.
    let issuer = issuer_for(&name);
    let idp = Arc::new(DemoIdp::from_key(idp_key, &issuer)?);
    write(&cdir.join("idp").join("jwks.json"), idp.jwks_json().as_bytes(), 0o644)?;
    // The same token cache as `meshca workload-ca` by default.
    let jwt = JwtAuthenticator::from_jwks(&issuer, &idp.jwks_json(), ISTIO_CA_AUDIENCE)?.with_clock(clock.clone());
    let auth = Arc::new(
        CachingAuthenticator::new(jwt, 100_000, meshca_workload_ca::authn::DEFAULT_TOKEN_CACHE_TTL)
            .with_clock(clock.clone()),
    );
    let metrics_token = random_token();
    let metrics_token_file = cdir.join("metrics-token");
    write(&metrics_token_file, metrics_token.as_bytes(), 0o600)?;
    let wopts = Options {
        cacerts_dir: cacerts.clone(),
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: Some("127.0.0.1:0".parse()?),
        metrics_token: Some(metrics_token),
        trust_domain: td.clone(),
        auth,
        // No leaf outlives --leaf-ttl: the root rotation's waits are computed from it.
        ttl: TtlPolicy { default: a.leaf_ttl.0, max: a.leaf_ttl.0 },
        limits: meshca_workload_ca::service::Limits::default(),
        serve: meshca_serve::ServeConfig::default(),
        clock: clock.clone(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ca_stop = stop.clone();
    let ca_name = name.clone();
    tasks.spawn(async move {
        let served = meshca_workload_ca::serve(
            wopts,
            Metrics::new(),
            move |addr, m| {
                let _ = tx.send((addr, m));
            },
            ca_stop.cancelled_owned(),
        )
        .await;
        if let Err(e) = served {
            tracing::error!(cluster = %ca_name, error = %e, "the workload CA stopped");
        }
    });
    let (ca_addr, metrics_addr) = rx.await.context("the workload CA did not start")?;

    // A token for ns/default/sa/sleep of this cluster, for scripts.
    let token_file = cdir.join("token-default-sleep");
    let sleep_token = idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(24 * 3600), clock.now())?;
    write(&token_file, sleep_token.as_bytes(), 0o600)?;

    let endpoint = CaEndpoint {
        address: ca_addr.to_string(),
        root_file: cacerts.join("root-cert.pem"),
        crl_file: cacerts.join(meshca_pki::bundle::CA_CRL),
        federated_dir,
        cluster: name.clone(),
        idp,
        clock: clock.clone(),
    };
    let mut workloads = Vec::new();
    let grace = meshca_tls::RevocationGrace(a.revocation_grace.0);
    for sa in ["sleep", "httpbin"] {
        let name_i = format!("{sa}-{i}");
        let id = SpiffeId::workload(td, "default", &name_i)?;
        let chain_file = cdir.join("workloads").join(&name_i).join("cert-chain.pem");
        let ttl = a.leaf_ttl.0;
        let mesh = &member.mesh.name;
        workloads
            .push(Workload::start(&name, mesh, id, td, endpoint.clone(), ttl, grace, chain_file, tasks, stop).await?);
    }

    let ca = bundle.ca_cert();
    if member.several {
        say!("  {name}  (mesh {}, trust domain {td})", member.mesh.name);
    } else {
        say!("  {name}");
    }
    for root in bundle.roots().iter() {
        // Every mesh's generated root has the same subject: the fingerprint tells them apart.
        say!("    root          {}  fingerprint {}", root.subject(), short(&root.fingerprint()));
    }
    for above in bundle.signer().chain().iter().skip(1).filter(|c| !c.is_self_issued()) {
        say!("    your CA       {}  expires {}", above.subject(), rfc3339(above.not_after()));
    }
    say!("    intermediate  {}  serial {}  expires {}", ca.subject(), short(&ca.serial_hex()), rfc3339(ca.not_after()));
    say!("    workload CA   {ca_addr}  cacerts {}", abs(&cacerts));
    let topology = TopologyCluster {
        name: name.clone(),
        mesh: member.mesh.name.clone(),
        trust_domain: td.to_string(),
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
        workloads: workloads
            .iter()
            .map(|w| TopologyWorkload {
                id: w.id.to_string(),
                address: w.addr.to_string(),
                cert_chain: abs(&w.chain_file),
            })
            .collect(),
    };
    let run = ClusterRun { name, mesh: member.mesh.name.clone(), cacerts, serial: ca.serial_hex(), rotations: 0 };
    Ok(Cluster { run, topology, workloads })
}

/// Waits for the agent's first valid `cacerts`.
async fn first_bundle(name: &str, cacerts: &Path, clock: &SharedClock) -> anyhow::Result<CaBundle> {
    let deadline = tokio::time::Instant::now() + FIRST_CACERTS;
    loop {
        if let Ok(files) = meshca_workload_ca::ca::read_cacerts_dir(cacerts)
            && let Ok(b) = CaBundle::validate(&files, clock.now())
        {
            return Ok(b);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name}: no valid cacerts after {}s (see the log)", FIRST_CACERTS.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the agent to have written the bundle of each trust domain in `domains` (none: at
/// once), so the cluster's sample workloads accept the federated meshes from their first call.
async fn first_federation(name: &str, dir: &Path, domains: &[meshca_pki::TrustDomain]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + FIRST_FEDERATION;
    loop {
        let missing: Vec<&str> = domains
            .iter()
            .map(|td| td.as_str())
            .filter(|td| !dir.join(meshca_agent::federated::file_name(td)).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{name}: no federated bundle of {} after {}s (see the log and `meshca status`)",
                missing.join(", "),
                FIRST_FEDERATION.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
