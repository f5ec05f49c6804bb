//! The policy's defaults, in one place: what an omitted field means.

use std::time::Duration;

/// `spec.trustDomain` when omitted.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// `metadata.namespace` when omitted (and the management plane's own namespace).
pub const NAMESPACE: &str = "meshca";
/// `orgName` (`O=` of roots and intermediates) when omitted.
pub const ORGANIZATION: &str = "meshca";
/// A generated root's lifetime when omitted: 10 years.
pub const ROOT_TTL: Duration = Duration::from_secs(87600 * 3600);
/// A cluster intermediate's lifetime when omitted: 30 days.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(720 * 3600);
/// `secretRotationGracePeriodRatio` when omitted: renew with a fifth of the lifetime left.
pub const GRACE_PERIOD_RATIO: f64 = 0.2;
/// `intermediateRef.expiryWarning` when omitted: 30 days.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(720 * 3600);
/// Istio's own serving names, which a DNS name constraint must permit or istiod cannot serve.
pub const ISTIOD_SERVING_NAMES: [&str; 2] = ["istiod.istio-system.svc", "localhost"];
/// `rootRotation.triggerRatio` when omitted: rotate a generated root with a fifth of its
/// lifetime left, like the intermediates' grace ratio.
pub const ROOT_ROTATION_TRIGGER_RATIO: f64 = 0.2;
/// `rootRotation.maxLeafLifetime` when omitted: Istio's default workload certificate lifetime.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// `rootRotation.skew` when omitted.
pub const ROOT_ROTATION_SKEW: Duration = Duration::from_secs(300);
