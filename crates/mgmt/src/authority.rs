//! The authority: what the management plane signs with, derived from the RootTrustPolicy and
//! the secrets it references, and republished whenever either changes.
//!
//! The *policy generation* digests everything that shapes a cluster intermediate (the policy's
//! intermediate options, the signer, the root set). Agents record the generation their `cacerts`
//! was issued under and re-issue when it changes — so changing a lifetime, a key algorithm or the
//! referenced secret rotates every affected cluster, which Gloo Mesh does not do.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use meshca_pki::{CaSigner, RootParams, RootSet};
use meshca_policy::{CaMode, Policy};
use meshca_store::{ObjectKey, Store};
use tokio::sync::watch;

use crate::castore;
use crate::error::MgmtError;
use crate::records;

/// The management plane's signing state.
#[derive(Debug)]
pub struct Authority {
    /// The policy in force (the last valid one).
    pub policy: Policy,
    /// The signer of cluster intermediates: the root, or the user's intermediate. `None` in Vault
    /// mode (clusters get intermediates from Vault) or when the policy's CA cannot be loaded.
    pub signer: Option<Arc<CaSigner>>,
    /// The root set clusters trust.
    pub roots: Option<RootSet>,
    /// Digest of policy + signer + roots.
    pub generation: String,
    /// Why the authority cannot sign, naming the policy field; `None` when healthy.
    pub error: Option<String>,
    /// A warning that does not stop signing (e.g. a generated root that no longer matches the
    /// policy's root parameters).
    pub warning: Option<String>,
}

impl Authority {
    /// In bring-your-own-intermediate mode: the user's intermediate (the signer), which meshca
    /// does not rotate and whose expiry it watches.
    pub fn upstream(&self) -> Option<&meshca_pki::Cert> {
        match (&self.policy.ca, &self.signer) {
            (CaMode::IntermediateRef { .. }, Some(s)) => Some(s.cert()),
            _ => None,
        }
    }
}

impl Authority {
    fn new(policy: Policy, loaded: Result<(Arc<CaSigner>, RootSet), MgmtError>, warning: Option<String>) -> Self {
        match loaded {
            Ok((signer, roots)) => {
                let text = format!(
                    "{}\n{}\n{}",
                    policy.intermediate_digest(),
                    signer.cert().fingerprint(),
                    roots.fingerprint()
                );
                let generation =
                    hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref()[..10]);
                Authority { policy, signer: Some(signer), roots: Some(roots), generation, error: None, warning }
            }
            Err(e) => Authority {
                generation: format!("error-{}", policy.intermediate_digest()),
                policy,
                signer: None,
                roots: None,
                error: Some(e.to_string()),
                warning,
            },
        }
    }
}

/// The store object a policy's CA mode reads, if any.
pub fn referenced_secret(policy: &Policy) -> Option<ObjectKey> {
    match &policy.ca {
        CaMode::Generated { .. } => Some(records::root_ca()),
        CaMode::SecretRef(r) => ObjectKey::new(&r.namespace, &r.name).ok(),
        CaMode::IntermediateRef { secret, .. } => ObjectKey::new(&secret.namespace, &secret.name).ok(),
        CaMode::Vault(_) => None,
    }
}

/// Builds the authority for `policy` from the store.
pub async fn load(store: &dyn Store, policy: Policy, now: SystemTime) -> Authority {
    let mut warning = None;
    let loaded = match &policy.ca {
        CaMode::Generated { key_algorithm, ttl, organization } => {
            let params = RootParams { ttl: *ttl, ..RootParams::new(organization) };
            let loaded = castore::load_or_create_root(store, &records::root_ca(), *key_algorithm, &params, now).await;
            if let Ok(s) = &loaded
                && s.cert().key_kind() != key_algorithm.kind()
            {
                warning = Some(format!(
                    "spec.config.generated.keyAlgorithm: the generated root already exists with a {} key; \
                     the policy asks for {key_algorithm}. Changing a root's key needs a root rotation; the existing root stays.",
                    s.cert().key_kind()
                ));
            }
            loaded
        }
        CaMode::SecretRef(r) => {
            const FIELD: &str = "spec.config.secretRef";
            load_ref(store, FIELD, &r.namespace, &r.name).await.and_then(|signer| {
                // An expired root signs nothing. Refused here, a policy naming it is refused and
                // the working CA stays in force, instead of every issuance failing afterwards.
                let cert = signer.cert();
                if cert.not_after() <= now {
                    return Err(MgmtError::Secret {
                        field: FIELD,
                        secret: format!("{}/{}", r.namespace, r.name),
                        reason: format!(
                            "{} expired at {}; nothing can be issued from it",
                            cert.subject(),
                            meshca_pki::chain::rfc3339(cert.not_after())
                        ),
                    });
                }
                Ok(signer)
            })
        }
        CaMode::IntermediateRef { secret, .. } => load_intermediate(store, &secret.namespace, &secret.name, now).await,
        CaMode::Vault(_) => {
            // The root lives in Vault: clusters obtain intermediates through `meshca vault-agent`;
            // the management plane signs nothing and only tracks status.
            let generation = policy.intermediate_digest();
            return Authority { policy, signer: None, roots: None, generation, error: None, warning: None };
        }
    };
    let loaded = loaded.and_then(|signer| {
        let roots = RootSet::from_certs(vec![signer.root().clone()]).map_err(|e| MgmtError::pki("root set", e))?;
        Ok((Arc::new(signer), roots))
    });
    Authority::new(policy, loaded, warning)
}

