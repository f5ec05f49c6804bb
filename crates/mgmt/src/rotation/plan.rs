//! The rotation's gates, as pure functions of the journal, the clusters' reports and `now`
//! (unix seconds): [`step`] decides whether the rotation waits (for which cluster, or until
//! when), advances to its next phase, or is finished; [`abort`] turns it back. No I/O and no
//! clock, so every gate is unit-tested on plain values; [`super::controller`] carries the
//! decisions out.
//!
//! | phase | every covered cluster holds | advances when |
//! |---|---|---|
//! | `Distributing` | root set {A, B}, intermediate under A | all report it, then half the maximum leaf lifetime plus skew since the last one did |
//! | `Switching` | root set {A, B}, intermediate under B | all report it |
//! | `Draining` | the same | the maximum leaf lifetime plus skew since the last one switched |
//! | `Retiring` | root set {B}, intermediate under B | all report it; then `Idle` |
//!
//! An abort before `Retiring` runs the same table back to A: from `Distributing` (nobody signs
//! under B yet) straight to `Retiring` with {A}; from `Switching` or `Draining` through
//! `Switching` (re-issue under A), `Draining` (B's leaves expire) and `Retiring` ({A}).

use std::time::Duration;

use meshca_pki::RootSet;
use meshca_proto::RotationPhase;

use super::journal::Rotation;
use crate::convergence::{self, ClusterReport, Convergence, Expectation, Lagging, Target};

/// The rotation's waits, from the policy's `rootRotation` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gates {
    /// The longest lifetime of any leaf in the mesh.
    pub max_leaf_lifetime: Duration,
    /// Allowance for clock skew and propagation.
    pub skew: Duration,
}

impl Gates {
    /// The gates of `policy`.
    pub fn of(policy: &meshca_policy::Policy) -> Gates {
        Gates { max_leaf_lifetime: policy.root_rotation.max_leaf_lifetime, skew: policy.root_rotation.skew }
    }

    /// How long after the last cluster trusts both roots every workload has renewed its leaf
    /// (workloads renew at half life) and so learned the new root: half the maximum leaf
    /// lifetime, rounded up, plus skew. In seconds.
    pub fn learn_secs(&self) -> i64 {
        secs(self.max_leaf_lifetime.div_ceil_secs(2) + self.skew)
    }

    /// How long after the last cluster switched every leaf signed under the old root has
    /// expired: the maximum leaf lifetime plus skew, rounded up. In seconds.
    pub fn drain_secs(&self) -> i64 {
        secs(self.max_leaf_lifetime + self.skew)
    }
}

trait DivCeilSecs {
    fn div_ceil_secs(self, n: u32) -> Duration;
}

impl DivCeilSecs for Duration {
    fn div_ceil_secs(self, n: u32) -> Duration {
        Duration::from_secs(self.as_secs().div_ceil(u64::from(n)) + u64::from(self.subsec_nanos() > 0))
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX)
}

/// Which root set clusters hold in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// Both roots, old first (`root-cert.pem` is A's PEM, then B's).
    Both,
    /// Only the root the rotation ends on.
    Target,
}

/// Which root the intermediates are under in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The old root (A).
    From,
    /// The root the rotation ends on (B; A after an abort).
    Target,
}

/// What every covered cluster holds in `r`'s phase.
pub fn holding(r: &Rotation) -> (Signer, Roots) {
    match r.phase {
        RotationPhase::Distributing => (Signer::From, Roots::Both),
        RotationPhase::Retiring => (Signer::Target, Roots::Target),
        _ => (Signer::Target, Roots::Both),
    }
}

/// The fingerprint of the set of roots with these certificate fingerprints, as
/// [`RootSet::fingerprint`] computes it.
pub fn set_fingerprint(roots: &[&str]) -> String {
    RootSet::fingerprint_of(roots.iter().copied())
}

/// What the current phase requires of every covered cluster.
pub fn target(r: &Rotation) -> Target {
    let (signer, roots) = holding(r);
    let both = set_fingerprint(&[&r.from.fingerprint, &r.to.fingerprint]);
    let t = r.target();
    let new = if r.aborted { "A" } else { "B" };
    let root_set = match roots {
        Roots::Both => Expectation::RootSet { fingerprint: both, label: "{A, B}".into() },
        Roots::Target => {
            Expectation::RootSet { fingerprint: set_fingerprint(&[&t.fingerprint]), label: format!("{{{new}}}") }
        }
    };
    let chain = match signer {
        Signer::From => Expectation::ChainRoot { fingerprint: r.from.fingerprint.clone(), label: "A".into() },
        Signer::Target => Expectation::ChainRoot { fingerprint: t.fingerprint.clone(), label: new.into() },
    };
    Target { expect: vec![root_set, chain], fresh_after: r.phase_since }
}

