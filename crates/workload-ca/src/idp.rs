//! A demo identity provider: an ES256 key that mints Kubernetes-shaped service-account tokens,
//! and the JWKS the workload CAs trust. It stands in for a cluster's service-account issuer when
//! `meshca up` runs without Kubernetes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshca_pki::{KeyAlgorithm, PrivateKey};
use serde::Serialize;

use crate::authn::AuthError;

/// The demo issuer.
pub struct DemoIdp {
    issuer: String,
    key: PrivateKey,
    kid: String,
}

impl std::fmt::Debug for DemoIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoIdp").field("issuer", &self.issuer).field("kid", &self.kid).finish()
    }
}

#[derive(Serialize)]
struct K8s<'a> {
    namespace: &'a str,
    serviceaccount: Name<'a>,
}

#[derive(Serialize)]
struct Name<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: String,
    aud: Vec<&'a str>,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: K8s<'a>,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl DemoIdp {
    /// A new issuer with a fresh P-256 key.
    pub fn generate(issuer: &str) -> Result<Self, AuthError> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(Self::with_key(key, issuer))
    }

    /// An issuer with an existing P-256 key (PEM).
    pub fn from_key(pem: &[u8], issuer: &str) -> Result<Self, AuthError> {
        let key = PrivateKey::from_pem(pem).map_err(|e| AuthError::Unavailable(e.to_string()))?;
        if key.kind() != KeyAlgorithm::EcdsaP256.kind() {
            return Err(AuthError::Unavailable("the demo issuer key must be ECDSA P-256".into()));
        }
        Ok(Self::with_key(key, issuer))
    }

    fn with_key(key: PrivateKey, issuer: &str) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key_spki());
        let kid = hex::encode(&digest.as_ref()[..8]);
        DemoIdp { issuer: issuer.to_string(), key, kid }
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The signing key as PKCS#8 PEM (to keep it on disk, 0600).
    pub fn key_pem(&self) -> String {
        self.key.to_pkcs8_pem().to_string()
    }

    /// The JWKS with the public key.
    pub fn jwks_json(&self) -> String {
        // The last 65 bytes of a P-256 SubjectPublicKeyInfo are the uncompressed point 04||X||Y.
        let spki = self.key.public_key_spki();
        let point = &spki[spki.len() - 65..];
        serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            }]
        })
        .to_string()
    }

    /// Mints a service-account token for `namespace/service_account` with audience `aud`.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        aud: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, AuthError> {
        let t = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = Claims {
            iss: &self.issuer,
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![aud],
            iat: t,
            nbf: t,
            exp: t.saturating_add(ttl.as_secs()),
            kubernetes: K8s { namespace, serviceaccount: Name { name: service_account } },
        };
        self.sign_claims(&claims)
    }

    /// Signs any claims with the issuer's key: what a trusted issuer could send, including claims
    /// no well-behaved issuer would (tests use it for huge or malformed times).
    pub fn sign_claims(&self, claims: &impl Serialize) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_der(self.key.pkcs8_der());
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| AuthError::Unavailable(format!("minting: {e}")))
    }
}
