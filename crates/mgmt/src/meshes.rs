//! Several meshes under one management plane: one per RootTrustPolicy, each with its own root,
//! trust domain, CA mode, clusters, root rotation, CRL and federation — and nothing shared
//! between them but the control plane (registration, agent identities, the audit log).
//!
//! The [`Supervisor`] reads the policy set and runs, for each policy, what a single-policy
//! management plane always ran: the loader (the policy's CA), the root rotation controller (the
//! *effective* authority), the CRL publisher and the federation poller, all on that mesh's own
//! records ([`Keyspace`]). It publishes a [`MeshView`]: every mesh's effective authority, which
//! the issuer, the trust streams, status, metrics and the dashboard read. A cluster's mesh is
//! decided on every call from its record's name and labels ([`MeshView::place`]): a cluster
//! selected by two policies is refused naming both, one selected by none is left alone.
//!
//! A policy added to the set starts its mesh; one removed stops it (its records stay in the
//! store, as a single-policy management plane's stayed when its policy was replaced).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshca_clock::SharedClock;
use meshca_policy::{Assignment, Policy, PolicySet};
use meshca_store::{Precondition, Store, StoreError, typed};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::authority::Authority;
use crate::error::MgmtError;
use crate::loader::{Loader, PolicySource};
use crate::records::{self, Keyspace};
use crate::replica::Leader;
use crate::rotation::{Controller, RotationHandle};

/// One mesh as the rest of the management plane sees it.
#[derive(Clone)]
pub struct Mesh {
    /// Its policy's name.
    pub name: String,
    /// Where its records live.
    pub keys: Keyspace,
    /// Its effective authority (the root rotation's phase applied), read afresh at each use: the
    /// issuer and a trust stream never act on an authority older than the newest.
    pub authority: watch::Receiver<Arc<Authority>>,
    /// Its root rotation controller (none where a mesh is wired by hand without one).
    pub rotation: Option<RotationHandle>,
}

impl Mesh {
    /// Its effective authority now.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.borrow().clone()
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("name", &self.name).field("keys", &self.keys).finish_non_exhaustive()
    }
}

/// Where a cluster belongs.
#[derive(Debug, Clone)]
pub enum Placement<'a> {
    /// In this mesh.
    Mesh(&'a Mesh),
    /// Not in any, or in several: it is told it is not enrolled and keeps its `cacerts`. The
    /// reason, for status and for a refused call.
    Outside(String),
}

/// Every mesh, sorted by name.
#[derive(Debug, Clone, Default)]
pub struct MeshView {
    meshes: Vec<Mesh>,
}

impl MeshView {
    /// The view of `meshes`.
    pub fn new(mut meshes: Vec<Mesh>) -> MeshView {
        meshes.sort_by(|a, b| a.name.cmp(&b.name));
        MeshView { meshes }
    }

    /// The meshes, sorted by name.
    pub fn meshes(&self) -> &[Mesh] {
        &self.meshes
    }

    /// The mesh of policy `name`.
    pub fn get(&self, name: &str) -> Option<&Mesh> {
        self.meshes.iter().find(|m| m.name == name)
    }

    /// The mesh an operator's request is about: the one named, or the only one when the request
    /// names none. The error lists the meshes there are.
    pub fn pick(&self, name: &str) -> Result<&Mesh, String> {
        let names = || self.meshes.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ");
        if name.is_empty() {
            return match self.meshes.as_slice() {
                [one] => Ok(one),
                [] => Err("no RootTrustPolicy is in force".into()),
                _ => Err(format!("there are several RootTrustPolicies ({}); name one with --policy", names())),
            };
        }
        self.get(name).ok_or_else(|| format!("no RootTrustPolicy is named {name:?} (there are: {})", names()))
    }

