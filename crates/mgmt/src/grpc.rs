//! The management plane's gRPC surface: who is calling, the state the services share, and the
//! certificate issuer service the agents call. Registration and the operator API are in
//! [`crate::registration`] and [`crate::operator`]. The caller's identity always comes from its
//! verified client certificate, never from a request field; decisions are made by the domain
//! services ([`crate::issuer::Issuer`], [`crate::registration`]) and only translated here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use meshca_clock::{SharedClock, unix};
use meshca_pki::Cert;
use meshca_proto::IssueReason;
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{
    AgentIdentity, ClusterStatus, IssueIntermediateRequest, IssueIntermediateResponse, RenewIdentityRequest,
    ReportStatusResponse, TrustState, WatchTrustRequest, certificate_issuer_server::CertificateIssuer,
};
use meshca_store::{Store, typed};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, Capability};
use crate::identities::{self, Standing};
use crate::issuer::Issuer;
use crate::loader::PolicySource;
use crate::meshes::{MeshView, Placement};
use crate::records::{self, ClusterRecord, OperatorLog, StatusRecord};
use crate::relay::RelayCa;

/// Tunables of the services.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of agent identities (renewed by the agent at half life).
    pub identity_ttl: Duration,
    /// How often agents report status.
    pub report_interval: Duration,
    /// Default bootstrap-token lifetime.
    pub default_token_ttl: Duration,
    /// Longest bootstrap-token lifetime an operator may ask for.
    pub max_token_ttl: Duration,
    /// After an agent renews its identity, how long the certificate it replaced is still
    /// accepted (calls on connections opened before the renewal; the agent reconnects at once).
    /// See [`crate::identities`].
    pub identity_overlap: Duration,
    /// Lifetime of the published CRLs (re-signed at half of it); agents sign theirs for as long.
    pub crl_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            identity_ttl: Duration::from_secs(30 * 86400),
            report_interval: Duration::from_secs(30),
            default_token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(7 * 86400),
            identity_overlap: crate::identities::DEFAULT_OVERLAP,
            crl_ttl: crate::revocation::DEFAULT_CRL_TTL,
        }
    }
}

/// State shared by the services.
pub struct Shared {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The relay CA.
    pub relay: Arc<RelayCa>,
    /// Every mesh and its current (effective) authority.
    pub meshes: watch::Receiver<Arc<MeshView>>,
    /// The certificate issuer.
    pub issuer: Issuer,
    /// Tunables.
    pub settings: Settings,
    /// Bumped when cluster records change (operator rotations), to wake trust watchers.
    pub nudge: watch::Sender<u64>,
    /// Where the policy is read from and applied to.
    pub policy_source: Arc<dyn PolicySource>,
    /// The time.
    pub clock: SharedClock,
    /// Fires when the server shuts down: long-lived streams end with it.
    pub shutdown: CancellationToken,
    /// Bumped on every status report, so barriers waiting on reports look again at once.
    pub reported: watch::Sender<u64>,
    /// The budget per address of calls made without a client certificate (registration).
    pub peers: meshca_serve::KeyedLimiter<meshca_serve::PeerKey>,
    /// The serving layer's counters (refusals are counted here too).
    pub serve_metrics: meshca_serve::ServeMetrics,
    /// The operator credentials this server keeps on its own disk (`<data-dir>/operator`), which
    /// it replaces when they are revoked.
    pub local_operator: Option<crate::operators::LocalCredentials>,
}

/// Refuses a call that signs or rotates on a replica that does not hold the lease. Followers
/// forward connections and so never see such calls; this covers a leader whose lease ran out
/// while a call was in flight.
pub(crate) fn require_leader(s: &Shared) -> Result<(), Status> {
    if s.issuer.leads() { Ok(()) } else { Err(crate::issuer::Denied::NotLeader.into_status()) }
}

/// An unexpected failure: logged with its detail under an error id, answered with only the id
/// ([`crate::error::caller_status`]).
pub(crate) fn internal(e: impl std::error::Error + 'static) -> Status {
    crate::error::caller_status(&e)
}

/// The verified caller of a mutual-TLS call, and the serial of the certificate it presented.
pub(crate) struct Presented {
    /// Who.
    pub caller: Caller,
    /// Uppercase hex.
    pub serial: String,
}

