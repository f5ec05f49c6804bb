//! `meshca server`: the management plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshca_mgmt::{ServerOptions, Settings};
use meshca_policy::Policy;
use meshca_store::dir::DirStore;
use meshca_store::migrate;

use super::DurationArg;

/// Arguments of `meshca server`.
#[derive(clap::Args)]
pub struct Args {
    /// Data directory: the store (`store.db`) and the operator credentials (`operator/`).
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    data_dir: PathBuf,
    /// Where the management plane keeps its state (outside Kubernetes mode). `sqlite`: one
    /// transactional file, `<data-dir>/store.db`, whose writes share fsyncs (an earlier meshca's
    /// `<data-dir>/store/` is moved into it on first start). `dir`: the directory tree
    /// `<data-dir>/store/`, one file per key (for comparisons; several fsyncs per write).
    #[arg(long, value_enum, default_value_t = StoreBackend::Sqlite)]
    store: StoreBackend,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// DNS names on the serving certificate; agents connect with one of them as server name.
    #[arg(long = "hostname", default_values_t = vec!["localhost".to_string()])]
    hostnames: Vec<String>,
    /// A RootTrustPolicy (YAML) to put in force; without it the stored one is used, or a
    /// generated root for every cluster.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// How often agents report status.
    #[arg(long, default_value = "30s")]
    report_interval: DurationArg,
    /// Lifetime of the CRLs in every cluster's ca-crl.pem (nextUpdate − thisUpdate); each is
    /// re-signed at half of it.
    #[arg(long, default_value = "24h")]
    crl_ttl: DurationArg,
    /// Intermediate issuances a cluster may make at once.
    #[arg(long, default_value_t = 5)]
    issue_burst: u32,
    /// Issuances per cluster per minute, after the burst.
    #[arg(long, default_value_t = 6.0)]
    issue_per_minute: f64,
    /// Prometheus metrics address (status as gauges at /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File with the bearer token required on /metrics.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
    /// Serve the web dashboard (HTTPS) on this address. It prints a login token at start; the
    /// operator's client certificate also opens it.
    #[arg(long)]
    dashboard_addr: Option<SocketAddr>,
    /// Calls one address (IPv6: one /64) may make per second without a client certificate
    /// (registration), before its bootstrap token is even looked up (0: no limit). Agents with
    /// an identity are limited per cluster instead (--issue-burst, --issue-per-minute).
    #[arg(long, default_value_t = meshca_mgmt::server::DEFAULT_PEER_RATE.per_second)]
    peer_requests_per_second: f64,
    /// Calls without a client certificate one address may make at once, on top of that rate.
    #[arg(long, default_value_t = meshca_mgmt::server::DEFAULT_PEER_RATE.burst)]
    peer_request_burst: u32,
    /// Most connections of one control-plane identity (an agent's cluster, an operator) once its
    /// client certificate is verified; past it that identity's oldest idle connection is closed
    /// (0: no cap).
    #[arg(long, default_value_t = meshca_serve::server::DEFAULT_MAX_PER_IDENTITY)]
    max_connections_per_identity: usize,
    #[command(flatten)]
    bundle: super::bundle_endpoint::BundleEndpointArgs,
    #[command(flatten)]
    serve: super::ServeArgs,
    #[command(flatten)]
    kube: super::kube::KubeArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
}

/// The management plane's store on a single machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreBackend {
    /// `<data-dir>/store.db` (SQLite, WAL, group commit).
    Sqlite,
    /// `<data-dir>/store/` (the directory store).
    Dir,
}

/// Opens the management plane's store in `data_dir`, moving an earlier meshca's directory store
/// into the database first (`meshca_store::migrate`).
pub async fn open_store(
    data_dir: &std::path::Path,
    backend: StoreBackend,
) -> anyhow::Result<Arc<dyn meshca_store::Store>> {
    Ok(match backend {
        StoreBackend::Dir => Arc::new(DirStore::open(data_dir.join(migrate::LEGACY_DIR)).context("opening the store")?),
        StoreBackend::Sqlite => {
            let (db, migrated) = migrate::open_management_store(data_dir)
                .await
                .with_context(|| format!("opening the store in {}", data_dir.display()))?;
            if let Some(m) = migrated {
                eprintln!(
                    "moved {} objects of the directory store into {} ({} written); the directory store is kept in {}",
                    m.copied.objects,
                    db.path().display(),
                    m.copied.written,
                    m.moved_to.display()
                );
            }
            Arc::new(db)
        }
    })
}

/// Kubernetes mode: the RootTrustPolicy resource and leader election among replicas.
#[derive(clap::Args)]
struct ReplicaArgs {
    /// Kubernetes mode: read and report on only this RootTrustPolicy (in namespace `meshca`);
    /// without it, every RootTrustPolicy there is a mesh of its own.
    #[arg(long)]
    policy_resource: Option<String>,
    /// Kubernetes mode: the Lease (in namespace `meshca`) replicas elect their leader with.
    #[arg(long, default_value = "meshca-leader")]
    leader_lease: String,
    /// Kubernetes mode: this replica's unique name (the pod name).
    #[arg(long, env = "POD_NAME")]
    replica_id: Option<String>,
    /// Kubernetes mode: `host:port` where other replicas reach this one (the pod IP and port), so
    /// followers can forward connections to the leader.
    #[arg(long, env = "MESHCA_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// How long followers wait for a renewal before taking the lease over.
    #[arg(long, default_value = "15s")]
    lease_duration: DurationArg,
    /// How long the leader keeps signing without a successful renewal (less than the lease
    /// duration minus the retry period).
    #[arg(long, default_value = "10s")]
    renew_deadline: DurationArg,
    /// How often the leader renews and followers look.
    #[arg(long, default_value = "2s")]
    retry_period: DurationArg,
}