/// What a rotation waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A covered cluster that has not converged.
    Cluster(Lagging),
    /// A time that must pass.
    Until {
        /// Unix seconds.
        at: i64,
        /// Why, in words.
        why: String,
    },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing yet; the reasons, clusters first.
    Wait(Vec<Wait>),
    /// Enter `phase`.
    Advance {
        /// The phase.
        phase: RotationPhase,
        /// Why, for the journal.
        note: String,
    },
    /// Every cluster holds the final state: the rotation is over.
    Finish,
}

/// The decision of one [`step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The convergence of the current phase (to keep in the journal).
    pub convergence: Convergence,
    /// What to do.
    pub next: Next,
}

/// Decides the rotation's next move at `now`.
pub fn step(r: &Rotation, clusters: &[ClusterReport], now: i64, gates: &Gates) -> Step {
    let convergence = convergence::evaluate(&target(r), clusters, &r.converged);
    let clusters_waited: Vec<Wait> = convergence.lagging.iter().cloned().map(Wait::Cluster).collect();
    // When every covered cluster has converged: the last one's time (the phase's start when
    // there is no covered cluster at all).
    let last = convergence.complete().then(|| convergence.last().unwrap_or(r.phase_since));
    let (old, new) = if r.aborted { ("B", "A") } else { ("A", "B") };
    let next = match (r.phase, last) {
        (_, None) => Next::Wait(clusters_waited),
        (RotationPhase::Distributing, Some(last)) => {
            let at = last + gates.learn_secs();
            if now >= at {
                Next::Advance {
                    phase: RotationPhase::Switching,
                    note: "every cluster trusts {A, B} and every workload has renewed since".into(),
                }
            } else {
                Next::Wait(vec![Wait::Until {
                    at,
                    why:
                        "every workload to renew its leaf and learn B (half the maximum leaf lifetime plus skew since \
                          the last cluster trusted {A, B})"
                            .into(),
                }])
            }
        }
        (RotationPhase::Switching, Some(_)) => {
            Next::Advance { phase: RotationPhase::Draining, note: format!("every cluster signs under {new}") }
        }
        (RotationPhase::Draining, Some(last)) => {
            let at = r.switched_at.unwrap_or(last) + gates.drain_secs();
            if now >= at {
                Next::Advance { phase: RotationPhase::Retiring, note: format!("every leaf under {old} has expired") }
            } else {
                Next::Wait(vec![Wait::Until {
                    at,
                    why: format!(
                        "every leaf signed under {old} to expire (the maximum leaf lifetime plus skew since the last \
                         cluster switched)"
                    ),
                }])
            }
        }
        (RotationPhase::Retiring, Some(_)) => Next::Finish,
        (RotationPhase::Idle | RotationPhase::Unspecified, Some(_)) => Next::Finish,
    };
    Step { convergence, next }
}

/// Applies a [`step`]'s decision to `r` at `now`. Returns whether the rotation is finished.
pub fn apply(r: &mut Rotation, s: &Step, now: i64) -> bool {
    r.converged = s.convergence.converged.clone();
    match &s.next {
        Next::Wait(_) => false,
        Next::Advance { phase, note } => {
            if *phase == RotationPhase::Draining {
                r.switched_at = Some(s.convergence.last().unwrap_or(now));
            }
            r.enter(*phase, now, note.clone());
            false
        }
        Next::Finish => true,
    }
}

/// Why an abort is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbortRefused {
    /// The rotation is already returning to the old root.
    #[error("the root rotation {0} is already being aborted")]
    AlreadyAborted(String),
    /// Too late: clusters are already dropping the old root.
    #[error(
        "the root rotation {0} is Retiring: clusters are dropping the old root, which cannot be undone; let it finish \
         and rotate again"
    )]
    Retiring(String),
}

/// Turns `r` back towards its old root at `now`: from `Distributing` straight to `Retiring`
/// (nobody signs under the new root yet), from `Switching` or `Draining` to `Switching` (every
/// cluster re-issues under the old root, then the new root's leaves drain).
pub fn abort(r: &mut Rotation, now: i64) -> Result<(), AbortRefused> {
    if r.aborted {
        return Err(AbortRefused::AlreadyAborted(r.id.clone()));
    }
    let phase = match r.phase {
        RotationPhase::Distributing => RotationPhase::Retiring,
        RotationPhase::Switching | RotationPhase::Draining => RotationPhase::Switching,
        _ => return Err(AbortRefused::Retiring(r.id.clone())),
    };
    r.aborted = true;
    r.switched_at = None;
    r.enter(phase, now, "aborted by an operator: returning to A");
    Ok(())
}

