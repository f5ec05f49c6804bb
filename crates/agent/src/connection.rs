//! The agent's connection to the management plane, replaced when its identity is renewed.
//!
//! A TLS client certificate is presented once per connection, and a gRPC channel keeps its
//! connection for as long as it works. After a renewal the management plane accepts the old
//! certificate only for a short overlap (the management plane's `identities` rules), so the agent must
//! not keep calling on a connection made with it: [`Connection::reconnect`] builds a new channel
//! (whose connections present the new certificate, through the same swappable resolver) and
//! every user — the intermediate source, the status reports, the trust stream — takes the new
//! one for its next call. The trust stream restarts on it at once. The old channel closes when
//! its last call has finished.

use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_tls::grpc;
use rustls::ClientConfig;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::AgentError;

/// The client of the certificate issuer service, replaceable.
#[derive(Clone)]
pub struct Connection {
    rx: watch::Receiver<CertificateIssuerClient<Channel>>,
    tx: std::sync::Arc<watch::Sender<CertificateIssuerClient<Channel>>>,
    server: String,
    server_name: String,
    config: ClientConfig,
}

impl Connection {
    /// A lazily connecting channel to `server` with `config` (which presents the agent's
    /// certificate through a swappable resolver).
    pub fn new(server: &str, server_name: &str, config: ClientConfig) -> Result<Self, AgentError> {
        let client = CertificateIssuerClient::new(grpc::channel(server, config.clone(), server_name)?);
        let (tx, rx) = watch::channel(client);
        Ok(Connection {
            rx,
            tx: std::sync::Arc::new(tx),
            server: server.to_string(),
            server_name: server_name.to_string(),
            config,
        })
    }

    /// The client for the next call.
    pub fn client(&self) -> CertificateIssuerClient<Channel> {
        self.rx.borrow().clone()
    }

    /// Resolves when the client was replaced since it was last taken with
    /// [`Connection::client_and_mark`]; never when nothing replaces it.
    pub async fn replaced(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The client, marking it seen for [`Connection::replaced`].
    pub fn client_and_mark(&mut self) -> CertificateIssuerClient<Channel> {
        self.rx.borrow_and_update().clone()
    }

    /// Opens a new channel for every later call (after the identity was renewed). Its TLS
    /// configuration gets a fresh session cache: a resumed TLS session carries the client
    /// certificate of the session it resumes, so resuming one made with the old certificate
    /// would present the replaced identity again on the new connection.
    pub fn reconnect(&self) -> Result<(), AgentError> {
        let mut config = self.config.clone();
        config.resumption = rustls::client::Resumption::default();
        let client = CertificateIssuerClient::new(grpc::channel(&self.server, config, &self.server_name)?);
        self.tx.send_replace(client);
        Ok(())
    }
}
