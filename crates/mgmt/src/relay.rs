//! The relay CA: issues the control plane's own identities — agents' and operators' client
//! certificates and the management plane's serving certificate. It is deliberately not the mesh
//! root: a control-plane credential can never authenticate a workload, nor the reverse.

use std::time::{Duration, SystemTime};

use meshca_pki::{CaSigner, Cert, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet, SpiffeId, TrustDomain};
use meshca_proto::identity::{Caller, RELAY_TRUST_DOMAIN};
use meshca_store::Store;

use crate::castore;
use crate::error::MgmtError;
use crate::records;

/// The relay CA.
#[derive(Debug)]
pub struct RelayCa {
    signer: CaSigner,
    roots: RootSet,
}

impl RelayCa {
    /// Loads the relay CA from the store, creating it on first start.
    pub async fn load_or_create(store: &dyn Store, now: SystemTime) -> Result<Self, MgmtError> {
        let params = RootParams {
            organization: "meshca".into(),
            common_name: "meshca relay CA".into(),
            ttl: Duration::from_secs(10 * 365 * 86400),
        };
        let signer =
            castore::load_or_create_root(store, &records::relay_ca(), KeyAlgorithm::EcdsaP256, &params, now).await?;
        let roots = RootSet::from_certs(vec![signer.cert().clone()]).map_err(|e| MgmtError::pki("relay CA", e))?;
        Ok(RelayCa { signer, roots })
    }

    /// The relay CA as a root set (what agents and operators pin).
    pub fn roots(&self) -> &RootSet {
        &self.roots
    }

    /// The relay CA certificate.
    pub fn cert(&self) -> &Cert {
        self.signer.cert()
    }

    /// Issues a client certificate for `caller` to the key in `spki_der`.
    pub fn issue_identity(
        &self,
        spki_der: &[u8],
        caller: &Caller,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Cert, MgmtError> {
        let td = TrustDomain::new(RELAY_TRUST_DOMAIN).map_err(|e| MgmtError::pki("relay trust domain", e))?;
        let uri = caller.uri();
        let path = uri.trim_start_matches(&format!("spiffe://{RELAY_TRUST_DOMAIN}/")).to_string();
        let id = SpiffeId::new(td, &path).map_err(|e| MgmtError::pki("identity", e))?;
        let issued = self
            .signer
            .sign_leaf(spki_der, &LeafParams::workload(id, ttl), now)
            .map_err(|e| MgmtError::pki("identity", e))?;
        issued.parse().map_err(|e| MgmtError::pki("identity", e))
    }

    /// Issues the management plane's serving certificate for `dns_names`, with a fresh key.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Cert, PrivateKey), MgmtError> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| MgmtError::pki("serving key", e))?;
        let params = LeafParams { identity: None, dns_names: dns_names.to_vec(), ttl };
        let cert = self
            .signer
            .sign_leaf(key.public_key_spki(), &params, now)
            .and_then(|i| i.parse().map_err(meshca_pki::IssueError::from))
            .map_err(|e| MgmtError::pki("serving certificate", e))?;
        Ok((cert, key))
    }
}
