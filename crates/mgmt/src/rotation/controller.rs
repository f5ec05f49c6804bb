//! The rotation's driver: it reads the journal and the clusters' reports, asks [`super::plan`]
//! what to do, carries it out (creating the new root, writing the journal at every transition,
//! promoting or destroying CA objects at the end), and publishes the **effective authority** —
//! the policy's authority with the signer and root set of the current phase — that the issuer,
//! the trust streams, status and metrics read.
//!
//! One task, one writer: operator requests (`meshca rotate root [--abort]`) reach it through a
//! [`RotationHandle`] and are carried out between two steps. With replicas, only the leader
//! writes; a follower re-reads the journal and publishes the same effective authority, so that a
//! new leader continues where the old one stopped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::{SharedClock, from_unix, unix};
use meshca_pki::{CaSigner, Cert, PrivateKey, RootParams, RootSet};
use meshca_policy::{CaMode, Policy, VaultDelivery, VaultDoc, VaultSpec};
use meshca_proto::RotationPhase;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Store, StoreError, Versioned, typed};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::journal::{Anchor, Journal, Rotation, SignerRef, Transition, Trigger, objects};
use super::plan::{self, Gates, Next, Roots, Signer};
use crate::authority::{Authority, Capability, Delegation, Signing};
use crate::castore;
use crate::convergence;
use crate::records::{self, Keyspace};
use crate::replica::{self, Leader};

/// How often the controller looks again when nothing wakes it earlier.
const POLL: Duration = Duration::from_secs(5);
/// How soon it retries after a store failure.
const RETRY: Duration = Duration::from_secs(2);
/// How long a Vault mount's root, once read, is taken as known.
const VAULT_ROOT_CACHE: Duration = Duration::from_secs(60);

/// The journal's object of the mesh whose records are `keys`.
pub fn journal_key(keys: &Keyspace) -> ObjectKey {
    // A valid DNS-1123 name for every mesh (checked by a unit test in `records`).
    keys.object(objects::JOURNAL).unwrap_or_else(|_| unreachable!("rotation journal {:?}", objects::JOURNAL))
}

/// The mesh's object `name`: a name from [`objects`], or one read back from the journal.
fn object(keys: &Keyspace, name: &str) -> Result<ObjectKey, String> {
    keys.object(name).map_err(|e| format!("the root rotation journal names {name:?}: {e}"))
}

/// Reads the journal of the mesh whose records are `keys` (empty when there is none yet).
pub async fn read_journal(store: &dyn Store, keys: &Keyspace) -> Result<Versioned<Journal>, StoreError> {
    Ok(typed::get::<Journal>(store, &journal_key(keys))
        .await?
        .unwrap_or(Versioned { value: Journal::default(), version: ResourceVersion(String::new()) }))
}

/// Why an operator's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// A rotation is already in progress.
    #[error("a root rotation ({id}) is already in progress, in phase {phase}; abort it first with --abort")]
    InProgress {
        /// Its id.
        id: String,
        /// Its phase.
        phase: RotationPhase,
    },
    /// There is nothing to abort.
    #[error("no root rotation is in progress")]
    NotInProgress,
    /// The abort is refused.
    #[error(transparent)]
    Abort(#[from] plan::AbortRefused),
    /// The CA mode does not let meshca make a root.
    #[error("{0}")]
    NotGenerated(String),
    /// The new root could not be made or used.
    #[error("cannot start a root rotation: {0}")]
    CannotStart(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The controller is not running (the server is stopping).
    #[error("the root rotation controller is not running")]
    Stopped,
    /// This replica does not lead.
    #[error("this replica does not hold the leader lease; retry (the leader answers)")]
    NotLeader,
}

enum Command {
    Start(oneshot::Sender<Result<Rotation, RotateError>>),
    Abort(oneshot::Sender<Result<Rotation, RotateError>>),
}

/// Sends operator requests to the controller.
#[derive(Clone)]
pub struct RotationHandle {
    tx: mpsc::Sender<Command>,
}

impl RotationHandle {
    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Rotation, RotateError>>) -> Command,
    ) -> Result<Rotation, RotateError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| RotateError::Stopped)?;
        rx.await.map_err(|_| RotateError::Stopped)?
    }

    /// Starts a rotation to a new generated root (`meshca rotate root`).
    pub async fn start(&self) -> Result<Rotation, RotateError> {
        self.ask(Command::Start).await
    }

    /// Aborts the rotation in progress (`meshca rotate root --abort`).
    pub async fn abort(&self) -> Result<Rotation, RotateError> {
        self.ask(Command::Abort).await
    }
}

