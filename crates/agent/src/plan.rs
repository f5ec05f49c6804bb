//! When to ask for a new cluster intermediate, and why. Pure: takes `now`, no I/O, so every rule
//! is unit-tested without a clock.

use std::time::{Duration, SystemTime};

use meshca_proto::IssueReason;

/// What the agent knows about the `cacerts` in service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// Start of the intermediate's lifetime: when it was issued (its NotBefore is backdated by
    /// a couple of minutes for clock skew, which must not count as lifetime).
    pub not_before: SystemTime,
    /// NotAfter of the intermediate.
    pub not_after: SystemTime,
    /// The policy generation it was issued under.
    pub generation: String,
    /// The operator rotation counter it answers.
    pub rotate_handled: u64,
    /// Fingerprint of its root set.
    pub roots_fingerprint: String,
}

/// What the management plane last said.
#[derive(Debug, Clone, PartialEq)]
pub struct Trust {
    /// Current policy generation.
    pub generation: String,
    /// Current root-set fingerprint.
    pub roots_fingerprint: String,
    /// Operator rotation counter.
    pub rotate_requests: u64,
    /// Renew when less than this fraction of the lifetime remains.
    pub grace_ratio: f64,
    /// Whether the policy covers this cluster.
    pub enrolled: bool,
    /// How often to report status.
    pub report_interval: Duration,
    /// Vault mode, and this agent does not talk to Vault: the vault-agent sidecar beside istiod
    /// obtains the intermediates, this agent writes no `cacerts`.
    pub vault_delegated: bool,
    /// The policy's `autoRestartPods`.
    pub auto_restart: bool,
    /// SHA-256 (hex) of the CRLs published above the cluster intermediate (the management
    /// plane's, or Vault's); empty when none are. `ca-crl.pem` is written again when it changes.
    pub crl_digest: String,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ask now.
    IssueNow(IssueReason),
    /// Nothing to do until then.
    WaitUntil(SystemTime),
    /// Nothing to do until the management plane says something.
    Idle,
}

/// The default grace ratio before the management plane has said otherwise.
pub const DEFAULT_GRACE: f64 = 0.2;

/// The renewal point of an intermediate: `grace × lifetime` before NotAfter, moved earlier by up
/// to a tenth of that window (at most 5 min) by `jitter` in [0, 1), so clusters issued at the same
/// moment do not all renew in the same second.
pub fn renew_at(c: &Current, grace: f64, jitter: f64) -> SystemTime {
    let lifetime = c.not_after.duration_since(c.not_before).unwrap_or_default();
    let window = lifetime.mul_f64(grace.clamp(0.0, 1.0));
    let spread = (window / 10).min(Duration::from_secs(300)).mul_f64(jitter.clamp(0.0, 1.0));
    c.not_after.checked_sub(window + spread).unwrap_or(c.not_before)
}

/// Decides what to do.
pub fn decide(current: Option<&Current>, trust: Option<&Trust>, now: SystemTime, jitter: f64) -> Decision {
    match (current, trust) {
        (None, Some(t)) if t.enrolled => Decision::IssueNow(IssueReason::Initial),
        (None, _) => Decision::Idle,
        // The policy no longer covers this cluster: keep what is in service, ask for nothing.
        (Some(_), Some(t)) if !t.enrolled => Decision::Idle,
        (Some(c), t) => {
            if let Some(t) = t {
                if t.rotate_requests > c.rotate_handled {
                    return Decision::IssueNow(IssueReason::Forced);
                }
                if !t.roots_fingerprint.is_empty() && t.roots_fingerprint != c.roots_fingerprint {
                    return Decision::IssueNow(IssueReason::RootSetChange);
                }
                if t.generation != c.generation {
                    return Decision::IssueNow(IssueReason::PolicyChange);
                }
            }
            let grace = trust.map(|t| t.grace_ratio).unwrap_or(DEFAULT_GRACE);
            let at = renew_at(c, grace, jitter);
            if now >= at { Decision::IssueNow(IssueReason::Renewal) } else { Decision::WaitUntil(at) }
        }
    }
}

/// Capped exponential backoff with jitter: `base × 2^attempt`, at most `max`, scaled by
/// `[0.5, 1.0)` so that many agents retrying after one outage spread out.
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    exp.min(max).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
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

    #[test]
    fn renews_when_less_than_the_grace_ratio_remains() {
        assert_eq!(decide(Some(&current()), Some(&trust()), t(100), 0.0), Decision::WaitUntil(t(800)));
        assert_eq!(decide(Some(&current()), Some(&trust()), t(800), 0.0), Decision::IssueNow(IssueReason::Renewal));
        // Jitter only ever moves renewal earlier, by at most a tenth of the window.
        assert_eq!(renew_at(&current(), 0.2, 0.999_999).duration_since(t(780)).unwrap_or_default().as_secs(), 0);
        // Without the management plane, the current cacerts is kept and renewal still planned.
        assert_eq!(decide(Some(&current()), None, t(100), 0.0), Decision::WaitUntil(t(800)));
    }

    #[test]
    fn policy_root_and_operator_changes_reissue_at_once() {
        let c = current();
        let mut tr = trust();
        tr.generation = "g2".into();
        assert_eq!(decide(Some(&c), Some(&tr), t(1), 0.0), Decision::IssueNow(IssueReason::PolicyChange));
        let mut tr = trust();
        tr.roots_fingerprint = "r2".into();
        assert_eq!(decide(Some(&c), Some(&tr), t(1), 0.0), Decision::IssueNow(IssueReason::RootSetChange));
        let mut tr = trust();
        tr.rotate_requests = 1;
        assert_eq!(decide(Some(&c), Some(&tr), t(1), 0.0), Decision::IssueNow(IssueReason::Forced));
        assert_eq!(decide(None, Some(&trust()), t(1), 0.0), Decision::IssueNow(IssueReason::Initial));
        assert_eq!(decide(None, None, t(1), 0.0), Decision::Idle);
        let mut out = trust();
        out.enrolled = false;
        assert_eq!(decide(None, Some(&out), t(1), 0.0), Decision::Idle);
        assert_eq!(decide(Some(&c), Some(&out), t(900), 0.0), Decision::Idle, "no renewal when not covered");
    }

    #[test]
    fn backoff_grows_to_the_cap_and_is_jittered_down_only() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(30);
        assert!(backoff(0, b, m, 0.0) == Duration::from_millis(500));
        assert!(backoff(0, b, m, 0.99) < b);
        assert!(backoff(3, b, m, 0.999) <= Duration::from_secs(8));
        assert!(backoff(3, b, m, 0.0) >= Duration::from_secs(4));
        assert_eq!(backoff(20, b, m, 0.999_999_9).as_secs(), 29);
        assert!(backoff(20, b, m, 0.0) >= Duration::from_secs(15));
    }
}
