//! The mesh's status for operators, and the alerts that say when a person is needed.

use std::time::Duration;

use meshca_proto::mgmt::{Alert, ClusterStatus, ClusterView, IssuedRecord, MeshStatus};
use meshca_store::{Store, typed};

use crate::authority::Authority;
use crate::error::MgmtError;
use crate::records::{self, ClusterRecord, IssuedLog, StatusRecord};

/// A cluster is "connected" when it reported within this many report intervals.
pub const CONNECTED_INTERVALS: i64 = 3;

fn to_proto(s: &StatusRecord) -> ClusterStatus {
    ClusterStatus {
        phase: s.phase.clone(),
        intermediate_serial: s.intermediate_serial.clone(),
        intermediate_not_after: s.intermediate_not_after,
        intermediate_not_before: s.intermediate_not_before,
        root_set_fingerprint: s.root_set_fingerprint.clone(),
        policy_generation: s.policy_generation.clone(),
        last_renewal: s.last_renewal,
        last_error: s.last_error.clone(),
        key_location: s.key_location.clone(),
        next_renewal: s.next_renewal,
        agent_version: s.agent_version.clone(),
    }
}

/// Reads every cluster's records and builds the status.
pub async fn collect(
    store: &dyn Store,
    authority: &Authority,
    now: i64,
    report_interval: Duration,
) -> Result<MeshStatus, MgmtError> {
    let mut clusters = Vec::new();
    let mut names: Vec<String> = store
        .list(records::NAMESPACE)
        .await?
        .into_iter()
        .filter_map(|n| n.strip_prefix(records::CLUSTER_PREFIX).map(str::to_string))
        .collect();
    if let meshca_policy::ClusterSelector::Named(v) = &authority.policy.clusters {
        for n in v {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names.sort();
    for name in names {
        let registered = typed::get::<ClusterRecord>(store, &records::cluster(&name)?).await?.is_some();
        let status = typed::get::<StatusRecord>(store, &records::status(&name)?).await?.map(|v| v.value);
        let issued =
            typed::get::<IssuedLog>(store, &records::issued(&name)?).await?.map(|v| v.value).unwrap_or_default();
        let last_seen = status.as_ref().map(|s| s.reported_at).unwrap_or(0);
        clusters.push(ClusterView {
            connected: last_seen > 0 && now - last_seen <= CONNECTED_INTERVALS * report_interval.as_secs() as i64,
            enrolled: authority.policy.clusters.covers(&name),
            registered,
            last_seen,
            status: status.as_ref().map(to_proto),
            issued: issued
                .records
                .iter()
                .take(8)
                .map(|r| IssuedRecord {
                    serial: r.serial.clone(),
                    not_after: r.not_after,
                    issued_at: r.issued_at,
                    reason: r.reason.clone(),
                })
                .collect(),
            name,
        });
    }
    let (root_fp, root_not_after) = match &authority.roots {
        Some(r) => (r.fingerprint(), crate::tokens::unix(r.earliest_expiry())),
        None => (String::new(), 0),
    };
    let alerts = alerts(now, authority, &clusters, report_interval);
    Ok(MeshStatus {
        trust_domain: authority.policy.trust_domain.to_string(),
        ca_mode: authority.policy.ca.name().to_string(),
        root_set_fingerprint: root_fp,
        root_not_after,
        policy_generation: authority.generation.clone(),
        policy_error: authority.error.clone().or_else(|| authority.warning.clone()).unwrap_or_default(),
        clusters,
        alerts,
        now,
        upstream_intermediate_subject: authority.upstream().map(|c| c.subject()).unwrap_or_default(),
        upstream_intermediate_not_after: authority.upstream().map(|c| crate::tokens::unix(c.not_after())).unwrap_or(0),
    })
}

fn alert(kind: &str, cluster: &str, message: String) -> Alert {
    Alert { kind: kind.into(), cluster: cluster.into(), message }
}

/// Human form of a number of seconds.
pub fn human(secs: i64) -> String {
    let neg = secs < 0;
    let s = secs.unsigned_abs();
    let text = if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    };
    if neg { format!("-{text}") } else { text }
}

/// The conditions that need a person:
/// - the policy's CA cannot sign (`PolicyInvalid`) or a policy warning (`PolicyWarning`);
/// - the root expires before an intermediate issued now would (`RootExpiresWithinIntermediateLifetime`);
/// - an intermediate past its renewal point and not renewed (`IntermediateRenewalOverdue`), or
///   expired (`IntermediateExpired`);
/// - a registered cluster silent for more than [`CONNECTED_INTERVALS`] report intervals
///   (`ClusterNotReporting`).
pub fn alerts(now: i64, authority: &Authority, clusters: &[ClusterView], report_interval: Duration) -> Vec<Alert> {
    let mut out = Vec::new();
    if let Some(e) = &authority.error {
        out.push(alert("PolicyInvalid", "", e.clone()));
    }
    if let Some(w) = &authority.warning {
        out.push(alert("PolicyWarning", "", w.clone()));
    }
    let ttl = authority.policy.intermediate.ttl.as_secs() as i64;
    if let Some(roots) = &authority.roots {
        let root_end = crate::tokens::unix(roots.earliest_expiry());
        if root_end < now + ttl {
            out.push(alert(
                "RootExpiresWithinIntermediateLifetime",
                "",
                format!(
                    "a root expires in {}, sooner than the intermediate lifetime ({}): new intermediates are cut short; plan a root rotation",
                    human(root_end - now),
                    human(ttl)
                ),
            ));
        }
    }
    if let (Some(up), meshca_policy::CaMode::IntermediateRef { expiry_warning, .. }) =
        (authority.upstream(), &authority.policy.ca)
    {
        let end = crate::tokens::unix(up.not_after());
        if end - now <= expiry_warning.as_secs() as i64 {
            out.push(alert(
                "UpstreamIntermediateExpiring",
                "",
                format!(
                    "your intermediate {} (spec.config.intermediateRef) expires in {}; meshca does not rotate it and clamps cluster intermediates to it — replace the secret with a new intermediate from the same root",
                    up.subject(),
                    human(end - now)
                ),
            ));
        }
    }
    let grace = authority.policy.intermediate.grace_period_ratio;
    let interval = report_interval.as_secs() as i64;
    for c in clusters.iter().filter(|c| c.enrolled && c.registered) {
        match &c.status {
            None => out.push(alert(
                "ClusterNotReporting",
                &c.name,
                format!("{} is registered but has never reported", c.name),
            )),
            Some(s) => {
                if now - c.last_seen > CONNECTED_INTERVALS * interval {
                    out.push(alert(
                        "ClusterNotReporting",
                        &c.name,
                        format!("{} last reported {} ago", c.name, human(now - c.last_seen)),
                    ));
                }
                if s.intermediate_not_after == 0 {
                    continue;
                }
                let lifetime = (s.intermediate_not_after - s.intermediate_not_before).max(1);
                let window = (grace * lifetime as f64) as i64;
                let due = s.intermediate_not_after - window;
                let slack = (2 * interval).max(window / 4);
                let error =
                    if s.last_error.is_empty() { String::new() } else { format!("; last error: {}", s.last_error) };
                if now >= s.intermediate_not_after {
                    out.push(alert(
                        "IntermediateExpired",
                        &c.name,
                        format!(
                            "{}'s intermediate {} expired {} ago{error}",
                            c.name,
                            s.intermediate_serial,
                            human(now - s.intermediate_not_after)
                        ),
                    ));
                } else if now > due + slack {
                    out.push(alert(
                        "IntermediateRenewalOverdue",
                        &c.name,
                        format!(
                            "{}'s intermediate {} expires in {} and has not been renewed{error}",
                            c.name,
                            s.intermediate_serial,
                            human(s.intermediate_not_after - now)
                        ),
                    ));
                }
            }
        }
    }
    out
}
