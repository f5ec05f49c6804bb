//! The agent's lifecycle as a pure state machine: [`Runner::step`] takes what the driver
//! observed (the `cacerts` held, the management plane's last word, whether it is connected, and
//! `now`) and returns the effects to carry out and when to look again. The driver
//! ([`crate::driver`]) performs the effects and reports their outcomes back ([`Runner::issued`],
//! [`Runner::failed`], …). Nothing here does I/O or reads a clock, so every rule — renewal at the
//! grace ratio, backoff on outage, re-issue on a generation change, keeping an intermediate whose
//! write failed — is tested on plain values.

use std::time::{Duration, SystemTime};

use meshca_proto::{IssueReason, Phase};

use crate::cacerts::Held;
use crate::istiod::{IstiodEffect, IstiodPlan, Wants};
use crate::plan::{self, Current, Decision, Trust};

/// How long the driver sleeps at most before it looks again with nothing scheduled. Changes
/// (a new trust state, a changed `cacerts`) wake it earlier.
pub const IDLE_WAKE: Duration = Duration::from_secs(60);
/// How far ahead a planned renewal is slept towards in one go: a wall-clock step or a suspended
/// machine then delays a renewal by at most this.
pub const MAX_PLANNED_SLEEP: Duration = Duration::from_secs(300);

/// The runner's fixed settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// First retry delay.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Replace a `cacerts` meshca did not write.
    pub adopt_existing: bool,
    /// The `cacerts` object, for messages.
    pub cacerts: String,
}

/// An intermediate obtained whose write to the store failed, as far as planning is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwritten {
    /// What it would be once written.
    pub current: Current,
}

/// What the driver observed, at `now`.
#[derive(Debug)]
pub struct Observation<'a> {
    /// The time.
    pub now: SystemTime,
    /// The `cacerts` held.
    pub held: &'a Held,
    /// An intermediate obtained but not yet written.
    pub unwritten: Option<&'a Unwritten>,
    /// The management plane's last word, if it ever spoke.
    pub trust: Option<&'a Trust>,
    /// Whether the trust stream is up now.
    pub connected: bool,
    /// Why it is not, when it is not.
    pub link_error: &'a str,
    /// Whether the agent's own identity is at half life.
    pub identity_due: bool,
    /// A number in [0, 1) for spreading retries.
    pub jitter: f64,
}

/// What the driver should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Obtain a new intermediate (new key) and write it.
    Issue(IssueReason),
    /// Forget the unwritten intermediate: what the mesh wants has moved on.
    DropUnwritten,
    /// Write the intermediate obtained earlier, whose write failed.
    RetryWrite,
    /// Read `cacerts` again (the last read failed).
    Reread,
    /// Renew the agent's own identity.
    RenewIdentity,
    /// Report status to the management plane.
    Report,
    /// Write `ca-crl.pem` again (the published CRLs changed, or the cluster's own CRL is at
    /// half its life), keeping the bundle as it is.
    WriteCrl,
    /// Read or patch istiod's Deployment ([`crate::istiod`]).
    Istiod(IstiodEffect),
}

/// Something the operator should read about a step that did not act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// `cacerts` was written by someone else and adoption was not asked for.
    Foreign,
    /// A new intermediate is due but the management plane is unreachable.
    DueButUnreachable,
}

/// The effects of one step and when to step again (unless something changes first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// In order.
    pub effects: Vec<Effect>,
    /// When to look again.
    pub wake: SystemTime,
    /// Why nothing was done, when that needs saying.
    pub note: Option<Note>,
}

/// The agent's lifecycle state.
#[derive(Debug, Clone)]
pub struct Runner {
    cfg: RunnerConfig,
    phase: Phase,
    failures: u32,
    retry_at: Option<SystemTime>,
    identity_retry_at: Option<SystemTime>,
    identity_failures: u32,
    last_error: String,
    last_renewal: Option<SystemTime>,
    next_renewal: Option<SystemTime>,
    next_report: Option<SystemTime>,
    report_every: Duration,
    renewal_jitter: f64,
    foreign: bool,
    /// Whether the last step saw a valid meshca `cacerts` in service (what a failure leaves).
    holds_current: bool,
    istiod: Option<IstiodPlan>,
}

