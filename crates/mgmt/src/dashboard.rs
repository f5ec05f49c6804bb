//! The web dashboard (crate `meshca-dashboard`) on the management plane: it renders the same
//! status document as `meshca status -o json` ([`status::document`]), on its own HTTPS port,
//! with the management plane's serving certificate and the operators' relay-CA client
//! certificates.

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::SharedClock;
use meshca_dashboard::{LoginDigest, SourceError, StatusSource};
use meshca_store::Store;
use meshca_tls::SwappableCert;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::MgmtError;
use crate::meshes::MeshView;
use crate::relay::RelayCa;
use crate::status;

/// What the caller gives the management plane to serve the dashboard: a bound listener (so it
/// knows the address before the server starts, as `meshca up` prints it) and the digest of the
/// login token it showed the operator.
#[derive(Debug)]
pub struct DashboardListener {
    /// Where to serve.
    pub listener: TcpListener,
    /// The login token's digest.
    pub login: LoginDigest,
}

/// The status document, collected afresh at each request.
struct Status {
    store: Arc<dyn Store>,
    meshes: watch::Receiver<Arc<MeshView>>,
    report_interval: Duration,
    clock: SharedClock,
}

#[async_trait::async_trait]
impl StatusSource for Status {
    async fn document(&self) -> Result<serde_json::Value, SourceError> {
        let view = self.meshes.borrow().clone();
        let now = meshca_clock::unix(self.clock.now());
        let st = status::overview(self.store.as_ref(), &view, now, self.report_interval)
            .await
            .map_err(|e| SourceError(Box::new(e)))?;
        Ok(status::document(&st))
    }
}

/// Everything the dashboard is served from.
pub(crate) struct Wiring {
    pub store: Arc<dyn Store>,
    pub meshes: watch::Receiver<Arc<MeshView>>,
    pub report_interval: Duration,
    pub clock: SharedClock,
    pub relay: Arc<RelayCa>,
    pub serving: Arc<SwappableCert>,
}

/// Starts the dashboard in `tasks`; it stops when `cancel` fires.
pub(crate) fn spawn(
    d: DashboardListener,
    w: Wiring,
    cancel: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), MgmtError> {
    let tls = meshca_dashboard::server_config(w.relay.roots(), w.serving)?;
    if let Ok(addr) = d.listener.local_addr() {
        tracing::info!(%addr, "dashboard listening");
    }
    let source =
        Status { store: w.store, meshes: w.meshes, report_interval: w.report_interval, clock: w.clock.clone() };
    let dashboard = meshca_dashboard::Dashboard { source: Arc::new(source), login: d.login, clock: w.clock };
    tasks.spawn(async move {
        if let Err(e) = meshca_dashboard::serve(d.listener, tls, dashboard, cancel.cancelled_owned()).await {
            tracing::error!(error = %e, "the dashboard stopped");
        }
    });
    Ok(())
}
