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
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{
    AgentIdentity, ClusterStatus, IssueIntermediateRequest, IssueIntermediateResponse, RenewIdentityRequest,
    ReportStatusResponse, TrustState, WatchTrustRequest, certificate_issuer_server::CertificateIssuer,
};
use meshca_proto::{IssueReason, Phase};
use meshca_store::{Store, typed};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, Capability};
use crate::issuer::Issuer;
use crate::loader::PolicySource;
use crate::records::{self, ClusterRecord, IstiodRecord, StatusRecord};
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            identity_ttl: Duration::from_secs(30 * 86400),
            report_interval: Duration::from_secs(30),
            default_token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(7 * 86400),
        }
    }
}

/// State shared by the services.
pub struct Shared {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The relay CA.
    pub relay: Arc<RelayCa>,
    /// The current authority.
    pub authority: watch::Receiver<Arc<Authority>>,
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
}

/// Refuses a call that signs or rotates on a replica that does not hold the lease. Followers
/// forward connections and so never see such calls; this covers a leader whose lease ran out
/// while a call was in flight.
pub(crate) fn require_leader(s: &Shared) -> Result<(), Status> {
    if s.issuer.leads() { Ok(()) } else { Err(crate::issuer::Denied::NotLeader.into_status()) }
}

/// An unexpected failure: logged with its detail, answered as `internal`.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

/// The verified caller of a mutual-TLS call.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let certs = meshca_tls::grpc::peer_certs(req).ok_or_else(|| {
        Status::unauthenticated("this call requires a client certificate (mutual TLS) from the relay CA")
    })?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let cert =
        Cert::from_der(leaf.to_vec()).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    cert.uri_sans()
        .iter()
        .find_map(|u| Caller::from_uri(u))
        .ok_or_else(|| Status::permission_denied("the client certificate carries no meshca control-plane identity"))
}

/// The calling agent's cluster.
pub(crate) fn agent<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req)? {
        Caller::Agent { cluster } => Ok(cluster),
        other => Err(Status::permission_denied(format!("{other} may not call the certificate issuer"))),
    }
}

/// The calling operator's name.
pub(crate) fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req)? {
        Caller::Operator { name } => Ok(name),
        other => Err(Status::permission_denied(format!("{other} may not call the operator API"))),
    }
}

impl Shared {
    pub(crate) async fn registered(&self, cluster: &str) -> Result<ClusterRecord, Status> {
        typed::get::<ClusterRecord>(self.store.as_ref(), &records::cluster(cluster).map_err(internal)?)
            .await
            .map_err(internal)?
            .map(|v| v.value)
            .ok_or_else(|| Status::permission_denied(format!("cluster {cluster} is not registered")))
    }

    pub(crate) fn identity_response(&self, cert: &Cert, cluster: &str) -> AgentIdentity {
        AgentIdentity {
            certificate: cert.to_pem(),
            relay_ca: self.relay.roots().to_pem(),
            cluster: cluster.to_string(),
            not_after: unix(cert.not_after()),
        }
    }

    async fn trust_state(&self, cluster: &str) -> Result<TrustState, Status> {
        let auth = self.authority.borrow().clone();
        let rec = self.registered(cluster).await?;
        Ok(trust_state(&auth, &rec, &self.settings))
    }
}

/// What a cluster is told about the trust it should hold.
pub fn trust_state(auth: &Authority, rec: &ClusterRecord, settings: &Settings) -> TrustState {
    let roots = auth.roots();
    TrustState {
        policy_generation: auth.generation.clone(),
        root_set_fingerprint: roots.map(|r| r.fingerprint()).unwrap_or_default(),
        root_set: roots.map(|r| r.to_pem()).unwrap_or_default(),
        enrolled: auth.policy.clusters.covers(&rec.name),
        rotate_requests: rec.rotate_requests,
        grace_period_ratio: auth.policy.intermediate.grace_period_ratio,
        report_interval_seconds: i64::try_from(settings.report_interval.as_secs()).unwrap_or(i64::MAX),
        key_algorithm: meshca_policy::key_algorithm_to_wire(auth.policy.intermediate.key_algorithm) as i32,
        intermediate_ttl_seconds: i64::try_from(auth.policy.intermediate.ttl.as_secs()).unwrap_or(i64::MAX),
        vault: match &auth.capability {
            Capability::Delegated(d) => Some(d.to_wire()),
            _ => None,
        },
        auto_restart_pods: auth.policy.auto_restart_pods,
    }
}

/// The certificate issuer service.
pub struct IssuerService(pub Arc<Shared>);