/// Which mesh a controller works for.
pub struct Scope {
    /// Where the mesh's rotation objects live.
    pub keys: Keyspace,
    /// With several meshes, all of them (a cluster another policy also claims is not waited
    /// for); `None` for a single mesh wired by hand.
    pub peers: Option<watch::Receiver<Arc<crate::meshes::MeshView>>>,
}

impl Scope {
    /// The one mesh of a management plane wired by hand: the plain records, no other meshes.
    pub fn single() -> Scope {
        Scope { keys: Keyspace::legacy(), peers: None }
    }
}

/// A CA loaded from a store object, kept while the object's version is unchanged.
struct Loaded {
    version: ResourceVersion,
    signer: Arc<CaSigner>,
}

/// The controller. [`Controller::start`] computes the first effective authority; run
/// [`Controller::run`] as a supervised task.
pub struct Controller {
    store: Arc<dyn Store>,
    /// Where this mesh's rotation objects live.
    keys: Keyspace,
    /// With several meshes, all of them: a cluster another policy also claims is not waited for.
    peers: Option<watch::Receiver<Arc<crate::meshes::MeshView>>>,
    base: watch::Receiver<Arc<Authority>>,
    tx: watch::Sender<Arc<Authority>>,
    clock: SharedClock,
    leader: Option<watch::Receiver<Leader>>,
    report_interval: Duration,
    reported: watch::Receiver<u64>,
    commands: mpsc::Receiver<Command>,
    cache: HashMap<String, Loaded>,
    /// Vault mounts' roots as last read, and when.
    vault_roots: HashMap<String, (SystemTime, Result<Cert, String>)>,
    /// The last problem logged, so a lasting one is logged once.
    logged: String,
}

/// What one pass decided about the next one.
struct Pass {
    wake: SystemTime,
}

impl Controller {
    /// A controller over `base` (the loader's authority). Returns it, the effective authority
    /// everyone else reads, and the handle for operator requests. `reported` is bumped whenever
    /// a cluster reports, so a barrier is re-checked at once.
    pub async fn start(
        store: Arc<dyn Store>,
        scope: Scope,
        base: watch::Receiver<Arc<Authority>>,
        clock: SharedClock,
        leader: Option<watch::Receiver<Leader>>,
        report_interval: Duration,
        reported: watch::Receiver<u64>,
    ) -> (Controller, watch::Receiver<Arc<Authority>>, RotationHandle) {
        let first = base.borrow().clone();
        let (tx, rx) = watch::channel(first);
        let (ctx, crx) = mpsc::channel(8);
        let Scope { keys, peers } = scope;
        let mut c = Controller {
            store,
            keys,
            peers,
            base,
            tx,
            clock,
            leader,
            report_interval,
            reported,
            commands: crx,
            cache: HashMap::new(),
            vault_roots: HashMap::new(),
            logged: String::new(),
        };
        c.pass().await;
        (c, rx, RotationHandle { tx: ctx })
    }

