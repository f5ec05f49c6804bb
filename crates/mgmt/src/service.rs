//! The gRPC services: registration (bootstrap token), the certificate issuer (agents, mutual
//! TLS) and the operator API (operators, mutual TLS). The caller's identity always comes from its
//! verified client certificate, never from a request field.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use meshca_pki::{Cert, CsrPolicy, IntermediateParams, KeyAlgorithm, verify_csr};
use meshca_policy::Policy;
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{
    AgentIdentity, ApplyPolicyRequest, ApplyPolicyResponse, BootstrapToken, ClusterStatus, CreateBootstrapTokenRequest,
    GetStatusRequest, IssueIntermediateRequest, IssueIntermediateResponse, MeshStatus, RegisterRequest,
    RenewIdentityRequest, ReportStatusResponse, RotateRequest, RotateResponse, TrustState, WatchTrustRequest,
    certificate_issuer_server::CertificateIssuer, operator_server::Operator, registration_server::Registration,
};
use meshca_store::{Precondition, Store, typed};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::authority::Authority;
use crate::ratelimit::RateLimiter;
use crate::records::{self, ClusterRecord, ISSUED_KEEP, IssuedLog, IssuedRecord, StatusRecord};
use crate::relay::RelayCa;
use crate::status;
use crate::tokens::{self, unix};

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
    /// Per-cluster issuance limits.
    pub limiter: RateLimiter,
    /// Tunables.
    pub settings: Settings,
    /// Bumped when cluster records change (operator rotations), to wake trust watchers.
    pub nudge: watch::Sender<u64>,
    /// The leader election's view (Kubernetes mode with replicas); `None`: the only replica.
    pub leader: Option<watch::Receiver<crate::replica::Leader>>,
    /// Where the policy is read from and applied to.
    pub policy_source: Arc<dyn crate::authority::PolicySource>,
}

/// Refuses a call that signs or rotates on a replica that does not hold the lease. Followers
/// forward connections and so never see such calls; this covers a leader whose lease ran out
/// while a call was in flight.
fn require_leader(s: &Shared) -> Result<(), Status> {
    if crate::replica::is_leader(s.leader.as_ref()) {
        Ok(())
    } else {
        Err(Status::unavailable(
            "this management-plane replica does not hold the leader lease; retry (the leader answers)",
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
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

fn agent<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req)? {
        Caller::Agent { cluster } => Ok(cluster),
        other => Err(Status::permission_denied(format!("{other} may not call the certificate issuer"))),
    }
}

fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req)? {
        Caller::Operator { name } => Ok(name),
        other => Err(Status::permission_denied(format!("{other} may not call the operator API"))),
    }
}

impl Shared {
    fn identity_response(&self, cert: &Cert, cluster: &str) -> AgentIdentity {
        AgentIdentity {
            certificate: cert.to_pem(),
            relay_ca: self.relay.roots().to_pem(),
            cluster: cluster.to_string(),
            not_after: unix(cert.not_after()),
        }
    }

    async fn issue_identity(&self, csr_pem: &str, cluster: &str) -> Result<Cert, Status> {
        let csr = verify_csr(csr_pem.as_bytes(), &CsrPolicy::exactly(KeyAlgorithm::EcdsaP256.kind()))
            .map_err(|e| Status::invalid_argument(format!("identity CSR: {e}")))?;
        let cert = self
            .relay
            .issue_identity(
                csr.public_key_spki(),
                &Caller::Agent { cluster: cluster.to_string() },
                self.settings.identity_ttl,
                SystemTime::now(),
            )
            .map_err(internal)?;
        let serial = cert.serial_hex();
        let now = unix(SystemTime::now());
        typed::update::<ClusterRecord, _>(self.store.as_ref(), &records::cluster(cluster).map_err(internal)?, |cur| {
            let mut rec = cur.cloned().unwrap_or(ClusterRecord {
                name: cluster.to_string(),
                registered_at: now,
                ..Default::default()
            });
            rec.identity_serial = serial.clone();
            Some(rec)
        })
        .await
        .map_err(internal)?;
        Ok(cert)
    }

