//! A certificate that can be replaced while a server or client keeps running.
//!
//! Rotation works by swapping the `CertifiedKey` behind an `ArcSwap`: handshakes already under way
//! keep the old one, new handshakes get the new one. Nothing is torn down, so nothing fails.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, client};

/// A swappable certificate, usable as a server certificate and as a client certificate.
#[derive(Debug)]
pub struct SwappableCert {
    current: ArcSwap<CertifiedKey>,
}

impl SwappableCert {
    /// Starts with `initial`.
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(SwappableCert { current: ArcSwap::new(initial) })
    }

    /// Replaces the certificate for every later handshake.
    pub fn swap(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }

    /// The current certificate.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for SwappableCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let ck = self.current.load_full();
        // Only offer the certificate when the server accepts our key's scheme.
        ck.key.choose_scheme(sigschemes).map(|_| ck)
    }

    fn has_certs(&self) -> bool {
        true
    }

    fn only_raw_public_keys(&self) -> bool {
        false
    }
}

/// Keeps the trait object types readable where configs are built.
pub type ClientResolver = Arc<dyn client::ResolvesClientCert>;
