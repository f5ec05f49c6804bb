//! The operator API: bootstrap tokens, status, rotations, policy changes, cluster removal,
//! operator credentials and intermediate revocation, for callers with an operator identity that
//! is not revoked.

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::unix;
use meshca_policy::PolicySet;
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{
    ApplyPolicyRequest, ApplyPolicyResponse, AuditLog, BootstrapToken, CreateBootstrapTokenRequest, GetAuditLogRequest,
    GetStatusRequest, IssueOperatorRequest, MeshStatus, OperatorCredentials, RemoveClusterRequest,
    RemoveClusterResponse, RevokeIntermediateRequest, RevokeIntermediateResponse, RevokeOperatorRequest,
    RevokeOperatorResponse, RotateRequest, RotateResponse, RotateRootRequest, RotateRootResponse,
    operator_server::Operator,
};
use meshca_store::typed;
use tonic::{Request, Response, Status};

use crate::error::MgmtError;
use crate::grpc::{Shared, internal, operator, require_leader};
use crate::records::{self, ClusterRecord};
use crate::{audit, status, tokens};

/// The operator API.
pub struct OperatorService(pub Arc<Shared>);

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn create_bootstrap_token(
        &self,
        request: Request<CreateBootstrapTokenRequest>,
    ) -> Result<Response<BootstrapToken>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        let r = request.into_inner();
        dns_label("cluster name", &r.cluster)?;
        let labels = cluster_labels(r.labels)?;
        let s = &self.0.settings;
        let ttl = lifetime("token lifetime", r.ttl_seconds, s.default_token_ttl, s.max_token_ttl)?;
        let by = who.to_string();
        let t = tokens::create(self.0.store.as_ref(), &r.cluster, &labels, ttl, &by, self.0.clock.now())
            .await
            .map_err(internal)?;
        tracing::info!(caller = %who, cluster = %r.cluster, expires_at = t.expires_at, "bootstrap token created");
        Ok(Response::new(BootstrapToken {
            token: t.token,
            cluster: r.cluster,
            expires_at: t.expires_at,
            relay_ca: self.0.relay.roots().to_pem(),
        }))
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<MeshStatus>, Status> {
        operator(&self.0, &request).await?;
        let policy = request.into_inner().policy;
        let view = self.0.meshes.borrow().clone();
        let (store, now, interval) = (self.0.store.as_ref(), unix(self.0.clock.now()), self.0.settings.report_interval);
        let st = if policy.is_empty() {
            status::overview(store, &view, now, interval).await
        } else {
            let mesh = view.pick(&policy).map_err(Status::not_found)?;
            status::collect(store, &view, mesh, now, interval).await
        };
        Ok(Response::new(st.map_err(internal)?))
    }

    async fn rotate(&self, request: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        require_leader(&self.0)?;
        let r = request.into_inner();
        let store = self.0.store.as_ref();
        let clusters: Vec<String> = if r.cluster.is_empty() {
            records::cluster_names(store).await.map_err(internal)?
        } else {
            dns_label("cluster name", &r.cluster)?;
            if self.0.lookup(&r.cluster).await?.is_none() {
                return Err(not_registered(&r.cluster));
            }
            vec![r.cluster.clone()]
        };
        for c in &clusters {
            typed::update::<ClusterRecord, _>(store, &records::cluster(c).map_err(internal)?, |cur| {
                cur.map(|rec| ClusterRecord { rotate_requests: rec.rotate_requests + 1, ..rec.clone() })
            })
            .await
            .map_err(internal)?;
        }
        self.0.nudge();
        tracing::info!(caller = %who, ?clusters, "rotation requested");
        Ok(Response::new(RotateResponse { clusters }))
    }

    async fn apply_policy(
        &self,
        request: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        let text = request.into_inner().policy;
        let set = PolicySet::from_yaml(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Load the CA each policy names before putting the set in force: a policy whose secret
        // is missing or not a CA is refused and the current set stays.
        for policy in set.policies() {
            if let Some(e) = crate::authority::trial(self.0.store.as_ref(), policy, self.0.clock.now()).await {
                return Err(Status::failed_precondition(format!("policy {}: {e}", policy.name)));
            }
        }
        self.0.policy_source.apply(&text).await.map_err(|e| match e {
            // The store (or the disk under it) failed: the caller gets an error id, not a path.
            MgmtError::Store(_) | MgmtError::Io { .. } => internal(e),
            other => Status::failed_precondition(other.to_string()),
        })?;
        let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
        tracing::info!(caller = %who, policies = ?names, "policy applied");
        // Wait for every mesh to put its policy in force, so the answer says what it led to.
        let mut rx = self.0.meshes.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let view = rx.borrow().clone();
            if view.holds(&set) {
                let mut generations = std::collections::HashMap::new();
                for policy in set.policies() {
                    let Some(mesh) = view.get(&policy.name) else { continue };
                    if let Some(e) = mesh.authority().error() {
                        return Err(Status::failed_precondition(format!("policy {}: {e}", policy.name)));
                    }
                    let event = audit::Event::new(audit::Action::PolicyApplied, who.to_string(), "")
                        .with("policy", &policy.name)
                        .with("policyGeneration", &mesh.authority().generation);
                    audit::record(self.0.store.as_ref(), event, self.0.clock.now()).await;
                    generations.insert(policy.name.clone(), mesh.authority().generation.clone());
                }
                let policy_generation = match set.policies() {
                    [one] => generations.get(&one.name).cloned().unwrap_or_default(),
                    _ => String::new(),
                };
                return Ok(Response::new(ApplyPolicyResponse { policy_generation, generations }));
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(Status::deadline_exceeded("the policy was stored but has not been loaded yet"));
            }
        }
    }

    async fn rotate_root(&self, request: Request<RotateRootRequest>) -> Result<Response<RotateRootResponse>, Status> {
        use crate::rotation::RotateError;
        let who = operator(&self.0, &request).await?.caller;
        require_leader(&self.0)?;
        let r = request.into_inner();
        let abort = r.abort;
        let view = self.0.meshes.borrow().clone();
        let mesh = view.pick(&r.policy).map_err(Status::failed_precondition)?;
        let rotation =
            mesh.rotation.clone().ok_or(RotateError::Stopped).map_err(|e| Status::unavailable(e.to_string()))?;
        let result = if abort { rotation.abort().await } else { rotation.start().await };
        let r = result.map_err(|e| match e {
            RotateError::InProgress { .. } | RotateError::NotInProgress | RotateError::Abort(_) => {
                Status::failed_precondition(e.to_string())
            }
            RotateError::NotGenerated(_) | RotateError::CannotStart(_) => Status::failed_precondition(e.to_string()),
            RotateError::NotLeader | RotateError::Stopped => Status::unavailable(e.to_string()),
            RotateError::Store(_) => internal(e),
        })?;
        let message = if abort {
            format!("root rotation {} aborted: every cluster returns to the old root (now {})", r.id, r.phase.name())
        } else {
            format!(
                "root rotation {} started: every cluster is to trust the old and the new root ({})",
                r.id,
                r.phase.name()
            )
        };
        tracing::info!(operator = %who, rotation = %r.id, abort, "root rotation requested");
        Ok(Response::new(RotateRootResponse { phase: r.phase as i32, message }))
    }

    async fn remove_cluster(
        &self,
        request: Request<RemoveClusterRequest>,
    ) -> Result<Response<RemoveClusterResponse>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        require_leader(&self.0)?;
        let cluster = request.into_inner().cluster;
        dns_label("cluster name", &cluster)?;
        let removed = crate::removal::remove(self.0.store.as_ref(), &cluster, &who.to_string(), self.0.clock.now())
            .await
            .map_err(internal)?
            .ok_or_else(|| not_registered(&cluster))?;
        // Open trust streams of the cluster look again, find no registration, and end.
        self.0.nudge();
        tracing::warn!(caller = %who, %cluster, archive = %removed.archive, tokens_deleted = removed.tokens, "cluster removed; its agent identity is refused from now on");
        Ok(Response::new(RemoveClusterResponse { archive: removed.archive, tokens_deleted: removed.tokens as u32 }))
    }

    async fn issue_operator(
        &self,
        request: Request<IssueOperatorRequest>,
    ) -> Result<Response<OperatorCredentials>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        let r = request.into_inner();
        dns_label("operator name", &r.name)?;
        let max = crate::operators::OPERATOR_TTL;
        let ttl = lifetime("operator credentials' lifetime", r.ttl_seconds, max, max)?;
        let csr = meshca_pki::verify_csr(r.csr.as_bytes(), &meshca_pki::CsrPolicy::default())
            .map_err(|e| Status::invalid_argument(format!("operator CSR: {e}")))?;
        let cert = crate::operators::issue(
            self.0.store.as_ref(),
            &self.0.relay,
            &r.name,
            csr.public_key_spki(),
            ttl,
            self.0.clock.now(),
        )
        .await
        .map_err(internal)?;
        let issued = Caller::Operator { name: r.name };
        tracing::info!(caller = %who, %issued, serial = %cert.serial_hex(), "operator credentials issued");
        Ok(Response::new(OperatorCredentials {
            certificate: cert.to_pem(),
            relay_ca: self.0.relay.roots().to_pem(),
            serial: cert.serial_hex(),
            not_after: unix(cert.not_after()),
        }))
    }

    async fn revoke_operator(
        &self,
        request: Request<RevokeOperatorRequest>,
    ) -> Result<Response<RevokeOperatorResponse>, Status> {
        let who = operator(&self.0, &request).await?.caller;
        let serial = request.into_inner().serial.trim().to_ascii_uppercase();
        if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a certificate serial (hexadecimal, as `meshca inspect` prints it)",
                meshca_proto::text::bounded(&serial, 80)
            )));
        }
        let now = self.0.clock.now();
        let store = self.0.store.as_ref();
        let revoked = crate::operators::revoke(store, &serial, &who.to_string(), now).await.map_err(internal)?;
        tracing::warn!(caller = %who, %serial, name = %revoked.name, "operator certificate revoked");
        let replaced = match &self.0.local_operator {
            Some(local) => crate::operators::replace_local_if_revoked(store, &self.0.relay, local, &serial, now)
                .await
                .map_err(internal)?,
            None => false,
        };
        Ok(Response::new(RevokeOperatorResponse {
            serial,
            name: revoked.name,
            already_revoked: revoked.already,
            replaced_local_credentials: replaced,
        }))
    }

    async fn get_audit_log(&self, request: Request<GetAuditLogRequest>) -> Result<Response<AuditLog>, Status> {
        operator(&self.0, &request).await?;
        let log = audit::read_log(self.0.store.as_ref()).await.map_err(internal)?;
        let entries =
            log.entries.iter().map(|e| serde_json::to_string(e).map_err(internal)).collect::<Result<_, _>>()?;
        let head = match &log.head {
            Some(h) => serde_json::to_string(h).map_err(internal)?,
            None => String::new(),
        };
        Ok(Response::new(AuditLog { entries, head }))
    }

    async fn revoke_intermediate(
        &self,
        request: Request<RevokeIntermediateRequest>,
    ) -> Result<Response<RevokeIntermediateResponse>, Status> {
        use crate::revocation::{self, RevokeError};
        let who = operator(&self.0, &request).await?.caller;
        require_leader(&self.0)?;
        let r = request.into_inner();
        dns_label("cluster name", &r.cluster)?;
        let reason = if r.reason.trim().is_empty() {
            meshca_pki::Reason::KeyCompromise
        } else {
            r.reason.trim().parse().map_err(|e: meshca_pki::CrlError| Status::invalid_argument(e.to_string()))?
        };
        let serial = Some(r.serial.trim()).filter(|s| !s.is_empty());
        if let Some(s) = serial
            && meshca_pki::crl::serial_bytes(s.trim_start_matches("0x")).is_err()
        {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a certificate serial (hexadecimal, as `meshca status -o json` prints it)",
                meshca_proto::text::bounded(s, 80)
            )));
        }
        let now = self.0.clock.now();
        let store = self.0.store.as_ref();
        let out =
            revocation::revoke(store, &r.cluster, serial, reason, &who.to_string(), now).await.map_err(
                |e| match e {
                    RevokeError::NotRegistered(_) | RevokeError::UnknownSerial { .. } => {
                        Status::not_found(e.to_string())
                    }
                    RevokeError::NothingIssued(_) => Status::failed_precondition(e.to_string()),
                    RevokeError::Store(_) => internal(e),
                },
            )?;
        // Publish at once (the background publisher would within its next wake-up too); then every
        // trust stream looks again: the cluster re-issues, every cluster gets the CRL.
        // Each mesh's CRL lists what its own CAs issued: the mesh whose CA signed the serial
        // publishes a new one, and its number is the answer. Every mesh is looked at (the others
        // find nothing new and write nothing).
        let view = self.0.meshes.borrow().clone();
        let mut crl_number = 0;
        for mesh in view.meshes() {
            match revocation::publish(store, &mesh.keys, &mesh.authority(), now, self.0.settings.crl_ttl).await {
                Ok(Some(c)) if signed_by(&mesh.authority(), &out.revoked.issuer_fingerprint) => crl_number = c.number,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, policy = %mesh.name, "the revocation is recorded but the CRL could not be signed; the publisher retries")
                }
            }
        }
        self.0.nudge();
        let rv = &out.revoked;
        if out.already {
            tracing::info!(caller = %who, cluster = %r.cluster, serial = %rv.serial, "intermediate was already revoked");
        } else {
            tracing::warn!(caller = %who, cluster = %r.cluster, serial = %rv.serial, reason = %rv.reason, crl_number, "cluster intermediate revoked; the cluster re-issues with a new key");
        }
        Ok(Response::new(RevokeIntermediateResponse {
            cluster: r.cluster,
            serial: rv.serial.clone(),
            reason: rv.reason.clone(),
            revoked_at: rv.revoked_at,
            already_revoked: out.already,
            crl_number,
        }))
    }
}

