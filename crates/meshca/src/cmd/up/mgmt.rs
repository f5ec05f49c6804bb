//! The management plane of `meshca up`: its policy for the chosen root-of-trust mode, and the
//! server itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshca_clock::SharedClock;
use meshca_mgmt::{ServerOptions, Settings};
use meshca_policy::{Policy, VaultAuth, VaultSpec};
use meshca_store::{ObjectKey, Precondition, Store};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::meshes::{Federate, MeshPlan};
use super::{Args, CaChoice, VaultArgs, abs, write};

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
async fn follow_intermediate_dir(dir: PathBuf, store: Arc<dyn Store>, clock: SharedClock, stop: CancellationToken) {
    let Ok(key) = ObjectKey::new(meshca_policy::defaults::NAMESPACE, USER_INTERMEDIATE) else { return };
    let mut last = read_intermediate_dir(&dir);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.sleep(Duration::from_secs(1)) => {}
        }
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

/// The policy's `vault` block for `--ca vault`: a token from a file, the root at `<mount>`.
fn vault_spec(v: &VaultArgs) -> anyhow::Result<VaultSpec> {
    let server = v.vault_addr.clone().context("--vault-addr (or VAULT_ADDR) is required with --ca vault")?;
    let token_file = v.vault_token_file.as_deref().context("--vault-token-file is required with --ca vault")?;
    let mount = v.vault_mount.trim_matches('/');
    let spec = VaultSpec {
        server,
        ca_path: format!("{mount}/root/sign-intermediate"),
        csr_path: v
            .vault_csr_mount
            .as_deref()
            .map(|m| format!("{}/intermediate/generate/exported", m.trim_matches('/'))),
        namespace: None,
        tls_ca_file: v.vault_ca_file.as_deref().map(abs),
        auth: VaultAuth::Token { secret_ref: None, token_file: Some(abs(token_file)) },
    };
    // Through the policy's own validation, so `up` cannot run a block `policy apply` would refuse.
    Ok(VaultSpec::from_doc(&spec.to_doc())?)
}

/// A running management plane.
pub struct Started {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub relay_ca: Vec<u8>,
    /// Vault mode: the folder the clusters' memory-backed `cacerts` folders go in.
    pub memory_root: Option<PathBuf>,
    /// The dashboard's URL and login token.
    pub dashboard: crate::cmd::dashboard::Access,
    /// The SPIFFE bundle endpoint's URL and profile.
    pub bundle: crate::cmd::bundle_endpoint::Access,
    /// With `--federate`: the CA of the bundle endpoint's `https_web` certificate (PEM file).
    pub bundle_ca: Option<PathBuf>,
    /// With `--federate`: the policy set that federates the meshes, put in force by
    /// [`federate`] once the bundle endpoint serves every mesh's bundle.
    federating: Option<Federating>,
}

/// The federating policy set, and what [`federate`] checks before applying it.
struct Federating {
    yaml: String,
    endpoint_ca: meshca_pki::RootSet,
}

/// Lifetime of the bundle endpoint's `https_web` certificate and its CA under `--federate`.
const WEB_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `--federate`: a CA of `up`'s own and a certificate for `localhost` from it, for the bundle
/// endpoint's `https_web` profile (each mesh's policy names the CA as `endpointCa`). The key
/// lives in memory only; the CA is written to `<dir>/bundle-endpoint/ca.pem` for other clients.
fn web_identity(dir: &Path, now: std::time::SystemTime) -> anyhow::Result<(Arc<rustls::sign::CertifiedKey>, String)> {
    use meshca_pki::{CaSigner, Cert, KeyAlgorithm, LeafParams, PrivateKey, RootParams};
    let params = RootParams { ttl: WEB_TTL, ..RootParams::new("meshca up bundle endpoint") };
    let ca = CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256)?, &params, now)?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let leaf = LeafParams { identity: None, dns_names: vec!["localhost".into()], ttl: WEB_TTL };
    let leaf = Cert::from_der(ca.sign_leaf(key.public_key_spki(), &leaf, now)?.der)?;
    let ck = meshca_tls::Identity::new(&leaf, &[], &key).certified_key()?;
    let pem = ca.cert().to_pem();
    write(&dir.join("bundle-endpoint").join("ca.pem"), pem.as_bytes(), 0o644)?;
    Ok((ck, pem))
}