    /// Steps the rotation until `cancel` fires or nobody reads the authority any more.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let Pass { wake } = self.pass().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.tx.closed() => return,
                r = self.base.changed() => if r.is_err() { return },
                r = self.reported.changed() => if r.is_err() { return },
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return,
                },
                _ = self.clock.sleep_until(wake) => {}
            }
        }
    }

    fn leads(&self) -> bool {
        replica::is_leader(self.leader.as_ref())
    }

    fn log_once(&mut self, problem: String) {
        if problem != self.logged {
            tracing::warn!(%problem, "root rotation");
            self.logged = problem;
        }
    }

    /// One pass: step the rotation (on the leader) and publish the effective authority.
    async fn pass(&mut self) -> Pass {
        let now = self.clock.now();
        let mut wake = now + POLL.min(self.report_interval.max(Duration::from_secs(1)));
        let journal = match read_journal(self.store.as_ref(), &self.keys).await {
            Ok(j) => j,
            Err(e) => {
                self.log_once(format!("reading the journal failed: {e}; retrying"));
                return Pass { wake: now + RETRY };
            }
        };
        let journal = if self.leads() {
            match self.advance(journal, now).await {
                Ok((j, until)) => {
                    if let Some(at) = until {
                        wake = wake.min(from_unix(at).max(now));
                    }
                    j
                }
                Err(e) => {
                    self.log_once(format!("{e}; retrying"));
                    wake = now + RETRY;
                    match read_journal(self.store.as_ref(), &self.keys).await {
                        Ok(j) => j,
                        Err(_) => return Pass { wake },
                    }
                }
            }
        } else {
            journal
        };
        let effective = self.effective(&journal.value).await;
        self.publish(effective);
        Pass { wake }
    }

    fn publish(&mut self, next: Authority) {
        let current = self.tx.borrow().clone();
        let same_capability = match (&current.capability, &next.capability) {
            (Capability::Signing(a), Capability::Signing(b)) => Arc::ptr_eq(a, b) || a.roots == b.roots,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        if current.generation != next.generation
            || current.error() != next.error()
            || current.warning != next.warning
            || current.policy != next.policy
            || !same_capability
        {
            self.tx.send_replace(Arc::new(next));
        }
    }

    /// Steps the rotation in `j` (or starts one), writing the journal when it changes. Returns
    /// the journal as written and the time of the next time gate, if any.
    async fn advance(
        &mut self,
        mut j: Versioned<Journal>,
        now_t: SystemTime,
    ) -> Result<(Versioned<Journal>, Option<i64>), String> {
        let now = unix(now_t);
        let base = self.base.borrow().clone();
        let gates = Gates::of(&base.policy);
        let before = j.value.clone();
        let mut until = None;
        match j.value.rotation.clone() {
            Some(mut r) => {
                let reports = convergence::reports(
                    self.store.as_ref(),
                    &base.policy,
                    self.peers.as_ref().map(|p| p.borrow().clone()).as_deref(),
                    now,
                    self.report_interval,
                )
                .await
                .map_err(|e| format!("reading the clusters' reports failed: {e}"))?;
                let s = plan::step(&r, &reports, now, &gates);
                if let Next::Wait(waits) = &s.next {
                    until = waits.iter().find_map(|w| match w {
                        plan::Wait::Until { at, .. } => Some(*at),
                        plan::Wait::Cluster(_) => None,
                    });
                }
                let finished = plan::apply(&mut r, &s, now);
                if let Next::Advance { phase, note } = &s.next {
                    tracing::info!(rotation = %r.id, phase = %phase, %note, "root rotation: entering {phase}");
                }
                if finished {
                    self.finish(&mut j.value, r, now).await?;
                } else {
                    j.value.rotation = Some(r);
                }
            }
            None => self.idle(&mut j.value, &base, now_t).await?,
        }
        if j.value != before {
            j = self.write(j).await.map_err(|e| format!("writing the journal failed: {e}"))?;
        }
        if j.value.rotation.is_none() && before.rotation.is_some() {
            self.cleanup(&j.value).await;
        }
        Ok((j, until))
    }

    async fn write(&self, j: Versioned<Journal>) -> Result<Versioned<Journal>, StoreError> {
        let before = read_journal(self.store.as_ref(), &self.keys).await?.value;
        let pre = if j.version.0.is_empty() { Precondition::Absent } else { Precondition::Version(j.version.clone()) };
        typed::put(self.store.as_ref(), &journal_key(&self.keys), &j.value, pre).await?;
        for event in phase_changes(&before, &j.value) {
            crate::audit::record(self.store.as_ref(), event, self.clock.now()).await;
        }
        read_journal(self.store.as_ref(), &self.keys).await
    }

    /// No rotation in progress: adopt the policy's root on first sight, keep the established
    /// anchor current (a user's CA renewed under the same root, another Vault mount of the same
    /// root), and start a rotation when the generated root is due or the policy now names another
    /// root.
    async fn idle(&mut self, j: &mut Journal, base: &Authority, now: SystemTime) -> Result<(), String> {
        let base_root = match &base.capability {
            Capability::Signing(s) => s.signer.root().clone(),
            Capability::Delegated(d) => match self.vault_root(&d.delivery.spec).await {
                Ok(r) => r,
                Err(e) => {
                    self.log_once(format!("reading the root of the policy's Vault mount failed: {e}"));
                    return Ok(());
                }
            },
            Capability::Unavailable { .. } => return Ok(()),
        };
        let base_fp = base_root.fingerprint();
        let Some(established) = j.established.clone() else {
            j.established = Some(self.anchor_for_base(base, &base_root, objects::ESTABLISHED_COPY).await?);
            tracing::info!(root = %base_root.subject(), fingerprint = %base_fp, "root rotation: the mesh's root is established");
            return Ok(());
        };
        if established.fingerprint == base_fp {
            j.declined = None;
            match (&established.signer, &base.capability) {
                // Your root / your intermediate: the copy follows the CA the policy names (a
                // renewed intermediate under the same root is an ordinary re-issue).
                (SignerRef::Stored { object }, Capability::Signing(s))
                    if object == objects::ESTABLISHED_COPY
                        && self.stored(object).await.map(|c| c.cert() != s.signer.cert()).unwrap_or(true) =>
                {
                    self.copy(objects::ESTABLISHED_COPY, &s.signer).await?;
                }
                // Vault: another mount (or another login) for the same root.
                (SignerRef::Vault { spec }, Capability::Delegated(d)) if **spec != d.delivery.spec.to_doc() => {
                    if let Some(e) = j.established.as_mut() {
                        e.signer = SignerRef::Vault { spec: Box::new(d.delivery.spec.to_doc()) };
                    }
                }
                _ => {}
            }
            if let (CaMode::Generated { .. }, Capability::Signing(_)) = (&base.policy.ca, &base.capability)
                && !j.history.first().is_some_and(|h| h.aborted && h.from == established.fingerprint)
                && plan::expiry_due(
                    // meshca made this root and backdated its NotBefore for clock skew; its
                    // lifetime counts from when it was made, as `generated.ttl` says.
                    unix(base_root.not_before() + meshca_pki::issue::BACKDATE),
                    unix(base_root.not_after()),
                    base.policy.root_rotation.trigger_ratio,
                    unix(now),
                )
            {
                let r =
                    self.start_generated(j, &base.policy, Trigger::RootExpiry, now).await.map_err(|e| e.to_string())?;
                j.rotation = Some(r);
            }
            return Ok(());
        }
        if j.declined.as_deref() == Some(base_fp.as_str()) {
            return Ok(());
        }
        // Generated mode, just after a rotation: the root the policy's authority still holds is
        // the one that rotation retired, because the loader has not yet read the promoted root
        // (`meshca/root-ca` was rewritten a moment ago). That is not a new root to rotate to
        // (it would send the mesh straight back); the next pass sees the promoted one.
        if matches!(base.policy.ca, CaMode::Generated { .. })
            && j.history.first().is_some_and(|h| !h.aborted && h.from == base_fp && h.to == established.fingerprint)
        {
            tracing::debug!(root = %base_fp, "the policy's authority still holds the retired root; waiting for the loader");
            return Ok(());
        }
        if let (SignerRef::Vault { spec }, Capability::Delegated(d)) = (&established.signer, &base.capability)
            && same_mount(spec, &d.delivery.spec)
        {
            // The old root cannot be signed under any more: nothing safe to do but say so.
            self.log_once(format!(
                "the root of Vault mount {} was replaced in place ({} -> {}); intermediates it signs no longer chain \
                 to the root clusters trust. Put the new root in another mount (or issuer) and point the policy at it: \
                 meshca then rotates the mesh to it",
                d.delivery.spec.ca_path, established.fingerprint, base_fp
            ));
            return Ok(());
        }
        // The policy names another root: rotate to it, once it has been checked.
        if let Err(why) = check_new_root(&base_root, &established, &Gates::of(&base.policy), now) {
            self.log_once(format!("the policy names a new root that cannot be rotated to: {why}"));
            return Ok(());
        }
        let to = self.anchor_for_base(base, &base_root, objects::NEXT_COPY).await?;
        let r = start(Trigger::Policy, established, to, unix(now));
        tracing::info!(rotation = %r.id, "root rotation started: the policy names a new root");
        j.rotation = Some(r);
        Ok(())
    }

    /// The anchor for the policy's CA as it is now, under `root`: the generated root in place, a
    /// copy of the user's CA (in `meshca/<copy_to>`), or the policy's Vault mount.
    async fn anchor_for_base(&mut self, base: &Authority, root: &Cert, copy_to: &str) -> Result<Anchor, String> {
        let signer = match (&base.policy.ca, &base.capability) {
            (_, Capability::Delegated(d)) => SignerRef::Vault { spec: Box::new(d.delivery.spec.to_doc()) },
            (CaMode::Generated { .. }, _) => SignerRef::Stored { object: records::ROOT_CA.to_string() },
            (_, Capability::Signing(s)) => {
                self.copy(copy_to, &s.signer).await?;
                SignerRef::Stored { object: copy_to.into() }
            }
            (_, Capability::Unavailable { reason }) => return Err(reason.clone()),
        };
        Ok(Anchor { root_pem: root.to_pem(), fingerprint: root.fingerprint(), signer })
    }

    /// The root Vault signs under at `spec`'s mount, read at most once a minute.
    async fn vault_root(&mut self, spec: &VaultSpec) -> Result<Cert, String> {
        let key = mount_key(&spec.server, &spec.ca_path, spec.namespace.as_deref());
        let now = self.clock.now();
        if let Some((at, r)) = self.vault_roots.get(&key)
            && now.duration_since(*at).unwrap_or_default() < VAULT_ROOT_CACHE
        {
            return r.clone();
        }
        let r = meshca_vault::pki::signing_root(spec).await.map_err(|e| e.to_string());
        self.vault_roots.insert(key, (now, r.clone()));
        r
    }

    /// Writes a copy of `signer` (certificate chain and key) to `meshca/<name>`.
    async fn copy(&mut self, name: &str, signer: &CaSigner) -> Result<(), String> {
        let secret = castore::secret_from_signer(signer);
        self.store
            .put(&object(&self.keys, name)?, &secret, Precondition::Any)
            .await
            .map_err(|e| format!("writing meshca/{name} failed: {e}"))?;
        self.cache.remove(name);
        Ok(())
    }

    /// Generated mode: makes a new root as the policy says and starts a rotation to it.
    async fn start_generated(
        &mut self,
        j: &Journal,
        policy: &Policy,
        trigger: Trigger,
        now: SystemTime,
    ) -> Result<Rotation, RotateError> {
        let CaMode::Generated { key_algorithm, ttl, organization } = &policy.ca else {
            return Err(RotateError::NotGenerated(format!(
                "the policy's root is {} ({}): meshca rotates it when the policy names a new one — point {} at your new root \
                 (or replace the secret's contents), and meshca runs the rotation",
                policy.ca.name(),
                match policy.ca {
                    CaMode::Vault(_) => "in Vault",
                    _ => "yours",
                },
                match policy.ca {
                    CaMode::SecretRef(_) => "spec.config.secretRef",
                    CaMode::IntermediateRef { .. } => "spec.config.intermediateRef",
                    _ => "spec.config.vault",
                }
            )));
        };
        let Some(from) = j.established.clone() else {
            return Err(RotateError::CannotStart(
                "the mesh's current root is not established yet; retry shortly".into(),
            ));
        };
        // The policy's lifetime, and a name that tells the new root from the old one.
        let mut params = RootParams::new(organization);
        params.ttl = *ttl;
        params.common_name = format!("{organization} Root CA {}", meshca_pki::chain::rfc3339(now));
        let key =
            PrivateKey::generate(*key_algorithm).map_err(|e| RotateError::CannotStart(format!("root key: {e}")))?;
        let next = CaSigner::new_root(key, &params, now).map_err(|e| RotateError::CannotStart(format!("root: {e}")))?;
        check_new_root(next.cert(), &from, &Gates::of(policy), now).map_err(RotateError::CannotStart)?;
        self.copy(objects::GENERATED_NEXT, &next).await.map_err(RotateError::CannotStart)?;
        let to = Anchor {
            root_pem: next.cert().to_pem(),
            fingerprint: next.cert().fingerprint(),
            signer: SignerRef::Stored { object: objects::GENERATED_NEXT.into() },
        };
        let r = start(trigger, from, to, unix(now));
        tracing::info!(rotation = %r.id, trigger = trigger.name(), new_root = %next.cert().subject(), "root rotation started");
        Ok(r)
    }

    /// Ends the rotation: the new root (or, aborted, the old one) becomes the established root.
    async fn finish(&mut self, j: &mut Journal, r: Rotation, now: i64) -> Result<(), String> {
        if r.aborted {
            if r.trigger == Trigger::Policy {
                // The policy still names the new root: do not rotate to it again by itself.
                j.declined = Some(r.to.fingerprint.clone());
            }
            tracing::info!(rotation = %r.id, "root rotation aborted and finished: every cluster is back on the old root alone");
        } else {
            let mut established = r.to.clone();
            if let SignerRef::Stored { object } = &r.to.signer {
                let promote_to = match object.as_str() {
                    objects::GENERATED_NEXT => Some(records::ROOT_CA.to_string()),
                    objects::NEXT_COPY => Some(objects::ESTABLISHED_COPY.to_string()),
                    _ => None,
                };
                if let Some(dest) = promote_to {
                    // Promote before the journal commits: a crash in between finds the rotation
                    // still in Retiring, converged, and promotes again (the same content).
                    let v = self
                        .store
                        .get(&self::object(&self.keys, object)?)
                        .await
                        .map_err(|e| format!("reading meshca/{object}: {e}"))?
                        .ok_or_else(|| format!("meshca/{object} (the new root's CA) is missing"))?;
                    self.store
                        .put(&self::object(&self.keys, &dest)?, &v.value, Precondition::Any)
                        .await
                        .map_err(|e| format!("promoting meshca/{object} to meshca/{dest}: {e}"))?;
                    self.cache.remove(&dest);
                    established.signer = SignerRef::Stored { object: dest };
                }
            }
            j.established = Some(established);
            j.declined = None;
            tracing::info!(rotation = %r.id, root = %r.to.fingerprint, "root rotation complete: every cluster trusts and signs under the new root alone; the old root is retired");
        }
        j.history.insert(0, r.finished(now));
        j.history.truncate(super::journal::HISTORY_KEEP);
        j.rotation = None;
        Ok(())
    }

    /// Deletes the CA objects no longer referenced once a rotation is over: the new root's
    /// prepared object after its promotion, or after an abort (in generated mode an aborted new
    /// root's key is destroyed here), and the copy of a user's CA the mesh no longer uses.
    async fn cleanup(&mut self, j: &Journal) {
        let referenced = |name: &str| {
            j.established.as_ref().is_some_and(|a| a.signer == SignerRef::Stored { object: name.to_string() })
        };
        for name in [objects::GENERATED_NEXT, objects::NEXT_COPY, objects::ESTABLISHED_COPY] {
            if referenced(name) {
                continue;
            }
            let Ok(key) = object(&self.keys, name) else { continue };
            match self.store.delete(&key, Precondition::Any).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => tracing::warn!(object = name, error = %e, "removing a retired root rotation object failed"),
            }
            self.cache.remove(name);
        }
    }

    async fn stored(&mut self, name: &str) -> Result<Arc<CaSigner>, String> {
        let v = self
            .store
            .get(&object(&self.keys, name)?)
            .await
            .map_err(|e| format!("meshca/{name}: {e}"))?
            .ok_or_else(|| format!("meshca/{name} is missing"))?;
        if let Some(l) = self.cache.get(name).filter(|l| l.version == v.version) {
            return Ok(l.signer.clone());
        }
        let signer = Arc::new(
            castore::signer_from_secret(&v.value, "root rotation", &format!("meshca/{name}"))
                .map_err(|e| e.to_string())?,
        );
        self.cache.insert(name.to_string(), Loaded { version: v.version, signer: signer.clone() });
        Ok(signer)
    }

    /// What signs under `anchor` — its CA, checked to be under its root, or its Vault mount —
    /// with `roots` as the root set clusters are to write.
    async fn capability_of(&mut self, anchor: &Anchor, roots: RootSet, policy: &Policy) -> Capability {
        let unavailable = |reason: String| Capability::Unavailable { reason: format!("root rotation: {reason}") };
        match &anchor.signer {
            SignerRef::Stored { object } => match self.stored(object).await {
                Err(reason) => unavailable(reason),
                Ok(s) if s.root().fingerprint() != anchor.fingerprint => unavailable(format!(
                    "meshca/{object} holds a CA under {} ({}), not under the root the rotation expects ({})",
                    s.root().subject(),
                    s.root().fingerprint(),
                    anchor.fingerprint
                )),
                Ok(signer) => Capability::Signing(Arc::new(Signing { signer, roots, crl_also: Vec::new() })),
            },
            SignerRef::Vault { spec } => match VaultSpec::from_doc(spec) {
                Err(e) => unavailable(format!("the Vault block in the journal: {e}")),
                Ok(spec) => Capability::Delegated(Box::new(Delegation {
                    delivery: VaultDelivery {
                        trust_domain: policy.trust_domain.clone(),
                        organization: policy.intermediate.organization.clone(),
                        spec,
                    },
                    roots: Some(roots),
                })),
            },
        }
    }

    /// The fingerprint of the root the policy's CA is under, when it can be known: `None` when
    /// it cannot sign. A Vault mount is read (at most once a minute) only when it is not the
    /// established one.
    async fn policy_root(&mut self, base: &Authority, est: &Anchor) -> Option<Result<String, String>> {
        match &base.capability {
            Capability::Signing(s) => Some(Ok(s.signer.root().fingerprint())),
            Capability::Delegated(d) => match &est.signer {
                SignerRef::Vault { spec } if same_mount(spec, &d.delivery.spec) => Some(Ok(est.fingerprint.clone())),
                _ => Some(self.vault_root(&d.delivery.spec).await.map(|c| c.fingerprint())),
            },
            Capability::Unavailable { .. } => None,
        }
    }

    /// The authority the mesh runs on now: the loader's, with the signer and root set the
    /// journal says.
    async fn effective(&mut self, j: &Journal) -> Authority {
        let base = self.base.borrow().clone();
        let mut other = None;
        let (signer_anchor, roots, note) = match (&j.rotation, &j.established) {
            (Some(r), _) => {
                let (signer, roots) = plan::holding(r);
                let signer_anchor = match signer {
                    Signer::From => r.from.clone(),
                    Signer::Target => r.target().clone(),
                };
                let roots = match roots {
                    Roots::Both => {
                        // Clusters may be under either root: the one not signing publishes a CRL too.
                        other = Some(if signer_anchor.fingerprint == r.from.fingerprint { &r.to } else { &r.from });
                        vec![r.from.root_pem.clone(), r.to.root_pem.clone()]
                    }
                    Roots::Target => vec![r.target().root_pem.clone()],
                };
                (signer_anchor, roots, None)
            }
            (None, Some(est)) => match self.policy_root(&base, est).await {
                // The policy's CA cannot sign: the loader's authority says why.
                None => return (*base).clone(),
                // The policy's CA is the established one: it rules, with the established root set
                // (which a Vault-mode authority does not know by itself).
                Some(Ok(fp)) if fp == est.fingerprint => {
                    let Capability::Delegated(d) = &base.capability else { return (*base).clone() };
                    let Ok(roots) = roots_of(std::slice::from_ref(&est.root_pem)) else { return (*base).clone() };
                    let d = Delegation { delivery: d.delivery.clone(), roots: Some(roots) };
                    return Authority::new(
                        base.policy.clone(),
                        Capability::Delegated(Box::new(d)),
                        base.warning.clone(),
                    );
                }
                Some(policy_root) => {
                    let note = match policy_root {
                        Err(e) => format!(
                            "the root of the policy's Vault mount cannot be read ({e}); the mesh stays on root {} until \
                             it can",
                            est.fingerprint
                        ),
                        Ok(fp) if j.declined.as_deref() == Some(fp.as_str()) => format!(
                            "the policy names root {fp}, but its rotation was aborted: the mesh stays on root {} until \
                             the policy names another root (or the old one again)",
                            est.fingerprint
                        ),
                        Ok(fp) => format!(
                            "the policy names root {fp}; the mesh stays on root {} until a rotation to it can start",
                            est.fingerprint
                        ),
                    };
                    (est.clone(), vec![est.root_pem.clone()], Some(note))
                }
            },
            (None, None) => return (*base).clone(),
        };
        let mut capability = match roots_of(&roots) {
            Ok(roots) => self.capability_of(&signer_anchor, roots, &base.policy).await,
            Err(reason) => Capability::Unavailable { reason: format!("root rotation: {reason}") },
        };
        if let (Capability::Signing(s), Some(Anchor { signer: SignerRef::Stored { object }, .. })) =
            (&capability, other)
        {
            match self.stored(object).await {
                Ok(also) => {
                    let s = Signing { signer: s.signer.clone(), roots: s.roots.clone(), crl_also: vec![also] };
                    capability = Capability::Signing(Arc::new(s));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the other root's CA cannot sign CRLs; its clusters write no ca-crl.pem")
                }
            }
        }
        let warning = match (note, &base.warning) {
            (Some(n), Some(w)) => Some(format!("{n}; {w}")),
            (n, w) => n.or_else(|| w.clone()),
        };
        Authority::new(base.policy.clone(), capability, warning)
    }

    async fn command(&mut self, cmd: Command) {
        let (reply, result) = match cmd {
            Command::Start(reply) => {
                let r = self.operator_start().await;
                (reply, r)
            }
            Command::Abort(reply) => {
                let r = self.operator_abort().await;
                (reply, r)
            }
        };
        let _ = reply.send(result);
    }

    async fn operator_start(&mut self) -> Result<Rotation, RotateError> {
        if !self.leads() {
            return Err(RotateError::NotLeader);
        }
        let mut j = read_journal(self.store.as_ref(), &self.keys).await?;
        if let Some(r) = &j.value.rotation {
            return Err(RotateError::InProgress { id: r.id.clone(), phase: r.phase });
        }
        let base = self.base.borrow().clone();
        let now = self.clock.now();
        if j.value.established.is_none()
            && let Some(signing) = base.signing()
        {
            let root = signing.signer.root().clone();
            j.value.established = Some(
                self.anchor_for_base(&base, &root, objects::ESTABLISHED_COPY)
                    .await
                    .map_err(RotateError::CannotStart)?,
            );
        }
        let r = self.start_generated(&j.value, &base.policy, Trigger::Operator, now).await?;
        j.value.rotation = Some(r.clone());
        self.write(j).await?;
        self.pass().await;
        Ok(r)
    }

    async fn operator_abort(&mut self) -> Result<Rotation, RotateError> {
        if !self.leads() {
            return Err(RotateError::NotLeader);
        }
        let mut j = read_journal(self.store.as_ref(), &self.keys).await?;
        let Some(mut r) = j.value.rotation.clone() else { return Err(RotateError::NotInProgress) };
        plan::abort(&mut r, unix(self.clock.now()))?;
        tracing::info!(rotation = %r.id, phase = %r.phase, "root rotation aborted by an operator");
        j.value.rotation = Some(r.clone());
        self.write(j).await?;
        self.pass().await;
        Ok(r)
    }
}