/// Runs the management plane until Ctrl-C or SIGTERM, then drains within --shutdown-grace and,
/// in Kubernetes mode, releases the leader lease.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let kube = args.kube.client().await?;
    if kube.is_some() && args.policy.is_some() {
        anyhow::bail!(
            "--policy is for the embedded store; in Kubernetes mode the policies are the RootTrustPolicy resources in namespace meshca (kubectl apply -f deploy/...)"
        );
    }
    let store: Arc<dyn meshca_store::Store> = match &kube {
        Some(client) => Arc::new(meshca_kube::store::KubeStore::new(client.clone())),
        None => open_store(&args.data_dir, args.store).await?,
    };
    let policy_yaml = match &args.policy {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if let Some(text) = &policy_yaml {
        Policy::from_yaml(text).map_err(|e| {
            anyhow::anyhow!("{}: {e}", args.policy.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        })?;
    }
    meshca_mgmt::revocation::check_crl_ttl(args.crl_ttl.0).map_err(|e| anyhow::anyhow!("--crl-ttl: {e}"))?;
    let metrics_token = args.metrics_token_file.as_deref().map(super::read_token_file).transpose()?;
    let opts = ServerOptions {
        listen: args.listen,
        hostnames: args.hostnames,
        policy_yaml,
        default_policy: Policy::generated_default(Duration::from_secs(720 * 3600)),
        operator_dir: Some(args.data_dir.join("operator")),
        settings: Settings { report_interval: args.report_interval.0, crl_ttl: args.crl_ttl.0, ..Settings::default() },
        issue_burst: args.issue_burst,
        issue_per_minute: args.issue_per_minute,
        metrics_listen: args.metrics_listen,
        metrics_token,
        peer_rate: meshca_serve::Rate::new(args.peer_requests_per_second, args.peer_request_burst),
        serve: args.serve.config(args.max_connections_per_identity),
    };
    let dashboard = match args.dashboard_addr {
        Some(addr) => {
            let (listener, access) = super::dashboard::open(addr, &opts.hostnames).await?;
            // Shown once, here; the server keeps only its digest.
            eprintln!(
                "dashboard on {}; log in with the operator's client certificate or open\n  {}\n(login token {}, valid until the server stops)",
                access.url,
                access.login_url(),
                access.token.secret()
            );
            Some(listener)
        }
        None => None,
    };
    let bundle_endpoint = match args.bundle.bundle_endpoint_addr {
        Some(addr) => {
            let td = bundle_trust_domain(store.as_ref(), opts.policy_yaml.as_deref(), &opts.default_policy).await;
            let (endpoint, access) = args.bundle.open(addr, &opts.hostnames, &td).await?;
            eprintln!("SPIFFE bundle endpoint on {}", access.describe());
            Some(endpoint)
        }
        None => None,
    };
    let creds = args.data_dir.join("operator");
    let on_bound = move |addr| {
        eprintln!("management plane listening on {addr}; operator credentials in {}", creds.display());
    };
    let Some(client) = kube else {
        let with = meshca_mgmt::ServeWith { dashboard, bundle_endpoint, ..Default::default() };
        meshca_mgmt::serve_with(store, opts, with, on_bound, super::ctrl_c()).await?;
        return Ok(());
    };

    // Kubernetes mode: the policy is the RootTrustPolicy resource, and replicas elect a leader.
    let r = &args.replica;
    let namespace = meshca_mgmt::records::NAMESPACE;
    let mut election = meshca_kube::lease::ElectionConfig::new(
        namespace,
        &r.leader_lease,
        &r.replica_id.clone().unwrap_or_else(|| format!("meshca-{}", std::process::id())),
    );
    election.address = r.advertise_address.clone();
    election.lease_duration = r.lease_duration.0;
    election.renew_deadline = r.renew_deadline.0;
    election.retry_period = r.retry_period.0;
    election.validate().map_err(|e| anyhow::anyhow!(e))?;
    let election = meshca_kube::lease::spawn(client.clone(), election);
    let with = meshca_mgmt::ServeWith {
        policy_source: Some(Arc::new(meshca_kube::policy::CrdPolicy::new(
            client.clone(),
            namespace,
            r.policy_resource.as_deref(),
        ))),
        leader: Some(election.view()),
        clock: meshca_clock::system(),
        dashboard,
        bundle_endpoint,
    };
    let result = meshca_mgmt::serve_with(store, opts, with, on_bound, super::ctrl_c()).await;
    // Signing has stopped: the lease is handed over at once instead of after the lease duration
    // (also after a lost leadership, in case the lease still names this replica).
    election.stop().await;
    result?;
    Ok(())
}

/// The trust domain the bundle endpoint is expected to serve, for the line printed at start: the
/// first policy's (by name) of the policies given, else of the stored ones, else the default.
/// (The endpoint itself serves every mesh in force at `/<trust domain>`; in Kubernetes mode the
/// policies are the RootTrustPolicy resources, which this does not read, so the line may name the
/// default trust domain there.)
async fn bundle_trust_domain(
    store: &dyn meshca_store::Store,
    policy_yaml: Option<&str>,
    default: &Policy,
) -> meshca_pki::TrustDomain {
    let first = |set: meshca_policy::PolicySet| set.policies().first().map(|p| p.trust_domain.clone());
    if let Some(td) = policy_yaml.and_then(|t| meshca_policy::PolicySet::from_yaml(t).ok()).and_then(first) {
        return td;
    }
    match meshca_mgmt::loader::stored_policy(store).await {
        Ok(Some(set)) => first(set).unwrap_or_else(|| default.trust_domain.clone()),
        _ => default.trust_domain.clone(),
    }
}
