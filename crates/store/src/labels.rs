//! The labels and annotations meshca puts on the objects it writes, in one place: the agent
//! writes them on `cacerts`, the management plane on its CAs, and the Kubernetes backend and
//! RBAC rules select by them.

/// Label marking objects meshca manages (`app.kubernetes.io/managed-by: meshca`). The agent
/// never overwrites a `cacerts` without it unless told to adopt it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca");
/// Annotation: the policy generation a `cacerts` was issued under.
pub const ANN_GENERATION: &str = "meshca.io/policy-generation";
/// Annotation: the operator rotation counter a `cacerts` answers.
pub const ANN_ROTATE: &str = "meshca.io/rotate-request";
/// Annotation: the serial of the intermediate in a `cacerts`.
pub const ANN_SERIAL: &str = "meshca.io/serial";
/// Annotation: when the intermediate was issued (unix seconds). Its NotBefore is backdated, so
/// renewal planning measures the lifetime from here.
pub const ANN_ISSUED_AT: &str = "meshca.io/issued-at";
/// Annotation: SHA-256 (hex) of the CRLs the management plane published that `ca-crl.pem` was
/// written with (empty: none were published), so the agent knows when to write it again.
pub const ANN_CRL_UPSTREAM: &str = "meshca.io/crl-upstream-sha256";
/// Annotation: the cluster a `cacerts` belongs to.
pub const ANN_CLUSTER: &str = "meshca.io/cluster";
