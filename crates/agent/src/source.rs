//! Where a cluster intermediate comes from. The agent's loop (when to renew, validating, writing
//! `cacerts`, backoff, status) is the same for every source; only this step differs: the
//! management plane's issuer service, or Vault in the Vault mode.

use meshca_pki::bundle::BundleFiles;
use meshca_pki::{CaBundle, Cert, KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::IssueReason;
use meshca_proto::mgmt::{IssueIntermediateRequest, IssueIntermediateResponse, TrustState};

use crate::AgentError;
use crate::connection::Connection;

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
    pub reason: IssueReason,
    /// What the management plane last said: the policy's parameters (lifetime, and in Vault mode
    /// the policy's `vault` block) for sources that are not the management plane itself.
    pub trust: &'a TrustState,
}

/// Where an intermediate's key lives once written, as reported in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLocation {
    /// In the store (a Secret or a directory).
    Store,
    /// Only in a memory-backed folder (Vault mode).
    Memory,
}

impl KeyLocation {
    /// The name status reports.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLocation::Store => "store",
            KeyLocation::Memory => "memory",
        }
    }
}

/// A source of cluster intermediates.
#[async_trait::async_trait]
pub trait IntermediateSource: Send + Sync {
    /// Where the intermediate's key lives once written.
    fn key_location(&self) -> KeyLocation;

    /// Whether this source obtains intermediates in Vault mode (the Vault agent). The
    /// management plane signs nothing then, so an agent whose source it is leaves the
    /// intermediates to the Vault agent.
    fn serves_vault_mode(&self) -> bool {
        false
    }

    /// Obtains a new intermediate. Implementations generate a fresh key for every call (or have
    /// the upstream generate it) and never write it anywhere themselves.
    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError>;

    /// The CRLs of the CAs above the cluster intermediate (PEM), when this source's upstream
    /// publishes its own (Vault's PKI). `None`: the management plane's, in `TrustState.crl`.
    async fn upstream_crls(&self, _trust: &TrustState) -> Option<Result<String, AgentError>> {
        None
    }
}

/// The subject an agent puts in its CSR: informative only (the issuer decides the certificate's
/// subject), but the management plane checks `L=` names the calling cluster.
pub fn csr_for(key: &PrivateKey, organization: &str, cluster: &str) -> Result<String, AgentError> {
    build_csr(key, &meshca_pki::profile::cluster_intermediate_subject(organization, cluster))
        .map_err(|e| AgentError::Identity(e.to_string()))
}

/// The management plane's certificate issuer service.
pub struct ManagementSource {
    /// The mTLS connection (replaced when the agent's identity is renewed).
    pub issuer: Connection,
}

#[async_trait::async_trait]
impl IntermediateSource for ManagementSource {
    fn key_location(&self) -> KeyLocation {
        KeyLocation::Store
    }

    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError> {
        const CALL: &str = "IssueIntermediate";
        let key = PrivateKey::generate(req.key_algorithm).map_err(|e| AgentError::Identity(e.to_string()))?;
        let csr = csr_for(&key, meshca_policy::defaults::ORGANIZATION, req.cluster)?;
        let resp = self
            .issuer
            .client()
            .issue_intermediate(IssueIntermediateRequest { csr, reason: req.reason as i32 })
            .await
            .map_err(AgentError::rpc(CALL))?
            .into_inner();
        obtained(&key, resp)
    }
}

/// The `cacerts` files for `key` and the issuer's answer (not yet validated).
pub fn obtained(key: &PrivateKey, resp: IssueIntermediateResponse) -> Result<Obtained, AgentError> {
    const CALL: &str = "IssueIntermediate";
    let bad =
        |what: &str, e: &dyn std::fmt::Display| AgentError::BadAnswer { call: CALL, reason: format!("{what}: {e}") };
    let cert = Cert::from_pem(resp.certificate.as_bytes()).map_err(|e| bad("certificate", &e))?;
    let chain = resp
        .chain
        .iter()
        .map(|p| Cert::from_pem(p.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("chain", &e))?;
    let roots = RootSet::from_pem(resp.root_set.as_bytes()).map_err(|e| bad("root set", &e))?;
    Ok(Obtained { files: CaBundle::assemble(key, &cert, &chain, &roots), serial: resp.serial })
}