async fn load_ref(store: &dyn Store, field: &'static str, ns: &str, name: &str) -> Result<CaSigner, MgmtError> {
    let secret = format!("{ns}/{name}");
    let key = ObjectKey::new(ns, name).map_err(|e| MgmtError::Secret {
        field,
        secret: secret.clone(),
        reason: e.to_string(),
    })?;
    let v = store.get(&key).await?.ok_or_else(|| MgmtError::Secret {
        field,
        secret: secret.clone(),
        reason: "not found".into(),
    })?;
    let signer = castore::signer_from_secret(&v.value, field, &secret)?;
    if !signer.cert().is_self_issued() && field == "spec.config.secretRef" {
        // Option 2 is a root; an intermediate belongs in intermediateRef.
        return Err(MgmtError::Secret {
            field,
            secret,
            reason: format!(
                "{} is not a root (issued by {}); use spec.config.intermediateRef for an intermediate",
                signer.cert().subject(),
                signer.cert().issuer()
            ),
        });
    }
    Ok(signer)
}

/// Loads the user's intermediate (option 3) and checks it can do the job: a CA with keyCertSign
/// whose key matches, not a root, with its chain up to a self-signed root, room for one more CA
/// below it (pathlen), and valid now.
async fn load_intermediate(store: &dyn Store, ns: &str, name: &str, now: SystemTime) -> Result<CaSigner, MgmtError> {
    const FIELD: &str = "spec.config.intermediateRef";
    let signer = load_ref(store, FIELD, ns, name).await?;
    let bad = |reason: String| MgmtError::Secret { field: FIELD, secret: format!("{ns}/{name}"), reason };
    let cert = signer.cert();
    if cert.is_self_issued() {
        return Err(bad(format!("{} is a self-signed root; use spec.config.secretRef for a root", cert.subject())));
    }
    if cert.path_len() == Some(0) {
        return Err(bad(format!(
            "{} has pathlen:0, which forbids any CA below it — but meshca signs a cluster intermediate (a CA) under it. \
             Issue the intermediate with pathlen:1 or more, or without a path length constraint",
            cert.subject()
        )));
    }
    let root = signer.root();
    if !root.is_self_issued() {
        return Err(bad(format!(
            "its chain does not reach a self-signed root: it ends at {} (issued by {}); include the chain up to the root in cert-chain.pem or root-cert.pem (ca.crt for tls.crt/tls.key)",
            root.subject(),
            root.issuer()
        )));
    }
    let roots = RootSet::from_certs(vec![root.clone()]).map_err(|e| bad(e.to_string()))?;
    let chain = signer.chain();
    let middle = if chain.len() > 2 { &chain[1..chain.len() - 1] } else { &[] };
    meshca_pki::verify_chain(cert, middle, &roots, now, meshca_pki::Usage::Ca).map_err(|e| bad(e.to_string()))?;
    Ok(signer)
}

/// Reads the policy stored in the store, validated. `Ok(None)` when none is stored.
pub async fn stored_policy(store: &dyn Store) -> Result<Option<Policy>, MgmtError> {
    let Some(v) = store.get(&records::policy()).await? else { return Ok(None) };
    let text = v.value.get(records::POLICY_KEY).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    Ok(Some(Policy::from_yaml(&text)?))
}

/// Where the RootTrustPolicy comes from. The loader below is the same for every source: the
/// store object `meshca/root-trust-policy` ([`StorePolicy`], the embedded default, written by
/// `meshca policy apply`), or in Kubernetes mode the RootTrustPolicy custom resource (in
/// `meshca-kube`), which operators change with `kubectl` and whose status the leader writes.
#[async_trait::async_trait]
pub trait PolicySource: Send + Sync + 'static {
    /// The policy as written now, validated; `Ok(None)` when none is defined.
    async fn read(&self) -> Result<Option<Policy>, MgmtError>;

    /// Yields once at once, then whenever the policy may have changed. Spurious wake-ups are
    /// fine (the loader re-reads and compares); missed changes are covered by its resync.
    fn changes(&self) -> futures::stream::BoxStream<'static, ()>;

    /// Puts `text` in force (`meshca policy apply`, `meshca server --policy`). `text` has been
    /// validated and its CA loaded already.
    async fn apply(&self, text: &str) -> Result<(), MgmtError>;

    /// Publishes the mesh's status where operators look for it. Called on the leader only.
    async fn publish_status(
        &self,
        _status: &meshca_proto::mgmt::MeshStatus,
        _authority: &Authority,
    ) -> Result<(), MgmtError> {
        Ok(())
    }
}

