//! How meshca's gRPC servers (the workload CA and the management plane) meet the network, so that
//! whoever can reach their port cannot take them down:
//!
//! - [`server`]: connections and calls as tasks the server owns, with handshake, HTTP/2 preface
//!   and idle timeouts, and a bounded graceful drain on stop;
//! - [`conn`]: connection caps per address, per client identity and in total, shedding the
//!   oldest idle connection first;
//! - [`fd`]: telling descriptor exhaustion apart from other I/O errors, and sizing the total cap
//!   under the open-file limit;
//! - [`limit`]: rate limits keyed by address (before authentication) or identity (after);
//! - [`admission`]: a bounded, fair queue in front of expensive work (a herd of re-requests);
//! - [`pushback`]: `RESOURCE_EXHAUSTED` carrying a retry hint;
//! - [`metrics`]: what all of that counts;
//! - [`https`]: the same care (handshake deadline, connection cap) for the small HTTPS servers
//!   (the dashboard, the SPIFFE bundle endpoint).
#![forbid(unsafe_code)]

pub mod admission;
pub mod conn;
pub mod fd;
pub mod https;
pub mod limit;
pub mod metrics;
pub mod pushback;
pub mod server;

pub use admission::{Admission, AdmissionConfig, Refusal};
pub use conn::Caps;
pub use limit::{KeyedLimiter, PeerKey, Rate};
pub use metrics::{RefusedBy, ServeMetrics};
pub use pushback::resource_exhausted;
pub use server::{GrpcServer, Route, ServeConfig};

/// The address key of a request: where its connection came from, or [`PeerKey::unknown`] for a
/// request that did not come over a connection (an in-process call).
pub fn peer_key<T>(request: &tonic::Request<T>) -> PeerKey {
    request.remote_addr().map(|a| PeerKey::of(a.ip())).unwrap_or_else(PeerKey::unknown)
}

/// Waits up to `grace` for a server's child tasks (already told to stop) to end, then aborts the
/// rest: a stopping server never waits on a child for ever. Panics in children are logged.
pub async fn stop_children(tasks: &mut tokio::task::JoinSet<()>, grace: std::time::Duration, server: &str) {
    let drained = tokio::time::timeout(grace, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r
                && e.is_panic()
            {
                tracing::error!(error = %e, "a {server} task panicked");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), ?grace, "{server} tasks did not stop in time; aborting them");
        tasks.shutdown().await;
    }
}
