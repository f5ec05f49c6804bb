//! The management plane's Prometheus metrics: what `meshca status` shows, as gauges, so alerting
//! can watch expiries and the alert conditions without scraping a CLI. Rendered from a fresh
//! status at every scrape.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use meshca_proto::mgmt::MeshStatus;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::sync::watch;

use crate::meshes::MeshView;
use crate::status;

type Labels = Vec<(String, String)>;

fn family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

/// Renders the overview status ([`status::overview`]: every mesh in `meshes`), and the serving
/// layer's counters (`meshca_server_connections_*`, `meshca_server_requests_refused`), as
/// Prometheus text. Every mesh's figures carry its policy's name (`policy`).
pub fn render(st: &MeshStatus, serve: &meshca_serve::ServeMetrics) -> String {
    let mut r = Registry::default();
    serve.register(r.sub_registry_with_prefix("meshca_server"));
    let root_expiry =
        family(&mut r, "meshca_root_expiry_timestamp_seconds", "NotAfter of the earliest-expiring root of each mesh");
    let per_root = family(
        &mut r,
        "meshca_root_cert_expiry_timestamp_seconds",
        "NotAfter of each root of the root set clusters trust (both roots during a root rotation)",
    );
    let phases = family(
        &mut r,
        "meshca_root_rotation_phase",
        "1 for the phase the root rotation is in (Idle when none is in progress), 0 for the others",
    );
    let phase_since = family(
        &mut r,
        "meshca_root_rotation_phase_since_timestamp_seconds",
        "When the root rotation entered its current phase (0: never rotated)",
    );
    let next_step = family(
        &mut r,
        "meshca_root_rotation_next_step_timestamp_seconds",
        "The earliest time the root rotation's next step can happen (0: it waits for clusters, or none runs)",
    );
    let up = family(
        &mut r,
        "meshca_upstream_intermediate_expiry_timestamp_seconds",
        "NotAfter of the user's intermediate (bring-your-own-intermediate mode)",
    );
    for mesh in &st.meshes {
        let policy = || ("policy".to_string(), mesh.policy.clone());
        root_expiry.get_or_create(&vec![policy()]).set(mesh.root_not_after);
        for root in &mesh.roots {
            per_root
                .get_or_create(&vec![
                    policy(),
                    ("subject".into(), root.subject.clone()),
                    ("fingerprint".into(), root.fingerprint.clone()),
                ])
                .set(root.not_after);
        }
        let rotation = mesh.root_rotation.clone().unwrap_or_default();
        let phase = match rotation.phase() {
            meshca_proto::RotationPhase::Unspecified => meshca_proto::RotationPhase::Idle,
            p => p,
        };
        for p in meshca_proto::RotationPhase::ALL {
            phases.get_or_create(&vec![policy(), ("phase".into(), p.name().into())]).set(i64::from(*p == phase));
        }
        phase_since.get_or_create(&vec![policy()]).set(rotation.phase_since);
        next_step.get_or_create(&vec![policy()]).set(rotation.next_step_at);
        if mesh.upstream_intermediate_not_after > 0 {
            up.get_or_create(&vec![policy(), ("subject".into(), mesh.upstream_intermediate_subject.clone())])
                .set(mesh.upstream_intermediate_not_after);
        }
    }
    let alerts = family(&mut r, "meshca_alerts", "Conditions that need a person, by kind and mesh");
    let mut policies: Vec<&str> = st.meshes.iter().map(|m| m.policy.as_str()).collect();
    // Alerts of no mesh in particular (a cluster two policies claim).
    policies.push("");
    for kind in meshca_proto::AlertKind::ALL {
        for policy in &policies {
            let n = st.alerts.iter().filter(|a| a.kind == *kind as i32 && a.policy == *policy).count();
            if n > 0 || !policy.is_empty() {
                alerts
                    .get_or_create(&vec![("kind".into(), kind.name().into()), ("policy".into(), policy.to_string())])
                    .set(n as i64);
            }
        }
    }
    let expiry = family(
        &mut r,
        "meshca_cluster_intermediate_expiry_timestamp_seconds",
        "NotAfter of each cluster's intermediate in service",
    );
    let connected = family(&mut r, "meshca_cluster_connected", "1 when the cluster's agent reported recently");
    for c in &st.clusters {
        let l = vec![("cluster".to_string(), c.name.clone()), ("policy".to_string(), c.policy.clone())];
        connected.get_or_create(&l).set(i64::from(c.connected));
        if let Some(s) = &c.status
            && s.intermediate_not_after > 0
        {
            expiry.get_or_create(&l).set(s.intermediate_not_after);
        }
    }
    let mut out = String::new();
    let _ = encode(&mut out, &r);
    out
}

/// State of the metrics endpoint.
#[derive(Clone)]
pub struct MetricsState {
    /// The store.
    pub store: Arc<dyn meshca_store::Store>,
    /// The meshes.
    pub meshes: watch::Receiver<Arc<MeshView>>,
    /// Agents' report interval.
    pub report_interval: std::time::Duration,
    /// Required bearer token.
    pub token: Option<Arc<String>>,
    /// The time.
    pub clock: meshca_clock::SharedClock,
    /// The serving layer's counters.
    pub serve: meshca_serve::ServeMetrics,
}

/// `GET /metrics`.
pub async fn handler(
    State(s): State<MetricsState>,
    headers: HeaderMap,
) -> (StatusCode, [(axum::http::header::HeaderName, &'static str); 1], String) {
    if let Some(want) = &s.token
        && !meshca_tls::bearer_matches(headers.get("authorization").and_then(|v| v.to_str().ok()), want)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            "a bearer token is required\n".into(),
        );
    }
    let view = s.meshes.borrow().clone();
    match status::overview(s.store.as_ref(), &view, meshca_clock::unix(s.clock.now()), s.report_interval).await {
        Ok(st) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, meshca_tls::METRICS_CONTENT_TYPE)],
            render(&st, &s.serve),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            format!("status unavailable: {}\n", crate::error::caller_message(&e)),
        ),
    }
}