    async fn registered(&self, cluster: &str) -> Result<ClusterRecord, Status> {
        typed::get::<ClusterRecord>(self.store.as_ref(), &records::cluster(cluster).map_err(internal)?)
            .await
            .map_err(internal)?
            .map(|v| v.value)
            .ok_or_else(|| Status::permission_denied(format!("cluster {cluster} is not registered")))
    }

    async fn trust_state(&self, cluster: &str) -> Result<TrustState, Status> {
        let auth = self.authority.borrow().clone();
        let rec = self.registered(cluster).await?;
        Ok(TrustState {
            policy_generation: auth.generation.clone(),
            root_set_fingerprint: auth.roots.as_ref().map(|r| r.fingerprint()).unwrap_or_default(),
            root_set: auth.roots.as_ref().map(|r| r.to_pem()).unwrap_or_default(),
            enrolled: auth.policy.clusters.covers(cluster),
            rotate_requests: rec.rotate_requests,
            grace_period_ratio: auth.policy.intermediate.grace_period_ratio,
            report_interval_seconds: self.settings.report_interval.as_secs() as i64,
            key_algorithm: auth.policy.intermediate.key_algorithm.to_string(),
            intermediate_ttl_seconds: auth.policy.intermediate.ttl.as_secs() as i64,
            vault_config_json: vault_config_json(&auth.policy),
        })
    }
}

/// In Vault mode, the part of the policy `meshca vault-agent` needs (see `TrustState`); empty
/// in every other mode.
fn vault_config_json(policy: &Policy) -> String {
    let meshca_policy::CaMode::Vault(vault) = &policy.ca else { return String::new() };
    serde_json::json!({
        "trustDomain": policy.trust_domain.as_str(),
        "organization": policy.intermediate.organization,
        "vault": vault,
    })
    .to_string()
}

/// The registration service.
pub struct RegistrationService(pub Arc<Shared>);

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<AgentIdentity>, Status> {
        let r = request.into_inner();
        // Check the CSR before touching the token, so a bad request does not burn it.
        verify_csr(r.identity_csr.as_bytes(), &CsrPolicy::exactly(KeyAlgorithm::EcdsaP256.kind()))
            .map_err(|e| Status::invalid_argument(format!("identity CSR: {e}")))?;
        let cluster =
            match tokens::consume(self.0.store.as_ref(), &r.bootstrap_token, Some(&r.cluster), SystemTime::now()).await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(reason = %e, "registration refused");
                    return Err(Status::unauthenticated(e.to_string()));
                }
                Err(e) => return Err(internal(e)),
            };
        let cert = self.0.issue_identity(&r.identity_csr, &cluster).await?;
        tracing::info!(%cluster, serial = %cert.serial_hex(), "cluster registered");
        Ok(Response::new(self.0.identity_response(&cert, &cluster)))
    }
}

/// The certificate issuer service.
pub struct IssuerService(pub Arc<Shared>);