impl Runner {
    /// A runner that has done nothing yet. `renewal_jitter` in [0, 1) spreads renewals of
    /// clusters issued at the same moment.
    pub fn new(cfg: RunnerConfig, renewal_jitter: f64) -> Self {
        Runner {
            cfg,
            phase: Phase::Waiting,
            failures: 0,
            retry_at: None,
            identity_retry_at: None,
            identity_failures: 0,
            last_error: String::new(),
            last_renewal: None,
            next_renewal: None,
            next_report: None,
            report_every: Duration::from_secs(30),
            renewal_jitter,
            foreign: false,
            holds_current: false,
            istiod: None,
        }
    }

    /// This runner also manages istiod's Deployment.
    pub fn with_istiod(mut self, plan: IstiodPlan) -> Self {
        self.istiod = Some(plan);
        self
    }

    /// The istiod part, when the agent manages istiod.
    pub fn istiod(&self) -> Option<&IstiodPlan> {
        self.istiod.as_ref()
    }

    /// The istiod part, to tell it how an effect went.
    pub fn istiod_mut(&mut self) -> Option<&mut IstiodPlan> {
        self.istiod.as_mut()
    }

    /// Whether `cacerts` was written by someone else and is left alone (last step).
    pub fn foreign(&self) -> bool {
        self.foreign
    }

    /// The phase, as reported.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The last error, empty when healthy.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// When the last intermediate was written.
    pub fn last_renewal(&self) -> Option<SystemTime> {
        self.last_renewal
    }

