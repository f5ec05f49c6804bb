//! What the serving layer counts, registered by each server into its own Prometheus registry
//! under its own prefix (`meshca_workload_ca_…`, `meshca_server_…`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::conn::CloseReason;

type Labels = Vec<(&'static str, &'static str)>;

/// Why a request was refused before it was worked on (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// The address's pre-authentication budget.
    PeerRate,
    /// The caller's (authenticated) identity's budget.
    IdentityRate,
    /// The admission queue was full.
    QueueFull,
    /// The request waited too long for its turn.
    QueueWait,
}

impl RefusedBy {
    fn label(self) -> &'static str {
        match self {
            RefusedBy::PeerRate => "peer_rate",
            RefusedBy::IdentityRate => "identity_rate",
            RefusedBy::QueueFull => "queue_full",
            RefusedBy::QueueWait => "queue_wait",
        }
    }
}

/// Connection and admission counters of one server. Clones share the same values.
#[derive(Debug, Clone, Default)]
pub struct ServeMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections accepted.
    pub accepted: Counter,
    /// Connections the server closed, by reason.
    closed: Family<Labels, Counter>,
    /// Accepts that failed for want of descriptors or socket memory.
    pub exhausted: Counter,
    /// Requests refused before they were worked on, by reason.
    refused: Family<Labels, Counter>,
    /// Requests being worked on (admitted).
    pub in_flight: Gauge,
    /// Requests waiting for their turn.
    pub queued: Gauge,
}

impl ServeMetrics {
    /// Counts a connection the server closed.
    pub fn closed(&self, reason: CloseReason) {
        self.closed.get_or_create(&vec![("reason", reason.label())]).inc();
    }

    /// How many connections were closed for `reason`.
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed.get_or_create(&vec![("reason", reason.label())]).get()
    }

    /// Counts a refused request.
    pub fn refused(&self, by: RefusedBy) {
        self.refused.get_or_create(&vec![("reason", by.label())]).inc();
    }

    /// How many requests were refused by `by`.
    pub fn refused_count(&self, by: RefusedBy) -> u64 {
        self.refused.get_or_create(&vec![("reason", by.label())]).get()
    }

    /// Registers every metric in `registry` (which the caller may have prefixed).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("connections_open", "Connections open now", self.open.clone());
        registry.register("connections_accepted", "Connections accepted", self.accepted.clone());
        registry.register(
            "connections_closed",
            "Connections the server closed, by reason (handshake_timeout, handshake_failed, preface_timeout, idle, shed, refused, stopping)",
            self.closed.clone(),
        );
        registry.register(
            "accept_resource_exhaustion",
            "Accepts that failed for want of file descriptors or socket memory (EMFILE, ENFILE, ENOBUFS)",
            self.exhausted.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused before they were worked on, by reason (peer_rate, identity_rate, queue_full, queue_wait)",
            self.refused.clone(),
        );
        registry.register("requests_in_flight", "Requests being worked on", self.in_flight.clone());
        registry.register("requests_queued", "Requests waiting for their turn", self.queued.clone());
    }
}
