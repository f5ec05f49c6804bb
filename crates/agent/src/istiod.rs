//! istiod's Deployment, as the agent manages it (`meshca agent --istiod-deployment`): when to
//! restart istiod, when to add or remove the Vault agent sidecar, and what to report. Pure: the
//! driver reads and patches the Deployment through an [`IstiodControl`] (the Kubernetes one is
//! `meshca_kube::istiod`) and tells [`IstiodPlan`] how it went.
//!
//! Restarts (the way `kubectl rollout restart` does it: a pod-template annotation) happen
//! - once after the first `cacerts` the agent sees in service — istiod that started before it
//!   runs with a self-signed CA and never picks `cacerts` up otherwise;
//! - after every later intermediate change, only when the policy sets `autoRestartPods`.
//!
//! Each restart is recorded on the Deployment itself, in the same patch, as the serial it was
//! for ([`RESTARTED_FOR`]); the agent reads it back after its own restart, so one intermediate
//! restarts istiod at most once, and a restart that failed is retried with backoff, never in a
//! loop. In Vault mode the agent writes no `cacerts` (the sidecar does, in memory, and istiod
//! reloads it), so it restarts nothing; adding or removing the sidecar rolls istiod out anyway.

use std::time::{Duration, SystemTime};

use meshca_proto::IstiodState;
use meshca_proto::mgmt::IstiodStatus;

use crate::plan;

/// The pod-template annotation `kubectl rollout restart` sets; changing it rolls the pods.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// The pod-template annotation recording which intermediate serial the restart was for.
pub const RESTARTED_FOR: &str = "meshca.io/restarted-for";
/// How often a Deployment that is missing (or was fine) is read again, so one that appears
/// later, or is replaced, is wired without restarting the agent.
pub const RECHECK: Duration = Duration::from_secs(60);

/// What the agent found on istiod's Deployment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The serial of [`RESTARTED_FOR`], if meshca ever restarted this Deployment.
    pub restarted_for: Option<String>,
    /// Whether the Vault agent sidecar is on it (applied by meshca's field manager).
    pub sidecar: bool,
}

/// Why the agent could not do something to istiod's Deployment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{state}: {message}")]
pub struct Problem {
    /// Which kind of failure (never [`IstiodState::Wired`] or `Unspecified`).
    pub state: IstiodState,
    /// What the API server said, and what to do.
    pub message: String,
}

/// Reads and patches istiod's Deployment. Every method is one API call, so nothing is ever
/// half-applied.
#[async_trait::async_trait]
pub trait IstiodControl: Send + Sync + std::fmt::Debug {
    /// `namespace/name`, for messages and status.
    fn deployment(&self) -> String;
    /// Reads the Deployment; `Ok(None)` when there is none.
    async fn read(&self) -> Result<Option<Observed>, Problem>;
    /// Restarts istiod for the intermediate `serial` at `at`, recording the serial.
    async fn restart(&self, serial: &str, at: SystemTime) -> Result<(), Problem>;
    /// Adds (`present`) or removes the Vault agent sidecar and its memory-backed volume.
    async fn sidecar(&self, present: bool) -> Result<(), Problem>;
}

/// What to do to the Deployment now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IstiodEffect {
    /// Read it (first, or again after [`RECHECK`] or a failure).
    Read,
    /// Add or remove the sidecar.
    Sidecar {
        /// Whether it should be there.
        present: bool,
    },
    /// Restart istiod for this intermediate serial.
    Restart {
        /// The serial in service.
        serial: String,
    },
}

/// What the agent knows about the Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Not read yet (or to be read again after a failure).
    Unknown,
    /// There is none.
    Missing,
    /// It is there.
    Present(Observed),
}

/// What istiod's situation asks for, given the cluster's state at one step.
#[derive(Debug, Clone, Copy)]
pub struct Wants<'a> {
    /// The serial of the meshca `cacerts` in service, if any.
    pub serial: Option<&'a str>,
    /// Vault mode: the sidecar belongs on istiod and the agent writes no `cacerts`.
    pub vault: bool,
    /// The policy's `autoRestartPods`.
    pub auto_restart: bool,
}