    /// When the next renewal is planned.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.next_renewal
    }

    /// How many attempts in a row have failed.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Decides what to do now.
    pub fn step(&mut self, obs: &Observation<'_>) -> Step {
        let now = obs.now;
        if let Some(t) = obs.trust
            && t.report_interval > Duration::ZERO
        {
            self.report_every = t.report_interval;
        }
        let mut effects = Vec::new();
        let mut note = None;
        let mut wake = now + IDLE_WAKE;
        let backoff_over = self.retry_at.is_none_or(|at| now >= at);
        self.foreign = false;
        self.holds_current = obs.held.current().is_some();

        match obs.held {
            // Vault mode: the vault-agent sidecar beside istiod obtains intermediates into memory;
            // this agent writes no cacerts and reports only istiod.
            _ if obs.trust.is_some_and(|t| t.vault_delegated) => {
                self.phase = Phase::Waiting;
                self.last_error.clear();
                self.next_renewal = None;
            }
            Held::Foreign { .. } if !self.cfg.adopt_existing => {
                self.foreign = true;
                note = Some(Note::Foreign);
                self.phase = Phase::Waiting;
                self.last_error = format!(
                    "{} exists and was not written by meshca; refusing to overwrite it. Start the agent with \
                     --adopt-existing to let meshca replace it (the new root set must contain the old one or be \
                     contained in it)",
                    self.cfg.cacerts
                );
            }
            Held::Unreadable { error } => {
                self.phase = Phase::Degraded;
                self.last_error = format!("reading {}: {error}", self.cfg.cacerts);
                match self.retry_at {
                    Some(at) if now < at => wake = at,
                    _ => effects.push(Effect::Reread),
                }
            }
            held => {
                // Plan against what will be in service: an unwritten intermediate counts, so a
                // failed write is retried instead of asking for yet another intermediate.
                let current = obs.unwritten.map(|u| &u.current).or(held.current());
                let revoked = matches!(held, Held::Ours { crl, .. } if crl.revoked) && obs.unwritten.is_none();
                let decision = match (held, obs.trust) {
                    (_, Some(t)) if !t.enrolled => plan::decide(current, obs.trust, now, self.renewal_jitter),
                    // The CRLs published above name the intermediate in service (a revocation the
                    // management plane's rotation request has not reached yet, or one made in
                    // Vault): replace it now.
                    (_, Some(_)) if revoked => Decision::IssueNow(IssueReason::Forced),
                    (Held::OursInvalid { .. } | Held::Foreign { .. }, Some(_)) if obs.unwritten.is_none() => {
                        Decision::IssueNow(IssueReason::Initial)
                    }
                    _ => plan::decide(current, obs.trust, now, self.renewal_jitter),
                };
                match decision {
                    Decision::IssueNow(reason) => {
                        if obs.unwritten.is_some() {
                            effects.push(Effect::DropUnwritten);
                        }
                        let keeps = held.current().is_some();
                        if !obs.connected {
                            // Due, but the management plane is not reachable right now; the
                            // trust stream reconnecting wakes the driver.
                            note = Some(Note::DueButUnreachable);
                            self.phase = if keeps { Phase::Degraded } else { Phase::Waiting };
                            self.last_error = if obs.link_error.is_empty() {
                                "management plane unreachable".into()
                            } else {
                                obs.link_error.to_string()
                            };
                        } else if !backoff_over {
                            self.phase = if keeps { Phase::Degraded } else { Phase::Waiting };
                            wake = self.retry_at.unwrap_or(wake);
                        } else {
                            self.phase = Phase::Renewing;
                            effects.push(Effect::Issue(reason));
                        }
                    }
                    Decision::WaitUntil(at) if obs.unwritten.is_some() => {
                        self.next_renewal = Some(at);
                        self.phase = if held.current().is_some() { Phase::Degraded } else { Phase::Waiting };
                        match self.retry_at {
                            Some(r) if now < r => wake = r,
                            _ => effects.push(Effect::RetryWrite),
                        }
                    }
                    Decision::WaitUntil(at) => {
                        self.next_renewal = Some(at);
                        self.phase =
                            if obs.connected || self.last_error.is_empty() { Phase::Ready } else { Phase::Degraded };
                        if obs.connected {
                            self.last_error.clear();
                        }
                        let planned = at.duration_since(now).unwrap_or_default().min(MAX_PLANNED_SLEEP);
                        wake = now + planned;
                    }
                    Decision::Idle => {
                        self.phase = Phase::Waiting;
                    }
                }
            }
        }

        // ca-crl.pem follows the published CRLs and re-signs its own CRL before nextUpdate. It is
        // written before any re-issue due in the same step: a new root CRL (a revocation) must
        // reach istiod even if the re-issue it forces fails. A cluster no policy covers (or that
        // two policies claim) is left exactly as it is, ca-crl.pem included.
        if let (Held::Ours { crl, .. }, Some(t)) = (obs.held, obs.trust)
            && obs.unwritten.is_none()
            && !t.vault_delegated
            && t.enrolled
        {
            match crate::cacerts::crl_due(crl, &t.crl_digest, now) {
                Ok(()) if backoff_over => effects.insert(0, Effect::WriteCrl),
                Ok(()) => wake = wake.min(self.retry_at.unwrap_or(wake)),
                Err(Some(at)) => wake = wake.min(at),
                Err(None) => {}
            }
        }
        if obs.connected && obs.identity_due && self.identity_retry_at.is_none_or(|at| now >= at) {
            effects.push(Effect::RenewIdentity);
        }
        if obs.connected {
            let due = *self.next_report.get_or_insert(now);
            if now >= due {
                effects.push(Effect::Report);
                self.next_report = Some(now + self.report_every);
            }
            if let Some(next) = self.next_report {
                wake = wake.min(next);
            }
        }
        if let Some(at) = self.identity_retry_at.filter(|_| obs.identity_due) {
            wake = wake.min(at.max(now));
        }
        // istiod is planned once the management plane has said which mode the mesh is in, and
        // not while `cacerts` is about to change (the restart is for what will be in service).
        let changing = effects
            .iter()
            .any(|e| matches!(e, Effect::Issue(_) | Effect::RetryWrite | Effect::Reread | Effect::WriteCrl));
        if let (Some(istiod), Some(t), false) = (&self.istiod, obs.trust, changing) {
            let serial = match obs.held {
                Held::Ours { bundle, .. } => Some(bundle.ca_cert().serial_hex()),
                _ => None,
            };
            let wants = Wants { serial: serial.as_deref(), vault: t.vault_delegated, auto_restart: t.auto_restart };
            let (effect, at) = istiod.step(now, wants);
            match effect {
                Some(e) => effects.push(Effect::Istiod(e)),
                None => wake = wake.min(at),
            }
        }
        Step { effects, wake: wake.max(now), note }
    }

    /// A new intermediate was written at `now`.
    pub fn issued(&mut self, now: SystemTime) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error.clear();
        self.last_renewal = Some(now);
        self.phase = Phase::Ready;
        // Tell the management plane at once.
        self.next_report = Some(now);
    }

    /// `ca-crl.pem` was written.
    pub fn crl_written(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error.clear();
    }

    /// Report at the next step (something worth telling happened).
    pub fn report_now(&mut self) {
        self.next_report = None;
    }

    /// `cacerts` was read again successfully.
    pub fn reread(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error.clear();
    }

    /// An attempt (to obtain, to write, to read) failed at `now` with `error`; the next attempt
    /// waits for the capped exponential backoff. Returns the wait.
    pub fn failed(&mut self, error: String, now: SystemTime, jitter: f64) -> Duration {
        let wait = plan::backoff(self.failures, self.cfg.backoff_base, self.cfg.backoff_max, jitter);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + wait);
        self.last_error = error;
        // The attempt is over: until the retry, the cluster runs on what it has (or has none).
        // Reports made in the same step as the failed attempt say so, not "Renewing".
        if self.phase == Phase::Renewing {
            self.phase = if self.holds_current { Phase::Degraded } else { Phase::Waiting };
        }
        wait
    }

    /// Renewing the agent's identity failed at `now`; it is retried with its own backoff.
    pub fn identity_failed(&mut self, now: SystemTime, jitter: f64) -> Duration {
        let wait = plan::backoff(self.identity_failures, self.cfg.backoff_base, self.cfg.backoff_max, jitter);
        self.identity_failures = self.identity_failures.saturating_add(1);
        self.identity_retry_at = Some(now + wait);
        wait
    }

    /// The agent's identity was renewed.
    pub fn identity_renewed(&mut self) {
        self.identity_failures = 0;
        self.identity_retry_at = None;
    }
}