/// The audit events between two journals: each phase a rotation entered, and its end.
fn phase_changes(before: &Journal, after: &Journal) -> Vec<crate::audit::Event> {
    use crate::audit::{Action, Event};
    let event = |r: &Rotation, phase: &str, note: &str| {
        Event::new(Action::RootRotationPhase, "management plane", "")
            .with("rotation", &r.id)
            .with("phase", phase)
            .with("note", note)
            .with("from", &r.from.fingerprint)
            .with("to", &r.to.fingerprint)
    };
    let mut out = Vec::new();
    match (&before.rotation, &after.rotation) {
        (Some(b), Some(a)) if b.id == a.id => {
            for t in a.transitions.iter().skip(b.transitions.len()) {
                out.push(event(a, t.phase.name(), &t.note));
            }
        }
        (b, a) => {
            if let Some(b) = b {
                let outcome = if b.aborted { "aborted" } else { "complete" };
                out.push(event(b, RotationPhase::Idle.name(), outcome));
            }
            if let Some(a) = a {
                for t in &a.transitions {
                    out.push(event(a, t.phase.name(), &t.note));
                }
            }
        }
    }
    out
}

/// A new rotation from `from` to `to`, started at `now`.
pub fn start(trigger: Trigger, from: Anchor, to: Anchor, now: i64) -> Rotation {
    let id =
        format!("{}-{}", meshca_pki::chain::rfc3339(from_unix(now)), &to.fingerprint[..to.fingerprint.len().min(8)]);
    Rotation {
        id,
        trigger,
        from,
        to,
        phase: RotationPhase::Distributing,
        aborted: false,
        started_at: now,
        phase_since: now,
        converged: Default::default(),
        switched_at: None,
        transitions: vec![Transition {
            phase: RotationPhase::Distributing,
            at: now,
            note: format!("started ({}): every cluster is to trust {{A, B}}", trigger.name()),
        }],
    }
}