/// Starts the management plane for `a` under `dir` running the meshes `plans`, its tasks in
/// `tasks`.
pub async fn start(
    a: &Args,
    plans: &[MeshPlan],
    dir: &Path,
    clock: &SharedClock,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<Started> {
    let store = crate::cmd::server::open_store(&dir.join("mgmt"), crate::cmd::server::StoreBackend::Sqlite).await?;
    let mut policy = Policy::generated_default(a.intermediate_ttl.0);
    policy.trust_domain = a.trust_domain.clone();
    policy.intermediate.grace_period_ratio = a.grace_ratio;
    if let meshca_policy::CaMode::Generated { ttl, .. } = &mut policy.ca {
        *ttl = a.root_ttl.0;
    }
    // The workload CAs of `up` issue leaves of exactly --leaf-ttl (and no longer: see
    // cluster.rs), so that is the longest leaf a root rotation waits for.
    policy.root_rotation = meshca_policy::RootRotationOptions {
        trigger_ratio: a.root_rotation_ratio,
        max_leaf_lifetime: a.leaf_ttl.0,
        skew: a.rotation_skew.0,
    };
    let mut memory_root = None;
    match a.ca {
        CaChoice::Generated => {}
        CaChoice::ByoIntermediate => {
            let from =
                a.intermediate_from.clone().context("--intermediate-from is required with --ca byo-intermediate")?;
            let secret = read_intermediate_dir(&from)
                .with_context(|| format!("{} holds none of {}", from.display(), INTERMEDIATE_FILES.join(", ")))?;
            store
                .put(
                    &ObjectKey::new(meshca_policy::defaults::NAMESPACE, USER_INTERMEDIATE)?,
                    &secret,
                    Precondition::Any,
                )
                .await?;
            policy.ca = meshca_policy::CaMode::IntermediateRef {
                secret: meshca_policy::SecretRef {
                    namespace: meshca_policy::defaults::NAMESPACE.into(),
                    name: USER_INTERMEDIATE.into(),
                },
                expiry_warning: meshca_policy::defaults::EXPIRY_WARNING,
            };
            if let Some(e) = meshca_mgmt::authority::trial(store.as_ref(), &policy, clock.now()).await {
                bail!("{e}");
            }
            tasks.spawn(follow_intermediate_dir(from, store.clone(), clock.clone(), stop.child_token()));
        }
        CaChoice::Vault => {
            policy.ca = meshca_policy::CaMode::Vault(Box::new(vault_spec(&a.vault)?));
            let stamp = meshca_clock::unix(clock.now());
            memory_root = Some(a.vault.memory_dir_root.join(format!("meshca-up-{}-{stamp}", std::process::id())));
        }
    }
    let hostnames = vec!["localhost".to_string()];
    let (dashboard_listener, dashboard) = crate::cmd::dashboard::open(a.dashboard_addr, &hostnames).await?;
    let bundle_addr = a.bundle.bundle_endpoint_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    // With several meshes the https_spiffe SVID is the first mesh's (the endpoint's choice).
    let first_td = plans.first().map_or(&a.trust_domain, |p| &p.trust_domain);
    let mut bundle_ca = None;
    let mut endpoint_ca = None;
    let (bundle_endpoint, bundle) = if a.federate {
        let (ck, pem) = web_identity(dir, clock.now())?;
        bundle_ca = Some(dir.join("bundle-endpoint").join("ca.pem"));
        endpoint_ca = Some(pem);
        let profile = meshca_mgmt::federation::Profile::Web(ck);
        a.bundle.bind(bundle_addr, profile, "localhost", first_td).await?
    } else {
        a.bundle.open(bundle_addr, &hostnames, first_td).await?
    };
    let mut policy_yaml = None;
    let mut federating = None;
    if plans.len() > 1 {
        let options = super::meshes::Options {
            root_ttl: a.root_ttl.0,
            intermediate_ttl: a.intermediate_ttl.0,
            grace_ratio: a.grace_ratio,
            root_rotation_ratio: a.root_rotation_ratio,
            max_leaf_lifetime: a.leaf_ttl.0,
            rotation_skew: a.rotation_skew.0,
        };
        // The meshes start apart; with --federate, `federate` then applies the set that joins
        // them (a mesh polling the endpoint before it publishes would wait a retry period).
        let text = super::meshes::policy_set_yaml(plans, &options, None)?;
        if let Some(pem) = endpoint_ca {
            let endpoint_ca = meshca_pki::RootSet::from_pem(pem.as_bytes())?;
            let with = Federate { base: bundle.url.clone(), endpoint_ca: pem };
            federating =
                Some(Federating { yaml: super::meshes::policy_set_yaml(plans, &options, Some(&with))?, endpoint_ca });
        }
        // For the operator to read, edit and `meshca policy apply`.
        let shown = federating.as_ref().map_or(&text, |f| &f.yaml);
        write(&dir.join("policies.yaml"), shown.as_bytes(), 0o644)?;
        policy_yaml = Some(text);
    } else if let Some(stored) = meshca_mgmt::loader::stored_policy(store.as_ref()).await.ok().flatten()
        && stored.policies().len() > 1
    {
        bail!(
            "{} ran {} meshes; run it with --meshes {} again, or use a fresh --dir",
            dir.display(),
            stored.policies().len(),
            stored.policies().len()
        );
    }
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        hostnames,
        policy_yaml,
        default_policy: policy,
        operator_dir: Some(dir.join("mgmt").join("operator")),
        settings: Settings { report_interval: Duration::from_secs(5), crl_ttl: a.crl_ttl.0, ..Settings::default() },
        issue_burst: 5,
        issue_per_minute: 30.0,
        metrics_listen: None,
        metrics_token: None,
        peer_rate: meshca_mgmt::server::DEFAULT_PEER_RATE,
        serve: meshca_serve::ServeConfig::default(),
    };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let with = meshca_mgmt::ServeWith {
        clock: clock.clone(),
        dashboard: Some(dashboard_listener),
        bundle_endpoint: Some(bundle_endpoint),
        ..Default::default()
    };
    let server_store = store.clone();
    let server_stop = stop.clone();
    tasks.spawn(async move {
        let result = meshca_mgmt::serve_with(
            server_store,
            opts,
            with,
            move |addr| {
                let _ = addr_tx.send(addr);
            },
            server_stop.cancelled_owned(),
        )
        .await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "the management plane stopped");
        }
        let _ = done_tx.send(result);
    });
    let addr = match addr_rx.await {
        Ok(a) => a,
        Err(_) => {
            let e = done_rx.await.ok().and_then(|r| r.err()).map(|e| e.to_string()).unwrap_or_default();
            bail!("the management plane did not start: {e}");
        }
    };
    let relay_ca = std::fs::read(dir.join("mgmt").join("operator").join("relay-ca.pem"))?;
    Ok(Started { addr, store, relay_ca, memory_root, dashboard, bundle, bundle_ca, federating })
}

