//! Where a cluster intermediate comes from. The agent's loop (when to renew, validating, writing
//! `cacerts`, backoff, status) is the same for every source; only this step differs: the
//! management plane's issuer service, or Vault in the Vault mode.

use meshca_pki::bundle::BundleFiles;
use meshca_pki::name::NameAttr;
use meshca_pki::{KeyAlgorithm, PrivateKey, build_csr};
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::{IssueIntermediateRequest, TrustState};
use tonic::transport::Channel;

use crate::AgentError;
use crate::plan::Reason;

/// A new intermediate: the four `cacerts` files (key included) and what to record about it.
pub struct Obtained {
    /// The bundle, not yet validated.
    pub files: BundleFiles,
    /// Serial, uppercase hex (for logs and annotations).
    pub serial: String,
}

/// What a source needs to know for one request.
pub struct Request<'a> {
    /// The cluster.
    pub cluster: &'a str,
    /// Key algorithm the policy asks for.
    pub key_algorithm: KeyAlgorithm,
    /// Why.
    pub reason: Reason,
    /// What the management plane last said: the policy's parameters (lifetime, and in Vault mode
    /// the policy's `vault` block) for sources that are not the management plane itself.
    pub trust: &'a TrustState,
}

/// A source of cluster intermediates.
#[async_trait::async_trait]
pub trait IntermediateSource: Send + Sync {
    /// Where the intermediate's key lives once written: `store` (a Secret or directory) or
    /// `memory` (a memory-backed folder, in Vault mode). Reported in status.
    fn key_location(&self) -> &'static str;

    /// Obtains a new intermediate. Implementations generate a fresh key for every call (or have
    /// the upstream generate it) and never write it anywhere themselves.
    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError>;
}

/// The subject an agent puts in its CSR: informative only (the issuer decides the certificate's
/// subject), but the management plane checks `L=` names the calling cluster.
pub fn csr_for(key: &PrivateKey, cluster: &str) -> Result<String, AgentError> {
    build_csr(
        key,
        &[
            (NameAttr::Organization, "meshca"),
            (NameAttr::CommonName, "meshca intermediate"),
            (NameAttr::Locality, cluster),
        ],
    )
    .map_err(|e| AgentError::Identity(e.to_string()))
}

/// The management plane's certificate issuer service.
pub struct ManagementSource {
    /// The mTLS client.
    pub issuer: CertificateIssuerClient<Channel>,
}

#[async_trait::async_trait]
impl IntermediateSource for ManagementSource {
    fn key_location(&self) -> &'static str {
        "store"
    }

    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError> {
        let key = PrivateKey::generate(req.key_algorithm).map_err(|e| AgentError::Identity(e.to_string()))?;
        let csr = csr_for(&key, req.cluster)?;
        let resp = self
            .issuer
            .clone()
            .issue_intermediate(IssueIntermediateRequest { csr, reason: req.reason.as_str().into() })
            .await
            .map_err(AgentError::from_status)?
            .into_inner();
        let mut chain_pem = resp.certificate.clone();
        for c in &resp.chain {
            chain_pem.push_str(c);
        }
        Ok(Obtained {
            files: BundleFiles {
                ca_cert: resp.certificate.into_bytes(),
                ca_key: key.to_pkcs8_pem().as_bytes().to_vec().into(),
                cert_chain: chain_pem.into_bytes(),
                root_cert: resp.root_set.into_bytes(),
            },
            serial: resp.serial,
        })
    }
}