/// The istiod part of the agent's lifecycle.
#[derive(Debug, Clone)]
pub struct IstiodPlan {
    deployment: String,
    seen: Seen,
    read_at: Option<SystemTime>,
    problem: Option<Problem>,
    /// The effect that failed last (its retry waits for `retry_at`).
    failed: Option<IstiodEffect>,
    failures: u32,
    retry_at: Option<SystemTime>,
    restarted_at: Option<SystemTime>,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl IstiodPlan {
    /// A plan for the Deployment `deployment` (`namespace/name`), nothing known yet.
    pub fn new(deployment: String, backoff_base: Duration, backoff_max: Duration) -> Self {
        IstiodPlan {
            deployment,
            seen: Seen::Unknown,
            read_at: None,
            problem: None,
            failed: None,
            failures: 0,
            retry_at: None,
            restarted_at: None,
            backoff_base,
            backoff_max,
        }
    }

    /// The next effect at `now`, if any, and when to look again otherwise.
    pub fn step(&self, now: SystemTime, wants: Wants<'_>) -> (Option<IstiodEffect>, SystemTime) {
        if let Some(at) = self.retry_at.filter(|at| now < *at) {
            return (None, at);
        }
        let recheck = self.read_at.map(|t| t + RECHECK).unwrap_or(now);
        let observed = match &self.seen {
            Seen::Unknown => return (Some(IstiodEffect::Read), now),
            _ if now >= recheck => return (Some(IstiodEffect::Read), now),
            Seen::Missing => return (None, recheck),
            Seen::Present(o) => o,
        };
        if observed.sidecar != wants.vault {
            return (Some(IstiodEffect::Sidecar { present: wants.vault }), now);
        }
        if !wants.vault
            && let Some(serial) = wants.serial
        {
            let due = match &observed.restarted_for {
                Some(done) if done == serial => false,
                // Never restarted by meshca: istiod may still run self-signed.
                None => true,
                Some(_) => wants.auto_restart,
            };
            if due {
                return (Some(IstiodEffect::Restart { serial: serial.to_string() }), now);
            }
        }
        (None, recheck)
    }

    /// The Deployment was read at `now`. A failed restart or sidecar change stays reported (and
    /// keeps its backoff) until it succeeds; a failed read, or a missing Deployment that is now
    /// there, is cleared.
    pub fn observed(&mut self, now: SystemTime, found: Option<Observed>) {
        self.read_at = Some(now);
        if self.failed == Some(IstiodEffect::Read)
            || self.problem.as_ref().is_some_and(|p| p.state == IstiodState::NotFound)
        {
            self.succeeded();
        }
        match found {
            Some(o) => self.seen = Seen::Present(o),
            None => {
                self.seen = Seen::Missing;
                self.problem = Some(Problem {
                    state: IstiodState::NotFound,
                    message: format!(
                        "no Deployment {} (missing, or istiod is named differently: set the agent's --istiod-deployment)",
                        self.deployment
                    ),
                });
            }
        }
    }

    /// istiod was restarted for `serial` at `now`.
    pub fn restarted(&mut self, now: SystemTime, serial: &str) {
        self.succeeded();
        self.restarted_at = Some(now);
        if let Seen::Present(o) = &mut self.seen {
            o.restarted_for = Some(serial.to_string());
        }
    }

    /// The sidecar was added (`present`) or removed.
    pub fn sidecar_applied(&mut self, present: bool) {
        self.succeeded();
        if let Seen::Present(o) = &mut self.seen {
            o.sidecar = present;
        }
    }

    /// `effect` failed at `now`: reported, and tried again after the backoff (a failed read
    /// is read again; a failed write is not retried before then either). Returns the wait.
    pub fn failed(&mut self, now: SystemTime, effect: IstiodEffect, problem: Problem, jitter: f64) -> Duration {
        let wait = plan::backoff(self.failures, self.backoff_base, self.backoff_max, jitter);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + wait);
        self.problem = Some(problem);
        if effect == IstiodEffect::Read {
            self.seen = Seen::Unknown;
        }
        self.failed = Some(effect);
        wait
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.problem = None;
        self.failed = None;
    }

    /// The problem in force, if any.
    pub fn problem(&self) -> Option<&Problem> {
        self.problem.as_ref()
    }

