//! Convergence tracking: has every covered cluster reported what a step of a mesh-wide change
//! requires, and since when?
//!
//! A mesh-wide change (a root rotation, and later a revocation or a federated trust bundle) moves
//! in steps, and a step may only be taken once **every** covered cluster holds what the previous
//! step asked for — a global barrier on what the agents report, never on a timer alone. This
//! module is that barrier, independent of any one change:
//!
//! - [`ClusterReport`] is what the management plane knows of one cluster (from its registration
//!   and its last status report); [`reports`] reads them all from the store.
//! - A [`Target`] says what a step requires of each cluster ([`Expectation`]s on its report),
//!   and that the report must have been received after the step began (`fresh_after`): a report
//!   sent before the step cannot prove anything about it.
//! - [`evaluate`] returns, for each cluster, since when it has converged (kept from the previous
//!   evaluation while it stays converged, so a wait measured from the last convergence is not
//!   restarted by every report), and for each one that has not, what it is waited for.
//!
//! Pure: the caller passes the reports and keeps the convergence map (a root rotation keeps it in
//! its journal, so a restart does not forget it).

use std::collections::BTreeMap;
use std::time::Duration;

use meshca_store::{Store, typed};

use crate::error::MgmtError;
use crate::meshes::Placement;
use crate::records::{self, ClusterRecord, StatusRecord};

/// What the management plane knows of one registered cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterReport {
    /// The cluster.
    pub name: String,
    /// Whether the policy covers it (only covered clusters hold the barrier).
    pub covered: bool,
    /// Whether its agent reported within [`crate::status::CONNECTED_INTERVALS`] report
    /// intervals.
    pub connected: bool,
    /// Its last report, if it ever reported.
    pub last: Option<StatusRecord>,
}

/// Reads every registered cluster's report, at `now` (unix seconds). A cluster is covered when
/// `policy` selects it — and, with several meshes (`meshes`), when it is in `policy`'s mesh and no
/// other: a cluster two policies claim is in neither, so it holds back neither mesh's changes.
pub async fn reports(
    store: &dyn Store,
    policy: &meshca_policy::Policy,
    meshes: Option<&crate::meshes::MeshView>,
    now: i64,
    report_interval: Duration,
) -> Result<Vec<ClusterReport>, MgmtError> {
    let mut out = Vec::new();
    let names = records::cluster_names(store).await?;
    for name in names {
        let Some(rec) = typed::get::<ClusterRecord>(store, &records::cluster(&name)?).await? else {
            continue;
        };
        let last = typed::get::<StatusRecord>(store, &records::status(&name)?).await?.map(|v| v.value);
        let connected = last.as_ref().is_some_and(|s| {
            now - s.reported_at <= crate::status::CONNECTED_INTERVALS * report_interval.as_secs() as i64
        });
        // Until the view holds this mesh (it is starting), its own selector decides.
        let covered = match meshes.filter(|v| v.meshes().len() > 1 && v.get(&policy.name).is_some()) {
            Some(v) => matches!(v.place(&name, &rec.value.labels), Placement::Mesh(m) if m.name == policy.name),
            None => policy.clusters.covers(&name, &rec.value.labels),
        };
        out.push(ClusterReport { covered, connected, last, name });
    }
    Ok(out)
}

/// One thing a step requires a cluster's report to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    /// Its `root-cert.pem` is exactly this root set.
    RootSet {
        /// The set's fingerprint (`RootSet::fingerprint`).
        fingerprint: String,
        /// How to name it in a message (e.g. `{old, new}`).
        label: String,
    },
    /// Its intermediate chains to this root.
    ChainRoot {
        /// The root's SHA-256 fingerprint (`Cert::fingerprint`).
        fingerprint: String,
        /// How to name it in a message.
        label: String,
    },
}

impl Expectation {
    /// Whether `report` meets it; otherwise what is awaited and what was reported instead.
    fn check(&self, report: &StatusRecord) -> Result<(), String> {
        match self {
            Expectation::RootSet { fingerprint, label } if &report.root_set_fingerprint != fingerprint => {
                Err(format!("root set {label} to be written (it reports {})", short(&report.root_set_fingerprint)))
            }
            Expectation::ChainRoot { fingerprint, label } if &report.chain_root_fingerprint != fingerprint => {
                Err(format!(
                    "an intermediate under {label} (it reports one under {})",
                    short(&report.chain_root_fingerprint)
                ))
            }
            _ => Ok(()),
        }
    }

    fn awaited(&self) -> String {
        match self {
            Expectation::RootSet { label, .. } => format!("root set {label} to be written"),
            Expectation::ChainRoot { label, .. } => format!("an intermediate under {label}"),
        }
    }
}

fn short(fp: &str) -> String {
    if fp.is_empty() {
        return "nothing".into();
    }
    let hex = fp.strip_prefix("sha256:").unwrap_or(fp);
    format!("{}…", &hex[..hex.len().min(12)])
}

/// What a step requires of every covered cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What each report must say.
    pub expect: Vec<Expectation>,
    /// Unix seconds: only a report received at or after this counts (the step's start).
    pub fresh_after: i64,
}

