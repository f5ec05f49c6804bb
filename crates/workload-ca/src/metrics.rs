//! Prometheus metrics with istiod's names (`citadel_server_*`), plus an issuance latency
//! histogram. The expiry gauges are named exactly as istiod's; the counters follow OpenMetrics,
//! which suffixes counters with `_total` (istiod's Go exporter uses `_count`: a dashboard query on
//! `citadel_server_csr_count` becomes `citadel_server_csr_total`). Unlike istiod's, the expiry
//! gauges are refreshed every time a new intermediate is loaded.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The workload CA's metrics.
pub struct Metrics {
    registry: Registry,
    /// CSRs received.
    pub csr_count: Counter,
    /// Callers refused authentication.
    pub auth_failures: Counter,
    /// Requests that failed after authentication (bad CSR, signing error).
    pub sign_errors: Counter,
    /// Certificates issued.
    pub issued: Counter,
    /// Requests answered `RESOURCE_EXHAUSTED` (a rate limit or the admission queue).
    pub rate_limited: Counter,
    /// Seconds from request to certificate.
    pub latency: Histogram,
    /// NotAfter of the earliest-expiring root, unix seconds.
    pub root_expiry: Gauge,
    /// NotAfter of the signing certificate chain (the earliest in it), unix seconds.
    pub chain_expiry: Gauge,
    /// Successful reloads of `cacerts`.
    pub reloads: Counter,
    /// Refused reloads (invalid bundle, forbidden root-set change, an unreadable directory).
    pub reload_failures: Counter,
    /// Connections and admission (`meshca_workload_ca_connections_*`, `…_requests_*`).
    pub serve: meshca_serve::ServeMetrics,
    /// 1 while the intermediate in service has expired (nothing can be signed), else 0.
    pub intermediate_expired: Gauge,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Metrics {
            csr_count: Counter::default(),
            auth_failures: Counter::default(),
            sign_errors: Counter::default(),
            issued: Counter::default(),
            rate_limited: Counter::default(),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            root_expiry: Gauge::default(),
            chain_expiry: Gauge::default(),
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            serve: meshca_serve::ServeMetrics::default(),
            intermediate_expired: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("citadel_server_csr", "CSRs received", m.csr_count.clone());
        registry.register(
            "citadel_server_authentication_failure",
            "Callers refused authentication",
            m.auth_failures.clone(),
        );
        registry.register(
            "citadel_server_csr_sign_err",
            "Requests that failed after authentication",
            m.sign_errors.clone(),
        );
        registry.register("citadel_server_success_cert_issuance", "Certificates issued", m.issued.clone());
        registry.register(
            "meshca_workload_ca_rate_limited",
            "Requests answered RESOURCE_EXHAUSTED (a rate limit or the admission queue; by reason in meshca_workload_ca_requests_refused)",
            m.rate_limited.clone(),
        );
        registry.register("meshca_workload_ca_issuance_seconds", "Time from request to certificate", m.latency.clone());
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "NotAfter of the earliest-expiring root (unix seconds)",
            m.root_expiry.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_timestamp",
            "NotAfter of the signing chain (unix seconds)",
            m.chain_expiry.clone(),
        );
        registry.register("meshca_workload_ca_cacerts_reloads", "cacerts bundles loaded", m.reloads.clone());
        registry.register(
            "meshca_workload_ca_cacerts_reload_failures",
            "cacerts bundles refused",
            m.reload_failures.clone(),
        );
        m.serve.register(registry.sub_registry_with_prefix("meshca_workload_ca"));
        registry.register(
            "meshca_workload_ca_intermediate_expired",
            "1 while the cluster intermediate in service has expired and nothing can be signed",
            m.intermediate_expired.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
