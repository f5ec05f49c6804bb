//! HTTPS for the dashboard: tokio-rustls under axum, with the client's certificate (when it
//! sent one) reaching the handlers as a [`Peer`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use meshca_pki::{Cert, RootSet};
use meshca_proto::identity::{Caller, RELAY_TRUST_DOMAIN};
use meshca_serve::https::{Limits, PeerOf};
use meshca_tls::{PeerPolicy, SpiffeVerifier, TlsError};
use rustls::server::ResolvesServerCert;

/// The dashboard's TLS configuration: the management plane's serving certificate (`cert`), and
/// an optional client certificate that must be an operator identity issued by the relay CA
/// (`relay`). A browser without one connects and gets the login page; a certificate that is not
/// an operator's (a cluster's agent, another CA) fails the handshake.
pub fn server_config(
    relay: &RootSet,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let operators =
        SpiffeVerifier::new(relay, PeerPolicy::UriPrefix(format!("spiffe://{RELAY_TRUST_DOMAIN}/operator/")), false)?;
    let mut config = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(operators)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The operator named by the client certificate, when one was presented (the handshake
    /// already checked it against the relay CA).
    pub operator: Option<String>,
}

impl PeerOf for Peer {
    fn of(addr: SocketAddr, tls: Option<&rustls::ServerConnection>) -> Self {
        let operator = tls.and_then(|s| s.peer_certificates()).and_then(|c| c.first()).and_then(operator_name);
        Peer { addr, operator }
    }
}

/// The dashboard's HTTPS listener: TLS handshakes within [`meshca_serve::https::HANDSHAKE_TIMEOUT`],
/// at most [`meshca_serve::https::MAX_CONNECTIONS`] connections open (the dashboard is for a few
/// operators' browsers).
pub type TlsListener = meshca_serve::https::TlsListener<Peer>;

/// The dashboard's listener limits.
pub const LIMITS: Limits = Limits::new("dashboard");

/// The operator a certificate names, if it names one.
fn operator_name(der: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let cert = Cert::from_der(der.to_vec()).ok()?;
    cert.uri_sans().iter().find_map(|u| match Caller::from_uri(u) {
        Some(Caller::Operator { name }) => Some(name),
        _ => None,
    })
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
