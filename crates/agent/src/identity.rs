//! The agent's own identity: a relay-CA client certificate for mutual TLS to the management
//! plane. Obtained once with a bootstrap token, stored (key 0600) in the agent's store, reused
//! across restarts, and renewed at half life.

use std::sync::Arc;
use std::time::SystemTime;

use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::mgmt::registration_client::RegistrationClient;
use meshca_proto::mgmt::{AgentIdentity as AgentIdentityMsg, RegisterRequest};
use meshca_store::{ObjectKey, Precondition, Secret, Store};
use meshca_tls::{ClientAuth, Identity, ServerTrust, SwappableCert, Versions, grpc};
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;

use crate::AgentError;

const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";
const RELAY: &str = "relay-ca.pem";
const CLUSTER: &str = "cluster";

/// The agent's identity.
pub struct AgentIdentity {
    /// Client certificate.
    pub cert: Cert,
    /// Its key.
    pub key: PrivateKey,
    /// The relay CA (to verify the management plane).
    pub relay: RootSet,
    /// The cluster it speaks for.
    pub cluster: String,
}

impl AgentIdentity {
    /// Reads the stored identity; `Ok(None)` when there is none.
    pub async fn load(store: &dyn Store, key: &ObjectKey) -> Result<Option<Self>, AgentError> {
        let Some(v) = store.get(key).await? else { return Ok(None) };
        let s = &v.value;
        let need = |k: &str| s.get(k).ok_or_else(|| AgentError::Identity(format!("{key}: missing {k}")));
        let cert = Cert::from_pem(need(CERT)?).map_err(|e| AgentError::Identity(format!("{key}: {CERT}: {e}")))?;
        let pkey = PrivateKey::from_pem(need(KEY)?).map_err(|e| AgentError::Identity(format!("{key}: {KEY}: {e}")))?;
        let relay =
            RootSet::from_pem(need(RELAY)?).map_err(|e| AgentError::Identity(format!("{key}: {RELAY}: {e}")))?;
        let cluster = String::from_utf8_lossy(need(CLUSTER)?).into_owned();
        if !cert.has_public_key(pkey.public_key_spki()) {
            return Err(AgentError::Identity(format!("{key}: the key does not match the certificate")));
        }
        Ok(Some(AgentIdentity { cert, key: pkey, relay, cluster }))
    }

    /// Stores the identity atomically.
    pub async fn save(&self, store: &dyn Store, key: &ObjectKey) -> Result<(), AgentError> {
        let secret = Secret::with_data([
            (CERT, self.cert.to_pem().into_bytes()),
            (KEY, self.key.to_pkcs8_pem().as_bytes().to_vec()),
            (RELAY, self.relay.to_pem().into_bytes()),
            (CLUSTER, self.cluster.clone().into_bytes()),
        ])
        .label(meshca_store::labels::MANAGED_BY.0, meshca_store::labels::MANAGED_BY.1);
        store.put(key, &secret, Precondition::Any).await?;
        Ok(())
    }

    /// Builds an identity from the management plane's answer and the key the CSR was made with.
    pub fn from_response(r: AgentIdentityMsg, key: PrivateKey) -> Result<Self, AgentError> {
        let cert = Cert::from_pem(r.certificate.as_bytes())
            .map_err(|e| AgentError::Identity(format!("issued identity: {e}")))?;
        let relay =
            RootSet::from_pem(r.relay_ca.as_bytes()).map_err(|e| AgentError::Identity(format!("relay CA: {e}")))?;
        if !cert.has_public_key(key.public_key_spki()) {
            return Err(AgentError::Identity("the issued identity is not for our key".into()));
        }
        Ok(AgentIdentity { cert, key, relay, cluster: r.cluster })
    }

    /// The TLS form.
    pub fn tls(&self) -> Identity {
        Identity::new(&self.cert, &[], &self.key)
    }

    /// Whether half of the certificate's lifetime has passed.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        let life = self.cert.not_after().duration_since(self.cert.not_before()).unwrap_or_default();
        now >= self.cert.not_before() + life / 2
    }
}

/// A client config trusting `relay` for the server and presenting `client` (if any).
pub fn client_config(relay: &RootSet, client: Option<Arc<SwappableCert>>) -> Result<ClientConfig, AgentError> {
    let auth = match client {
        Some(c) => ClientAuth::Resolver(c as Arc<dyn ResolvesClientCert>),
        None => ClientAuth::None,
    };
    Ok(meshca_tls::client_config(ServerTrust::Roots(relay), auth, Versions::Tls13)?)
}

/// Registers with a bootstrap token: a fresh identity key, a CSR, and the relay CA given by the
/// operator (from `meshca cluster add`) to authenticate the management plane.
pub async fn register(
    server: &str,
    server_name: &str,
    relay_pem: &[u8],
    token: &str,
    cluster: &str,
) -> Result<AgentIdentity, AgentError> {
    let relay = RootSet::from_pem(relay_pem).map_err(|e| AgentError::Identity(format!("relay CA file: {e}")))?;
    let channel = grpc::channel(server, client_config(&relay, None)?, server_name)?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| AgentError::Identity(e.to_string()))?;
    let csr = build_csr(&key, &[]).map_err(|e| AgentError::Identity(e.to_string()))?;
    let resp = RegistrationClient::new(channel)
        .register(RegisterRequest {
            bootstrap_token: token.to_string(),
            identity_csr: csr,
            cluster: cluster.to_string(),
        })
        .await
        .map_err(AgentError::rpc("Register"))?;
    AgentIdentity::from_response(resp.into_inner(), key)
}
