//! meshca's web dashboard: the mesh's chain of trust as a picture — the root set, the management
//! intermediate, every cluster's intermediate with its state, an expiry timeline of every
//! certificate, rotations in flight, alerts and recent issuance — live in a browser.
//!
//! The page renders the status document `meshca status -o json` prints (one source of truth:
//! the management plane's `status::document`), fetched from `/api/status` every two seconds.
//! This crate knows nothing of how that document is made; the management plane hands it a
//! [`StatusSource`].
//!
//! - [`auth`]: who may look — the operator's relay-CA client certificate, or a login token whose
//!   digest alone is kept, exchanged for a session cookie (`Secure; HttpOnly; SameSite=Strict`).
//! - [`http`]: the routes, the login page for anyone unauthenticated, and the security headers
//!   (a strict Content-Security-Policy) on every response.
//! - [`listener`]: HTTPS on tokio-rustls, with the client certificate handed to the handlers.
//! - [`assets`]: the page, its script and style, and the vendored d3 modules, embedded in the
//!   binary (no network, no CDN).
#![forbid(unsafe_code)]

pub mod assets;
pub mod auth;
pub mod http;
pub mod listener;

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::SharedClock;
use tokio::net::TcpListener;

pub use auth::{LoginDigest, LoginToken, Sessions};
pub use listener::server_config;

/// Where the page's data comes from: the mesh's status document, as `meshca status -o json`
/// prints it.
#[async_trait::async_trait]
pub trait StatusSource: Send + Sync + 'static {
    /// The current status document.
    async fn document(&self) -> Result<serde_json::Value, SourceError>;
}

/// The status could not be collected (the store did not answer); the page says so and retries.
#[derive(Debug, thiserror::Error)]
#[error("the mesh's status is unavailable: {0}")]
pub struct SourceError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// What can stop the dashboard from starting.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The system's random generator failed (no token or session can be made).
    #[error("the random generator failed; no login token or session can be made")]
    Random,
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// The server stopped on an I/O error.
    #[error("the dashboard server: {0}")]
    Io(#[source] std::io::Error),
}

/// How long a session lasts after logging in with the token (then the login page again).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Everything the dashboard serves from.
pub struct Dashboard {
    /// The status document's source.
    pub source: Arc<dyn StatusSource>,
    /// The digest of the login token (the token itself is shown once to the operator).
    pub login: LoginDigest,
    /// The time sessions expire on.
    pub clock: SharedClock,
}

/// Serves the dashboard on `listener` with `tls` (see [`server_config`]) until `shutdown`
/// resolves, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dashboard: Dashboard,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    let app = http::router(http::AppState::new(dashboard, SESSION_TTL));
    let listener = listener::TlsListener::new(listener, tls, listener::LIMITS).map_err(DashboardError::Io)?;
    axum::serve(listener, app.into_make_service_with_connect_info::<listener::Peer>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DashboardError::Io)
}
