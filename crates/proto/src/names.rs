//! Human names of the shared enums: `Phase::Ready` is "Ready" in logs, `meshca status`, records
//! and the Kubernetes status; `IssueReason::PolicyChange` is "policy-change" on the command line
//! and in the issued log. One spelling for each, here.

use std::fmt;
use std::str::FromStr;

use crate::mgmt::{AlertKind, IssueReason, IstiodState, Phase, RotationPhase};

/// A name that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// Which enum.
    pub kind: &'static str,
    /// What was given.
    pub given: String,
    /// What would have been accepted.
    pub expected: Vec<&'static str>,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}: expected one of {}", self.kind, self.given, self.expected.join(", "))
    }
}

impl std::error::Error for UnknownName {}

macro_rules! names {
    ($ty:ident, $kind:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value but `Unspecified`, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The human name (`Unspecified` for the zero value).
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                    $ty::Unspecified => "Unspecified",
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName { kind: $kind, given: s.to_string(), expected: vec![$($name),+] }),
                }
            }
        }
    };
}

names!(Phase, "phase", {
    Waiting => "Waiting",
    Ready => "Ready",
    Renewing => "Renewing",
    Degraded => "Degraded",
});

names!(AlertKind, "alert kind", {
    PolicyInvalid => "PolicyInvalid",
    PolicyWarning => "PolicyWarning",
    RootExpiresWithinIntermediateLifetime => "RootExpiresWithinIntermediateLifetime",
    UpstreamIntermediateExpiring => "UpstreamIntermediateExpiring",
    IntermediateRenewalOverdue => "IntermediateRenewalOverdue",
    IntermediateExpired => "IntermediateExpired",
    ClusterNotReporting => "ClusterNotReporting",
    ForeignCacerts => "ForeignCacerts",
    IstiodNotWired => "IstiodNotWired",
    RootRotationStalled => "RootRotationStalled",
    UpstreamCrlUnavailable => "UpstreamCrlUnavailable",
    FederationFailing => "FederationFailing",
    ClusterPolicyConflict => "ClusterPolicyConflict",
});

names!(IstiodState, "istiod state", {
    Wired => "Wired",
    NotFound => "NotFound",
    Forbidden => "Forbidden",
    Conflict => "Conflict",
    Failed => "Failed",
});

names!(RotationPhase, "rotation phase", {
    Idle => "Idle",
    Distributing => "Distributing",
    Switching => "Switching",
    Draining => "Draining",
    Retiring => "Retiring",
});

names!(IssueReason, "issue reason", {
    Initial => "initial",
    Renewal => "renewal",
    PolicyChange => "policy-change",
    RootSetChange => "root-set-change",
    Forced => "forced",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in Phase::ALL {
            assert_eq!(p.name().parse::<Phase>(), Ok(*p));
        }
        for k in AlertKind::ALL {
            assert_eq!(k.name().parse::<AlertKind>(), Ok(*k));
        }
        for r in IssueReason::ALL {
            assert_eq!(r.name().parse::<IssueReason>(), Ok(*r));
        }
        for r in RotationPhase::ALL {
            assert_eq!(r.name().parse::<RotationPhase>(), Ok(*r));
        }
        let e = "Broken".parse::<Phase>().expect_err("not a phase");
        assert!(e.to_string().contains("Ready"), "{e}");
        assert!("Unspecified".parse::<Phase>().is_err(), "the zero value is not a name one may send");
    }

    #[test]
    fn serde_names_are_the_variant_names_records_already_hold() {
        assert_eq!(serde_json::to_string(&Phase::Ready).ok().as_deref(), Some("\"Ready\""));
        assert_eq!(serde_json::from_str::<Phase>("\"Degraded\"").ok(), Some(Phase::Degraded));
    }
}
