//! What the management plane persists, and where. Everything lives in the store (namespace
//! [`NAMESPACE`]), so a replica holds no state of its own.

use meshca_proto::{IssueReason, IstiodState, Phase};
use meshca_store::{ObjectKey, StoreError};
use serde::{Deserialize, Serialize};

/// The management plane's namespace in its store.
pub const NAMESPACE: &str = "meshca";

fn fixed(name: &'static str) -> ObjectKey {
    // The constant names below are valid DNS-1123 names (checked by a unit test).
    ObjectKey::new(NAMESPACE, name).unwrap_or_else(|_| unreachable!("constant object name {name:?}"))
}

fn key(name: &str) -> Result<ObjectKey, StoreError> {
    ObjectKey::new(NAMESPACE, name)
}

/// The generated root (option 1): `ca-cert.pem`, `ca-key.pem`.
pub fn root_ca() -> ObjectKey {
    fixed("root-ca")
}

/// The relay CA that issues control-plane identities.
pub fn relay_ca() -> ObjectKey {
    fixed("relay-ca")
}

/// The RootTrustPolicy in force (`policy.yaml`).
pub fn policy() -> ObjectKey {
    fixed("root-trust-policy")
}

/// When bootstrap-token records were last swept (`crate::tokens::create`).
pub fn token_sweep() -> ObjectKey {
    fixed("token-sweep")
}

/// A cluster's registration record.
pub fn cluster(name: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("cluster-{name}"))
}

/// A bootstrap token.
pub fn token(id: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("bootstrap-token-{id}"))
}

/// A cluster's issued-certificate log.
pub fn issued(cluster: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("issued-{cluster}"))
}

/// A cluster's last reported status.
pub fn status(cluster: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("status-{cluster}"))
}

/// Prefix of cluster records, for listing.
pub const CLUSTER_PREFIX: &str = "cluster-";

/// The data key of the policy document.
pub const POLICY_KEY: &str = "policy.yaml";

/// A registered cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Cluster name.
    pub name: String,
    /// Unix seconds.
    pub registered_at: i64,
    /// Serial of the agent identity last issued.
    pub identity_serial: String,
    /// Operator-requested rotations (`meshca rotate`); the agent re-issues when this grows.
    #[serde(default)]
    pub rotate_requests: u64,
}

/// A bootstrap token: only a hash of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Cluster the token registers.
    pub cluster: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds when it was used; tokens are single-use.
    pub used_at: Option<i64>,
}

/// One certificate the issuer signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Uppercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Why the agent asked (stored by its name, `renewal`; a name this version does not know
    /// reads back as `Unspecified`).
    #[serde(with = "reason_name")]
    pub reason: IssueReason,
    /// Policy generation it was issued under.
    pub policy_generation: String,
    /// SHA-256 of the certified public key (SubjectPublicKeyInfo DER), hex: a key is certified
    /// once. Empty in records written before it was kept.
    #[serde(default)]
    pub public_key_sha256: String,
    /// Unix seconds: the certificate's NotBefore (backdated from `issued_at`). 0 in older records.
    #[serde(default)]
    pub not_before: i64,
    /// The certified key's algorithm ("ECDSA P-256", ...). Empty in older records.
    #[serde(default)]
    pub key_algorithm: String,
    /// SHA-256 fingerprint of the signing certificate, hex. Empty in older records.
    #[serde(default)]
    pub issuer_fingerprint: String,
}

/// How many issued records are kept per cluster.
pub const ISSUED_KEEP: usize = 64;

/// A cluster's issued log, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedLog {
    /// Newest first.
    pub records: Vec<IssuedRecord>,
}