/// What identifies a Vault mount's signer (not how one logs in).
fn mount_key(server: &str, ca_path: &str, namespace: Option<&str>) -> String {
    format!("{}|{}|{}", server.trim_end_matches('/'), ca_path.trim_matches('/'), namespace.unwrap_or(""))
}

/// Whether the Vault block `doc` signs at the same mount (and issuer) as `spec`.
fn same_mount(doc: &VaultDoc, spec: &VaultSpec) -> bool {
    mount_key(&doc.server, &doc.ca_path, doc.namespace.as_deref())
        == mount_key(&spec.server, &spec.ca_path, spec.namespace.as_deref())
}

/// The root set of these root PEMs, in this order.
fn roots_of(pems: &[String]) -> Result<RootSet, String> {
    let certs = pems
        .iter()
        .map(|p| Cert::from_pem(p.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a root in the journal does not parse: {e}"))?;
    RootSet::from_certs(certs).map_err(|e| e.to_string())
}

/// A new root must be a valid self-signed CA, another root than the established one, and live
/// long enough for a whole rotation (both waits) with room to spare.
pub fn check_new_root(root: &Cert, established: &Anchor, gates: &Gates, now: SystemTime) -> Result<(), String> {
    RootSet::from_certs(vec![root.clone()]).map_err(|e| e.to_string())?;
    if root.fingerprint() == established.fingerprint {
        return Err("it is the root the mesh already trusts".into());
    }
    if !root.is_valid_at(now) {
        return Err(format!(
            "{} is not valid now (valid {} to {})",
            root.subject(),
            meshca_pki::chain::rfc3339(root.not_before()),
            meshca_pki::chain::rfc3339(root.not_after())
        ));
    }
    let needed = Duration::from_secs(u64::try_from(2 * (gates.learn_secs() + gates.drain_secs())).unwrap_or(u64::MAX));
    if root.not_after() < now + needed {
        return Err(format!(
            "{} expires at {}, too soon for a rotation (which takes at least {}s with rootRotation.maxLeafLifetime {}s)",
            root.subject(),
            meshca_pki::chain::rfc3339(root.not_after()),
            gates.learn_secs() + gates.drain_secs(),
            gates.max_leaf_lifetime.as_secs()
        ));
    }
    Ok(())
}
