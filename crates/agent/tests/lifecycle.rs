//! The agent's loop in-process, on a manual clock: a real directory store in a temp dir, a real
//! CA behind the intermediate source, and the management plane's side (trust state, status
//! reports) played by the test. Hours of simulated time run in milliseconds; nothing sleeps.
//!
//! The management plane is not a real peer here on purpose: these tests are about the agent's
//! decisions over time (renewal at the grace ratio, backoff during an outage, re-issue on a
//! policy change, a failed write retried with the intermediate already obtained). The same loop
//! against the real management plane over gRPC is tested end to end in
//! `crates/meshca/tests/mgmt_agent.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshca_agent::driver::{ControlPlane, Link, drive};
use meshca_agent::istiod::{IstiodControl, Observed, Problem};
use meshca_agent::source::{IntermediateSource, KeyLocation, Obtained, Request};
use meshca_agent::{AgentError, AgentOptions};
use meshca_clock::{Clock, ManualClock};
use meshca_pki::{
    CaBundle, CaSigner, Cert, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet, TrustDomain,
};
use meshca_proto::mgmt::{ClusterStatus, TrustState};
use meshca_proto::{IssueReason, Phase};
use meshca_store::dir::DirStore;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned, WatchStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A real CA that signs each request with a fresh key, and can be made to fail (an outage).
struct RootSource {
    root: CaSigner,
    clock: ManualClock,
    down: AtomicBool,
    calls: Mutex<Vec<(SystemTime, IssueReason)>>,
}

#[async_trait::async_trait]
impl IntermediateSource for RootSource {
    fn key_location(&self) -> KeyLocation {
        KeyLocation::Store
    }

    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError> {
        let now = self.clock.now();
        self.calls.lock().unwrap().push((now, req.reason));
        if self.down.load(Ordering::SeqCst) {
            return Err(AgentError::Rpc {
                call: "IssueIntermediate",
                status: tonic::Status::unavailable("connection refused"),
            });
        }
        let key = PrivateKey::generate(req.key_algorithm).unwrap();
        let ttl = Duration::from_secs(req.trust.intermediate_ttl_seconds as u64);
        let params = IntermediateParams {
            ttl,
            ..IntermediateParams::cluster("meshca", req.cluster, TrustDomain::new("cluster.local").unwrap())
        };
        let issued = self.root.sign_intermediate(key.public_key_spki(), &params, now).unwrap();
        let cert: Cert = issued.parse().unwrap();
        let roots = RootSet::from_certs(vec![self.root.cert().clone()]).unwrap();
        Ok(Obtained {
            files: CaBundle::assemble(&key, &cert, &[self.root.cert().clone()], &roots),
            serial: issued.serial_hex,
        })
    }
}

/// The management plane's receiving end of status reports.
#[derive(Default)]
struct Reports(Mutex<Vec<ClusterStatus>>);

#[async_trait::async_trait]
impl ControlPlane for Reports {
    async fn report(&self, status: ClusterStatus) -> Result<(), AgentError> {
        self.0.lock().unwrap().push(status);
        Ok(())
    }
    fn identity_due(&self, _now: SystemTime) -> bool {
        false
    }
    async fn renew_identity(&self) -> Result<(), AgentError> {
        Ok(())
    }
}

/// A store whose writes fail while `full` is set, as on a full disk; reads pass through.
///
/// A stand-in for the failure only: the store under it is the real directory store. A full
/// file system itself is exercised end to end on a small tmpfs.
struct FullDisk {
    inner: DirStore,
    full: AtomicBool,
    refused: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for FullDisk {
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &ObjectKey, s: &Secret, p: Precondition) -> Result<ResourceVersion, StoreError> {
        if self.full.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io { path: key.to_string(), source: std::io::Error::from_raw_os_error(28) });
        }
        self.inner.put(key, s, p).await
    }
    async fn delete(&self, key: &ObjectKey, p: Precondition) -> Result<(), StoreError> {
        self.inner.delete(key, p).await
    }
    async fn list(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(ns).await
    }
    fn watch(&self, key: &ObjectKey) -> WatchStream {
        self.inner.watch(key)
    }
}