/// A cluster's last status report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// Unix seconds when it was received.
    pub reported_at: i64,
    /// The phase the agent reported.
    pub phase: Phase,
    /// Serial of the intermediate in service.
    pub intermediate_serial: String,
    /// Unix seconds.
    pub intermediate_not_after: i64,
    /// Unix seconds.
    pub intermediate_not_before: i64,
    /// Root set the cluster trusts.
    pub root_set_fingerprint: String,
    /// Generation its cacerts was issued under.
    pub policy_generation: String,
    /// Unix seconds of the last successful renewal.
    pub last_renewal: i64,
    /// Last error, empty when healthy.
    pub last_error: String,
    /// "store" or "memory".
    pub key_location: String,
    /// Unix seconds of the next planned renewal.
    pub next_renewal: i64,
    /// Agent version.
    pub agent_version: String,
    /// Attempts in a row that failed.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// `cacerts` exists but is not meshca's (and adoption was not asked for).
    #[serde(default)]
    pub foreign_cacerts: bool,
    /// What the agent did to istiod's Deployment, when it manages it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istiod: Option<IstiodRecord>,
}

/// What a cluster's agent reported about istiod's Deployment (`IstiodStatus` on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IstiodRecord {
    /// Whether the agent could do what the policy asks.
    pub state: IstiodState,
    /// `namespace/name`.
    pub deployment: String,
    /// Why, when not wired.
    pub message: String,
    /// The intermediate serial istiod was last restarted for.
    pub restarted_for_serial: String,
    /// Unix seconds of that restart.
    pub restarted_at: i64,
    /// Whether the Vault agent sidecar is on the Deployment.
    pub vault_sidecar: bool,
}

impl IstiodRecord {
    /// From the wire, with its strings clipped by `clip`.
    pub fn from_wire(w: &meshca_proto::mgmt::IstiodStatus, clip: impl Fn(&str) -> String) -> Self {
        IstiodRecord {
            state: w.state(),
            deployment: clip(&w.deployment),
            message: clip(&w.message),
            restarted_for_serial: clip(&w.restarted_for_serial),
            restarted_at: w.restarted_at,
            vault_sidecar: w.vault_sidecar,
        }
    }

    /// To the wire.
    pub fn to_wire(&self) -> meshca_proto::mgmt::IstiodStatus {
        meshca_proto::mgmt::IstiodStatus {
            state: self.state as i32,
            deployment: self.deployment.clone(),
            message: self.message.clone(),
            restarted_for_serial: self.restarted_for_serial.clone(),
            restarted_at: self.restarted_at,
            vault_sidecar: self.vault_sidecar,
        }
    }
}

/// An [`IssueReason`] by its name, as the issued log has always stored it.
mod reason_name {
    use meshca_proto::IssueReason;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &IssueReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match r {
            IssueReason::Unspecified => "unspecified",
            other => other.name(),
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IssueReason, D::Error> {
        let name = String::deserialize(d)?;
        Ok(name.parse().unwrap_or(IssueReason::Unspecified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_names_are_valid_and_input_names_are_checked() {
        let _ = (root_ca(), relay_ca(), policy(), token_sweep());
        assert!(cluster("cluster-1").is_ok());
        assert!(cluster("../etc").is_err());
        assert!(status("UPPER").is_err());
    }

    #[test]
    fn issued_records_keep_their_reason_names_and_tolerate_unknown_ones() {
        let rec = IssuedRecord {
            serial: "AB".into(),
            not_after: 2,
            issued_at: 1,
            reason: IssueReason::PolicyChange,
            policy_generation: "g".into(),
            public_key_sha256: String::new(),
            not_before: 0,
            key_algorithm: String::new(),
            issuer_fingerprint: String::new(),
        };
        let json = serde_json::to_string(&rec).expect("json");
        assert!(json.contains(r#""reason":"policy-change""#), "{json}");
        assert_eq!(serde_json::from_str::<IssuedRecord>(&json).expect("back"), rec);
        let old = json.replace("policy-change", "from-a-newer-version");
        assert_eq!(serde_json::from_str::<IssuedRecord>(&old).expect("tolerated").reason, IssueReason::Unspecified);
        let status: StatusRecord =
            serde_json::from_str(r#"{"reported_at":1,"phase":"Degraded","intermediate_serial":"","intermediate_not_after":0,"intermediate_not_before":0,"root_set_fingerprint":"","policy_generation":"","last_renewal":0,"last_error":"","key_location":"store","next_renewal":0,"agent_version":""}"#)
                .expect("a record written when phases were strings");
        assert_eq!(status.phase, Phase::Degraded);
    }
}