/// Who is calling, from the client certificate the TLS layer verified against the relay CA.
fn presented<T>(req: &Request<T>) -> Result<Presented, Status> {
    let certs = meshca_tls::grpc::peer_certs(req).ok_or_else(|| {
        Status::unauthenticated("this call requires a client certificate (mutual TLS) from the relay CA")
    })?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let cert =
        Cert::from_der(leaf.to_vec()).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    let caller =
        cert.uri_sans().iter().find_map(|u| Caller::from_uri(u)).ok_or_else(|| {
            Status::permission_denied("the client certificate carries no meshca control-plane identity")
        })?;
    Ok(Presented { caller, serial: cert.serial_hex() })
}

/// An agent call whose certificate is its cluster's current identity, or the predecessor within
/// its overlap window ([`crate::identities`]).
pub(crate) struct AgentCall {
    /// The cluster.
    pub cluster: String,
    /// The serial presented.
    pub serial: String,
    /// The cluster's record, as read for the check (the issuer uses it rather than reading it
    /// again).
    pub record: ClusterRecord,
}

/// The calling agent, checked against its cluster's record: a replaced, superseded or removed
/// identity is refused (`UNAUTHENTICATED`) on every call.
pub(crate) async fn agent<T>(s: &Shared, req: &Request<T>) -> Result<AgentCall, Status> {
    let p = presented(req)?;
    let cluster = match p.caller {
        Caller::Agent { cluster } => cluster,
        other => return Err(Status::permission_denied(format!("{other} may not call the certificate issuer"))),
    };
    let (record, _) = s.identity_standing(&cluster, &p.serial).await?;
    Ok(AgentCall { cluster, serial: p.serial, record })
}

/// The calling operator's name and certificate serial; a revoked certificate is refused
/// (`UNAUTHENTICATED`) on every call.
pub(crate) async fn operator<T>(s: &Shared, req: &Request<T>) -> Result<Presented, Status> {
    let p = presented(req)?;
    if !matches!(p.caller, Caller::Operator { .. }) {
        return Err(Status::permission_denied(format!("{} may not call the operator API", p.caller)));
    }
    let log = typed::get::<OperatorLog>(s.store.as_ref(), &records::operators()).await.map_err(internal)?;
    if log.is_some_and(|l| l.value.is_revoked(&p.serial)) {
        tracing::warn!(caller = %p.caller, serial = %p.serial, "a revoked operator certificate was refused");
        return Err(Status::unauthenticated(format!(
            "operator certificate {} was revoked (`meshca operator revoke`); use other operator credentials",
            p.serial
        )));
    }
    Ok(p)
}