/// Whether the mesh of `auth` signs with (or, during a root rotation, also publishes a CRL for)
/// the CA of fingerprint `issuer` — or, for a revocation recorded before issuers were kept, is
/// the signer at all.
fn signed_by(auth: &crate::authority::Authority, issuer: &str) -> bool {
    auth.signing().is_some_and(|s| {
        issuer.is_empty()
            || s.signer.cert().fingerprint() == issuer
            || s.crl_also.iter().any(|c| c.cert().fingerprint() == issuer)
    })
}

/// The labels of `meshca cluster add --label`, checked as Kubernetes checks labels.
fn cluster_labels(
    labels: std::collections::HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    const MAX_LABELS: usize = 32;
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!("a cluster has at most {MAX_LABELS} labels")));
    }
    for (k, v) in &labels {
        if !meshca_policy::is_label_key(k) {
            return Err(Status::invalid_argument(format!(
                "label key {:?} is not a Kubernetes label key",
                meshca_proto::text::bounded(k, 80)
            )));
        }
        if !meshca_policy::is_label_value(v) {
            return Err(Status::invalid_argument(format!(
                "label {k}: {:?} is not a Kubernetes label value",
                meshca_proto::text::bounded(v, 80)
            )));
        }
    }
    Ok(labels.into_iter().collect())
}

/// Refuses a name that is not a DNS-1123 label (as cluster and operator names are).
fn dns_label(what: &str, name: &str) -> Result<(), Status> {
    if meshca_policy::is_cluster_name(name) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!("{what} {:?} is not a DNS-1123 label", meshca_proto::text::bounded(name, 80))))
}

/// A requested lifetime in seconds: `default` when none (≤ 0), refused above `max`.
fn lifetime(what: &str, requested_secs: i64, default: Duration, max: Duration) -> Result<Duration, Status> {
    let ttl = if requested_secs <= 0 { default } else { Duration::from_secs(requested_secs.unsigned_abs()) };
    if ttl > max {
        return Err(Status::invalid_argument(format!("{what} is capped at {}s", max.as_secs())));
    }
    Ok(ttl)
}

fn not_registered(cluster: &str) -> Status {
    Status::not_found(format!("cluster {cluster} is not registered (`meshca status` lists the registered ones)"))
}
