//! CAs kept in the store: the generated root (option 1), the user's root or intermediate
//! (options 2 and 3), and the relay CA.

use std::time::SystemTime;

use meshca_pki::{CaSigner, Cert, KeyAlgorithm, PrivateKey, RootParams};
use meshca_store::{ObjectKey, Precondition, Secret, Store, StoreError};

use crate::error::MgmtError;

/// Data keys of a CA secret written by meshca.
const CERT_KEY: &str = "ca-cert.pem";
const KEY_KEY: &str = "ca-key.pem";

/// Loads the CA stored under `key`, creating it (self-signed, `params`) on first use. When two
/// replicas race, the first create wins and the other reads the winner's CA back, so there is
/// only ever one root.
pub async fn load_or_create_root(
    store: &dyn Store,
    key: &ObjectKey,
    alg: KeyAlgorithm,
    params: &RootParams,
    now: SystemTime,
) -> Result<CaSigner, MgmtError> {
    if let Some(v) = store.get(key).await? {
        return signer_from_secret(&v.value, "store", &key.to_string());
    }
    let signer = CaSigner::new_root(PrivateKey::generate(alg).map_err(|e| MgmtError::pki("root key", e))?, params, now)
        .map_err(|e| MgmtError::pki("root", e))?;
    let secret = Secret::with_data([
        (CERT_KEY, signer.cert().to_pem().into_bytes()),
        (KEY_KEY, signer.key().to_pkcs8_pem().as_bytes().to_vec()),
    ])
    .label(meshca_store::labels::MANAGED_BY.0, meshca_store::labels::MANAGED_BY.1);
    match store.put(key, &secret, Precondition::Absent).await {
        Ok(_) => {
            tracing::info!(ca = %key, subject = %signer.cert().subject(), "created CA");
            Ok(signer)
        }
        Err(StoreError::AlreadyExists(_)) => {
            let v =
                store.get(key).await?.ok_or_else(|| MgmtError::Pki(format!("{key} vanished after a create race")))?;
            signer_from_secret(&v.value, "store", &key.to_string())
        }
        Err(e) => Err(e.into()),
    }
}

/// A CA as a secret in meshca's own layout: `ca-cert.pem`, `ca-key.pem` (0600 like every key
/// the store writes), and `cert-chain.pem` (the certificate up to the root), which
/// [`signer_from_secret`] reads back.
pub fn secret_from_signer(signer: &CaSigner) -> Secret {
    Secret::with_data([
        (CERT_KEY, signer.cert().to_pem().into_bytes()),
        (KEY_KEY, signer.key().to_pkcs8_pem().as_bytes().to_vec()),
        ("cert-chain.pem", signer.chain_pems().concat().into_bytes()),
    ])
    .label(meshca_store::labels::MANAGED_BY.0, meshca_store::labels::MANAGED_BY.1)
}

/// The key pairs a CA secret may use: meshca's / Istio's (`ca-cert.pem`, `ca-key.pem`) or
/// Kubernetes TLS (`tls.crt`, `tls.key`). An optional chain above the certificate comes from
/// `cert-chain.pem` (Istio layout: the certificate first) and `root-cert.pem`, or `ca.crt` (TLS
/// layout: the issuer's chain). The result is ordered certificate first, root last, whatever order
/// the chain files use.
pub fn signer_from_secret(secret: &Secret, field: &'static str, name: &str) -> Result<CaSigner, MgmtError> {
    let bad = |reason: String| MgmtError::Secret { field, secret: name.to_string(), reason };
    let (cert_pem, key_pem, layout) = match (secret.get("tls.crt"), secret.get("tls.key")) {
        (Some(c), Some(k)) => (c, k, "tls"),
        _ => match (secret.get(CERT_KEY), secret.get(KEY_KEY)) {
            (Some(c), Some(k)) => (c, k, "istio"),
            _ => {
                let keys: Vec<&str> = secret.data.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "needs tls.crt and tls.key, or ca-cert.pem and ca-key.pem; it has [{}]",
                    keys.join(", ")
                )));
            }
        },
    };
    let mut certs = Cert::parse_pem_bundle(cert_pem).map_err(|e| bad(format!("certificate: {e}")))?;
    let key = PrivateKey::from_pem(key_pem).map_err(|e| bad(format!("key: {e}")))?;
    let above = match layout {
        "istio" => {
            let mut c = match secret.get("cert-chain.pem") {
                Some(chain) => Cert::parse_pem_bundle(chain).map_err(|e| bad(format!("cert-chain.pem: {e}")))?,
                None => Vec::new(),
            };
            if let Some(roots) = secret.get("root-cert.pem") {
                c.extend(Cert::parse_pem_bundle(roots).map_err(|e| bad(format!("root-cert.pem: {e}")))?);
            }
            c
        }
        _ => match secret.get("ca.crt") {
            Some(chain) => Cert::parse_pem_bundle(chain).map_err(|e| bad(format!("ca.crt: {e}")))?,
            None => Vec::new(),
        },
    };
    // A certificate file holding the whole chain (leaf first) is accepted too.
    let first = certs.remove(0);
    let mut pool: Vec<Cert> = Vec::new();
    for c in certs.into_iter().chain(above) {
        if c != first && !pool.contains(&c) {
            pool.push(c);
        }
    }
    let chain = order_chain(first, pool);
    CaSigner::new(key, chain).map_err(|e| bad(e.to_string()))
}

/// Orders `pool` into the path above `first`: each next certificate is the issuer of the last
/// (matched by name and verified by signature). Certificates not on the path are dropped.
fn order_chain(first: Cert, mut pool: Vec<Cert>) -> Vec<Cert> {
    let mut chain = vec![first];
    while let Some(last) = chain.last() {
        if last.is_self_issued() {
            break;
        }
        let Some(i) =
            pool.iter().position(|c| c.subject_der() == last.issuer_der() && last.verify_signed_by(c).is_ok())
        else {
            break;
        };
        chain.push(pool.remove(i));
    }
    chain
}
