//! Registration: a single-use bootstrap token and an identity CSR in, the agent's relay-CA client
//! certificate out. Also the renewal of that identity. Which identities are accepted afterwards
//! is decided in [`crate::identities`]; here the decisions are carried out: the certificate is
//! issued first and handed out only once the cluster's record names it (a compare-and-swap, so a
//! racing renewal or removal wins cleanly and nothing unrecorded is ever handed out).

use std::sync::Arc;

use meshca_clock::unix;
use meshca_pki::{Cert, CsrPolicy, KeyAlgorithm, VerifiedCsr, verify_csr};
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{AgentIdentity, RegisterRequest, registration_server::Registration};
use meshca_store::typed;
use tonic::{Request, Response, Status};

use crate::grpc::{Shared, internal};
use crate::identities::{self, NewIdentity};
use crate::records::{self, ClusterRecord};
use crate::tokens;

fn identity_csr(csr_pem: &str) -> Result<VerifiedCsr, Status> {
    verify_csr(csr_pem.as_bytes(), &CsrPolicy::exactly(KeyAlgorithm::EcdsaP256.kind()))
        .map_err(|e| Status::invalid_argument(format!("identity CSR: {e}")))
}

/// Issues `cluster`'s agent a client certificate for the key in `csr`.
fn issue(s: &Shared, csr: &VerifiedCsr, cluster: &str) -> Result<(Cert, NewIdentity), Status> {
    let cert = s
        .relay
        .issue_identity(
            csr.public_key_spki(),
            &Caller::Agent { cluster: cluster.to_string() },
            s.settings.identity_ttl,
            s.clock.now(),
        )
        .map_err(internal)?;
    let key_sha256 = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr.public_key_spki()).as_ref());
    let new = NewIdentity { serial: cert.serial_hex(), key_sha256 };
    Ok((cert, new))
}

/// Registers `cluster` (its token already consumed): the new identity replaces every earlier one
/// at once, and open trust streams of earlier identities end.
async fn register_identity(
    s: &Shared,
    csr: &VerifiedCsr,
    cluster: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<Cert, Status> {
    let (cert, new) = issue(s, csr, cluster)?;
    let now = unix(s.clock.now());
    typed::update::<ClusterRecord, _>(s.store.as_ref(), &records::cluster(cluster).map_err(internal)?, |cur| {
        // The token's labels are the cluster's from now on (they place it in a mesh).
        Some(ClusterRecord { labels: labels.clone(), ..identities::registered(cur, cluster, &new, now) })
    })
    .await
    .map_err(internal)?;
    s.nudge();
    Ok(cert)
}

/// Renews the identity of `cluster`'s agent, which called with the certificate `presented`.
pub(crate) async fn renew_identity(s: &Shared, csr_pem: &str, cluster: &str, presented: &str) -> Result<Cert, Status> {
    let csr = identity_csr(csr_pem)?;
    let (cert, new) = issue(s, &csr, cluster)?;
    let now = unix(s.clock.now());
    let overlap = s.settings.identity_overlap;
    let mut refused = None;
    typed::update::<ClusterRecord, _>(s.store.as_ref(), &records::cluster(cluster).map_err(internal)?, |cur| {
        let Some(rec) = cur else {
            refused = Some(identities::Refused::NotRegistered(cluster.to_string()));
            return None;
        };
        match identities::renewed(rec, presented, &new, now, overlap) {
            Ok(next) => {
                refused = None;
                Some(next)
            }
            Err(r) => {
                refused = Some(r);
                None
            }
        }
    })
    .await
    .map_err(internal)?;
    if let Some(r) = refused {
        tracing::warn!(%cluster, serial = %presented, reason = %r, "an identity renewal was refused");
        return Err(Status::unauthenticated(r.to_string()));
    }
    tracing::info!(%cluster, serial = %new.serial, replaced = %presented, "agent identity renewed");
    s.nudge();
    Ok(cert)
}

/// The registration service.
pub struct RegistrationService(pub Arc<Shared>);

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<AgentIdentity>, Status> {
        // Registration is the one call anyone may make: its address pays first.
        self.0.charge_anonymous(&request)?;
        let r = request.into_inner();
        // Check the CSR before touching the token, so a bad request does not burn it.
        let csr = identity_csr(&r.identity_csr)?;
        let s = &self.0;
        let (cluster, labels) =
            match tokens::consume(s.store.as_ref(), &r.bootstrap_token, Some(&r.cluster), s.clock.now()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(reason = %e, "registration refused");
                    return Err(Status::unauthenticated(e.to_string()));
                }
                Err(e) => return Err(internal(e)),
            };
        let cert = register_identity(s, &csr, &cluster, &labels).await?;
        tracing::info!(%cluster, serial = %cert.serial_hex(), "cluster registered; any earlier identity of it is refused from now on");
        let event = crate::audit::Event::new(
            crate::audit::Action::ClusterRegistered,
            meshca_proto::identity::Caller::Agent { cluster: cluster.clone() }.to_string(),
            &cluster,
        )
        .with("identitySerial", cert.serial_hex());
        crate::audit::record(s.store.as_ref(), event, s.clock.now()).await;
        Ok(Response::new(s.identity_response(&cert, &cluster)))
    }
}