/// Generated mode: whether a root valid from `not_before` to `not_after` (unix seconds) is due
/// for rotation at `now`: less than `ratio` of its lifetime remains.
pub fn expiry_due(not_before: i64, not_after: i64, ratio: f64, now: i64) -> bool {
    let lifetime = (not_after - not_before).max(1) as f64;
    ((not_after - now) as f64) < ratio * lifetime
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::records::StatusRecord;
    use crate::rotation::journal::{Anchor, SignerRef, Trigger};

    const A: &str = "aaaa";
    const B: &str = "bbbb";
    const HOUR: i64 = 3600;

    fn gates() -> Gates {
        Gates { max_leaf_lifetime: Duration::from_secs(24 * 3600), skew: Duration::from_secs(300) }
    }

    fn anchor(fp: &str) -> Anchor {
        Anchor { root_pem: String::new(), fingerprint: fp.into(), signer: SignerRef::Stored { object: "x".into() } }
    }

    fn rotation(at: i64) -> Rotation {
        Rotation {
            id: "r".into(),
            trigger: Trigger::Operator,
            from: anchor(A),
            to: anchor(B),
            phase: RotationPhase::Distributing,
            aborted: false,
            started_at: at,
            phase_since: at,
            converged: BTreeMap::new(),
            switched_at: None,
            transitions: vec![],
        }
    }

    /// A cluster whose last report (at `at`) shows `roots` and an intermediate under `chain`.
    fn cluster(name: &str, at: i64, roots: &[&str], chain: &str) -> ClusterReport {
        ClusterReport {
            name: name.into(),
            covered: true,
            connected: true,
            last: Some(StatusRecord {
                reported_at: at,
                root_set_fingerprint: set_fingerprint(roots),
                chain_root_fingerprint: chain.into(),
                ..Default::default()
            }),
        }
    }

    fn run(r: &mut Rotation, clusters: &[ClusterReport], now: i64) -> Next {
        let s = step(r, clusters, now, &gates());
        apply(r, &s, now);
        s.next
    }

    fn waits_for_clusters(n: &Next) -> Vec<String> {
        match n {
            Next::Wait(w) => w
                .iter()
                .filter_map(|w| match w {
                    Wait::Cluster(l) => Some(l.cluster.clone()),
                    Wait::Until { .. } => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    fn until(n: &Next) -> Option<i64> {
        match n {
            Next::Wait(w) => w.iter().find_map(|w| match w {
                Wait::Until { at, .. } => Some(*at),
                Wait::Cluster(_) => None,
            }),
            _ => None,
        }
    }

    #[test]
    fn the_gates_follow_the_leaf_lifetime_and_skew() {
        assert_eq!(gates().learn_secs(), 12 * HOUR + 300);
        assert_eq!(gates().drain_secs(), 24 * HOUR + 300);
        let odd = Gates { max_leaf_lifetime: Duration::from_millis(30_500), skew: Duration::from_secs(2) };
        assert_eq!((odd.learn_secs(), odd.drain_secs()), (18, 33), "rounded up, never down");
    }

    #[test]
    fn distributing_waits_for_every_cluster_then_for_every_workload_to_renew() {
        let t0 = 1_000_000;
        let mut r = rotation(t0);
        // Reports from before the phase prove nothing, even if they happened to match.
        let stale = [cluster("c1", t0 - 1, &[A, B], A), cluster("c2", t0 - 1, &[A], A)];
        assert_eq!(waits_for_clusters(&run(&mut r, &stale, t0 + 1)), ["c1", "c2"]);
        // c1 converges; c2 still reports {A}: the barrier holds, whatever the time.
        let partial = [cluster("c1", t0 + 5, &[A, B], A), cluster("c2", t0 + 5, &[A], A)];
        assert_eq!(waits_for_clusters(&run(&mut r, &partial, t0 + 10 * HOUR)), ["c2"]);
        assert_eq!(r.phase, RotationPhase::Distributing);
        assert_eq!(r.converged.get("c1"), Some(&(t0 + 5)));
        // The last cluster converges at t0 + 2 h: then the learning wait starts.
        let all = [cluster("c1", t0 + 2 * HOUR, &[A, B], A), cluster("c2", t0 + 2 * HOUR, &[A, B], A)];
        let n = run(&mut r, &all, t0 + 2 * HOUR);
        assert_eq!(until(&n), Some(t0 + 2 * HOUR + 12 * HOUR + 300), "from the last convergence, not the first");
        assert_eq!(r.converged.get("c1"), Some(&(t0 + 5)), "c1 keeps its earlier time");
        assert!(matches!(run(&mut r, &all, t0 + 14 * HOUR + 299), Next::Wait(_)));
        assert_eq!(
            run(&mut r, &all, t0 + 14 * HOUR + 300),
            Next::Advance {
                phase: RotationPhase::Switching,
                note: "every cluster trusts {A, B} and every workload has renewed since".into()
            }
        );
        assert_eq!(r.phase, RotationPhase::Switching);
        assert!(r.converged.is_empty(), "Switching starts its own barrier");
        assert_eq!(
            r.transitions.last().map(|t| (t.phase, t.at)),
            Some((RotationPhase::Switching, t0 + 14 * HOUR + 300))
        );
    }

    #[test]
    fn a_cluster_that_joins_or_regresses_during_distributing_restarts_the_learning_wait() {
        let t0 = 0;
        let mut r = rotation(t0);
        let one = [cluster("c1", 10, &[A, B], A)];
        assert_eq!(until(&run(&mut r, &one, 10)), Some(10 + 12 * HOUR + 300));
        // A new cluster registers at 1 h: nothing advances until it trusts {A, B} too, and the
        // wait then counts from its convergence.
        let two = [cluster("c1", 3600, &[A, B], A), cluster("c2", 3600, &[A], A)];
        assert_eq!(waits_for_clusters(&run(&mut r, &two, 13 * HOUR)), ["c2"]);
        let two = [cluster("c1", 3700, &[A, B], A), cluster("c2", 3700, &[A, B], A)];
        assert_eq!(until(&run(&mut r, &two, 13 * HOUR)), Some(3700 + 12 * HOUR + 300));
    }

    #[test]
    fn switching_waits_for_every_intermediate_under_b_and_draining_for_a_leaves_to_expire() {
        let mut r = rotation(0);
        r.enter(RotationPhase::Switching, 100, "test");
        let mixed = [cluster("c1", 110, &[A, B], B), cluster("c2", 110, &[A, B], A)];
        let n = run(&mut r, &mixed, 200);
        assert_eq!(waits_for_clusters(&n), ["c2"]);
        match &n {
            Next::Wait(w) => match &w[0] {
                Wait::Cluster(l) => assert!(l.awaited.starts_with("an intermediate under B"), "{}", l.awaited),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // c2 switches at 150 (its report arrives at 300): the drain counts from its report.
        let switched = [cluster("c1", 290, &[A, B], B), cluster("c2", 300, &[A, B], B)];
        assert!(matches!(run(&mut r, &switched, 301), Next::Advance { phase: RotationPhase::Draining, .. }));
        assert_eq!(r.switched_at, Some(300));
        assert_eq!(r.converged.len(), 2, "the same requirement: convergence carries over");
        let n = run(&mut r, &switched, 302);
        assert_eq!(until(&n), Some(300 + 24 * HOUR + 300));
        // Hours pass; one second short of the drain nothing moves, then Retiring.
        assert!(matches!(run(&mut r, &switched, 300 + 24 * HOUR + 299), Next::Wait(_)));
        assert!(matches!(
            run(&mut r, &switched, 300 + 24 * HOUR + 300),
            Next::Advance { phase: RotationPhase::Retiring, .. }
        ));
    }

    #[test]
    fn draining_holds_if_a_cluster_stops_signing_under_b() {
        let mut r = rotation(0);
        r.enter(RotationPhase::Switching, 100, "test");
        let switched = [cluster("c1", 110, &[A, B], B)];
        run(&mut r, &switched, 120);
        assert_eq!(r.phase, RotationPhase::Draining);
        let back = [cluster("c1", 200, &[A, B], A)];
        assert_eq!(waits_for_clusters(&run(&mut r, &back, 30 * HOUR)), ["c1"]);
    }

    #[test]
    fn retiring_finishes_when_every_cluster_trusts_only_b() {
        let mut r = rotation(0);
        r.enter(RotationPhase::Retiring, 100, "test");
        let some = [cluster("c1", 110, &[B], B), cluster("c2", 110, &[A, B], B)];
        assert_eq!(waits_for_clusters(&run(&mut r, &some, 120)), ["c2"]);
        let all = [cluster("c1", 110, &[B], B), cluster("c2", 130, &[B], B)];
        assert_eq!(run(&mut r, &all, 130), Next::Finish);
    }

    #[test]
    fn an_agent_that_stops_stalls_the_rotation_with_its_name_and_nothing_advances() {
        let mut r = rotation(0);
        let mut down = cluster("c2", 0, &[A], A);
        down.connected = false;
        let clusters = [cluster("c1", 5, &[A, B], A), down];
        for hours in [1, 24, 24 * 30] {
            let n = run(&mut r, &clusters, hours * HOUR);
            match &n {
                Next::Wait(w) => {
                    assert_eq!(w.len(), 1);
                    let Wait::Cluster(l) = &w[0] else { panic!("{w:?}") };
                    assert_eq!(l.cluster, "c2");
                    assert!(!l.connected);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(r.phase, RotationPhase::Distributing);
        }
    }

    #[test]
    fn abort_returns_to_a_by_the_shortest_safe_path() {
        // From Distributing nobody signs under B: straight to Retiring with {A}.
        let mut r = rotation(0);
        abort(&mut r, 50).expect("abort");
        assert_eq!((r.phase, r.aborted), (RotationPhase::Retiring, true));
        let t = target(&r);
        assert_eq!(t.expect[0], Expectation::RootSet { fingerprint: set_fingerprint(&[A]), label: "{A}".into() });
        assert_eq!(abort(&mut r, 60), Err(AbortRefused::AlreadyAborted("r".into())));
        let back = [cluster("c1", 70, &[A], A)];
        assert_eq!(run(&mut r, &back, 70), Next::Finish);

        // From Switching: re-issue under A, drain B's leaves, then {A}.
        let mut r = rotation(0);
        r.enter(RotationPhase::Switching, 100, "test");
        abort(&mut r, 150).expect("abort");
        assert_eq!(r.phase, RotationPhase::Switching);
        let still_b = [cluster("c1", 160, &[A, B], B)];
        assert_eq!(waits_for_clusters(&run(&mut r, &still_b, 160)), ["c1"]);
        let under_a = [cluster("c1", 170, &[A, B], A)];
        assert!(matches!(run(&mut r, &under_a, 170), Next::Advance { phase: RotationPhase::Draining, .. }));
        assert_eq!(until(&run(&mut r, &under_a, 171)), Some(170 + 24 * HOUR + 300));
        assert!(matches!(
            run(&mut r, &under_a, 170 + 24 * HOUR + 300),
            Next::Advance { phase: RotationPhase::Retiring, .. }
        ));
        assert_eq!(abort(&mut r, 0), Err(AbortRefused::AlreadyAborted("r".into())));
        let only_a = [cluster("c1", 1000 + 24 * HOUR, &[A], A)];
        assert_eq!(run(&mut r, &only_a, 1000 + 24 * HOUR), Next::Finish);

        // In Retiring (forward) it is too late.
        let mut r = rotation(0);
        r.enter(RotationPhase::Retiring, 100, "test");
        assert!(matches!(abort(&mut r, 110), Err(AbortRefused::Retiring(_))));
    }

    #[test]
    fn a_report_from_before_an_abort_cannot_end_b_s_drain_early() {
        // c1 reported "under A" before the abort, but may have switched to B after that
        // report: only a report received after the abort counts.
        let mut r = rotation(0);
        r.enter(RotationPhase::Switching, 100, "test");
        abort(&mut r, 150).expect("abort");
        let stale = [cluster("c1", 90, &[A, B], A)];
        assert_eq!(waits_for_clusters(&run(&mut r, &stale, 10 * HOUR)), ["c1"]);
    }

    #[test]
    fn no_covered_cluster_means_only_the_time_gates_apply() {
        let mut r = rotation(0);
        assert_eq!(until(&run(&mut r, &[], 1)), Some(12 * HOUR + 300));
        assert!(matches!(run(&mut r, &[], 12 * HOUR + 300), Next::Advance { .. }));
    }

    #[test]
    fn a_generated_root_is_due_when_less_than_the_ratio_of_its_lifetime_remains() {
        assert!(!expiry_due(0, 1000, 0.2, 799));
        assert!(!expiry_due(0, 1000, 0.2, 800));
        assert!(expiry_due(0, 1000, 0.2, 801));
        assert!(expiry_due(0, 1000, 0.2, 2000), "an expired root is due");
    }
}
