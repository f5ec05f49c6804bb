//! The process-wide rustls crypto provider.
//!
//! rustls panics in its config builders when more than one provider is compiled in and none is
//! installed, so every entry point (the binary's `main`, tests, benches) calls [`install`] first.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// Installs aws-lc-rs as the default provider; harmless when one is already installed.
pub fn install() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider meshca uses (aws-lc-rs), for building configs explicitly.
pub fn get() -> Arc<CryptoProvider> {
    install();
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}