    /// The status to report.
    pub fn status(&self) -> IstiodStatus {
        let (state, message) = match (&self.problem, &self.seen) {
            (Some(p), _) => (p.state, p.message.clone()),
            (None, Seen::Present(_)) => (IstiodState::Wired, String::new()),
            (None, _) => (IstiodState::Unspecified, String::new()),
        };
        let observed = match &self.seen {
            Seen::Present(o) => o.clone(),
            _ => Observed::default(),
        };
        IstiodStatus {
            state: state as i32,
            deployment: self.deployment.clone(),
            message,
            restarted_for_serial: observed.restarted_for.unwrap_or_default(),
            restarted_at: self.restarted_at.map(meshca_clock::unix).unwrap_or(0),
            vault_sidecar: observed.sidecar,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn plan() -> IstiodPlan {
        IstiodPlan::new("istio-system/istiod".into(), Duration::from_secs(1), Duration::from_secs(30))
    }

    fn wants(serial: Option<&str>, vault: bool, auto_restart: bool) -> Wants<'_> {
        Wants { serial, vault, auto_restart }
    }

    fn present(restarted_for: Option<&str>, sidecar: bool) -> Option<Observed> {
        Some(Observed { restarted_for: restarted_for.map(str::to_string), sidecar })
    }

    #[test]
    fn the_first_cacerts_restarts_istiod_once_and_later_ones_only_with_auto_restart() {
        let mut p = plan();
        assert_eq!(p.step(t(0), wants(None, false, false)).0, Some(IstiodEffect::Read));
        p.observed(t(0), present(None, false));
        assert_eq!(p.step(t(0), wants(None, false, false)).0, None, "no cacerts yet");
        let restart = |s: &str| Some(IstiodEffect::Restart { serial: s.into() });
        assert_eq!(p.step(t(1), wants(Some("A"), false, false)).0, restart("A"));
        p.restarted(t(1), "A");
        assert_eq!(p.step(t(2), wants(Some("A"), false, false)).0, None, "once per serial");
        assert_eq!(p.step(t(3), wants(Some("B"), false, false)).0, None, "autoRestartPods is off");
        assert_eq!(p.step(t(3), wants(Some("B"), false, true)).0, restart("B"));
        p.restarted(t(3), "B");
        assert_eq!(p.step(t(4), wants(Some("B"), false, true)).0, None);
        let st = p.status();
        assert_eq!((st.state(), st.restarted_for_serial.as_str()), (IstiodState::Wired, "B"));
    }

    #[test]
    fn a_restarted_agent_reads_the_record_and_does_not_restart_again() {
        let mut p = plan();
        p.observed(t(0), present(Some("A"), false));
        assert_eq!(p.step(t(0), wants(Some("A"), false, true)).0, None);
    }

    #[test]
    fn vault_mode_adds_the_sidecar_restarts_nothing_and_leaving_it_removes_the_sidecar() {
        let mut p = plan();
        p.observed(t(0), present(None, false));
        assert_eq!(p.step(t(0), wants(None, true, true)).0, Some(IstiodEffect::Sidecar { present: true }));
        p.sidecar_applied(true);
        assert_eq!(p.step(t(1), wants(Some("A"), true, true)).0, None, "Vault mode restarts nothing");
        assert!(p.status().vault_sidecar);
        assert_eq!(p.step(t(2), wants(None, false, false)).0, Some(IstiodEffect::Sidecar { present: false }));
        p.sidecar_applied(false);
        assert_eq!(p.step(t(2), wants(None, false, false)).0, None);
    }

    #[test]
    fn a_missing_deployment_is_reported_and_read_again_later() {
        let mut p = plan();
        p.observed(t(0), None);
        let (effect, wake) = p.step(t(1), wants(Some("A"), false, false));
        assert_eq!((effect, wake), (None, t(0) + RECHECK));
        let st = p.status();
        assert_eq!(st.state(), IstiodState::NotFound);
        assert!(st.message.contains("--istiod-deployment"), "{}", st.message);
        assert_eq!(p.step(t(0) + RECHECK, wants(Some("A"), false, false)).0, Some(IstiodEffect::Read));
        p.observed(t(0) + RECHECK, present(None, false));
        assert_eq!(p.status().state(), IstiodState::Wired);
    }

    #[test]
    fn a_forbidden_patch_backs_off_and_is_never_retried_in_a_loop() {
        let mut p = plan();
        p.observed(t(0), present(None, false));
        let forbidden = Problem { state: IstiodState::Forbidden, message: "RBAC".into() };
        let mut now = t(1);
        let mut waits = Vec::new();
        let restart = IstiodEffect::Restart { serial: "A".into() };
        for _ in 0..6 {
            assert_eq!(p.step(now, wants(Some("A"), false, false)).0, Some(restart.clone()));
            let wait = p.failed(now, restart.clone(), forbidden.clone(), 0.999);
            assert_eq!(p.status().state(), IstiodState::Forbidden);
            assert_eq!(p.step(now + wait / 2, wants(Some("A"), false, false)), (None, now + wait));
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [0, 1, 3, 7, 15, 29], "capped exponential backoff");
        // The periodic read does not clear the failure or its backoff.
        let now = now + RECHECK;
        p.observed(now, present(None, false));
        assert_eq!(p.status().state(), IstiodState::Forbidden);
        let wait = p.failed(now, restart.clone(), forbidden, 0.999);
        assert_eq!(wait.as_secs(), 29);
        p.restarted(now + wait, "A");
        assert_eq!(p.status().state(), IstiodState::Wired);
    }
}
