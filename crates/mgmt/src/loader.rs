//! Keeps the [`Authority`] current: reloads when the policy or the secret it references changes
//! (and every `resync` as a safety net). An invalid new policy is reported and the last valid
//! one stays in force; a working CA is never dropped because its replacement cannot be loaded.
//!
//! The policy comes from a [`PolicySource`]: the store object `meshca/root-trust-policy`
//! ([`StorePolicy`], the embedded default, written by `meshca policy apply`), or in Kubernetes
//! mode the RootTrustPolicy custom resource (in `meshca-kube`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshca_clock::SharedClock;
use meshca_policy::{Policy, PolicySet};
use meshca_store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authority::{self, Authority, Capability};
use crate::error::MgmtError;
use crate::records::{self, Keyspace};

/// Where the RootTrustPolicies come from.
#[async_trait::async_trait]
pub trait PolicySource: Send + Sync + 'static {
    /// The policies as written now, validated together; `Ok(None)` when none is defined.
    async fn read(&self) -> Result<Option<PolicySet>, MgmtError>;

    /// Yields once at once, then whenever the policy may have changed. Spurious wake-ups are
    /// fine (the loader re-reads and compares); missed changes are covered by its resync.
    fn changes(&self) -> futures::stream::BoxStream<'static, ()>;

    /// Puts `text` (one policy or several, as YAML documents) in force as the whole set
    /// (`meshca policy apply`, `meshca server --policy`). `text` has been validated and its CAs
    /// loaded already.
    async fn apply(&self, text: &str) -> Result<(), MgmtError>;

    /// Who puts a policy read from here in force, for the audit log — `None` when the writer
    /// records it itself (the store object: `meshca policy apply` goes through the operator API,
    /// which appends the entry). The Kubernetes resource is changed with `kubectl apply`, which
    /// meshca never sees: the loader records it ([`audit_applied`]).
    fn audit_actor(&self, _policy: &Policy) -> Option<String> {
        None
    }

    /// Publishes one mesh's status where operators look for it (`authority.policy` says which).
    /// Called on the leader only.
    async fn publish_status(
        &self,
        _status: &meshca_proto::mgmt::MeshStatus,
        _authority: &Authority,
    ) -> Result<(), MgmtError> {
        Ok(())
    }
}

/// Reads the policies stored in the store, validated. `Ok(None)` when none is stored.
pub async fn stored_policy(store: &dyn Store) -> Result<Option<PolicySet>, MgmtError> {
    let Some(v) = store.get(&records::policy()).await? else { return Ok(None) };
    let text = v.value.get(records::POLICY_KEY).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    Ok(Some(PolicySet::from_yaml(&text)?))
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
    async fn read(&self) -> Result<Option<PolicySet>, MgmtError> {
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

/// Which policy of the set a loader follows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pick {
    /// The one of this name (a mesh of several, run by [`crate::meshes::Supervisor`]).
    Named(String),
    /// The set's only policy, whatever its name (a single mesh wired by hand).
    Only,
}

/// The loader of one mesh: call [`Loader::start`] for the first authority and the receiver
/// everyone reads, then run [`Loader::run`] as a supervised task.
pub struct Loader {
    store: Arc<dyn Store>,
    source: Arc<dyn PolicySource>,
    keys: Keyspace,
    pick: Pick,
    clock: SharedClock,
    resync: Duration,
    policy: Policy,
    tx: watch::Sender<Arc<Authority>>,
}

impl Loader {
    /// Loads the first authority of the mesh of policy `policy.name`, whose records are `keys`:
    /// the source's policy of that name, or `policy` when it has none (or an invalid set, which
    /// is logged).
    pub async fn start(
        store: Arc<dyn Store>,
        source: Arc<dyn PolicySource>,
        keys: Keyspace,
        policy: Policy,
        clock: SharedClock,
        resync: Duration,
    ) -> (Loader, watch::Receiver<Arc<Authority>>) {
        let pick = Pick::Named(policy.name.clone());
        Self::start_picking(store, source, keys, pick, policy, clock, resync).await
    }

    /// [`Loader::start`] for a management plane of one mesh wired by hand: follows the source's
    /// only policy whatever its name (`fallback` until there is one), on the plain records.
    pub async fn start_single(
        store: Arc<dyn Store>,
        source: Arc<dyn PolicySource>,
        fallback: Policy,
        clock: SharedClock,
        resync: Duration,
    ) -> (Loader, watch::Receiver<Arc<Authority>>) {
        Self::start_picking(store, source, Keyspace::legacy(), Pick::Only, fallback, clock, resync).await
    }

    async fn start_picking(
        store: Arc<dyn Store>,
        source: Arc<dyn PolicySource>,
        keys: Keyspace,
        pick: Pick,
        fallback: Policy,
        clock: SharedClock,
        resync: Duration,
    ) -> (Loader, watch::Receiver<Arc<Authority>>) {
        let policy = match read_picked(source.as_ref(), &pick).await {
            Ok(Some(p)) => p,
            Ok(None) => fallback,
            Err(e) => {
                tracing::error!(error = %e, "stored policy is invalid; using the default until it is fixed");
                fallback
            }
        };
        let initial = authority::load(store.as_ref(), &keys, policy.clone(), clock.now()).await;
        log_authority(&initial);
        if let Some(actor) = source.audit_actor(&initial.policy) {
            audit_applied(store.as_ref(), &keys, &actor, &initial, clock.now()).await;
        }
        let (tx, rx) = watch::channel(Arc::new(initial));
        (Loader { store, source, keys, pick, clock, resync, policy, tx }, rx)
    }

    /// Reloads on every change until `cancel` fires or nobody reads the authority any more.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let mut policy_watch = self.source.changes();
            // Each watch yields the current state first; skip it, and reload instead: a change
            // made after the last reload but before these watches began would otherwise be
            // missed until the next resync (two policies applied in quick succession). A policy
            // that references no secret (Vault mode) has no secret watch: waiting for its first
            // item would wait forever, and no later policy would ever be loaded.
            let _ = policy_watch.next().await;
            let mut secret_watch = match authority::referenced_secret(&self.keys, &self.policy) {
                Some(k) => {
                    let mut w = self.store.watch(&k);
                    let _ = w.next().await;
                    w
                }
                None => Box::pin(futures::stream::pending()),
            };
            self.reload().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = policy_watch.next() => {},
                _ = secret_watch.next() => {},
                _ = self.clock.sleep(self.resync) => {},
            }
        }
    }

    /// One reload: re-reads the policy and its CA and publishes the result if anything changed.
    pub async fn reload(&mut self) {
        let mut policy_error = None;
        match read_picked(self.source.as_ref(), &self.pick).await {
            Ok(Some(p)) => self.policy = p,
            Ok(None) => {}
            Err(e) => policy_error = Some(e.to_string()),
        }
        let mut next = authority::load(self.store.as_ref(), &self.keys, self.policy.clone(), self.clock.now()).await;
        let current = self.tx.borrow().clone();
        if let (Capability::Unavailable { reason }, Capability::Signing(_)) = (&next.capability, &current.capability) {
            // Never drop a working CA because its replacement cannot be loaded (a deleted or
            // corrupt secret, a bad edit): keep signing with the last good one, loudly.
            tracing::error!(error = %reason, "the policy's CA cannot be loaded; the last good CA stays in force");
            let warning = format!("{reason}; the last good CA stays in force");
            next = Authority { warning: Some(warning), ..(*current).clone() };
        }
        if let Some(e) = policy_error {
            tracing::error!(error = %e, "new policy refused; the previous policy stays in force");
            next.warning = Some(format!("the stored policy was refused and the previous one stays in force: {e}"));
        }
        if current.generation != next.generation
            || current.error() != next.error()
            || current.warning != next.warning
            || current.policy != next.policy
        {
            log_authority(&next);
            if let Some(actor) = self.source.audit_actor(&next.policy) {
                audit_applied(self.store.as_ref(), &self.keys, &actor, &next, self.clock.now()).await;
            }
            self.tx.send_replace(Arc::new(next));
        }
    }
}

