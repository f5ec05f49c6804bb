//! A TLS identity: a certificate chain (leaf first) and its private key.

use std::sync::Arc;

use meshca_pki::{Cert, PrivateKey};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{TlsError, provider};

/// A certificate chain and key. The chain should not include the root (peers have it).
pub struct Identity {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("chain_len", &self.chain.len()).field("key", &"[secret elided]").finish()
    }
}

impl Identity {
    /// Builds an identity from a leaf, the intermediates above it and the leaf's key.
    pub fn new(leaf: &Cert, intermediates: &[Cert], key: &PrivateKey) -> Self {
        let mut chain = vec![CertificateDer::from(leaf.der().to_vec())];
        chain.extend(intermediates.iter().map(|c| CertificateDer::from(c.der().to_vec())));
        Identity { chain, key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec())) }
    }

    /// From raw DER pieces.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Identity { chain, key }
    }

    /// The rustls signing form.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let signer = provider::get().key_provider.load_private_key(self.key.clone_key())?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signer)))
    }

    /// The private key, for building rustls configs.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}