type TrustStream = Pin<Box<dyn Stream<Item = Result<TrustState, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CertificateIssuer for IssuerService {
    async fn issue_intermediate(
        &self,
        request: Request<IssueIntermediateRequest>,
    ) -> Result<Response<IssueIntermediateResponse>, Status> {
        let cluster = agent(&request)?;
        let r = request.into_inner();
        let s = &self.0;
        s.registered(&cluster).await?;
        let auth = s.authority.borrow().clone();
        if !auth.policy.clusters.covers(&cluster) {
            return Err(Status::failed_precondition(format!(
                "cluster {cluster} is not covered by RootTrustPolicy {}",
                auth.policy.name
            )));
        }
        let Some(signer) = auth.signer.clone() else {
            return Err(Status::failed_precondition(
                auth.error
                    .clone()
                    .unwrap_or_else(|| "this mesh's root lives in Vault: use `meshca vault-agent`".into()),
            ));
        };
        if let Err(wait) = s.limiter.try_acquire(&cluster) {
            tracing::warn!(%cluster, "intermediate issuance rate-limited");
            return Err(Status::resource_exhausted(format!(
                "cluster {cluster} is over its issuance rate limit; retry in {}s",
                wait.as_secs().max(1)
            )));
        }
        let policy: &Policy = &auth.policy;
        let csr = verify_csr(r.csr.as_bytes(), &CsrPolicy::exactly(policy.intermediate.key_algorithm.kind()))
            .map_err(|e| Status::invalid_argument(format!("intermediate CSR from {cluster}: {e}")))?;
        if let Some(named) = csr.subject_locality()
            && named != cluster
        {
            return Err(Status::permission_denied(format!(
                "the CSR names cluster {named:?} but the caller is cluster {cluster}"
            )));
        }
        let params = IntermediateParams {
            organization: policy.intermediate.organization.clone(),
            common_name: "meshca intermediate".into(),
            cluster: cluster.clone(),
            trust_domain: policy.trust_domain.clone(),
            ttl: policy.intermediate.ttl,
            path_len: 0,
            permitted_dns_domains: policy.intermediate.permitted_dns_domains.clone(),
        };
        let now = SystemTime::now();
        require_leader(s)?;
        let issued = signer
            .sign_intermediate(csr.public_key_spki(), &params, now)
            .map_err(|e| Status::failed_precondition(format!("cannot issue for {cluster}: {e}")))?;
        let key_sha256 =
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr.public_key_spki()).as_ref());
        let record = IssuedRecord {
            serial: issued.serial_hex.clone(),
            not_after: unix(issued.not_after),
            issued_at: unix(now),
            reason: if r.reason.is_empty() { "unspecified".into() } else { r.reason.chars().take(64).collect() },
            policy_generation: auth.generation.clone(),
            public_key_sha256: key_sha256.clone(),
            not_before: unix(issued.not_before),
            key_algorithm: csr.key_kind().to_string(),
            issuer_fingerprint: signer.cert().fingerprint(),
        };
        // Record before answering: nothing is handed out that the log does not show. The log is
        // updated by compare-and-swap, so when two replicas race on the same request (a leader
        // whose lease ran out mid-call and its successor), the second finds the first's record
        // for this key and hands out nothing: a key is certified once.
        let mut duplicate = false;
        typed::update::<IssuedLog, _>(s.store.as_ref(), &records::issued(&cluster).map_err(internal)?, |cur| {
            let mut log = cur.cloned().unwrap_or_default();
            duplicate = log.records.iter().any(|r| r.public_key_sha256 == key_sha256);
            if duplicate {
                return None;
            }
            log.records.insert(0, record.clone());
            log.records.truncate(ISSUED_KEEP);
            Some(log)
        })
        .await
        .map_err(internal)?;
        if duplicate {
            return Err(Status::already_exists(format!(
                "an intermediate for this key was already issued to {cluster}; send a CSR with a new key"
            )));
        }
        tracing::info!(%cluster, serial = %record.serial, not_after = record.not_after, reason = %record.reason, "issued cluster intermediate");
        Ok(Response::new(IssueIntermediateResponse {
            certificate: issued.to_pem(),
            chain: signer.chain_pems(),
            root_set: auth.roots.as_ref().map(|r| r.to_pem()).unwrap_or_default(),
            policy_generation: auth.generation.clone(),
            serial: record.serial,
            not_after: record.not_after,
        }))
    }

    async fn renew_identity(&self, request: Request<RenewIdentityRequest>) -> Result<Response<AgentIdentity>, Status> {
        let cluster = agent(&request)?;
        self.0.registered(&cluster).await?;
        let cert = self.0.issue_identity(&request.into_inner().identity_csr, &cluster).await?;
        Ok(Response::new(self.0.identity_response(&cert, &cluster)))
    }

    type WatchTrustStream = TrustStream;

    async fn watch_trust(&self, request: Request<WatchTrustRequest>) -> Result<Response<TrustStream>, Status> {
        let cluster = agent(&request)?;
        let shared = self.0.clone();
        let first = shared.trust_state(&cluster).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut auth = shared.authority.clone();
            let mut nudge = shared.nudge.subscribe();
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    r = auth.changed() => if r.is_err() { return },
                    r = nudge.changed() => if r.is_err() { return },
                }
                match shared.trust_state(&cluster).await {
                    Ok(next) if next != last => {
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_status(&self, request: Request<ClusterStatus>) -> Result<Response<ReportStatusResponse>, Status> {
        let cluster = agent(&request)?;
        self.0.registered(&cluster).await?;
        let s = request.into_inner();
        let clip = |t: &str| t.chars().take(1024).collect::<String>();
        let rec = StatusRecord {
            reported_at: unix(SystemTime::now()),
            phase: clip(&s.phase),
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
        };
        typed::put(self.0.store.as_ref(), &records::status(&cluster).map_err(internal)?, &rec, Precondition::Any)
            .await
            .map_err(internal)?;
        Ok(Response::new(ReportStatusResponse {}))
    }
}

/// The operator API.
pub struct OperatorService(pub Arc<Shared>);

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn create_bootstrap_token(
        &self,
        request: Request<CreateBootstrapTokenRequest>,
    ) -> Result<Response<BootstrapToken>, Status> {
        let who = operator(&request)?;
        let r = request.into_inner();
        if !meshca_policy::is_cluster_name(&r.cluster) {
            return Err(Status::invalid_argument(format!("cluster name {:?} is not a DNS-1123 label", r.cluster)));
        }
        let s = &self.0.settings;
        let ttl = if r.ttl_seconds <= 0 { s.default_token_ttl } else { Duration::from_secs(r.ttl_seconds as u64) };
        if ttl > s.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "token lifetime is capped at {}s",
                s.max_token_ttl.as_secs()
            )));
        }
        let t = tokens::create(self.0.store.as_ref(), &r.cluster, ttl, SystemTime::now()).await.map_err(internal)?;
        tracing::info!(operator = %who, cluster = %r.cluster, expires_at = t.expires_at, "bootstrap token created");
        Ok(Response::new(BootstrapToken {
            token: t.token,
            cluster: r.cluster,
            expires_at: t.expires_at,
            relay_ca: self.0.relay.roots().to_pem(),
        }))
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<MeshStatus>, Status> {
        operator(&request)?;
        let auth = self.0.authority.borrow().clone();
        let st =
            status::collect(self.0.store.as_ref(), &auth, unix(SystemTime::now()), self.0.settings.report_interval)
                .await
                .map_err(internal)?;
        Ok(Response::new(st))
    }

    async fn rotate(&self, request: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        let who = operator(&request)?;
        require_leader(&self.0)?;
        let r = request.into_inner();
        let store = self.0.store.as_ref();
        let clusters: Vec<String> = if r.cluster.is_empty() {
            store
                .list(records::NAMESPACE)
                .await
                .map_err(internal)?
                .into_iter()
                .filter_map(|n| n.strip_prefix(records::CLUSTER_PREFIX).map(str::to_string))
                .collect()
        } else {
            self.0
                .registered(&r.cluster)
                .await
                .map_err(|_| Status::not_found(format!("cluster {} is not registered", r.cluster)))?;
            vec![r.cluster.clone()]
        };
        for c in &clusters {
            typed::update::<ClusterRecord, _>(store, &records::cluster(c).map_err(internal)?, |cur| {
                cur.map(|rec| ClusterRecord { rotate_requests: rec.rotate_requests + 1, ..rec.clone() })
            })
            .await
            .map_err(internal)?;
        }
        self.0.nudge.send_modify(|n| *n += 1);
        tracing::info!(operator = %who, ?clusters, "rotation requested");
        Ok(Response::new(RotateResponse { clusters }))
    }

    async fn apply_policy(
        &self,
        request: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let who = operator(&request)?;
        let text = request.into_inner().policy;
        let policy = Policy::from_yaml(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Load the CA the policy names before putting it in force: a policy whose secret is
        // missing or not a CA is refused and the current one stays.
        let trial = crate::authority::load(self.0.store.as_ref(), policy.clone(), SystemTime::now()).await;
        if let Some(e) = trial.error {
            return Err(Status::failed_precondition(e));
        }
        self.0.policy_source.apply(&text).await.map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(operator = %who, policy = %policy.name, "policy applied");
        // Wait for the loader to put it in force, so the answer says what it led to.
        let mut rx = self.0.authority.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let current = rx.borrow().clone();
            if current.policy == policy {
                if let Some(e) = &current.error {
                    return Err(Status::failed_precondition(e.clone()));
                }
                return Ok(Response::new(ApplyPolicyResponse { policy_generation: current.generation.clone() }));
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(Status::deadline_exceeded("the policy was stored but has not been loaded yet"));
            }
        }
    }
}