/// The policy `pick` names in the source's set: `Ok(None)` when there is none (no set; the mesh's
/// policy was removed, and the supervisor stops the mesh).
async fn read_picked(source: &dyn PolicySource, pick: &Pick) -> Result<Option<Policy>, MgmtError> {
    let Some(set) = source.read().await? else { return Ok(None) };
    Ok(match pick {
        Pick::Named(name) => set.get(name).cloned(),
        Pick::Only => match set.policies() {
            [only] => Some(only.clone()),
            _ => {
                return Err(MgmtError::Policy(meshca_policy::PolicyError {
                    field: "policy".into(),
                    message: "this management plane runs one mesh; the set has several policies".into(),
                }));
            }
        },
    })
}

/// Records `authority`'s policy as applied by `actor` in the audit log — once, however many
/// replicas load it and however often: the policy's digest is swapped into the mesh's marker
/// ([`Keyspace::policy_audited`]) by compare-and-swap first, and only the replica whose swap
/// wins appends the entry (a crash between the two loses the entry rather than doubling it). A
/// policy that cannot sign is not in force and is not recorded (it is once its CA loads).
pub async fn audit_applied(
    store: &dyn Store,
    keys: &Keyspace,
    actor: &str,
    authority: &Authority,
    now: std::time::SystemTime,
) {
    if authority.error().is_some() {
        return;
    }
    let digest = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{:?}", authority.policy).as_bytes(),
    ));
    let key = keys.policy_audited();
    loop {
        let current = match store.get(&key).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reading the audit marker failed; this policy has no audit entry");
                return;
            }
        };
        if current.as_ref().and_then(|v| v.value.get("digest")) == Some(digest.as_bytes()) {
            return;
        }
        let precondition = match &current {
            Some(v) => meshca_store::Precondition::Version(v.version.clone()),
            None => meshca_store::Precondition::Absent,
        };
        let marker = meshca_store::Secret::with_data([("digest", digest.as_bytes().to_vec())]);
        match store.put(&key, &marker, precondition).await {
            Ok(_) => break,
            // Another replica moved it: look again.
            Err(meshca_store::StoreError::Conflict { .. } | meshca_store::StoreError::AlreadyExists(_)) => {}
            Err(e) => {
                tracing::error!(error = %e, "writing the audit marker failed; this policy has no audit entry");
                return;
            }
        }
    }
    let event = crate::audit::Event::new(crate::audit::Action::PolicyApplied, actor, "")
        .with("policy", &authority.policy.name)
        .with("policyGeneration", &authority.generation);
    crate::audit::record(store, event, now).await;
}

fn log_authority(a: &Authority) {
    match &a.capability {
        Capability::Unavailable { reason } => {
            tracing::error!(error = %reason, mode = a.policy.ca.name(), "the policy's CA cannot sign")
        }
        Capability::Signing(s) => tracing::info!(
            mode = a.policy.ca.name(),
            signer = %s.signer.cert().subject(),
            generation = %a.generation,
            "authority loaded"
        ),
        Capability::Delegated(d) => tracing::info!(
            mode = a.policy.ca.name(),
            vault = %d.delivery.spec.server,
            generation = %a.generation,
            "authority loaded: Vault signs the cluster intermediates"
        ),
    }
    if let Some(w) = &a.warning {
        tracing::warn!(warning = %w, "policy warning");
    }
}