    /// Where the cluster `name`, labelled `labels`, belongs.
    pub fn place(&self, name: &str, labels: &BTreeMap<String, String>) -> Placement<'_> {
        let authorities: Vec<Arc<Authority>> = self.meshes.iter().map(Mesh::authority).collect();
        let assignment = meshca_policy::set::assign(authorities.iter().map(|a| &a.policy), name, labels);
        match assignment {
            Assignment::Mesh(p) => {
                match self.meshes.iter().zip(&authorities).find(|(_, a)| a.policy.name == p.name).map(|(m, _)| m) {
                    Some(m) => Placement::Mesh(m),
                    None => Placement::Outside(format!("cluster {name} is selected by no RootTrustPolicy")),
                }
            }
            other => Placement::Outside(other.explain(name).unwrap_or_default()),
        }
    }

    /// Whether every policy of `set` is in force as it is written there (an applied set has
    /// been loaded).
    pub fn holds(&self, set: &PolicySet) -> bool {
        set.policies().iter().all(|p| self.get(&p.name).is_some_and(|m| m.authority().policy == *p))
    }
}

/// A view of one mesh wired by hand (tests; a single mesh without a supervisor): follows
/// `authority` until its sender is gone.
pub fn single(
    mut authority: watch::Receiver<Arc<Authority>>,
    keys: Keyspace,
    rotation: Option<RotationHandle>,
) -> watch::Receiver<Arc<MeshView>> {
    let live = authority.clone();
    let view = move |a: Arc<Authority>| {
        Arc::new(MeshView::new(vec![Mesh {
            name: a.policy.name.clone(),
            keys: keys.clone(),
            authority: live.clone(),
            rotation: rotation.clone(),
        }]))
    };
    let (tx, rx) = watch::channel(view(authority.borrow_and_update().clone()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                r = authority.changed() => if r.is_err() { return },
            }
            tx.send_replace(view(authority.borrow_and_update().clone()));
        }
    });
    rx
}

/// Which mesh holds which [`Keyspace`] ([`records::mesh_index`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MeshIndex {
    /// The mesh whose records have the plain names.
    #[serde(default)]
    legacy: Option<String>,
    /// Every other mesh ever started: its records are `mesh.<name>.*`, for good.
    #[serde(default)]
    named: BTreeSet<String>,
}