const TTL: u64 = 1000;

struct World {
    _tmp: tempfile::TempDir,
    clock: ManualClock,
    source: Arc<RootSource>,
    reports: Arc<Reports>,
    store: Arc<FullDisk>,
    link: watch::Sender<Link>,
    cacerts: ObjectKey,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

fn trust(generation: &str) -> TrustState {
    TrustState {
        policy_generation: generation.into(),
        enrolled: true,
        grace_period_ratio: 0.2,
        report_interval_seconds: 1,
        key_algorithm: meshca_proto::mgmt::KeyAlgorithm::EcdsaP256 as i32,
        intermediate_ttl_seconds: TTL as i64,
        ..Default::default()
    }
}

/// istiod's Deployment as the agent sees it through [`IstiodControl`]: the restart record it
/// keeps and every restart it gets. A stand-in for the API server, as the management plane is
/// here: these tests are about when the agent restarts istiod over time. The real Deployment
/// (server-side apply, field managers, RBAC) is tested against a real kube-apiserver in
/// `crates/meshca/tests/kube_chart.rs`.
#[derive(Debug, Default)]
struct Istiod {
    restarted_for: Mutex<Option<String>>,
    restarts: Mutex<Vec<(SystemTime, String)>>,
}

#[async_trait::async_trait]
impl IstiodControl for Istiod {
    fn deployment(&self) -> String {
        "istio-system/istiod".into()
    }
    async fn read(&self) -> Result<Option<Observed>, Problem> {
        Ok(Some(Observed { restarted_for: self.restarted_for.lock().unwrap().clone(), sidecar: false }))
    }
    async fn restart(&self, serial: &str, at: SystemTime) -> Result<(), Problem> {
        *self.restarted_for.lock().unwrap() = Some(serial.to_string());
        self.restarts.lock().unwrap().push((at, serial.to_string()));
        Ok(())
    }
    async fn sidecar(&self, _present: bool) -> Result<(), Problem> {
        unreachable!("not in Vault mode")
    }
}

impl World {
    async fn start() -> World {
        World::start_with(None, None, trust("g1")).await
    }

    /// Stops the agent and returns what its restart keeps: the store, and the time.
    async fn kept(self) -> (tempfile::TempDir, ManualClock) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        (self._tmp, self.clock)
    }

