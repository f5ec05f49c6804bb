//! The operator API: bootstrap tokens, status, rotations and policy changes, for callers with an
//! operator identity.

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::unix;
use meshca_policy::Policy;
use meshca_proto::mgmt::{
    ApplyPolicyRequest, ApplyPolicyResponse, BootstrapToken, CreateBootstrapTokenRequest, GetStatusRequest, MeshStatus,
    RotateRequest, RotateResponse, RotateRootRequest, RotateRootResponse, operator_server::Operator,
};
use meshca_store::typed;
use tonic::{Request, Response, Status};

use crate::grpc::{Shared, internal, operator, require_leader};
use crate::records::{self, ClusterRecord};
use crate::{status, tokens};

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
        let ttl =
            if r.ttl_seconds <= 0 { s.default_token_ttl } else { Duration::from_secs(r.ttl_seconds.unsigned_abs()) };
        if ttl > s.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "token lifetime is capped at {}s",
                s.max_token_ttl.as_secs()
            )));
        }
        let t = tokens::create(self.0.store.as_ref(), &r.cluster, ttl, self.0.clock.now()).await.map_err(internal)?;
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
            status::collect(self.0.store.as_ref(), &auth, unix(self.0.clock.now()), self.0.settings.report_interval)
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
        let trial = crate::authority::load(self.0.store.as_ref(), policy.clone(), self.0.clock.now()).await;
        if let Some(e) = trial.error() {
            return Err(Status::failed_precondition(e.to_string()));
        }
        self.0.policy_source.apply(&text).await.map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(operator = %who, policy = %policy.name, "policy applied");
        // Wait for the loader to put it in force, so the answer says what it led to.
        let mut rx = self.0.authority.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let current = rx.borrow().clone();
            if current.policy == policy {
                if let Some(e) = current.error() {
                    return Err(Status::failed_precondition(e.to_string()));
                }
                return Ok(Response::new(ApplyPolicyResponse { policy_generation: current.generation.clone() }));
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(Status::deadline_exceeded("the policy was stored but has not been loaded yet"));
            }
        }
    }

    async fn rotate_root(&self, request: Request<RotateRootRequest>) -> Result<Response<RotateRootResponse>, Status> {
        use crate::rotation::RotateError;
        let who = operator(&request)?;
        require_leader(&self.0)?;
        let abort = request.into_inner().abort;
        let result = if abort { self.0.rotation.abort().await } else { self.0.rotation.start().await };
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
}