impl Shared {
    /// Charges a call made without a client certificate to its address's budget, before anything
    /// else is done with it; `RESOURCE_EXHAUSTED` with a retry hint when the budget is spent.
    pub(crate) fn charge_anonymous<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let peer = meshca_serve::peer_key(req);
        self.peers.check(&peer).map_err(|wait| {
            self.serve_metrics.refused(meshca_serve::RefusedBy::PeerRate);
            tracing::info!(%peer, "a call without a client certificate is over its address's budget");
            meshca_serve::resource_exhausted(
                format!("{peer} is over its budget of {} calls without a client certificate", self.peers.rate()),
                wait,
            )
        })
    }

    /// A cluster's registration record, if it has one. A name that cannot be a cluster's is
    /// simply not registered.
    pub(crate) async fn lookup(&self, cluster: &str) -> Result<Option<ClusterRecord>, Status> {
        let Ok(key) = records::cluster(cluster) else { return Ok(None) };
        Ok(typed::get::<ClusterRecord>(self.store.as_ref(), &key).await.map_err(internal)?.map(|v| v.value))
    }

    /// `cluster`'s record, and how the certificate `serial` stands as its agent identity now.
    pub(crate) async fn identity_standing(
        &self,
        cluster: &str,
        serial: &str,
    ) -> Result<(ClusterRecord, Standing), Status> {
        let now = unix(self.clock.now());
        let refused = |r: identities::Refused| {
            tracing::warn!(%cluster, %serial, reason = %r, "an agent certificate was refused");
            Status::unauthenticated(r.to_string())
        };
        let rec =
            self.lookup(cluster).await?.ok_or_else(|| refused(identities::Refused::NotRegistered(cluster.into())))?;
        let standing = identities::check(&rec, serial, now).map_err(refused)?;
        Ok((rec, standing))
    }

    pub(crate) fn identity_response(&self, cert: &Cert, cluster: &str) -> AgentIdentity {
        AgentIdentity {
            certificate: cert.to_pem(),
            relay_ca: self.relay.roots().to_pem(),
            cluster: cluster.to_string(),
            not_after: unix(cert.not_after()),
        }
    }

    /// The trust state for `cluster`, as long as `serial` is still an identity it accepts, and
    /// how that identity stands.
    async fn trust_state(&self, cluster: &str, serial: &str) -> Result<(TrustState, Standing), Status> {
        let view = self.meshes.borrow().clone();
        let (rec, standing) = self.identity_standing(cluster, serial).await?;
        let mesh = match view.place(cluster, &rec.labels) {
            Placement::Mesh(m) => m,
            // Not enrolled: the agent keeps what it holds and asks for nothing.
            Placement::Outside(_) => return Ok((outside(&rec, &self.settings), standing)),
        };
        let auth = &mesh.authority();
        let mut state = trust_state(auth, &rec, &self.settings);
        // The published CRL, when it is the current signer's (right after a signer change the
        // publisher has not caught up yet: nothing rather than a CRL of another CA).
        let crl = crate::revocation::published(self.store.as_ref(), &mesh.keys).await.map_err(internal)?;
        if let (Some(c), Some(s)) = (crl, auth.signing())
            && c.signer_fingerprint == s.signer.cert().fingerprint()
        {
            state.crl = c.pem;
        }
        let federated = crate::federation::poll::read(self.store.as_ref(), &mesh.keys).await.map_err(internal)?;
        state.federated_bundles = crate::federation::poll::bundles(&federated, &auth.policy.federation);
        Ok((state, standing))
    }

    /// Wakes every trust stream to look again (a rotation request, a registration, a removal).
    pub(crate) fn nudge(&self) {
        self.nudge.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What a cluster in no mesh (or claimed by several) is told: it is not enrolled, so its agent
/// keeps the `cacerts` it holds and asks for nothing.
fn outside(rec: &ClusterRecord, settings: &Settings) -> TrustState {
    TrustState {
        enrolled: false,
        rotate_requests: rec.rotate_requests,
        report_interval_seconds: i64::try_from(settings.report_interval.as_secs()).unwrap_or(i64::MAX),
        crl_ttl_seconds: i64::try_from(settings.crl_ttl.as_secs()).unwrap_or(i64::MAX),
        ..TrustState::default()
    }
}

/// What a cluster of the mesh whose authority is `auth` is told about the trust it should hold.
pub fn trust_state(auth: &Authority, rec: &ClusterRecord, settings: &Settings) -> TrustState {
    let roots = auth.roots();
    TrustState {
        policy_generation: auth.generation.clone(),
        root_set_fingerprint: roots.map(|r| r.fingerprint()).unwrap_or_default(),
        root_set: roots.map(|r| r.to_pem()).unwrap_or_default(),
        enrolled: true,
        rotate_requests: rec.rotate_requests,
        grace_period_ratio: auth.policy.intermediate.grace_period_ratio,
        report_interval_seconds: i64::try_from(settings.report_interval.as_secs()).unwrap_or(i64::MAX),
        key_algorithm: meshca_policy::key_algorithm_to_wire(auth.policy.intermediate.key_algorithm) as i32,
        intermediate_ttl_seconds: i64::try_from(auth.policy.intermediate.ttl.as_secs()).unwrap_or(i64::MAX),
        vault: match &auth.capability {
            Capability::Delegated(d) => Some(d.delivery.to_wire()),
            _ => None,
        },
        auto_restart_pods: auth.policy.auto_restart_pods,
        crl: String::new(),
        federated_bundles: Vec::new(),
        crl_ttl_seconds: i64::try_from(settings.crl_ttl.as_secs()).unwrap_or(i64::MAX),
    }
}

/// The certificate issuer service.
pub struct IssuerService(pub Arc<Shared>);

type TrustStream = Pin<Box<dyn Stream<Item = Result<TrustState, Status>> + Send + 'static>>;

/// What a trust stream remembers between two items.
struct TrustWatch {
    shared: Arc<Shared>,
    cluster: String,
    /// The certificate the stream was opened with: re-checked on every change, so a removal or a
    /// new registration ends the stream.
    serial: String,
    /// Once that certificate is a predecessor (the agent renewed): the end of its overlap
    /// window, when the stream is checked again, and so ends.
    until: Option<i64>,
    meshes: watch::Receiver<Arc<MeshView>>,
    nudge: watch::Receiver<u64>,
    last: Option<TrustState>,
    /// Set once an error was sent: the stream then ends.
    done: bool,
}

impl TrustWatch {
    /// The next state that differs from the last one sent; `None` ends the stream (the server
    /// shuts down; or the identity is no longer accepted: the error is sent first).
    async fn next(&mut self) -> Option<Result<TrustState, Status>> {
        if self.done {
            return None;
        }
        loop {
            if self.last.is_some() {
                let window_end = async {
                    match self.until {
                        Some(t) => self.shared.clock.sleep_until(meshca_clock::from_unix(t)).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.shared.shutdown.cancelled() => return None,
                    r = self.meshes.changed() => r.ok()?,
                    r = self.nudge.changed() => r.ok()?,
                    _ = window_end => {}
                }
            }
            match self.shared.trust_state(&self.cluster, &self.serial).await {
                Ok((next, standing)) => {
                    self.until = match standing {
                        Standing::Predecessor { until } => Some(until),
                        Standing::Current => None,
                    };
                    if Some(&next) != self.last.as_ref() {
                        self.last = Some(next.clone());
                        return Some(Ok(next));
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl CertificateIssuer for IssuerService {
    async fn issue_intermediate(
        &self,
        request: Request<IssueIntermediateRequest>,
    ) -> Result<Response<IssueIntermediateResponse>, Status> {
        let call = agent(&self.0, &request).await?;
        let r = request.into_inner();
        let reason = IssueReason::try_from(r.reason).unwrap_or(IssueReason::Unspecified);
        let issued =
            self.0.issuer.issue_registered(&call.cluster, &call.record, &r.csr, reason, self.0.clock.now()).await?;
        Ok(Response::new(IssueIntermediateResponse {
            certificate: issued.certificate,
            chain: issued.chain,
            root_set: issued.root_set,
            policy_generation: issued.generation,
            serial: issued.serial,
            not_after: issued.not_after,
        }))
    }

    async fn renew_identity(&self, request: Request<RenewIdentityRequest>) -> Result<Response<AgentIdentity>, Status> {
        let call = agent(&self.0, &request).await?;
        let csr = request.into_inner().identity_csr;
        let cert = crate::registration::renew_identity(&self.0, &csr, &call.cluster, &call.serial).await?;
        Ok(Response::new(self.0.identity_response(&cert, &call.cluster)))
    }

    type WatchTrustStream = TrustStream;

    async fn watch_trust(&self, request: Request<WatchTrustRequest>) -> Result<Response<TrustStream>, Status> {
        let call = agent(&self.0, &request).await?;
        let shared = self.0.clone();
        let mut w = TrustWatch {
            meshes: shared.meshes.clone(),
            nudge: shared.nudge.subscribe(),
            shared,
            cluster: call.cluster,
            serial: call.serial,
            until: None,
            last: None,
            done: false,
        };
        // The first state is computed now, so a caller that is not registered is refused at once.
        let first = w.next().await.unwrap_or_else(|| Err(Status::unavailable("the management plane is stopping")))?;
        // The stream is driven by tonic itself (no task of its own), and ends with the server.
        let rest = futures::stream::unfold(w, |mut w| async move { w.next().await.map(|item| (item, w)) });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest))))
    }

    async fn report_status(&self, request: Request<ClusterStatus>) -> Result<Response<ReportStatusResponse>, Status> {
        let cluster = agent(&self.0, &request).await?.cluster;
        let s = request.into_inner();
        let now = unix(self.0.clock.now());
        // Refused as a whole, naming the field, before the store is touched.
        crate::report::accept(&s, now)
            .map_err(|e| Status::invalid_argument(format!("status report of cluster {cluster}: {e}")))?;
        let key = records::status(&cluster).map_err(internal)?;
        typed::update::<StatusRecord, _>(self.0.store.as_ref(), &key, |cur| {
            StatusRecord::after_report(cur, &s, now).ok()
        })
        .await
        .map_err(internal)?;
        self.0.reported.send_modify(|n| *n = n.wrapping_add(1));
        Ok(Response::new(ReportStatusResponse {}))
    }
}