type TrustStream = Pin<Box<dyn Stream<Item = Result<TrustState, Status>> + Send + 'static>>;

/// What a trust stream remembers between two items.
struct TrustWatch {
    shared: Arc<Shared>,
    cluster: String,
    authority: watch::Receiver<Arc<Authority>>,
    nudge: watch::Receiver<u64>,
    last: Option<TrustState>,
}

impl TrustWatch {
    /// The next state that differs from the last one sent; `None` ends the stream (the server
    /// shuts down, or the cluster's record is gone: the error is sent first).
    async fn next(&mut self) -> Option<Result<TrustState, Status>> {
        loop {
            if self.last.is_some() {
                tokio::select! {
                    _ = self.shared.shutdown.cancelled() => return None,
                    r = self.authority.changed() => r.ok()?,
                    r = self.nudge.changed() => r.ok()?,
                }
            }
            match self.shared.trust_state(&self.cluster).await {
                Ok(next) if Some(&next) != self.last.as_ref() => {
                    self.last = Some(next.clone());
                    return Some(Ok(next));
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
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
        let cluster = agent(&request)?;
        let r = request.into_inner();
        let reason = IssueReason::try_from(r.reason).unwrap_or(IssueReason::Unspecified);
        let issued = self.0.issuer.issue(&cluster, &r.csr, reason, self.0.clock.now()).await?;
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
        let cluster = agent(&request)?;
        self.0.registered(&cluster).await?;
        let csr = crate::registration::verify_identity_csr(&request.into_inner().identity_csr)?;
        let cert = crate::registration::issue_identity(&self.0, &csr, &cluster).await?;
        Ok(Response::new(self.0.identity_response(&cert, &cluster)))
    }

    type WatchTrustStream = TrustStream;

    async fn watch_trust(&self, request: Request<WatchTrustRequest>) -> Result<Response<TrustStream>, Status> {
        let cluster = agent(&request)?;
        let shared = self.0.clone();
        let mut w = TrustWatch {
            authority: shared.authority.clone(),
            nudge: shared.nudge.subscribe(),
            shared,
            cluster,
            last: None,
        };
        // The first state is computed now, so a caller that is not registered is refused at once.
        let first = w.next().await.unwrap_or_else(|| Err(Status::unavailable("the management plane is stopping")))?;
        // The stream is driven by tonic itself (no task of its own), and ends with the server.
        let rest = futures::stream::unfold(w, |mut w| async move { w.next().await.map(|item| (item, w)) });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest))))
    }

    async fn report_status(&self, request: Request<ClusterStatus>) -> Result<Response<ReportStatusResponse>, Status> {
        let cluster = agent(&request)?;
        self.0.registered(&cluster).await?;
        let s = request.into_inner();
        let phase = match Phase::try_from(s.phase) {
            Ok(Phase::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "phase {} is not one of {}",
                    s.phase,
                    Phase::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
                )));
            }
            Ok(p) => p,
        };
        let clip = |t: &str| t.chars().take(1024).collect::<String>();
        let key = records::status(&cluster).map_err(internal)?;
        let now = unix(self.0.clock.now());
        let istiod = s.istiod.as_ref().map(|i| IstiodRecord::from_wire(i, clip));
        // Two processes may report for one cluster (in Vault mode the agent reports istiod, the
        // vault-agent sidecar the intermediate): each keeps what the other reported.
        typed::update::<StatusRecord, _>(self.0.store.as_ref(), &key, |cur| {
            let mut rec = match (s.istiod_only, cur) {
                (true, Some(cur)) => cur.clone(),
                _ => StatusRecord {
                    phase,
                    intermediate_serial: clip(&s.intermediate_serial),
                    intermediate_not_after: s.intermediate_not_after,
                    intermediate_not_before: s.intermediate_not_before,
                    root_set_fingerprint: clip(&s.root_set_fingerprint),
                    policy_generation: clip(&s.policy_generation),
                    last_renewal: s.last_renewal,
                    last_error: clip(&s.last_error),
                    key_location: clip(&s.key_location),
                    next_renewal: s.next_renewal,
                    agent_version: clip(&s.agent_version),
                    consecutive_failures: s.consecutive_failures,
                    foreign_cacerts: s.foreign_cacerts,
                    istiod: cur.and_then(|c| c.istiod.clone()),
                    ..Default::default()
                },
            };
            rec.reported_at = now;
            if let Some(i) = &istiod {
                rec.istiod = Some(i.clone());
            }
            Some(rec)
        })
        .await
        .map_err(internal)?;
        Ok(Response::new(ReportStatusResponse {}))
    }
}