/// The policy kept in the management plane's own store (`meshca/root-trust-policy`).
pub struct StorePolicy {
    store: Arc<dyn Store>,
}

impl StorePolicy {
    /// The policy in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        StorePolicy { store }
    }
}

#[async_trait::async_trait]
impl PolicySource for StorePolicy {
    async fn read(&self) -> Result<Option<Policy>, MgmtError> {
        stored_policy(self.store.as_ref()).await
    }

    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        self.store.watch(&records::policy()).map(|_| ()).boxed()
    }

    async fn apply(&self, text: &str) -> Result<(), MgmtError> {
        let secret = meshca_store::Secret::with_data([(records::POLICY_KEY, text.as_bytes().to_vec())]);
        self.store.put(&records::policy(), &secret, meshca_store::Precondition::Any).await?;
        Ok(())
    }
}

/// Keeps an [`Authority`] current: reloads when the stored policy or the secret it references
/// changes (and every `resync` as a safety net). An invalid new policy is reported and the last
/// valid one stays in force.
pub async fn spawn_loader(
    store: Arc<dyn Store>,
    fallback: Policy,
    resync: Duration,
) -> watch::Receiver<Arc<Authority>> {
    let source = Arc::new(StorePolicy::new(store.clone()));
    spawn_loader_from(store, source, fallback, resync).await
}

/// [`spawn_loader`] with the policy read from `source` (the CA secrets still come from `store`).
pub async fn spawn_loader_from(
    store: Arc<dyn Store>,
    source: Arc<dyn PolicySource>,
    fallback: Policy,
    resync: Duration,
) -> watch::Receiver<Arc<Authority>> {
    let mut policy = match source.read().await {
        Ok(Some(p)) => p,
        Ok(None) => fallback,
        Err(e) => {
            tracing::error!(error = %e, "stored policy is invalid; using the default until it is fixed");
            fallback
        }
    };
    let initial = load(store.as_ref(), policy.clone(), SystemTime::now()).await;
    log_authority(&initial);
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        loop {
            let mut policy_watch = source.changes();
            let mut secret_watch = match referenced_secret(&policy) {
                Some(k) => store.watch(&k),
                None => Box::pin(futures::stream::pending()),
            };
            // Each watch yields the current state first; skip it.
            let _ = policy_watch.next().await;
            let _ = secret_watch.next().await;
            tokio::select! {
                _ = tx.closed() => return,
                _ = policy_watch.next() => {},
                _ = secret_watch.next() => {},
                _ = tokio::time::sleep(resync) => {},
            }
            let mut policy_error = None;
            match source.read().await {
                Ok(Some(p)) => policy = p,
                Ok(None) => {}
                Err(e) => policy_error = Some(e.to_string()),
            }
            let mut next = load(store.as_ref(), policy.clone(), SystemTime::now()).await;
            let current = tx.borrow().clone();
            if let (Some(e), Some(_)) = (&next.error, &current.signer) {
                // Never drop a working CA because its replacement cannot be loaded (a deleted or
                // corrupt secret, a bad edit): keep signing with the last good one, loudly.
                tracing::error!(error = %e, "the policy's CA cannot be loaded; the last good CA stays in force");
                next = Authority {
                    policy: current.policy.clone(),
                    signer: current.signer.clone(),
                    roots: current.roots.clone(),
                    generation: current.generation.clone(),
                    error: None,
                    warning: Some(format!("{e}; the last good CA stays in force")),
                };
            }
            if let Some(e) = policy_error {
                tracing::error!(error = %e, "new policy refused; the previous policy stays in force");
                next.warning = Some(format!("the stored policy was refused and the previous one stays in force: {e}"));
            }
            if current.generation != next.generation
                || current.error != next.error
                || current.warning != next.warning
                || current.policy != next.policy
            {
                log_authority(&next);
                let _ = tx.send(Arc::new(next));
            }
        }
    });
    rx
}

fn log_authority(a: &Authority) {
    match (&a.error, &a.signer) {
        (Some(e), _) => tracing::error!(error = %e, mode = a.policy.ca.name(), "the policy's CA cannot sign"),
        (None, Some(s)) => tracing::info!(
            mode = a.policy.ca.name(),
            signer = %s.cert().subject(),
            generation = %a.generation,
            "authority loaded"
        ),
        _ => {}
    }
    if let Some(w) = &a.warning {
        tracing::warn!(warning = %w, "policy warning");
    }
}