/// The records of each mesh in `names`, recording new meshes in the index.
///
/// A mesh keeps its records for as long as its policy keeps its name. The plain names (the
/// records a single-policy management plane always had) belong to the first mesh ever started;
/// when a set of one policy is renamed, the new name takes them over (renaming the only policy
/// changes nothing else, as before); any other new mesh gets records of its own and never
/// inherits another mesh's root.
pub async fn keyspaces(store: &dyn Store, names: &[String]) -> Result<BTreeMap<String, Keyspace>, StoreError> {
    let key = records::mesh_index();
    loop {
        let current = typed::get::<MeshIndex>(store, &key).await?;
        let mut index = current.as_ref().map(|v| v.value.clone()).unwrap_or_default();
        let fresh = |n: &String, index: &MeshIndex| index.legacy.as_ref() != Some(n) && !index.named.contains(n);
        let legacy_present = index.legacy.as_ref().is_some_and(|l| names.contains(l));
        match (&index.legacy, names) {
            (None, _) => index.legacy = names.first().cloned(),
            (Some(_), [only]) if !legacy_present && fresh(only, &index) => index.legacy = Some(only.clone()),
            _ => {}
        }
        for n in names {
            if fresh(n, &index) {
                index.named.insert(n.clone());
            }
        }
        let out = names
            .iter()
            .map(|n| {
                let keys = if index.legacy.as_ref() == Some(n) { Keyspace::legacy() } else { Keyspace::named(n) };
                (n.clone(), keys)
            })
            .collect();
        if current.as_ref().map(|v| &v.value) == Some(&index) {
            return Ok(out);
        }
        let pre = match &current {
            Some(v) => Precondition::Version(v.version.clone()),
            None => Precondition::Absent,
        };
        match typed::put(store, &key, &index, pre).await {
            Ok(()) => return Ok(out),
            // Another replica recorded the same meshes first: read its answer.
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// What the supervisor runs each mesh with.
#[derive(Clone)]
pub struct Wiring {
    /// The management plane's store.
    pub store: Arc<dyn Store>,
    /// Where the policy set comes from.
    pub source: Arc<dyn PolicySource>,
    /// The policy used when the source has none.
    pub fallback: Policy,
    /// Time.
    pub clock: SharedClock,
    /// With replicas: who leads.
    pub leader: Option<watch::Receiver<Leader>>,
    /// How often agents report (the rotation's barrier).
    pub report_interval: Duration,
    /// The CRL's lifetime.
    pub crl_ttl: Duration,
    /// Bumped whenever a cluster reports.
    pub reported: watch::Receiver<u64>,
    /// Wakes every trust stream.
    pub nudge: watch::Sender<u64>,
    /// How often the policy is re-read when nothing says it changed.
    pub resync: Duration,
}

/// One running mesh.
struct Running {
    keys: Keyspace,
    cancel: CancellationToken,
    authority: watch::Receiver<Arc<Authority>>,
    rotation: RotationHandle,
}

/// Runs one mesh per policy. [`Supervisor::start`] starts the meshes of the set in force and
/// returns the view; run [`Supervisor::run`] as a supervised task.
pub struct Supervisor {
    w: Wiring,
    running: BTreeMap<String, Running>,
    tasks: JoinSet<()>,
    /// Every mesh's tasks end when this does.
    cancel: CancellationToken,
    tx: watch::Sender<Arc<MeshView>>,
}

impl Supervisor {
    /// Starts a mesh for each policy in force (the fallback when the source has none, or an
    /// invalid set, which is logged).
    pub async fn start(w: Wiring) -> Result<(Supervisor, watch::Receiver<Arc<MeshView>>), MgmtError> {
        let (tx, rx) = watch::channel(Arc::new(MeshView::default()));
        let mut s =
            Supervisor { w, running: BTreeMap::new(), tasks: JoinSet::new(), cancel: CancellationToken::new(), tx };
        let set = match s.w.source.read().await {
            Ok(Some(set)) => set,
            Ok(None) => PolicySet::single(s.w.fallback.clone()),
            Err(e) => {
                tracing::error!(error = %e, "the stored policies are invalid; using the default until they are fixed");
                PolicySet::single(s.w.fallback.clone())
            }
        };
        s.reconcile(&set).await?;
        s.publish();
        Ok((s, rx))
    }

    /// Follows the policy set until `cancel` fires, then stops every mesh.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut changes = self.w.source.changes();
        let _ = changes.next().await;
        loop {
            while self.tasks.try_join_next().is_some() {}
            let authority_changed = {
                // A mesh whose tasks ended (a panic; a removal ends it through `cancel`) changes no
                // more: its wait never resolves, rather than resolving at once on every pass.
                let waits: Vec<_> = self
                    .running
                    .values_mut()
                    .map(|r| {
                        Box::pin(async {
                            if r.authority.changed().await.is_err() {
                                std::future::pending::<()>().await
                            }
                        })
                    })
                    .collect();
                async move {
                    if waits.is_empty() {
                        std::future::pending::<()>().await
                    } else {
                        let _ = futures::future::select_all(waits).await;
                    }
                }
            };
            let mut reread = false;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.tx.closed() => break,
                _ = authority_changed => {}
                _ = changes.next() => reread = true,
                _ = self.w.clock.sleep(self.w.resync) => reread = true,
            }
            if reread {
                match self.w.source.read().await {
                    Ok(Some(set)) => {
                        if let Err(e) = self.reconcile(&set).await {
                            tracing::error!(error = %e, "starting the meshes of the new policy set failed; will retry");
                        }
                    }
                    Ok(None) => {}
                    // Each mesh's loader reports the refused set in its status and keeps its policy.
                    Err(e) => tracing::error!(error = %e, "the new policy set is refused; the meshes in force stay"),
                }
            }
            self.publish();
        }
        self.cancel.cancel();
        meshca_serve::stop_children(&mut self.tasks, crate::server::CHILD_GRACE, "meshes").await;
    }

    /// Starts the meshes `set` adds and stops those it no longer has.
    async fn reconcile(&mut self, set: &PolicySet) -> Result<(), MgmtError> {
        let names: Vec<String> = set.policies().iter().map(|p| p.name.clone()).collect();
        let keys = keyspaces(self.w.store.as_ref(), &names).await?;
        let gone: Vec<String> =
            self.running.iter().filter(|(n, r)| keys.get(*n) != Some(&r.keys)).map(|(n, _)| n.clone()).collect();
        for name in gone {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(policy = %name, "RootTrustPolicy removed: its mesh stops (its records stay)");
                r.cancel.cancel();
            }
        }
        for policy in set.policies() {
            if !self.running.contains_key(&policy.name) {
                let keys = keys.get(&policy.name).cloned().unwrap_or_else(|| Keyspace::named(&policy.name));
                let running = self.start_mesh(policy.clone(), keys).await;
                self.running.insert(policy.name.clone(), running);
            }
        }
        Ok(())
    }

    async fn start_mesh(&mut self, policy: Policy, keys: Keyspace) -> Running {
        let w = &self.w;
        let name = policy.name.clone();
        tracing::info!(policy = %name, records = if keys.is_legacy() { "plain" } else { "own" }, "mesh starting");
        let cancel = self.cancel.child_token();
        let (loader, base) =
            Loader::start(w.store.clone(), w.source.clone(), keys.clone(), policy, w.clock.clone(), w.resync).await;
        self.tasks.spawn(loader.run(cancel.child_token()));
        let (controller, authority, rotation) = Controller::start(
            w.store.clone(),
            crate::rotation::controller::Scope { keys: keys.clone(), peers: Some(self.tx.subscribe()) },
            base,
            w.clock.clone(),
            w.leader.clone(),
            w.report_interval,
            w.reported.clone(),
        )
        .await;
        self.tasks.spawn(controller.run(cancel.child_token()));
        let publisher = crate::revocation::Publisher {
            store: w.store.clone(),
            keys: keys.clone(),
            authority: authority.clone(),
            nudge: w.nudge.clone(),
            clock: w.clock.clone(),
            ttl: w.crl_ttl,
            leader: w.leader.clone(),
        };
        self.tasks.spawn(publisher.run(cancel.child_token()));
        let poller = crate::federation::poll::Poller::new(
            w.store.clone(),
            keys.clone(),
            authority.clone(),
            w.nudge.clone(),
            w.clock.clone(),
            w.leader.clone(),
        );
        self.tasks.spawn(poller.run(cancel.child_token()));
        Running { keys, cancel, authority, rotation }
    }

    fn publish(&mut self) {
        let meshes = self
            .running
            .iter_mut()
            .map(|(name, r)| {
                r.authority.borrow_and_update();
                Mesh {
                    name: name.clone(),
                    keys: r.keys.clone(),
                    authority: r.authority.clone(),
                    rotation: Some(r.rotation.clone()),
                }
            })
            .collect();
        self.tx.send_replace(Arc::new(MeshView::new(meshes)));
        // Trust streams look again: a cluster may have changed mesh.
        self.w.nudge.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_store::dir::DirStore;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_mesh_keeps_its_records_and_only_a_renamed_single_policy_inherits_the_plain_ones() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DirStore::open(dir.path()).expect("store");
        let k = keyspaces(&store, &names(&["mesh"])).await.expect("first");
        assert!(k["mesh"].is_legacy(), "the first mesh keeps the plain names (an upgrade moves nothing)");
        let k = keyspaces(&store, &names(&["mesh", "staging"])).await.expect("second");
        assert!(k["mesh"].is_legacy());
        assert_eq!(k["staging"], Keyspace::named("staging"));
        // The plain one's policy removed: staging keeps its own; a new policy gets its own too.
        let k = keyspaces(&store, &names(&["prod", "staging"])).await.expect("third");
        assert_eq!(k["prod"], Keyspace::named("prod"), "a new mesh never inherits another's root");
        assert_eq!(k["staging"], Keyspace::named("staging"));
        // Down to staging alone: still its own records.
        let k = keyspaces(&store, &names(&["staging"])).await.expect("fourth");
        assert_eq!(k["staging"], Keyspace::named("staging"));
        // Renaming the only policy (never seen before) takes over the plain records.
        let dir2 = tempfile::tempdir().expect("tmp");
        let store2 = DirStore::open(dir2.path()).expect("store");
        keyspaces(&store2, &names(&["mesh"])).await.expect("first");
        let k = keyspaces(&store2, &names(&["renamed"])).await.expect("rename");
        assert!(k["renamed"].is_legacy(), "renaming the only policy changes nothing else");
    }

    #[test]
    fn pick_names_the_meshes_when_the_request_is_ambiguous() {
        let view = MeshView::default();
        assert!(view.pick("").expect_err("no meshes").contains("no RootTrustPolicy"));
    }
}
