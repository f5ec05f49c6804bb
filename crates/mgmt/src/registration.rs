//! Registration: a single-use bootstrap token and an identity CSR in, the agent's relay-CA client
//! certificate out. Also the renewal of that identity.

use std::sync::Arc;

use meshca_clock::unix;
use meshca_pki::{Cert, CsrPolicy, KeyAlgorithm, VerifiedCsr, verify_csr};
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{AgentIdentity, RegisterRequest, registration_server::Registration};
use meshca_store::typed;
use tonic::{Request, Response, Status};

use crate::grpc::{Shared, internal};
use crate::records::{self, ClusterRecord};
use crate::tokens;

/// Checks an agent identity CSR: a P-256 key, proven by the CSR's signature.
pub(crate) fn verify_identity_csr(csr_pem: &str) -> Result<VerifiedCsr, Status> {
    verify_csr(csr_pem.as_bytes(), &CsrPolicy::exactly(KeyAlgorithm::EcdsaP256.kind()))
        .map_err(|e| Status::invalid_argument(format!("identity CSR: {e}")))
}

/// Issues `cluster`'s agent a client certificate for the key of `csr` (checked by
/// [`verify_identity_csr`]), and records its serial in the cluster's record (creating the record
/// on first registration).
pub(crate) async fn issue_identity(s: &Shared, csr: &VerifiedCsr, cluster: &str) -> Result<Cert, Status> {
    let now = s.clock.now();
    let cert = s
        .relay
        .issue_identity(
            csr.public_key_spki(),
            &Caller::Agent { cluster: cluster.to_string() },
            s.settings.identity_ttl,
            now,
        )
        .map_err(internal)?;
    let serial = cert.serial_hex();
    typed::update::<ClusterRecord, _>(s.store.as_ref(), &records::cluster(cluster).map_err(internal)?, |cur| {
        let mut rec = cur.cloned().unwrap_or(ClusterRecord {
            name: cluster.to_string(),
            registered_at: unix(now),
            ..Default::default()
        });
        rec.identity_serial = serial.clone();
        Some(rec)
    })
    .await
    .map_err(internal)?;
    Ok(cert)
}

/// The registration service.
pub struct RegistrationService(pub Arc<Shared>);

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<AgentIdentity>, Status> {
        let r = request.into_inner();
        // Check the CSR before touching the token, so a bad request does not burn it.
        let csr = verify_identity_csr(&r.identity_csr)?;
        let s = &self.0;
        let cluster = match tokens::consume(s.store.as_ref(), &r.bootstrap_token, Some(&r.cluster), s.clock.now()).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(reason = %e, "registration refused");
                return Err(Status::unauthenticated(e.to_string()));
            }
            Err(e) => return Err(internal(e)),
        };
        let cert = issue_identity(s, &csr, &cluster).await?;
        tracing::info!(%cluster, serial = %cert.serial_hex(), "cluster registered");
        Ok(Response::new(s.identity_response(&cert, &cluster)))
    }
}
