//! Root rotation in-process, on a manual clock: the management plane's real domain services
//! (policy loader, rotation controller, issuer, status) over a real directory store, and real
//! agents (the agent's own loop, each with its own directory store for `cacerts`) wired to them
//! by function calls instead of gRPC. A day and a half of simulated time per rotation runs in
//! seconds; nothing sleeps on the clock.
//!
//! The wiring stands in for the network only: what the agents receive is exactly
//! `grpc::trust_state` of the effective authority, what they report is stored exactly as the
//! `ReportStatus` handler stores it. The same rotation over real processes, sockets and mutual
//! TLS is tested end to end in `crates/meshca/tests/root_rotation.rs`.
//!
//! Every test watches every cluster's `cacerts` and checks the barrier on each version written:
//! no cluster signs under the new root before every cluster trusts both, and no cluster drops the
//! old root before every cluster signs under the new one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use meshca_agent::driver::{ControlPlane, Link, drive};
use meshca_agent::source::{IntermediateSource, KeyLocation, Obtained, Request};
use meshca_agent::{AgentError, AgentOptions};
use meshca_clock::{Clock, ManualClock, unix};
use meshca_mgmt::authority::Authority;
use meshca_mgmt::grpc::Settings;
use meshca_mgmt::issuer::Issuer;
use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
use meshca_mgmt::ratelimit::RateLimiter;
use meshca_mgmt::records::{self, ClusterRecord, StatusRecord};
use meshca_mgmt::rotation::controller::read_journal;
use meshca_mgmt::rotation::{Controller, RotationHandle};
use meshca_pki::bundle::BundleFiles;
use meshca_pki::{CaBundle, Cert, PrivateKey};
use meshca_proto::mgmt::{ClusterStatus, IssueIntermediateResponse};
use meshca_proto::{AlertKind, RotationPhase};
use meshca_store::dir::DirStore;
use meshca_store::{ObjectKey, Precondition, Store, typed};
use meshca_testsupport::rotation;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const HOUR: u64 = 3600;
const REPORT: Duration = Duration::from_secs(30);
/// The policy's waits: half of 24 h plus 5 min, then 24 h plus 5 min.
const LEARN: i64 = 12 * 3600 + 300;
const DRAIN: i64 = 24 * 3600 + 300;

fn policy(extra: &str) -> String {
    format!(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n    generated: {{ ttl: 87600h }}\n  intermediateCertOptions: {{ ttl: 720h }}\n  rootRotation: {{ maxLeafLifetime: 24h, skew: 5m }}\n{extra}"
    )
}