/// A covered cluster that has not converged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lagging {
    /// The cluster.
    pub cluster: String,
    /// What it is waited for, in words (and what it reported instead).
    pub awaited: String,
    /// Whether its agent is reporting at all.
    pub connected: bool,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Convergence {
    /// Each converged covered cluster, and since when (unix seconds).
    pub converged: BTreeMap<String, i64>,
    /// Each covered cluster that has not, in name order.
    pub lagging: Vec<Lagging>,
}

impl Convergence {
    /// Whether every covered cluster converged (also when there is none: nothing to wait for).
    pub fn complete(&self) -> bool {
        self.lagging.is_empty()
    }

    /// When the last cluster converged, once all have (`None` before, or without clusters).
    pub fn last(&self) -> Option<i64> {
        if self.complete() { self.converged.values().copied().max() } else { None }
    }
}

/// Evaluates `target` against every covered cluster's report. `previous` is the convergence
/// map of earlier evaluations of the same requirement: a cluster in it that still meets the
/// target keeps its earlier time (even if its last report predates `fresh_after`: it proved
/// convergence after the requirement began, when it entered the map).
pub fn evaluate(target: &Target, clusters: &[ClusterReport], previous: &BTreeMap<String, i64>) -> Convergence {
    let mut out = Convergence::default();
    for c in clusters.iter().filter(|c| c.covered) {
        let known = previous.get(&c.name).copied();
        let verdict = match &c.last {
            None => Err("a first status report (it never reported)".to_string()),
            Some(r) if r.cacerts_at() < target.fresh_after && known.is_none() => {
                let awaited = target.expect.iter().map(Expectation::awaited).collect::<Vec<_>>().join(" and ");
                Err(format!("a report since this step began, showing {awaited}"))
            }
            Some(r) => target.expect.iter().try_for_each(|e| e.check(r)).map(|()| r.cacerts_at()),
        };
        match verdict {
            Ok(reported_at) => {
                let since = known.unwrap_or(reported_at);
                out.converged.insert(c.name.clone(), since);
            }
            Err(awaited) => out.lagging.push(Lagging { cluster: c.name.clone(), awaited, connected: c.connected }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, at: i64, roots: &str, chain: &str) -> ClusterReport {
        ClusterReport {
            name: name.into(),
            covered: true,
            connected: true,
            last: Some(StatusRecord {
                reported_at: at,
                root_set_fingerprint: roots.into(),
                chain_root_fingerprint: chain.into(),
                ..Default::default()
            }),
        }
    }

    fn target(after: i64) -> Target {
        Target {
            expect: vec![
                Expectation::RootSet { fingerprint: "sha256:ab".into(), label: "{A, B}".into() },
                Expectation::ChainRoot { fingerprint: "a".into(), label: "A".into() },
            ],
            fresh_after: after,
        }
    }

    #[test]
    fn every_covered_cluster_must_report_every_expectation_after_the_step_began() {
        let mut uncovered = report("c9", 50, "sha256:old", "a");
        uncovered.covered = false;
        let clusters = vec![
            report("c1", 120, "sha256:ab", "a"),
            report("c2", 90, "sha256:ab", "a"),
            report("c3", 130, "sha256:a", "a"),
            ClusterReport { name: "c4".into(), covered: true, connected: false, last: None },
            uncovered,
        ];
        let c = evaluate(&target(100), &clusters, &BTreeMap::new());
        assert_eq!(c.converged, BTreeMap::from([("c1".to_string(), 120)]));
        let lagging: Vec<(&str, &str)> = c.lagging.iter().map(|l| (l.cluster.as_str(), l.awaited.as_str())).collect();
        assert_eq!(lagging[0].0, "c2");
        assert!(lagging[0].1.contains("a report since this step began"), "{}", lagging[0].1);
        assert_eq!(lagging[1].0, "c3");
        assert!(lagging[1].1.starts_with("root set {A, B} to be written (it reports a…)"), "{}", lagging[1].1);
        assert_eq!(
            c.lagging[2],
            Lagging {
                cluster: "c4".into(),
                awaited: "a first status report (it never reported)".into(),
                connected: false
            }
        );
        assert_eq!(lagging.len(), 3, "the uncovered cluster holds nothing up");
        assert!(!c.complete());
        assert_eq!(c.last(), None);
    }

    #[test]
    fn a_cluster_keeps_its_convergence_time_while_it_stays_converged_and_loses_it_when_it_regresses() {
        let first = evaluate(&target(100), &[report("c1", 110, "sha256:ab", "a")], &BTreeMap::new());
        assert_eq!(first.last(), Some(110));
        // A later report saying the same does not restart the clock.
        let again = evaluate(&target(100), &[report("c1", 140, "sha256:ab", "a")], &first.converged);
        assert_eq!(again.converged["c1"], 110);
        // A report saying something else takes the cluster out; converging again starts afresh.
        let regressed = evaluate(&target(100), &[report("c1", 150, "sha256:ab", "b")], &again.converged);
        assert!(regressed.converged.is_empty());
        assert!(regressed.lagging[0].awaited.starts_with("an intermediate under A"));
        let back = evaluate(&target(100), &[report("c1", 160, "sha256:ab", "a")], &regressed.converged);
        assert_eq!(back.last(), Some(160));
        // No covered cluster: nothing to wait for.
        assert!(evaluate(&target(100), &[], &BTreeMap::new()).complete());
    }
}
