//! Which control-plane identities the management plane accepts, decided on plain values.
//!
//! The relay CA signs every agent and operator certificate, so a certificate that verifies is not
//! enough: it may have been replaced, or stolen and revoked. The rules:
//!
//! - **Agents.** A cluster's record names its *current* identity (a serial). Only that
//!   certificate is accepted — plus, after a renewal, its *predecessor* for a short overlap
//!   window ([`crate::grpc::Settings::identity_overlap`], 5 minutes by default), so that calls on
//!   connections the agent opened before the renewal finish; the agent reconnects with the new
//!   certificate at once. A registration with a new bootstrap token replaces the identity with
//!   no overlap at all, and `meshca cluster remove` deletes the record: every earlier
//!   certificate of the cluster is refused from then on, on every call, and open trust streams
//!   end. Only the current identity may renew, so a stolen predecessor cannot renew itself for
//!   ever; the one exception is a renewal whose answer was lost, retried by the predecessor for
//!   the *same key* the current identity certifies (a key only the agent holds).
//! - **Operators.** Operator certificates are checked against a deny list on every call
//!   (`meshca operator revoke`).

use std::time::Duration;

use meshca_pki::chain::rfc3339;

use crate::records::ClusterRecord;

/// Default overlap during which a renewed agent identity's predecessor is still accepted.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(300);

/// How an accepted agent certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The cluster's current identity.
    Current,
    /// The identity the current one replaced at a renewal, accepted until `until` (unix seconds).
    Predecessor {
        /// End of the overlap window.
        until: i64,
    },
}

/// Why an agent certificate was refused. Each says what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The cluster has no registration (never registered, or removed).
    #[error(
        "cluster {0} is not registered (it may have been removed with `meshca cluster remove`); register it again with a bootstrap token from `meshca cluster add`"
    )]
    NotRegistered(String),
    /// The certificate was the predecessor and its window has passed.
    #[error(
        "agent certificate {serial} of cluster {cluster} was replaced at a renewal; it was accepted until {until} and is refused now"
    )]
    OverlapOver {
        /// The presented serial.
        serial: String,
        /// The cluster.
        cluster: String,
        /// When the window closed (RFC 3339).
        until: String,
    },
    /// Neither the current identity nor its predecessor: replaced by a registration, or older.
    #[error(
        "agent certificate {serial} is not the current identity of cluster {cluster}: it was replaced by a newer registration or renewal; register this agent again with a bootstrap token from `meshca cluster add`"
    )]
    NotCurrent {
        /// The presented serial.
        serial: String,
        /// The cluster.
        cluster: String,
    },
    /// A renewal by anything but the current identity (or a lost-answer retry).
    #[error("only the current identity of cluster {cluster} may renew it; certificate {serial} was already replaced")]
    RenewalByPredecessor {
        /// The presented serial.
        serial: String,
        /// The cluster.
        cluster: String,
    },
}

/// Whether `serial` may call as the agent of `rec`'s cluster at `now` (unix seconds).
pub fn check(rec: &ClusterRecord, serial: &str, now: i64) -> Result<Standing, Refused> {
    if !rec.identity_serial.is_empty() && rec.identity_serial.eq_ignore_ascii_case(serial) {
        return Ok(Standing::Current);
    }
    if !rec.previous_identity_serial.is_empty() && rec.previous_identity_serial.eq_ignore_ascii_case(serial) {
        if now < rec.previous_identity_until {
            return Ok(Standing::Predecessor { until: rec.previous_identity_until });
        }
        return Err(Refused::OverlapOver {
            serial: serial.to_string(),
            cluster: rec.name.clone(),
            until: rfc3339(meshca_clock::from_unix(rec.previous_identity_until)),
        });
    }
    Err(Refused::NotCurrent { serial: serial.to_string(), cluster: rec.name.clone() })
}

/// A new identity for the cluster: its serial and the SHA-256 of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdentity {
    /// Uppercase hex.
    pub serial: String,
    /// Hex.
    pub key_sha256: String,
}

/// The record after `presented` (standing as `standing`) renewed into `new` at `now`: the
/// current identity becomes the predecessor for `overlap`. A predecessor may only retry a
/// renewal for the key the current identity already certifies (its answer was lost); that
/// replaces the current certificate and leaves the predecessor's window as it was, so retrying
/// never extends it.
pub fn renewed(
    rec: &ClusterRecord,
    presented: &str,
    new: &NewIdentity,
    now: i64,
    overlap: Duration,
) -> Result<ClusterRecord, Refused> {
    let mut next = rec.clone();
    match check(rec, presented, now)? {
        Standing::Current => {
            next.previous_identity_serial = rec.identity_serial.clone();
            next.previous_identity_until = now.saturating_add(i64::try_from(overlap.as_secs()).unwrap_or(i64::MAX));
        }
        Standing::Predecessor { .. }
            if !rec.identity_key_sha256.is_empty() && rec.identity_key_sha256 == new.key_sha256 => {}
        Standing::Predecessor { .. } => {
            return Err(Refused::RenewalByPredecessor { serial: presented.to_string(), cluster: rec.name.clone() });
        }
    }
    next.identity_serial = new.serial.clone();
    next.identity_key_sha256 = new.key_sha256.clone();
    Ok(next)
}