/// The management plane, in-process.
struct Plane {
    store: Arc<DirStore>,
    authority: watch::Receiver<Arc<Authority>>,
    issuer: Arc<Issuer>,
    rotation: RotationHandle,
    reported: watch::Sender<u64>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Plane {
    async fn start(store: Arc<DirStore>, clock: &ManualClock) -> Plane {
        let source = Arc::new(StorePolicy::new(store.clone()));
        let fallback = meshca_policy::Policy::generated_default(Duration::from_secs(720 * HOUR));
        let (loader, base) =
            Loader::start_single(store.clone(), source, fallback, clock.shared(), Duration::from_secs(30)).await;
        let (reported, reported_rx) = watch::channel(0u64);
        let (controller, authority, rotation) = Controller::start(
            store.clone(),
            meshca_mgmt::rotation::controller::Scope::single(),
            base,
            clock.shared(),
            None,
            REPORT,
            reported_rx,
        )
        .await;
        let cancel = CancellationToken::new();
        let tasks =
            vec![tokio::spawn(loader.run(cancel.child_token())), tokio::spawn(controller.run(cancel.child_token()))];
        let issuer = Arc::new(Issuer::new(
            store.clone(),
            meshca_mgmt::meshes::single(authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
            RateLimiter::new(50, 60.0, clock.shared()),
            None,
        ));
        Plane { store, authority, issuer, rotation, reported, cancel, tasks }
    }

    /// Stops the management plane as a crash would: its tasks end, the store stays.
    async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// The management plane as an agent sees it: issuance and reports, by function call.
struct Wire {
    cluster: String,
    plane: Arc<Mutex<Option<WireEnds>>>,
    clock: ManualClock,
}

#[derive(Clone)]
struct WireEnds {
    store: Arc<DirStore>,
    issuer: Arc<Issuer>,
    reported: watch::Sender<u64>,
}

impl Wire {
    fn ends(&self) -> Result<WireEnds, AgentError> {
        self.plane.lock().unwrap().clone().ok_or_else(|| AgentError::Rpc {
            call: "IssueIntermediate",
            status: tonic::Status::unavailable("the management plane is down"),
        })
    }
}

#[async_trait::async_trait]
impl IntermediateSource for Wire {
    fn key_location(&self) -> KeyLocation {
        KeyLocation::Store
    }

    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError> {
        let ends = self.ends()?;
        let key = PrivateKey::generate(req.key_algorithm).unwrap();
        let csr = meshca_agent::source::csr_for(&key, "meshca", &self.cluster)?;
        let issued = ends
            .issuer
            .issue(&self.cluster, &csr, req.reason, self.clock.now())
            .await
            .map_err(|d| AgentError::Rpc { call: "IssueIntermediate", status: d.into_status() })?;
        meshca_agent::source::obtained(
            &key,
            IssueIntermediateResponse {
                certificate: issued.certificate,
                chain: issued.chain,
                root_set: issued.root_set,
                policy_generation: issued.generation,
                serial: issued.serial,
                not_after: issued.not_after,
            },
        )
    }
}

#[async_trait::async_trait]
impl ControlPlane for Wire {
    async fn report(&self, status: ClusterStatus) -> Result<(), AgentError> {
        let ends = self.ends()?;
        let now = unix(self.clock.now());
        typed::update::<StatusRecord, _>(ends.store.as_ref(), &records::status(&self.cluster).unwrap(), |cur| {
            Some(StatusRecord::after_report(cur, &status, now).unwrap())
        })
        .await
        .unwrap();
        ends.reported.send_modify(|n| *n += 1);
        Ok(())
    }
    fn identity_due(&self, _now: SystemTime) -> bool {
        false
    }
    async fn renew_identity(&self) -> Result<(), AgentError> {
        Ok(())
    }
}

/// One cacerts version as written, for the barrier checks.
#[derive(Debug, Clone)]
struct Seen {
    held: rotation::Held,
    /// root-cert.pem as written.
    root_pem: Vec<u8>,
}

struct Cluster {
    name: String,
    store: Arc<DirStore>,
    agent: Option<(CancellationToken, JoinHandle<()>)>,
    link: watch::Sender<Link>,
    wire: Arc<Wire>,
}

/// A management plane, three clusters and the wiring between them.
struct Mesh {
    _tmp: tempfile::TempDir,
    tmp_path: std::path::PathBuf,
    clock: ManualClock,
    /// The management plane's store, readable whether it runs or not.
    mgmt: Arc<DirStore>,
    plane: Option<Plane>,
    wire: Arc<Mutex<Option<WireEnds>>>,
    clusters: Vec<Cluster>,
    seen: Arc<Mutex<Vec<Seen>>>,
    feeders: Vec<JoinHandle<()>>,
    watchers: Vec<JoinHandle<()>>,
}

fn cacerts_key() -> ObjectKey {
    ObjectKey::new("istio-system", "cacerts").unwrap()
}

impl Mesh {
    async fn start(n: usize, policy_yaml: &str) -> Mesh {
        let tmp = tempfile::tempdir().unwrap();
        let clock = ManualClock::at_2026();
        let store = Arc::new(DirStore::open(tmp.path().join("mgmt")).unwrap());
        StorePolicy::new(store.clone()).apply(policy_yaml).await.unwrap();
        let mut mesh = Mesh {
            tmp_path: tmp.path().to_path_buf(),
            _tmp: tmp,
            clock,
            mgmt: store,
            plane: None,
            wire: Arc::new(Mutex::new(None)),
            clusters: Vec::new(),
            seen: Arc::default(),
            feeders: Vec::new(),
            watchers: Vec::new(),
        };
        mesh.start_plane().await;
        for i in 1..=n {
            mesh.add_cluster(&format!("cluster-{i}")).await;
        }
        mesh.until("every cluster to hold an intermediate under the first root", |m| {
            m.clusters.iter().all(|c| m.report(&c.name).is_some_and(|r| !r.chain_root_fingerprint.is_empty()))
        })
        .await;
        mesh
    }

    fn plane(&self) -> &Plane {
        self.plane.as_ref().unwrap()
    }

    async fn start_plane(&mut self) {
        let store = self.mgmt.clone();
        let plane = Plane::start(store.clone(), &self.clock).await;
        *self.wire.lock().unwrap() =
            Some(WireEnds { store, issuer: plane.issuer.clone(), reported: plane.reported.clone() });
        self.plane = Some(plane);
        for c in 0..self.clusters.len() {
            self.feed(c);
        }
    }

    /// The management plane "crashes": its tasks stop, agents lose it.
    async fn stop_plane(&mut self) {
        for f in self.feeders.drain(..) {
            f.abort();
        }
        *self.wire.lock().unwrap() = None;
        for c in &self.clusters {
            c.link.send_modify(|l| {
                l.connected = false;
                l.error = "the management plane is down".into();
            });
        }
        if let Some(p) = self.plane.take() {
            p.stop().await;
        }
    }

    /// Keeps cluster `i`'s link to the trust state the management plane would stream to it.
    fn feed(&mut self, i: usize) {
        let plane = self.plane();
        let mut authority = plane.authority.clone();
        let store = plane.store.clone();
        let link = self.clusters[i].link.clone();
        let name = self.clusters[i].name.clone();
        self.feeders.push(tokio::spawn(async move {
            let settings = Settings { report_interval: REPORT, ..Settings::default() };
            loop {
                let auth = authority.borrow_and_update().clone();
                let rec = typed::get::<ClusterRecord>(store.as_ref(), &records::cluster(&name).unwrap())
                    .await
                    .unwrap()
                    .unwrap()
                    .value;
                let trust = meshca_mgmt::grpc::trust_state(&auth, &rec, &settings);
                link.send_modify(|l| {
                    l.trust = Some(trust);
                    l.connected = true;
                    l.error.clear();
                });
                if authority.changed().await.is_err() {
                    return;
                }
            }
        }));
    }

    async fn add_cluster(&mut self, name: &str) {
        let rec = ClusterRecord { name: name.into(), registered_at: unix(self.clock.now()), ..Default::default() };
        typed::put(self.plane().store.as_ref(), &records::cluster(name).unwrap(), &rec, Precondition::Absent)
            .await
            .unwrap();
        let store = Arc::new(DirStore::open(self.tmp_path.join(name)).unwrap());
        let (link, _) = watch::channel(Link::default());
        let wire = Arc::new(Wire { cluster: name.into(), plane: self.wire.clone(), clock: self.clock.clone() });
        self.clusters.push(Cluster { name: name.into(), store: store.clone(), agent: None, link, wire });
        let i = self.clusters.len() - 1;
        self.feed(i);
        self.start_agent(name);
        // Record every cacerts version the agent writes.
        let seen = self.seen.clone();
        let clock = self.clock.clone();
        let cluster = name.to_string();
        self.watchers.push(tokio::spawn(async move {
            let mut w = store.watch(&cacerts_key());
            while let Some(v) = w.next().await {
                let Ok(Some(v)) = v else { continue };
                let files = BundleFiles::from_lookup(|k| v.value.get(k).map(<[u8]>::to_vec));
                let b = CaBundle::validate(&files, clock.now())
                    .unwrap_or_else(|e| panic!("{cluster}: invalid cacerts: {e}"));
                seen.lock().unwrap().push(Seen {
                    held: rotation::Held {
                        cluster: cluster.clone(),
                        roots: b.roots().iter().map(Cert::fingerprint).collect(),
                        chain_root: b.signer().root().fingerprint(),
                    },
                    root_pem: files.root_cert.clone(),
                });
            }
        }));
    }

    fn cluster(&self, name: &str) -> usize {
        self.clusters.iter().position(|c| c.name == name).unwrap()
    }

    fn start_agent(&mut self, name: &str) {
        let i = self.cluster(name);
        let c = &mut self.clusters[i];
        let mut opts = AgentOptions::new(name, "in-process:1").unwrap();
        opts.clock = self.clock.shared();
        let cancel = CancellationToken::new();
        let (store, wire, rx, stop) =
            (c.store.clone() as Arc<dyn Store>, c.wire.clone(), c.link.subscribe(), cancel.clone());
        let task = tokio::spawn(async move {
            drive(store, &opts, wire.clone(), wire, rx, stop).await.unwrap();
        });
        c.agent = Some((cancel, task));
    }

    async fn stop_agent(&mut self, name: &str) {
        let i = self.cluster(name);
        let (cancel, task) = self.clusters[i].agent.take().unwrap();
        cancel.cancel();
        task.await.unwrap();
    }

    fn report(&self, cluster: &str) -> Option<StatusRecord> {
        block(typed::get::<StatusRecord>(self.mgmt.as_ref(), &records::status(cluster).unwrap()))
            .unwrap()
            .map(|v| v.value)
    }

    fn has_object(&self, name: &str) -> bool {
        block(self.mgmt.get(&ObjectKey::new("meshca", name).unwrap())).unwrap().is_some()
    }

    fn journal(&self) -> meshca_mgmt::rotation::Journal {
        block(read_journal(self.mgmt.as_ref(), &meshca_mgmt::records::Keyspace::legacy())).unwrap().value
    }

    fn phase(&self) -> RotationPhase {
        self.journal().rotation.map(|r| r.phase).unwrap_or(RotationPhase::Idle)
    }

    /// Waits (real time, bounded) until `f` holds; the clock does not move meanwhile.
    async fn until(&self, what: &str, f: impl Fn(&Mesh) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} (journal: {:#?})",
                self.journal()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Moves the clock to `t` (unix seconds) in one step and lets everyone act on it: every
    /// running agent reports at the new time, and the controller looks at those reports.
    async fn advance_to(&self, t: i64) {
        let now = unix(self.clock.now());
        assert!(t >= now, "the clock does not go back ({t} < {now})");
        let before: Vec<i64> =
            self.running().iter().map(|c| self.report(c).map(|r| r.reported_at).unwrap_or(0)).collect();
        self.clock.advance(Duration::from_secs((t - now) as u64));
        let running = if self.plane.is_some() { self.running() } else { Vec::new() };
        self.until("every running agent to report at the new time", |m| {
            running
                .iter()
                .zip(&before)
                .all(|(c, b)| m.report(c).is_some_and(|r| r.reported_at > *b || r.reported_at >= t))
        })
        .await;
        settle().await;
    }

    /// Moves the clock by `d` (in report-interval steps, so reports keep flowing).
    async fn advance(&self, d: Duration) {
        let end = unix(self.clock.now()) + d.as_secs() as i64;
        while unix(self.clock.now()) < end {
            let next = (unix(self.clock.now()) + 6 * REPORT.as_secs() as i64 * 60).min(end);
            self.advance_to(next).await;
        }
    }

    fn running(&self) -> Vec<String> {
        self.clusters.iter().filter(|c| c.agent.is_some()).map(|c| c.name.clone()).collect()
    }

    fn now(&self) -> i64 {
        unix(self.clock.now())
    }

    /// The journal's wake-up time for the next step (`nextStepAt` in status).
    async fn status(&self) -> meshca_proto::mgmt::MeshStatus {
        let auth = self.plane().authority.borrow().clone();
        let mesh = meshca_mgmt::meshes::Mesh {
            name: auth.policy.name.clone(),
            keys: meshca_mgmt::records::Keyspace::legacy(),
            authority: self.plane().authority.clone(),
            rotation: None,
        };
        let view = meshca_mgmt::meshes::MeshView::new(vec![mesh.clone()]);
        meshca_mgmt::status::collect(self.plane().store.as_ref(), &view, &mesh, self.now(), REPORT).await.unwrap()
    }

    /// Checks the barrier on every cacerts version written so far, for a rotation from `a`
    /// ending on `to` (`a`'s rotation to B, or its abort back to `a`), and that every two-root
    /// root-cert.pem is `a`'s PEM bytes followed by the other's (Istio's byte-wise subset check
    /// before 1.30 needs the old root's bytes first).
    fn check_barrier(&self, a: &str, to: &str) {
        let seen = self.seen.lock().unwrap().clone();
        let names: Vec<String> = self.clusters.iter().map(|c| c.name.clone()).collect();
        let from = if to == a {
            seen.iter().flat_map(|s| s.held.roots.clone()).find(|r| r != a).unwrap()
        } else {
            a.to_string()
        };
        rotation::check_barrier(&seen.iter().map(|s| s.held.clone()).collect::<Vec<_>>(), &names, &from, to);
        for s in seen.iter().filter(|s| s.held.roots.len() == 2) {
            let text = String::from_utf8(s.root_pem.clone()).unwrap();
            let first = &Cert::parse_pem_bundle(text.as_bytes()).unwrap()[0];
            assert_eq!(first.fingerprint(), a, "{}: the old root first", s.held.cluster);
            assert!(text.starts_with(&first.to_pem()), "{}: PEM bytes as written", s.held.cluster);
        }
    }

    /// The distinct root sets (as A/B letters) each cluster's root-cert.pem went through.
    fn root_set_history(&self, a: &str, b: &str) -> BTreeMap<String, Vec<String>> {
        let seen: Vec<_> = self.seen.lock().unwrap().iter().map(|s| s.held.clone()).collect();
        rotation::root_set_history(&seen, a, b)
    }
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Lets spawned tasks run a little (real time); the clock does not move.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn root_fp(m: &Mesh) -> String {
    m.plane().authority.borrow().roots().unwrap().iter().next().unwrap().fingerprint()
}

/// The roots (fingerprints) a CRL published now is signed by — so that clusters under each can
/// write a `ca-crl.pem` istiod accepts.
async fn crl_signers(m: &Mesh) -> std::collections::BTreeSet<String> {
    let auth = m.plane().authority.borrow().clone();
    let store = m.plane().store.as_ref();
    let rec = meshca_mgmt::revocation::publish(
        store,
        &meshca_mgmt::records::Keyspace::legacy(),
        &auth,
        m.clock.now(),
        Duration::from_secs(600),
    )
    .await
    .unwrap()
    .unwrap();
    let crls = meshca_pki::Crl::parse_pem_bundle(rec.pem.as_bytes()).unwrap();
    auth.roots()
        .unwrap()
        .iter()
        .filter(|r| crls.iter().any(|c| c.verify_signed_by(r).is_ok()))
        .map(Cert::fingerprint)
        .collect()
}

/// Runs a started rotation through Distributing, checking its gate exactly, up to Switching.
async fn through_distributing(m: &Mesh) -> i64 {
    m.until("every cluster to trust {A, B}", |m| {
        let r = m.journal().rotation.unwrap();
        r.phase == RotationPhase::Distributing && r.converged.len() == m.clusters.len()
    })
    .await;
    let r = m.journal().rotation.unwrap();
    let last = *r.converged.values().max().unwrap();
    let gate = last + LEARN;
    assert_eq!(m.status().await.root_rotation.unwrap().next_step_at, gate);
    // One report interval short of the gate: nothing moves, whatever the reports say.
    m.advance_to(gate - 30).await;
    assert_eq!(m.phase(), RotationPhase::Distributing);
    assert!(m.seen.lock().unwrap().iter().all(|s| s.held.chain_root == r.from.fingerprint), "nobody signs under B yet");
    m.advance_to(gate).await;
    m.until("Switching", |m| m.phase() != RotationPhase::Distributing).await;
    // The clusters may re-issue under B at once, so Draining can follow Switching within the
    // same instant: look for the step to Switching, not at the last one.
    let r = m.journal().rotation.unwrap();
    let switching = r.transitions.iter().find(|t| t.phase == RotationPhase::Switching).map(|t| t.at);
    assert_eq!(switching, Some(gate), "{:?}", r.transitions);
    gate
}

/// Runs Switching and Draining, checking the drain gate exactly, up to Retiring.
async fn through_draining(m: &Mesh, signing_root: &str) -> i64 {
    m.until("every cluster to sign under the target root, and Draining", |m| {
        m.phase() == RotationPhase::Draining
            && m.clusters.iter().all(|c| m.report(&c.name).unwrap().chain_root_fingerprint == signing_root)
    })
    .await;
    let r = m.journal().rotation.unwrap();
    let switched = r.switched_at.unwrap();
    assert_eq!(switched, *r.converged.values().max().unwrap(), "the drain counts from the last switch");
    let gate = switched + DRAIN;
    m.advance(Duration::from_secs((gate - 30 - m.now()) as u64)).await;
    assert_eq!(m.phase(), RotationPhase::Draining, "a leaf under the old root may still be alive");
    m.advance_to(gate).await;
    // Every cluster may hold {B} already, so the rotation can go through Retiring to Idle
    // before a look: either is past the drain.
    m.until("Retiring", |m| matches!(m.phase(), RotationPhase::Retiring | RotationPhase::Idle)).await;
    gate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_passes_every_gate_over_simulated_hours_and_no_write_breaks_the_barrier() {
    let m = Mesh::start(3, &policy("")).await;
    let a = root_fp(&m);
    let started = m.now();
    let r = m.plane().rotation.start().await.expect("start");
    assert_eq!(r.phase, RotationPhase::Distributing);
    let b = r.to.fingerprint.clone();
    assert_eq!(m.status().await.root_rotation.unwrap().phase(), RotationPhase::Distributing);
    // Starting twice is refused while one runs.
    let e = m.plane().rotation.start().await.expect_err("one at a time");
    assert!(e.to_string().contains("already in progress"), "{e}");

    assert_eq!(
        crl_signers(&m).await,
        std::collections::BTreeSet::from([a.clone(), b.clone()]),
        "Distributing: a CRL from each root"
    );
    through_distributing(&m).await;
    // Switching: clusters still under A (they re-issue one by one) need A's CRL, those under B
    // B's — the published CRL carries both.
    assert_eq!(
        crl_signers(&m).await,
        std::collections::BTreeSet::from([a.clone(), b.clone()]),
        "Switching: a CRL from each root"
    );
    through_draining(&m, &b).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    assert_eq!(crl_signers(&m).await, std::collections::BTreeSet::from([b.clone()]), "after the rotation: B's alone");
    m.check_barrier(&a, &b);
    for (cluster, history) in m.root_set_history(&a, &b) {
        assert_eq!(history, ["A", "AB", "B"], "{cluster}");
    }

    // B is the root now: promoted into root-ca, its prepared copy gone, A's key destroyed.
    let j = m.journal();
    assert_eq!(j.established.as_ref().unwrap().fingerprint, b);
    assert_eq!(j.history[0].from, a);
    assert!(!j.history[0].aborted);
    let phases: Vec<RotationPhase> = j.history[0].transitions.iter().map(|t| t.phase).collect();
    use RotationPhase::*;
    assert_eq!(phases, [Distributing, Switching, Draining, Retiring]);
    let root_ca = m.plane().store.get(&records::Keyspace::legacy().root_ca()).await.unwrap().unwrap();
    assert_eq!(Cert::from_pem(root_ca.value.get("ca-cert.pem").unwrap()).unwrap().fingerprint(), b);
    m.until("the prepared copy of B to be removed", |m| !m.has_object("root-ca-next")).await;
    assert_eq!(root_fp(&m), b);
    assert!(m.now() - started >= LEARN + DRAIN, "at least the two waits");
    let st = m.status().await;
    assert_eq!(st.root_rotation.unwrap().phase(), RotationPhase::Idle);
    assert!(st.alerts.is_empty(), "{:?}", st.alerts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_stalls_the_rotation_with_an_alert_naming_it_until_it_returns() {
    let mut m = Mesh::start(3, &policy("")).await;
    let a = root_fp(&m);
    m.stop_agent("cluster-2").await;
    let r = m.plane().rotation.start().await.expect("start");
    let b = r.to.fingerprint.clone();
    m.until("the running clusters to trust {A, B}", |m| m.journal().rotation.unwrap().converged.len() == 2).await;
    // Two simulated days: nothing advances, nobody signs under B, and status says why.
    m.advance(Duration::from_secs(48 * HOUR)).await;
    assert_eq!(m.phase(), RotationPhase::Distributing);
    assert!(m.seen.lock().unwrap().iter().all(|s| s.held.chain_root == a));
    let st = m.status().await;
    let stalled: Vec<_> = st.alerts.iter().filter(|x| x.kind() == AlertKind::RootRotationStalled).collect();
    assert_eq!(stalled.len(), 1, "{:?}", st.alerts);
    assert_eq!(stalled[0].cluster, "cluster-2");
    assert!(
        stalled[0].message.contains("cluster-2") && stalled[0].message.contains("{A, B}"),
        "{}",
        stalled[0].message
    );
    let waiting = st.root_rotation.unwrap().waiting;
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].cluster, "cluster-2");

    // The agent returns: it catches up, and the rotation completes.
    m.start_agent("cluster-2");
    assert_eq!(
        crl_signers(&m).await,
        std::collections::BTreeSet::from([a.clone(), b.clone()]),
        "Distributing: a CRL from each root"
    );
    through_distributing(&m).await;
    // Switching: clusters still under A (they re-issue one by one) need A's CRL, those under B
    // B's — the published CRL carries both.
    assert_eq!(
        crl_signers(&m).await,
        std::collections::BTreeSet::from([a.clone(), b.clone()]),
        "Switching: a CRL from each root"
    );
    through_draining(&m, &b).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    assert_eq!(crl_signers(&m).await, std::collections::BTreeSet::from([b.clone()]), "after the rotation: B's alone");
    m.check_barrier(&a, &b);
    assert!(m.status().await.alerts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_in_switching_returns_every_cluster_to_a_through_a_drain_of_b() {
    let m = Mesh::start(3, &policy("")).await;
    let a = root_fp(&m);
    let r = m.plane().rotation.start().await.expect("start");
    let b = r.to.fingerprint.clone();
    through_distributing(&m).await;
    m.until("a cluster to sign under B", |m| m.seen.lock().unwrap().iter().any(|s| s.held.chain_root == b)).await;
    let r = m.plane().rotation.abort().await.expect("abort");
    assert!(r.aborted);
    assert_eq!(r.phase, RotationPhase::Switching);
    assert!(m.plane().rotation.abort().await.is_err(), "already aborted");
    // Back under A, then B's leaves drain, then {A} alone.
    through_draining(&m, &a).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    let j = m.journal();
    assert_eq!(j.established.as_ref().unwrap().fingerprint, a, "the mesh stays on A");
    assert!(j.history[0].aborted);
    assert_eq!(root_fp(&m), a);
    for c in &m.clusters {
        let rep = m.report(&c.name).unwrap();
        assert_eq!(rep.chain_root_fingerprint, a);
        assert_eq!(rep.root_set_fingerprint, meshca_pki::RootSet::fingerprint_of([a.as_str()].into_iter()));
    }
    for (cluster, history) in m.root_set_history(&a, &b) {
        assert_eq!(history, ["A", "AB", "A"], "{cluster}");
    }
    // B's key is destroyed, and automatic rotation of A is suspended after an abort.
    m.until("B's key to be destroyed", |m| !m.has_object("root-ca-next")).await;
    let note = m.status().await.root_rotation.unwrap().note;
    assert!(note.contains("aborted"), "{note}");
    // Forward, nobody signed under B before everyone trusted it; back, nobody dropped B while a
    // cluster still signed under it.
    m.check_barrier(&a, &b);
    m.check_barrier(&a, &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_in_distributing_drops_b_at_once_since_nobody_signs_under_it() {
    let m = Mesh::start(2, &policy("")).await;
    let a = root_fp(&m);
    let r = m.plane().rotation.start().await.expect("start");
    let b = r.to.fingerprint.clone();
    m.until("every cluster to trust {A, B}", |m| m.journal().rotation.unwrap().converged.len() == 2).await;
    let r = m.plane().rotation.abort().await.expect("abort");
    assert_eq!(r.phase, RotationPhase::Retiring);
    m.advance_to(m.now() + 30).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    for (cluster, history) in m.root_set_history(&a, &b) {
        assert_eq!(history, ["A", "AB", "A"], "{cluster}");
    }
    assert!(m.seen.lock().unwrap().iter().all(|s| s.held.chain_root == a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_management_plane_resumes_each_phase_from_the_journal() {
    let mut m = Mesh::start(2, &policy("")).await;
    let a = root_fp(&m);
    let r = m.plane().rotation.start().await.expect("start");
    let b = r.to.fingerprint.clone();
    m.until("every cluster to trust {A, B}", |m| m.journal().rotation.unwrap().converged.len() == 2).await;
    let before = m.journal();
    // Crash in Distributing: the new plane knows the phase, the convergence times and the gate.
    m.stop_plane().await;
    m.start_plane().await;
    assert_eq!(m.journal(), before);
    let gate = *before.rotation.as_ref().unwrap().converged.values().max().unwrap() + LEARN;
    assert_eq!(m.status().await.root_rotation.unwrap().next_step_at, gate);
    assert_eq!(root_fp(&m), a, "the loader still loads A; the controller publishes {{A, B}}");
    m.advance_to(gate).await;
    m.until("Switching", |m| m.phase() == RotationPhase::Switching || m.phase() == RotationPhase::Draining).await;
    // Crash in Draining.
    m.until("Draining", |m| m.phase() == RotationPhase::Draining).await;
    let before = m.journal();
    m.stop_plane().await;
    m.advance(Duration::from_secs(HOUR)).await;
    m.start_plane().await;
    assert_eq!(m.journal().rotation, before.rotation);
    through_draining(&m, &b).await;
    // Crash in Retiring (the agents may have converged on {B} already, and the rotation ended
    // just before the stop), then finish: the restarted plane resumes where the journal says,
    // never an earlier phase.
    let before = m.phase();
    m.stop_plane().await;
    m.start_plane().await;
    let after = m.phase();
    assert!(
        matches!(
            (before, after),
            (RotationPhase::Retiring, RotationPhase::Retiring | RotationPhase::Idle)
                | (RotationPhase::Idle, RotationPhase::Idle)
        ),
        "{before:?} before the restart, {after:?} after it"
    );
    m.advance_to(m.now() + 30).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    m.check_barrier(&a, &b);
    for (cluster, history) in m.root_set_history(&a, &b) {
        assert_eq!(history, ["A", "AB", "B"], "{cluster}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_registering_mid_rotation_gets_the_phase_s_root_set_and_intermediate() {
    let mut m = Mesh::start(2, &policy("")).await;
    let a = root_fp(&m);
    let r = m.plane().rotation.start().await.expect("start");
    let b = r.to.fingerprint.clone();
    let both = meshca_pki::RootSet::fingerprint_of([a.as_str(), b.as_str()].into_iter());
    // Registering in Distributing: {A, B} under A, and the barrier now waits for it too.
    m.add_cluster("cluster-3").await;
    m.until("cluster-3 to trust {A, B} under A", |m| {
        m.report("cluster-3").is_some_and(|r| r.root_set_fingerprint == both && r.chain_root_fingerprint == a)
    })
    .await;
    through_distributing(&m).await;
    // Registering in Switching: {A, B} under B at once.
    m.add_cluster("cluster-4").await;
    m.until("cluster-4 to trust {A, B} under B", |m| {
        m.report("cluster-4").is_some_and(|r| r.root_set_fingerprint == both && r.chain_root_fingerprint == b)
    })
    .await;
    through_draining(&m, &b).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    m.check_barrier(&a, &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_root_rotates_by_itself_when_less_than_the_ratio_of_its_life_remains() {
    // A 10-day root and a 0.5 ratio: the rotation starts 5 days in.
    let yaml = policy("").replace("ttl: 87600h", "ttl: 240h").replace("skew: 5m }", "skew: 5m, triggerRatio: 0.5 }");
    let m = Mesh::start(1, &yaml).await;
    let a = root_fp(&m);
    let root = m.plane().authority.borrow().roots().unwrap().iter().next().unwrap().clone();
    // Half of the 240 h it was made for (NotBefore is backdated 2 min for skew, not lifetime).
    let made = unix(root.not_before()) + 120;
    let due = made + (unix(root.not_after()) - made) / 2;
    m.advance(Duration::from_secs((due - 60 - m.now()) as u64)).await;
    assert_eq!(m.phase(), RotationPhase::Idle, "more than half its life left");
    m.advance(Duration::from_secs(120)).await;
    m.until("the automatic rotation", |m| m.phase() == RotationPhase::Distributing).await;
    let r = m.journal().rotation.unwrap();
    assert_eq!(r.trigger, meshca_mgmt::rotation::journal::Trigger::RootExpiry);
    let b = r.to.fingerprint.clone();
    let new_root = Cert::from_pem(r.to.root_pem.as_bytes()).unwrap();
    assert_eq!(
        unix(new_root.not_after()) - unix(new_root.not_before()),
        240 * 3600 + 120,
        "the policy's root lifetime (NotBefore backdated 2 min)"
    );
    through_distributing(&m).await;
    through_draining(&m, &b).await;
    m.until("Idle again", |m| m.journal().rotation.is_none()).await;
    assert_eq!(root_fp(&m), b);
    m.check_barrier(&a, &b);
}
