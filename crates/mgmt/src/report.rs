//! What the management plane accepts from an agent's status report. Everything in a report is
//! chosen by the agent, and all of it ends up in front of an operator (`meshca status`, the
//! dashboard, the Kubernetes status, alerts), so it is checked before it is stored:
//!
//! - the phase must be one of the protocol's phases;
//! - fields with a fixed shape (serial, fingerprint, generation, key location, version) must have
//!   it, or the report is refused naming the field;
//! - times must be within `0..=`[`MAX_TIME`] (the same bound as token claims: no arithmetic on
//!   them can overflow downstream);
//! - the free text (`last_error`) is escaped of control characters and cut to
//!   [`MAX_ERROR_CHARS`] ([`meshca_proto::text::bounded`]), so an agent cannot drive the
//!   operator's terminal.

use meshca_proto::Phase;
use meshca_proto::mgmt::ClusterStatus;
use meshca_proto::text::{bounded, terminal_safe};

use crate::records::StatusRecord;

/// The latest time a report may carry (9999-12-31T23:59:59Z), in unix seconds.
pub const MAX_TIME: i64 = 253_402_300_799;

/// Longest `last_error` kept, in characters (after escaping).
pub const MAX_ERROR_CHARS: usize = 1024;

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReport {
    /// Not one of the protocol's phases.
    #[error("phase {0} is not one of {1}")]
    Phase(i32, String),
    /// A field that does not have its shape.
    #[error("{field} {value:?} is not {expected}")]
    Shape {
        /// The field.
        field: &'static str,
        /// What was sent (escaped, cut).
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A time outside `0..=MAX_TIME`.
    #[error("{field} {value} is not a unix time between 0 and {MAX_TIME}")]
    Time {
        /// The field.
        field: &'static str,
        /// What was sent.
        value: i64,
    },
}

fn shaped(
    field: &'static str,
    value: &str,
    max: usize,
    expected: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<String, InvalidReport> {
    if value.chars().count() <= max && value.chars().all(ok) {
        return Ok(value.to_string());
    }
    Err(InvalidReport::Shape { field, value: bounded(&terminal_safe(value), 80), expected })
}

fn time(field: &'static str, value: i64) -> Result<i64, InvalidReport> {
    if (0..=MAX_TIME).contains(&value) { Ok(value) } else { Err(InvalidReport::Time { field, value }) }
}

/// The record to store for report `s` received at `now` (unix seconds), or why it is refused.
pub fn accept(s: &ClusterStatus, now: i64) -> Result<StatusRecord, InvalidReport> {
    let phase = match Phase::try_from(s.phase) {
        Ok(Phase::Unspecified) | Err(_) => {
            let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
            return Err(InvalidReport::Phase(s.phase, names.join(", ")));
        }
        Ok(p) => p,
    };
    let token = |c: char| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-' | '+');
    Ok(StatusRecord {
        reported_at: now,
        phase,
        intermediate_serial: shaped("intermediate_serial", &s.intermediate_serial, 64, "hexadecimal", |c| {
            c.is_ascii_hexdigit()
        })?,
        intermediate_not_after: time("intermediate_not_after", s.intermediate_not_after)?,
        intermediate_not_before: time("intermediate_not_before", s.intermediate_not_before)?,
        root_set_fingerprint: shaped("root_set_fingerprint", &s.root_set_fingerprint, 128, FINGERPRINT, token)?,
        chain_root_fingerprint: shaped("chain_root_fingerprint", &s.chain_root_fingerprint, 128, FINGERPRINT, token)?,
        intermediate_issuer_fingerprint: shaped(
            "intermediate_issuer_fingerprint",
            &s.intermediate_issuer_fingerprint,
            128,
            FINGERPRINT,
            token,
        )?,
        policy_generation: shaped("policy_generation", &s.policy_generation, 128, "a policy generation", token)?,
        last_renewal: time("last_renewal", s.last_renewal)?,
        last_error: bounded(&s.last_error, MAX_ERROR_CHARS),
        crl_note: bounded(&s.crl_note, MAX_ERROR_CHARS),
        upstream_crl_unavailable: s.upstream_crl_unavailable,
        key_location: match s.key_location.as_str() {
            "" | "store" | "memory" => s.key_location.clone(),
            other => {
                return Err(InvalidReport::Shape {
                    field: "key_location",
                    value: bounded(other, 80),
                    expected: "\"store\" or \"memory\"",
                });
            }
        },
        next_renewal: time("next_renewal", s.next_renewal)?,
        agent_version: shaped("agent_version", &s.agent_version, 64, "a version", token)?,
        consecutive_failures: s.consecutive_failures,
        foreign_cacerts: s.foreign_cacerts,
        cacerts_reported_at: now,
        // What a report says of istiod is merged into the stored record by
        // `StatusRecord::after_report`.
        istiod: None,
    })
}

const FINGERPRINT: &str = "a fingerprint (sha256:<hex>)";

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ClusterStatus {
        ClusterStatus {
            phase: Phase::Degraded as i32,
            intermediate_serial: "0A1B2C".into(),
            intermediate_not_after: 1_900_000_000,
            intermediate_not_before: 1_800_000_000,
            root_set_fingerprint: "sha256:00ff".into(),
            policy_generation: "abcdef0123".into(),
            last_renewal: 1_800_000_000,
            last_error: "management plane unreachable: connection refused".into(),
            key_location: "store".into(),
            next_renewal: 1_880_000_000,
            agent_version: "0.1.0".into(),
            consecutive_failures: 3,
            chain_root_fingerprint: "sha256:00ff".into(),
            intermediate_issuer_fingerprint: "sha256:11ee".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_report_is_kept_as_sent() {
        let r = accept(&good(), 5).expect("accepted");
        assert_eq!((r.reported_at, r.phase, r.intermediate_serial.as_str()), (5, Phase::Degraded, "0A1B2C"));
        assert_eq!(r.last_error, good().last_error);
    }

    #[test]
    fn escape_sequences_in_the_error_are_escaped_and_the_error_is_bounded() {
        let mut s = good();
        s.last_error = format!("\u{1b}[2J\u{1b}]0;pwned\u{7}{}", "x".repeat(5000));
        let r = accept(&s, 0).expect("accepted, made safe");
        assert!(r.last_error.starts_with("\\x1b[2J\\x1b]0;pwned\\x07xxx"), "{}", r.last_error);
        assert!(!r.last_error.contains('\u{1b}'));
        assert_eq!(r.last_error.chars().count(), MAX_ERROR_CHARS);
    }

    #[test]
    fn unknown_phases_odd_fields_and_impossible_times_are_refused_by_name() {
        for (phase, ok) in [(0, false), (99, false), (-1, false), (Phase::Ready as i32, true)] {
            let s = ClusterStatus { phase, ..good() };
            assert_eq!(accept(&s, 0).is_ok(), ok, "phase {phase}");
        }
        let cases: Vec<(ClusterStatus, &str)> = vec![
            (ClusterStatus { intermediate_serial: "\u{1b}[31mAB".into(), ..good() }, "intermediate_serial"),
            (ClusterStatus { root_set_fingerprint: "sha256:ab\ncd".into(), ..good() }, "root_set_fingerprint"),
            (ClusterStatus { policy_generation: "x".repeat(200), ..good() }, "policy_generation"),
            (ClusterStatus { key_location: "\u{1b}]0;t\u{7}".into(), ..good() }, "key_location"),
            (ClusterStatus { agent_version: "1.0 \u{9b}2J".into(), ..good() }, "agent_version"),
            (ClusterStatus { intermediate_not_after: i64::MAX, ..good() }, "intermediate_not_after"),
            (ClusterStatus { intermediate_not_before: -1, ..good() }, "intermediate_not_before"),
            (ClusterStatus { last_renewal: i64::MIN, ..good() }, "last_renewal"),
            (ClusterStatus { next_renewal: MAX_TIME + 1, ..good() }, "next_renewal"),
        ];
        for (s, field) in cases {
            let e = accept(&s, 0).expect_err(field).to_string();
            assert!(e.starts_with(field), "{e}");
            assert!(!e.contains('\u{1b}') && !e.contains('\u{9b}'), "{e}");
        }
    }
}