/// How long the bundle endpoint may take to serve every mesh's bundle.
const ENDPOINT_READY: Duration = Duration::from_secs(30);

/// `--federate`: once the bundle endpoint serves every mesh's bundle (fetched and validated
/// as each mesh's poller will), puts the federating policy set in force through the operator
/// API with `up`'s operator credentials — as `meshca policy apply <dir>/policies.yaml` would, so
/// the audit log records it. Nothing to do without `--federate`.
pub async fn federate(mgmt: &Started, plans: &[MeshPlan], dir: &Path, clock: &SharedClock) -> anyhow::Result<()> {
    use meshca_mgmt::federation::fetch::{EndpointAuth, FETCH_TIMEOUT, Source, fetch};
    let Some(f) = &mgmt.federating else { return Ok(()) };
    let deadline = tokio::time::Instant::now() + ENDPOINT_READY;
    for p in plans {
        let source = Source {
            trust_domain: p.trust_domain.clone(),
            url: format!("{}{}", mgmt.bundle.url, p.trust_domain),
            auth: EndpointAuth::Web(f.endpoint_ca.clone()),
            timeout: FETCH_TIMEOUT,
        };
        loop {
            match fetch(&source, None, clock.now()).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("the bundle endpoint does not serve {}'s bundle: {e}", p.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let operator = dir.join("mgmt").join("operator");
    let tls = meshca_mgmt::server::creds::client_config(&operator)?;
    let channel = meshca_tls::grpc::channel(&mgmt.addr.to_string(), tls, "localhost")?;
    let request = meshca_proto::mgmt::ApplyPolicyRequest { policy: f.yaml.clone() };
    meshca_proto::mgmt::operator_client::OperatorClient::new(channel)
        .apply_policy(request)
        .await
        .map_err(|s| anyhow::anyhow!("applying the federating policies: {}", s.message()))?;
    tracing::info!("the meshes federate with each other");
    Ok(())
}
