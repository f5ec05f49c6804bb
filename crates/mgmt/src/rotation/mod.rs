//! Root rotation: moving every cluster from root A to root B with no failed handshake, gated on
//! what every cluster reports (docs/root-rotation.md).
//!
//! `Idle` {A} → `Distributing` {A, B}, intermediates under A → `Switching` {A, B},
//! intermediates under B → `Draining` (A's leaves expire) → `Retiring` {B} → `Idle`.
//!
//! - [`plan`]: the gates, pure ([`plan::step`], [`plan::abort`]).
//! - [`journal`]: what is persisted at every transition, so a restart resumes.
//! - [`controller`]: the driver, and the *effective authority* (the signer and root set of the
//!   current phase) that the issuer and the trust streams use.
//! - [`describe`]: what operators see (status, alerts).
//!
//! The barrier itself — has every covered cluster reported what a phase requires — is
//! [`crate::convergence`], shared with other mesh-wide changes.

pub mod controller;
pub mod journal;
pub mod plan;

use std::time::Duration;

use meshca_proto::mgmt::{Alert, CertificateSummary, RootRotation, RotationTransition, RotationWait};
use meshca_proto::{AlertKind, RotationPhase};

use crate::convergence::ClusterReport;
pub use controller::{Controller, RotateError, RotationHandle};
pub use journal::Journal;

/// A cluster that holds a rotation up is *stalled* (and raises an alert) once its agent stops
/// reporting, or once the phase has waited for it this many report intervals.
pub const STALL_INTERVALS: i64 = 10;

fn summary(pem: &str) -> Option<CertificateSummary> {
    let c = meshca_pki::Cert::from_pem(pem.as_bytes()).ok()?;
    Some(CertificateSummary {
        subject: c.subject(),
        serial: c.serial_hex(),
        not_before: meshca_clock::unix(c.not_before()),
        not_after: meshca_clock::unix(c.not_after()),
        fingerprint: c.fingerprint(),
        key_algorithm: c.key_kind().to_string(),
        issuer_fingerprint: String::new(),
    })
}

/// The rotation as operators see it at `now`, and the alerts it raises: a stalled cluster
/// (`RootRotationStalled`, naming the cluster and what it is waited for).
pub fn describe(
    j: &Journal,
    clusters: &[ClusterReport],
    policy: &meshca_policy::Policy,
    now: i64,
    report_interval: Duration,
) -> (RootRotation, Vec<Alert>) {
    let Some(r) = &j.rotation else {
        let last = j.history.first();
        let note = match (last, &j.declined) {
            (_, Some(fp)) => format!(
                "the policy names root {fp}, whose rotation was aborted: the mesh stays on the established root until \
                 the policy names another one"
            ),
            (Some(h), None) if h.aborted => format!(
                "the last rotation ({}) was aborted; automatic rotation of this root is suspended until `meshca rotate \
                 root`",
                h.id
            ),
            (Some(h), None) => format!("the last rotation ({}) completed", h.id),
            (None, None) => String::new(),
        };
        let idle = RootRotation {
            phase: RotationPhase::Idle as i32,
            phase_since: last.map(|h| h.finished_at).unwrap_or(0),
            note,
            from: j.established.as_ref().and_then(|a| summary(&a.root_pem)),
            ..Default::default()
        };
        return (idle, Vec::new());
    };
    let gates = plan::Gates::of(policy);
    let step = plan::step(r, clusters, now, &gates);
    let mut waiting = Vec::new();
    let mut next_step_at = 0;
    let mut alerts = Vec::new();
    let stall_after = STALL_INTERVALS * report_interval.as_secs() as i64;
    if let plan::Next::Wait(waits) = &step.next {
        for w in waits {
            match w {
                plan::Wait::Cluster(l) => {
                    waiting.push(RotationWait { cluster: l.cluster.clone(), reason: l.awaited.clone() });
                    if !l.connected || now - r.phase_since > stall_after {
                        let why = if l.connected {
                            format!("for {}", crate::status::human(now - r.phase_since))
                        } else {
                            "and its agent is not reporting".into()
                        };
                        alerts.push(Alert {
                            kind: AlertKind::RootRotationStalled as i32,
                            cluster: l.cluster.clone(),
                            message: format!(
                                "root rotation {} is stalled in {} {why}: it waits for {} to report {}; nothing advances \
                                 until it does (or it leaves the policy)",
                                r.id,
                                r.phase.name(),
                                l.cluster,
                                l.awaited
                            ),
                            policy: String::new(),
                        });
                    }
                }
                plan::Wait::Until { at, why } => {
                    next_step_at = *at;
                    waiting.push(RotationWait {
                        cluster: String::new(),
                        reason: format!("until {}: {why}", rfc3339(*at)),
                    });
                }
            }
        }
    }
    let status = RootRotation {
        phase: r.phase as i32,
        phase_since: r.phase_since,
        started_at: r.started_at,
        trigger: r.trigger.name().into(),
        aborted: r.aborted,
        from: summary(&r.from.root_pem),
        to: summary(&r.to.root_pem),
        waiting,
        next_step_at,
        transitions: r
            .transitions
            .iter()
            .map(|t| RotationTransition { phase: t.phase as i32, at: t.at, note: t.note.clone() })
            .collect(),
        id: r.id.clone(),
        converged: step.convergence.converged.into_iter().collect(),
        note: if r.aborted {
            "aborted by an operator: every cluster returns to the old root".into()
        } else {
            String::new()
        },
    };
    (status, alerts)
}

/// Unix seconds as RFC 3339.
pub(crate) fn rfc3339(unix: i64) -> String {
    meshca_pki::chain::rfc3339(meshca_clock::from_unix(unix))
}