    /// An agent on the store in `tmp` (a new one when `None`), told `first`, managing `istiod`
    /// if given.
    async fn start_with(
        istiod: Option<Arc<Istiod>>,
        kept: Option<(tempfile::TempDir, ManualClock)>,
        first: TrustState,
    ) -> World {
        let (tmp, clock) = kept.unwrap_or_else(|| (tempfile::tempdir().unwrap(), ManualClock::at_2026()));
        let root_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let root = CaSigner::new_root(root_key, &RootParams::new("lifecycle"), clock.now()).unwrap();
        let source = Arc::new(RootSource { root, clock: clock.clone(), down: false.into(), calls: Mutex::default() });
        let reports = Arc::new(Reports::default());
        let store = Arc::new(FullDisk {
            inner: DirStore::open(tmp.path()).unwrap(),
            full: false.into(),
            refused: AtomicUsize::new(0),
        });
        let mut opts = AgentOptions::new("cluster-1", "unused:1").unwrap();
        opts.clock = clock.shared();
        opts.backoff_base = Duration::from_secs(1);
        opts.backoff_max = Duration::from_secs(30);
        opts.istiod = istiod.map(|i| i as Arc<dyn IstiodControl>);
        let cacerts = opts.cacerts.clone();
        let (link, rx) = watch::channel(Link { trust: Some(first), connected: true, error: String::new() });
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (store, source, reports, cancel) =
                (store.clone() as Arc<dyn Store>, source.clone(), reports.clone(), cancel.clone());
            async move { drive(store, &opts, source, reports, rx, cancel).await }
        });
        let w = World { _tmp: tmp, clock, source, reports, store, link, cacerts, cancel, task };
        w.until("the first cacerts, reported", |w| w.serial().is_some() && !w.reports.0.lock().unwrap().is_empty())
            .await;
        w
    }

    fn calls(&self) -> Vec<(SystemTime, IssueReason)> {
        self.source.calls.lock().unwrap().clone()
    }

    fn serial(&self) -> Option<String> {
        let dir = self.store.inner.object_path(&self.cacerts);
        let cert = std::fs::read(dir.join("ca-cert.pem")).ok()?;
        Some(Cert::from_pem(&cert).ok()?.serial_hex())
    }

    fn annotation(&self, key: &str) -> String {
        let rt = tokio::runtime::Handle::current();
        let v = tokio::task::block_in_place(|| rt.block_on(self.store.get(&self.cacerts))).unwrap().unwrap();
        v.value.annotations.get(key).cloned().unwrap_or_default()
    }

    fn last_report(&self) -> ClusterStatus {
        self.reports.0.lock().unwrap().last().cloned().unwrap_or_default()
    }

    /// Waits (in real time, bounded) until the agent has acted so that `f` holds.
    async fn until(&self, what: &str, f: impl Fn(&World) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Moves the clock and waits until the agent has taken a full step at the new time: its
    /// status report for it (due every simulated second) comes after every other effect.
    async fn advance(&self, d: Duration) {
        let before = self.reports.0.lock().unwrap().len();
        self.clock.advance(d);
        self.until("a step after the clock moved", |w| w.reports.0.lock().unwrap().len() > before).await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_is_restarted_once_per_change_and_not_again_after_an_agent_restart() {
    let istiod = Arc::new(Istiod::default());
    let w = World::start_with(Some(istiod.clone()), None, trust("g1")).await;
    let restarts = |i: &Istiod| i.restarts.lock().unwrap().clone();
    let first = w.serial().unwrap();
    w.until("the restart after the first cacerts", |_| restarts(&istiod).len() == 1).await;
    assert_eq!(restarts(&istiod)[0], (w.clock.now(), first.clone()));
    for _ in 0..5 {
        w.advance(Duration::from_secs(30)).await;
    }
    assert_eq!(restarts(&istiod).len(), 1, "once for the first intermediate, not on every pass");
    let r = w.last_report();
    let st = r.istiod.as_ref().unwrap();
    assert_eq!((st.state(), st.restarted_for_serial.as_str()), (meshca_proto::IstiodState::Wired, first.as_str()));

    // A new intermediate: without autoRestartPods istiod (which reloads cacerts) is left alone ...
    w.link.send_modify(|l| l.trust = Some(trust("g2")));
    w.until("the second cacerts", |w| w.serial().is_some_and(|s| s != first)).await;
    let second = w.serial().unwrap();
    w.advance(Duration::from_secs(30)).await;
    assert_eq!(restarts(&istiod).len(), 1, "autoRestartPods is off");
    // ... with it, every change restarts istiod once.
    w.link.send_modify(|l| {
        let mut t = trust("g3");
        t.auto_restart_pods = true;
        l.trust = Some(t);
    });
    w.until("the third cacerts", |w| w.serial().is_some_and(|s| s != second)).await;
    let third = w.serial().unwrap();
    w.until("the restart for it", |_| restarts(&istiod).len() == 2).await;
    assert_eq!(restarts(&istiod)[1].1, third);
    for _ in 0..5 {
        w.advance(Duration::from_secs(30)).await;
    }
    assert_eq!(restarts(&istiod).len(), 2);

    // The agent restarts: it reads the record on the Deployment and restarts nothing.
    let mut same = trust("g3");
    same.auto_restart_pods = true;
    let w = World::start_with(Some(istiod.clone()), Some(w.kept().await), same).await;
    assert_eq!(w.serial().unwrap(), third);
    for _ in 0..5 {
        w.advance(Duration::from_secs(30)).await;
    }
    assert_eq!(restarts(&istiod).len(), 2, "no restart after the agent's own restart");
    assert_eq!(w.calls().len(), 0, "and no new intermediate");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_comes_at_the_grace_ratio_with_a_new_key_and_never_before() {
    let w = World::start().await;
    let first = w.serial().unwrap();
    // 20 % of a 1000 s lifetime is 200 s; jitter may move renewal up to 20 s earlier.
    for _ in 0..26 {
        w.advance(Duration::from_secs(30)).await; // up to 780 s
    }
    assert_eq!(w.calls().len(), 1, "nothing before 780 s of 1000 s");
    assert_eq!(w.serial().unwrap(), first);
    assert_eq!(w.last_report().phase(), Phase::Ready);
    w.advance(Duration::from_secs(21)).await; // 801 s
    w.until("the renewal", |w| w.calls().len() == 2).await;
    assert_eq!(w.calls()[1].1, IssueReason::Renewal);
    w.until("the new cacerts", |w| w.serial().is_some_and(|s| s != first)).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_backs_off_exponentially_keeps_cacerts_and_recovers() {
    let w = World::start().await;
    let first = w.serial().unwrap();
    w.source.down.store(true, Ordering::SeqCst);
    w.link.send_modify(|l| l.trust = Some(trust("g2")));
    w.until("the first failed attempt", |w| w.calls().len() == 2).await;
    // Ten simulated minutes, one second at a time.
    for _ in 0..600 {
        w.advance(Duration::from_secs(1)).await;
    }
    let attempts: Vec<SystemTime> = w.calls()[1..].iter().map(|c| c.0).collect();
    let gaps: Vec<f64> = attempts.windows(2).map(|p| p[1].duration_since(p[0]).unwrap().as_secs_f64()).collect();
    assert!(gaps.len() >= 20, "it keeps trying: {gaps:?}");
    assert!(gaps[..4].windows(2).all(|g| g[1] >= g[0]), "the first retries grow: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= 31.0), "capped at 30 s (rounded to the 1 s steps): {gaps:?}");
    assert!(gaps[gaps.len() - 5..].iter().all(|g| *g >= 15.0), "and stay near the cap: {gaps:?}");
    assert_eq!(w.serial().unwrap(), first, "the current cacerts is kept throughout");
    let r = w.last_report();
    assert_eq!(r.phase(), Phase::Degraded);
    assert!(r.last_error.contains("connection refused"), "{r:?}");
    assert!(r.consecutive_failures >= 20, "{r:?}");

    w.source.down.store(false, Ordering::SeqCst);
    w.advance(Duration::from_secs(31)).await;
    w.until("recovery", |w| w.serial().is_some_and(|s| s != first)).await;
    w.advance(Duration::from_secs(1)).await;
    let r = w.last_report();
    assert_eq!((r.phase(), r.consecutive_failures, r.last_error.as_str()), (Phase::Ready, 0, ""));
    assert_eq!(w.annotation(meshca_store::labels::ANN_GENERATION), "g2");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_or_an_operator_rotation_re_issues_at_once() {
    let w = World::start().await;
    w.link.send_modify(|l| l.trust = Some(trust("g2")));
    w.until("the policy change", |w| w.calls().len() == 2).await;
    assert_eq!(w.calls()[1].1, IssueReason::PolicyChange);
    w.until("the new generation written", |w| w.annotation(meshca_store::labels::ANN_GENERATION) == "g2").await;
    w.link.send_modify(|l| l.trust.as_mut().unwrap().rotate_requests = 1);
    w.until("the forced rotation", |w| w.calls().len() == 3).await;
    assert_eq!(w.calls()[2].1, IssueReason::Forced);
    assert_eq!(w.calls()[2].0, w.calls()[1].0, "no time passed: it acted on the change, not a timer");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_keeps_the_intermediate_obtained_and_writes_it_later() {
    let w = World::start().await;
    let first = w.serial().unwrap();
    w.store.full.store(true, Ordering::SeqCst);
    w.link.send_modify(|l| l.trust = Some(trust("g2")));
    w.until("the refused write", |w| w.store.refused.load(Ordering::SeqCst) >= 1).await;
    for _ in 0..120 {
        w.advance(Duration::from_secs(1)).await;
    }
    assert!(w.store.refused.load(Ordering::SeqCst) >= 5, "the write is retried");
    assert_eq!(w.calls().len(), 2, "but only one intermediate was asked for");
    assert_eq!(w.serial().unwrap(), first, "the current cacerts stays");
    assert_eq!(w.last_report().phase(), Phase::Degraded);
    w.store.full.store(false, Ordering::SeqCst);
    w.advance(Duration::from_secs(31)).await;
    w.until("the write", |w| w.serial().is_some_and(|s| s != first)).await;
    assert_eq!(w.calls().len(), 2, "the intermediate written is the one obtained");
    w.stop().await;
}

/// Collects what the agent logs, for the test whose point is how often it logs.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn lines(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }
}

/// The attack: an agent whose renewals keep failing logged the same warning on every attempt,
/// for as long as the condition lasted (a line every 30 s, for ever), and said "keeping the
/// current cacerts (valid until <a time already past>)" once it had expired. Now a persisting
/// error is logged once per change, the expiry once (at ERROR), and the expired intermediate
/// stays in the status report so the management plane raises its IntermediateExpired alert and
/// metric. (A current-thread runtime, so the agent's task logs into this test's subscriber.)
#[tokio::test(flavor = "current_thread")]
async fn a_persisting_failure_and_an_expiry_are_logged_once_each() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let w = World::start().await;
    let first = w.serial().unwrap();
    w.source.down.store(true, Ordering::SeqCst);
    w.link.send_modify(|l| l.trust = Some(trust("g2")));
    w.until("the first failed attempt", |w| w.calls().len() == 2).await;
    // Past the intermediate's 1000 s lifetime, one simulated second at a time.
    for _ in 0..1100 {
        w.advance(Duration::from_secs(1)).await;
    }
    assert!(w.calls().len() >= 30, "it kept retrying: {} attempts", w.calls().len());
    let warnings = logs.lines(" WARN ");
    assert_eq!(warnings.len(), 1, "one warning for one persisting error, not one per attempt: {warnings:#?}");
    assert!(warnings[0].contains("could not obtain a new intermediate") && warnings[0].contains("connection refused"));
    let errors = logs.lines(" ERROR ");
    assert_eq!(errors.len(), 1, "the expiry, once: {errors:#?}");
    assert!(errors[0].contains("EXPIRED") && errors[0].contains(&first), "{}", errors[0]);
    let r = w.last_report();
    assert_eq!(r.intermediate_serial, first, "the expired intermediate is still reported");
    assert!(r.intermediate_not_after < meshca_clock::unix(w.clock.now()));
    // Degraded, or Renewing when the report came from a step that was also retrying.
    assert!(matches!(r.phase(), Phase::Degraded | Phase::Renewing), "{:?}", r.phase());

    w.source.down.store(false, Ordering::SeqCst);
    w.advance(Duration::from_secs(31)).await;
    w.until("recovery", |w| w.serial().is_some_and(|s| s != first)).await;
    w.stop().await;
}

impl World {
    /// `ca-crl.pem` as written, parsed; empty when there is none.
    fn crls(&self) -> Vec<meshca_pki::Crl> {
        let dir = self.store.inner.object_path(&self.cacerts);
        std::fs::read(dir.join("ca-crl.pem"))
            .map(|p| meshca_pki::Crl::parse_pem_bundle(&p).unwrap())
            .unwrap_or_default()
    }

    /// The root's CRL as the management plane would publish it.
    fn root_crl(&self, number: u64, revoked: &[&str]) -> String {
        let now = self.clock.now();
        let revoked = revoked
            .iter()
            .map(|s| meshca_pki::Revoked {
                serial_hex: s.to_string(),
                revoked_at: now,
                reason: meshca_pki::Reason::KeyCompromise,
            })
            .collect();
        let params = meshca_pki::CrlParams { number, this_update: now, next_update: now + CRL_TTL, revoked };
        self.source.root.sign_crl(&params).unwrap().to_pem()
    }

    fn chain(&self) -> Vec<Cert> {
        let dir = self.store.inner.object_path(&self.cacerts);
        Cert::parse_pem_bundle(&std::fs::read(dir.join("cert-chain.pem")).unwrap()).unwrap()
    }
}

const CRL_TTL: Duration = Duration::from_secs(100);

fn with_crl(mut t: TrustState, crl: String) -> TrustState {
    t.crl = crl;
    t.crl_ttl_seconds = CRL_TTL.as_secs() as i64;
    t
}

/// ca-crl.pem: written only with the root's CRL published (istiod refuses one without it), then
/// always a CRL from every certificate of the chain; the cluster's own CRL re-signed at half its
/// lifetime, before its nextUpdate; a new root CRL (a revocation) written at once, before the
/// re-issue it forces. Checked with OpenSSL too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_crl_pem_holds_a_crl_from_every_ca_of_the_chain_and_is_resigned_before_next_update() {
    let w = World::start().await;
    assert!(w.crls().is_empty(), "nothing published: no ca-crl.pem");
    let first = w.serial().unwrap();

    // A published CRL from a CA that is not in the chain would leave the root without one:
    // istiod would refuse the bundle, so no ca-crl.pem, and the report says why.
    let other = CaSigner::new_root(
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        &RootParams::new("other"),
        w.clock.now(),
    )
    .unwrap();
    let now = w.clock.now();
    let foreign = meshca_pki::CrlParams { number: 1, this_update: now, next_update: now + CRL_TTL, revoked: vec![] };
    w.link.send_modify(|l| l.trust = Some(with_crl(trust("g1"), other.sign_crl(&foreign).unwrap().to_pem())));
    w.until("the reason in the report", |w| w.last_report().crl_note.contains("missing CRL signed by")).await;
    assert!(w.crls().is_empty(), "no ca-crl.pem istiod would refuse");

    w.link.send_modify(|l| l.trust = Some(with_crl(trust("g1"), w.root_crl(1, &[]))));
    w.until("ca-crl.pem", |w| w.crls().len() == 2).await;
    w.until("the reason cleared in the report", |w| w.last_report().crl_note.is_empty()).await;
    assert_eq!(w.serial().unwrap(), first, "the bundle is kept; only ca-crl.pem is added");
    let chain = w.chain();
    meshca_pki::crl::check_chain_coverage(&w.crls(), &chain).unwrap();
    let own = w.crls()[0].clone();
    own.verify_signed_by(&chain[0]).unwrap();
    assert_eq!(own.next_update(), w.clock.now() + CRL_TTL);

    // OpenSSL agrees that each CRL verifies against its issuer.
    let dir = tempfile::tempdir().unwrap();
    for (i, (crl, ca)) in w.crls().iter().zip(&chain).enumerate() {
        std::fs::write(dir.path().join(format!("{i}.crl")), crl.to_pem()).unwrap();
        std::fs::write(dir.path().join(format!("{i}.pem")), ca.to_pem()).unwrap();
        let crl_file = format!("{i}.crl");
        let ca_file = format!("{i}.pem");
        let out = meshca_testsupport::openssl_ok(
            dir.path(),
            &["crl", "-in", &crl_file, "-CAfile", &ca_file, "-verify", "-noout"],
        );
        assert!(out.contains("verify OK"), "{out}");
    }

    // Just before half its life: kept. At half: re-signed with a later nextUpdate.
    w.advance(CRL_TTL / 2 - Duration::from_secs(1)).await;
    assert_eq!(w.crls()[0], own);
    w.advance(Duration::from_secs(1)).await;
    w.until("the own CRL re-signed", |w| w.crls()[0] != own).await;
    assert!(w.crls()[0].next_update() > own.next_update());
    assert!(w.crls()[0].number() > own.number());

    // A revocation: the root's new CRL lands at once, then the forced re-issue.
    let mut t = with_crl(trust("g1"), w.root_crl(2, &[&first]));
    t.rotate_requests = 1;
    w.link.send_modify(|l| l.trust = Some(t));
    w.until("the new intermediate", |w| w.serial().is_some_and(|s| s != first)).await;
    assert!(w.crls()[1].lists(&first), "the root's CRL names the revoked serial");
    meshca_pki::crl::check_chain_coverage(&w.crls(), &w.chain()).unwrap();
    assert_eq!(w.calls().last().unwrap().1, IssueReason::Forced);
    w.stop().await;
}