/// The record after a registration with a bootstrap token at `now`: `new` is the only identity
/// accepted from then on (no overlap: re-registering is how an operator replaces a lost or
/// stolen agent identity). Rotation requests carry over, so the agent picks up any pending one.
pub fn registered(existing: Option<&ClusterRecord>, cluster: &str, new: &NewIdentity, now: i64) -> ClusterRecord {
    let mut rec = existing.cloned().unwrap_or(ClusterRecord {
        name: cluster.to_string(),
        registered_at: now,
        ..Default::default()
    });
    rec.identity_serial = new.serial.clone();
    rec.identity_key_sha256 = new.key_sha256.clone();
    rec.previous_identity_serial.clear();
    rec.previous_identity_until = 0;
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(serial: &str, key: &str) -> NewIdentity {
        NewIdentity { serial: serial.into(), key_sha256: key.into() }
    }

    const OVERLAP: Duration = Duration::from_secs(300);

    #[test]
    fn a_renewal_keeps_the_predecessor_for_the_overlap_only() {
        let rec = registered(None, "c1", &id("AA", "ka"), 1000);
        assert_eq!(check(&rec, "AA", 1000), Ok(Standing::Current));
        assert_eq!(check(&rec, "aa", 1000), Ok(Standing::Current), "hex case does not matter");
        let rec = renewed(&rec, "AA", &id("BB", "kb"), 2000, OVERLAP).expect("the current identity renews");
        assert_eq!(check(&rec, "BB", 2000), Ok(Standing::Current));
        assert_eq!(check(&rec, "AA", 2299), Ok(Standing::Predecessor { until: 2300 }));
        assert!(matches!(check(&rec, "AA", 2300), Err(Refused::OverlapOver { .. })));
        assert!(matches!(check(&rec, "00", 2000), Err(Refused::NotCurrent { .. })));
        // The next renewal pushes the first identity out entirely.
        let rec = renewed(&rec, "BB", &id("CC", "kc"), 3000, OVERLAP).expect("renews");
        assert!(matches!(check(&rec, "AA", 3000), Err(Refused::NotCurrent { .. })));
        assert_eq!(check(&rec, "BB", 3000), Ok(Standing::Predecessor { until: 3300 }));
    }

    #[test]
    fn a_predecessor_cannot_renew_itself_except_to_fetch_a_lost_answer() {
        let rec = registered(None, "c1", &id("AA", "ka"), 0);
        let rec = renewed(&rec, "AA", &id("BB", "kb"), 100, OVERLAP).expect("renews");
        let e = renewed(&rec, "AA", &id("XX", "thief-key"), 150, OVERLAP).expect_err("a stolen predecessor");
        assert!(matches!(e, Refused::RenewalByPredecessor { .. }), "{e}");
        // The agent's retry for the key it already holds: re-issued, window not extended.
        let again = renewed(&rec, "AA", &id("B2", "kb"), 150, OVERLAP).expect("lost answer fetched");
        assert_eq!((again.identity_serial.as_str(), again.previous_identity_until), ("B2", 400));
        assert!(matches!(check(&again, "BB", 150), Err(Refused::NotCurrent { .. })), "the unused one is gone");
        assert!(renewed(&rec, "AA", &id("B3", "kb"), 400, OVERLAP).is_err(), "not after the window");
    }

    #[test]
    fn a_registration_ends_every_earlier_identity_at_once() {
        let rec = registered(None, "c1", &id("AA", "ka"), 0);
        let rec = renewed(&rec, "AA", &id("BB", "kb"), 100, OVERLAP).expect("renews");
        let rec = ClusterRecord { rotate_requests: 3, ..rec };
        let again = registered(Some(&rec), "c1", &id("CC", "kc"), 150);
        assert_eq!(check(&again, "CC", 150), Ok(Standing::Current));
        for old in ["AA", "BB"] {
            assert!(matches!(check(&again, old, 150), Err(Refused::NotCurrent { .. })), "{old}");
        }
        assert_eq!((again.registered_at, again.rotate_requests), (0, 3), "the registration history stays");
    }

    #[test]
    fn an_empty_record_accepts_nothing() {
        let rec = ClusterRecord { name: "c1".into(), ..Default::default() };
        assert!(check(&rec, "", 0).is_err());
        assert!(check(&rec, "AA", 0).is_err());
    }
}