#[cfg(test)]
mod tests {
    use meshca_store::ResourceVersion;

    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn cfg() -> RunnerConfig {
        RunnerConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            adopt_existing: false,
            cacerts: "istio-system/cacerts".into(),
        }
    }

    fn trust() -> Trust {
        Trust {
            generation: "g1".into(),
            roots_fingerprint: "r".into(),
            rotate_requests: 0,
            grace_ratio: 0.2,
            enrolled: true,
            report_interval: Duration::from_secs(30),
            vault_delegated: false,
            auto_restart: false,
            crl_digest: String::new(),
        }
    }

    fn current() -> Current {
        Current {
            not_before: t(0),
            not_after: t(1000),
            generation: "g1".into(),
            rotate_handled: 0,
            roots_fingerprint: "r".into(),
        }
    }

    fn obs<'a>(now: SystemTime, held: &'a Held, trust: Option<&'a Trust>, connected: bool) -> Observation<'a> {
        Observation { now, held, unwritten: None, trust, connected, link_error: "", identity_due: false, jitter: 0.0 }
    }

    /// A valid `Held::Ours` needs a real bundle; planning only reads `current`, so tests that
    /// need one use `unwritten` with an absent store object instead where it makes no difference,
    /// and this helper where it does.
    fn ours(c: Current) -> Held {
        let (bundle, _) = crate::testing::bundle();
        let mut held = crate::cacerts::written(
            bundle,
            &crate::cacerts::Stamp {
                cluster: "cluster-1".into(),
                generation: c.generation.clone(),
                rotate_requests: c.rotate_handled,
                serial: "01".into(),
                issued_at: c.not_before,
            },
            &crate::cacerts::CrlFile::default(),
            ResourceVersion("1".into()),
        );
        if let Held::Ours { current, .. } = &mut held {
            *current = c;
        }
        held
    }

    #[test]
    fn the_first_intermediate_is_asked_for_once_connected_and_reported_at_once() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = trust();
        let s = r.step(&obs(t(0), &Held::Absent, None, false));
        assert!(s.effects.is_empty());
        assert_eq!((r.phase(), s.wake), (Phase::Waiting, t(0) + IDLE_WAKE));

        let s = r.step(&obs(t(1), &Held::Absent, Some(&tr), true));
        assert_eq!(s.effects, vec![Effect::Issue(IssueReason::Initial), Effect::Report]);
        assert_eq!(r.phase(), Phase::Renewing);
        r.issued(t(1));
        let held = ours(current());
        let s = r.step(&obs(t(2), &held, Some(&tr), true));
        assert_eq!(s.effects, vec![Effect::Report], "a fresh intermediate is reported at once");
        assert_eq!(r.phase(), Phase::Ready);
    }

    #[test]
    fn renewal_waits_for_the_grace_ratio_then_issues_with_a_new_reason() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = trust();
        let held = ours(current());
        let s = r.step(&obs(t(100), &held, Some(&tr), true));
        assert_eq!(r.next_renewal(), Some(t(800)), "20 % of a 1000 s lifetime before NotAfter");
        assert_eq!(s.wake, t(100) + Duration::from_secs(30), "the next report comes first");
        let s = r.step(&obs(t(790), &held, Some(&tr), true));
        assert!(!s.effects.iter().any(|e| matches!(e, Effect::Issue(_))));
        assert_eq!(s.wake, t(790) + Duration::from_secs(10));
        let s = r.step(&obs(t(800), &held, Some(&tr), true));
        assert!(s.effects.contains(&Effect::Issue(IssueReason::Renewal)));
        assert_eq!(r.phase(), Phase::Renewing);
        // The attempt fails: the report that follows in the same step says Degraded, because the
        // cluster runs on its current intermediate until the retry.
        r.failed("Unavailable: connection refused".into(), t(800), 0.0);
        assert_eq!(r.phase(), Phase::Degraded);
    }

    #[test]
    fn a_new_generation_re_issues_at_once_but_an_uncovered_cluster_keeps_what_it_has() {
        let mut r = Runner::new(cfg(), 0.0);
        let held = ours(current());
        let mut tr = trust();
        tr.generation = "g2".into();
        let s = r.step(&obs(t(10), &held, Some(&tr), true));
        assert!(s.effects.contains(&Effect::Issue(IssueReason::PolicyChange)));
        tr.enrolled = false;
        let s = r.step(&obs(t(900), &held, Some(&tr), true));
        assert_eq!(s.effects, vec![Effect::Report]);
        assert_eq!(r.phase(), Phase::Waiting);
    }

    #[test]
    fn failures_back_off_exponentially_and_keep_the_current_intermediate() {
        let mut r = Runner::new(cfg(), 0.0);
        let mut tr = trust();
        tr.generation = "g2".into();
        let held = ours(current());
        let mut now = t(10);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let s = r.step(&obs(now, &held, Some(&tr), true));
            assert!(s.effects.contains(&Effect::Issue(IssueReason::PolicyChange)), "{s:?}");
            let wait = r.failed("Unavailable: connection refused".into(), now, 0.999);
            waits.push(wait.as_secs());
            // Before the backoff ends nothing is asked for, and the phase says Degraded.
            let s = r.step(&obs(now + wait / 2, &held, Some(&tr), true));
            assert!(!s.effects.iter().any(|e| matches!(e, Effect::Issue(_))));
            assert_eq!(r.phase(), Phase::Degraded);
            assert!(s.wake <= now + wait, "it wakes for the retry (or an earlier report)");
            now += wait;
        }
        assert_eq!(waits, [0, 1, 3, 7, 15, 29, 29], "doubling up to the 30 s cap (jittered down)");
        assert_eq!(r.last_error(), "Unavailable: connection refused");
        r.issued(now);
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn an_unreachable_management_plane_leaves_cacerts_alone_and_says_why() {
        let mut r = Runner::new(cfg(), 0.0);
        let held = ours(current());
        let tr = trust();
        let mut o = obs(t(900), &held, Some(&tr), false);
        o.link_error = "Unavailable: tcp connect error";
        let s = r.step(&o);
        assert!(s.effects.is_empty(), "due, but nobody to ask: {s:?}");
        assert_eq!((r.phase(), r.last_error()), (Phase::Degraded, "Unavailable: tcp connect error"));
        let s = r.step(&obs(t(901), &Held::Absent, Some(&tr), false));
        assert!(s.effects.is_empty());
        assert_eq!(r.phase(), Phase::Waiting, "nothing in service yet");
    }

    #[test]
    fn a_failed_write_is_retried_with_the_intermediate_obtained_not_a_new_one() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = trust();
        let unwritten = Unwritten { current: current() };
        let mut o = obs(t(10), &Held::Absent, Some(&tr), true);
        o.unwritten = Some(&unwritten);
        let s = r.step(&o);
        assert_eq!(s.effects, vec![Effect::RetryWrite, Effect::Report]);
        let wait = r.failed("istio-system/cacerts: No space left on device".into(), t(10), 0.0);
        o.now = t(10) + wait / 2;
        assert!(r.step(&o).effects.is_empty(), "backing off");
        o.now = t(10) + wait;
        assert_eq!(r.step(&o).effects, vec![Effect::RetryWrite]);
        // If the mesh moves on meanwhile, the unwritten one is dropped and a new one asked for.
        let mut tr2 = trust();
        tr2.generation = "g2".into();
        o.trust = Some(&tr2);
        o.now = t(100);
        assert!(r.step(&o).effects.starts_with(&[Effect::DropUnwritten, Effect::Issue(IssueReason::PolicyChange)]));
    }

    #[test]
    fn a_store_read_error_is_retried_with_backoff_instead_of_stopping_the_agent() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = trust();
        let held = Held::Unreadable { error: "permission denied".into() };
        assert_eq!(r.step(&obs(t(0), &held, Some(&tr), true)).effects, vec![Effect::Reread, Effect::Report]);
        assert_eq!(r.phase(), Phase::Degraded);
        let wait = r.failed("permission denied".into(), t(0), 0.0);
        assert!(r.step(&obs(t(0), &held, Some(&tr), true)).effects.is_empty());
        assert_eq!(r.step(&obs(t(0) + wait, &held, Some(&tr), true)).effects, vec![Effect::Reread]);
    }

    #[test]
    fn a_foreign_cacerts_is_not_touched_unless_adoption_is_asked_for() {
        let tr = trust();
        let foreign = Held::Foreign { version: ResourceVersion("7".into()), roots: None };
        let mut r = Runner::new(cfg(), 0.0);
        let s = r.step(&obs(t(0), &foreign, Some(&tr), true));
        assert_eq!(s.effects, vec![Effect::Report]);
        assert_eq!(r.phase(), Phase::Waiting);
        assert!(r.last_error().contains("--adopt-existing"), "{}", r.last_error());
        let mut r = Runner::new(RunnerConfig { adopt_existing: true, ..cfg() }, 0.0);
        assert!(r.step(&obs(t(0), &foreign, Some(&tr), true)).effects.contains(&Effect::Issue(IssueReason::Initial)));
    }

    /// A CRL in `ca-crl.pem` naming the intermediate in service (a revocation made in Vault, or
    /// one whose rotation request has not arrived) re-issues at once; a due CRL refresh is written
    /// first.
    #[test]
    fn a_revoked_intermediate_is_replaced_at_once_after_its_crl_is_written() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = Trust { crl_digest: "published".into(), ..trust() };
        let mut held = ours(current());
        if let Held::Ours { crl, .. } = &mut held {
            crl.upstream_digest = "published".into();
            crl.refresh_at = Some(t(50));
        }
        let s = r.step(&obs(t(10), &held, Some(&tr), true));
        assert!(!s.effects.iter().any(|e| matches!(e, Effect::Issue(_) | Effect::WriteCrl)), "{s:?}");
        assert_eq!(s.wake, t(40), "the next report, before the CRL refresh at 50");
        let s = r.step(&obs(t(50), &held, Some(&tr), true));
        assert_eq!(s.effects.first(), Some(&Effect::WriteCrl), "{s:?}");
        if let Held::Ours { crl, .. } = &mut held {
            crl.revoked = true;
            crl.refresh_at = Some(t(100));
        }
        let s = r.step(&obs(t(51), &held, Some(&tr), true));
        assert!(s.effects.contains(&Effect::Issue(IssueReason::Forced)), "{s:?}");
    }

    #[test]
    fn the_identity_renews_when_due_and_backs_off_on_failure() {
        let mut r = Runner::new(cfg(), 0.0);
        let tr = trust();
        let held = ours(current());
        let mut o = obs(t(10), &held, Some(&tr), true);
        o.identity_due = true;
        assert!(r.step(&o).effects.contains(&Effect::RenewIdentity));
        let wait = r.identity_failed(t(10), 0.0);
        o.now = t(10) + wait / 2;
        assert!(!r.step(&o).effects.contains(&Effect::RenewIdentity));
        o.now = t(10) + wait;
        assert!(r.step(&o).effects.contains(&Effect::RenewIdentity));
    }
}
