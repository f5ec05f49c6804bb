//! The RootTrustPolicy (DESIGN.md §3.4): the document an operator writes, in YAML or as a
//! Kubernetes custom resource, and the validated, typed [`Policy`] the rest of meshca runs on.
//!
//! Validation turns every mistake into a [`PolicyError`] that names the field, so an operator
//! never has to guess which line was wrong: two CA modes, none, an unknown key algorithm, a ratio
//! outside (0, 1), an unparsable duration, a missing secret reference.
#![forbid(unsafe_code)]

pub mod duration;

use std::time::Duration;

use meshca_pki::{KeyAlgorithm, TrustDomain};
use serde::{Deserialize, Serialize};

/// API group/version of the resource.
pub const API_VERSION: &str = "meshca.io/v1alpha1";
/// Kind of the resource.
pub const KIND: &str = "RootTrustPolicy";

/// A policy mistake, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// Dotted path of the offending field, e.g. `spec.intermediateCertOptions.ttl`.
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError { field: field.to_string(), message: message.into() }
}

// ---------------------------------------------------------------------------------------------
// The document, as written.
// ---------------------------------------------------------------------------------------------

/// The RootTrustPolicy document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootTrustPolicyDoc {
    /// Must be `meshca.io/v1alpha1`.
    pub api_version: String,
    /// Must be `RootTrustPolicy`.
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: Metadata,
    /// What the operator asks for.
    pub spec: SpecDoc,
    /// Written by meshca in Kubernetes mode; ignored when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Object metadata (the subset meshca reads; Kubernetes adds more, which is tolerated).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Kubernetes' generation, when read from the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    /// SPIFFE trust domain; `cluster.local` when absent.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Clusters covered; empty means every registered cluster.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Exactly one CA mode.
    pub config: ConfigDoc,
    /// The cluster intermediates' profile.
    #[serde(default)]
    pub intermediate_cert_options: IntermediateCertOptionsDoc,
    /// Restart istiod pods after a rotation (for real istiod without hot reload).
    #[serde(default)]
    pub auto_restart_pods: bool,
}

/// `spec.config`: exactly one of the four modes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigDoc {
    /// Option 1: meshca generates the root.
    #[serde(default)]
    pub generated: Option<GeneratedDoc>,
    /// Option 2: the user's root in a secret.
    #[serde(default)]
    pub secret_ref: Option<SecretRef>,
    /// Option 3: the user's intermediate (and its chain) in a secret.
    #[serde(default)]
    pub intermediate_ref: Option<IntermediateRefDoc>,
    /// Option 4: the root lives in Vault.
    #[serde(default)]
    pub vault: Option<VaultDoc>,
}

/// `generated`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratedDoc {
    /// Root key algorithm; `ecdsa-p256` by default.
    #[serde(default)]
    pub key_algorithm: Option<String>,
    /// Root lifetime; `87600h` (10 years) by default.
    #[serde(default)]
    pub ttl: Option<String>,
    /// `O=` of the root; `meshca` by default.
    #[serde(default)]
    pub org_name: Option<String>,
}

/// A reference to a secret in the management plane's store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Namespace; the policy's own namespace when empty.
    #[serde(default)]
    pub namespace: String,
    /// Name.
    #[serde(default)]
    pub name: String,
}

/// `intermediateRef`: the user's intermediate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntermediateRefDoc {
    /// Namespace of the secret.
    #[serde(default)]
    pub namespace: String,
    /// Name of the secret.
    #[serde(default)]
    pub name: String,
    /// Warn this long before the user's intermediate expires; `720h` by default.
    #[serde(default)]
    pub expiry_warning: Option<String>,
}

/// `vault`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultDoc {
    /// Vault's address, e.g. `https://vault.example.com:8200`.
    #[serde(default)]
    pub server: String,
    /// Signing path, e.g. `pki/root/sign-intermediate`.
    #[serde(default)]
    pub ca_path: String,
    /// Optional: `pki_int/intermediate/generate/exported` to have Vault generate the key.
    #[serde(default)]
    pub csr_path: Option<String>,
    /// Vault Enterprise namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// TLS to Vault.
    #[serde(default)]
    pub tls: Option<VaultTlsDoc>,
    /// How the agent authenticates.
    #[serde(default)]
    pub auth: VaultAuthDoc,
}

/// `vault.tls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultTlsDoc {
    /// PEM file of the CA that signed Vault's serving certificate.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// `vault.auth`: exactly one method.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultAuthDoc {
    /// A token read from a secret/file.
    #[serde(default)]
    pub token: Option<VaultTokenDoc>,
    /// AppRole.
    #[serde(default)]
    pub app_role: Option<VaultAppRoleDoc>,
    /// Kubernetes service-account JWT.
    #[serde(default)]
    pub kubernetes: Option<VaultKubernetesDoc>,
}

/// Token auth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultTokenDoc {
    /// Secret holding the token under key `token`.
    #[serde(default)]
    pub secret_ref: Option<SecretRef>,
    /// Or a file holding the token.
    #[serde(default)]
    pub token_file: Option<String>,
}

/// AppRole auth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultAppRoleDoc {
    /// Mount path; `approle` by default.
    #[serde(default)]
    pub mount_path: Option<String>,
    /// The role ID.
    #[serde(default)]
    pub role_id: String,
    /// Secret holding the secret ID under key `secret-id`.
    #[serde(default)]
    pub secret_id_ref: Option<SecretRef>,
    /// Or a file holding the secret ID.
    #[serde(default)]
    pub secret_id_file: Option<String>,
}

/// Kubernetes auth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultKubernetesDoc {
    /// Vault role.
    #[serde(default)]
    pub role: String,
    /// Mount path; `kubernetes` by default.
    #[serde(default)]
    pub mount_path: Option<String>,
    /// Service-account token file.
    #[serde(default)]
    pub token_path: Option<String>,
}

/// `spec.intermediateCertOptions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntermediateCertOptionsDoc {
    /// Key algorithm of the cluster intermediates; `ecdsa-p256` by default.
    #[serde(default)]
    pub key_algorithm: Option<String>,
    /// Lifetime; `720h` by default.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Renew when less than this fraction of the lifetime remains; 0.2 by default.
    #[serde(default)]
    pub secret_rotation_grace_period_ratio: Option<f64>,
    /// `O=` of the intermediates; `meshca` by default.
    #[serde(default)]
    pub org_name: Option<String>,
    /// Optional DNS name constraints (permitted subtrees) on the intermediates. Istio's serving
    /// names (`istiod.istio-system.svc`, `localhost`) are added automatically when non-empty.
    #[serde(default)]
    pub permitted_dns_domains: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated policy.
// ---------------------------------------------------------------------------------------------

/// Which clusters the policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSelector {
    /// Every registered cluster.
    All,
    /// Only these.
    Named(Vec<String>),
}

impl ClusterSelector {
    /// Whether `cluster` is covered.
    pub fn covers(&self, cluster: &str) -> bool {
        match self {
            ClusterSelector::All => true,
            ClusterSelector::Named(v) => v.iter().any(|c| c == cluster),
        }
    }
}

/// Where the root (or the management intermediate) comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CaMode {
    /// meshca generates and keeps the root.
    Generated {
        /// Root key algorithm.
        key_algorithm: KeyAlgorithm,
        /// Root lifetime.
        ttl: Duration,
        /// `O=` of the root.
        organization: String,
    },
    /// The user's root, from a secret.
    SecretRef(SecretRef),
    /// The user's intermediate, from a secret.
    IntermediateRef {
        /// The secret.
        secret: SecretRef,
        /// Warn this long before it expires.
        expiry_warning: Duration,
    },
    /// The root lives in Vault.
    Vault(Box<VaultDoc>),
}

impl CaMode {
    /// The mode's name as written in the policy.
    pub fn name(&self) -> &'static str {
        match self {
            CaMode::Generated { .. } => "generated",
            CaMode::SecretRef(_) => "secretRef",
            CaMode::IntermediateRef { .. } => "intermediateRef",
            CaMode::Vault(_) => "vault",
        }
    }
}

/// The cluster intermediates' profile.
#[derive(Debug, Clone, PartialEq)]
pub struct IntermediateOptions {
    /// Key algorithm (the agent generates this kind of key; the issuer accepts only it).
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime.
    pub ttl: Duration,
    /// Renew when less than `ttl × ratio` remains; in (0, 1).
    pub grace_period_ratio: f64,
    /// `O=`.
    pub organization: String,
    /// Permitted DNS subtrees (empty: no name constraints).
    pub permitted_dns_domains: Vec<String>,
}

/// Istio's own serving names, which a DNS name constraint must permit or istiod cannot serve.
pub const ISTIOD_SERVING_NAMES: [&str; 2] = ["istiod.istio-system.svc", "localhost"];

/// A validated RootTrustPolicy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`meshca` when empty).
    pub namespace: String,
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Which clusters.
    pub clusters: ClusterSelector,
    /// Where the root comes from.
    pub ca: CaMode,
    /// The cluster intermediates' profile.
    pub intermediate: IntermediateOptions,
    /// Restart istiod after a rotation.
    pub auto_restart_pods: bool,
}

fn parse_duration(field: &str, v: &Option<String>, default: Duration) -> Result<Duration, PolicyError> {
    match v {
        None => Ok(default),
        Some(s) => match duration::parse(s) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(err(field, format!("{s:?} is not a positive duration (examples: 720h, 90s, 1h30m)"))),
        },
    }
}

fn parse_alg(field: &str, v: &Option<String>) -> Result<KeyAlgorithm, PolicyError> {
    match v {
        None => Ok(KeyAlgorithm::EcdsaP256),
        Some(s) => s.parse().map_err(|e: meshca_pki::KeyError| err(field, e.to_string())),
    }
}

fn check_ref(field: &str, r: &SecretRef, default_ns: &str) -> Result<SecretRef, PolicyError> {
    if r.name.trim().is_empty() {
        return Err(err(&format!("{field}.name"), "is required"));
    }
    let namespace = if r.namespace.is_empty() { default_ns.to_string() } else { r.namespace.clone() };
    Ok(SecretRef { namespace, name: r.name.clone() })
}

impl Policy {
    /// Parses and validates a policy from YAML (JSON is YAML too).
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        let doc: RootTrustPolicyDoc = serde_saphyr::from_str(text).map_err(|e| err("policy", e.to_string()))?;
        Policy::from_doc(&doc)
    }

    /// Validates a parsed document.
    pub fn from_doc(doc: &RootTrustPolicyDoc) -> Result<Policy, PolicyError> {
        if doc.api_version != API_VERSION {
            return Err(err("apiVersion", format!("must be {API_VERSION}, got {:?}", doc.api_version)));
        }
        if doc.kind != KIND {
            return Err(err("kind", format!("must be {KIND}, got {:?}", doc.kind)));
        }
        let namespace =
            if doc.metadata.namespace.is_empty() { "meshca".to_string() } else { doc.metadata.namespace.clone() };
        let spec = &doc.spec;
        let trust_domain = TrustDomain::new(spec.trust_domain.as_deref().unwrap_or("cluster.local"))
            .map_err(|e| err("spec.trustDomain", e.to_string()))?;
        let clusters = if spec.clusters.is_empty() {
            ClusterSelector::All
        } else {
            for (i, c) in spec.clusters.iter().enumerate() {
                if !is_cluster_name(c) {
                    return Err(err(&format!("spec.clusters[{i}]"), format!("{c:?} is not a DNS-1123 label")));
                }
            }
            ClusterSelector::Named(spec.clusters.clone())
        };

        let cfg = &spec.config;
        let set: Vec<&str> = [
            cfg.generated.as_ref().map(|_| "generated"),
            cfg.secret_ref.as_ref().map(|_| "secretRef"),
            cfg.intermediate_ref.as_ref().map(|_| "intermediateRef"),
            cfg.vault.as_ref().map(|_| "vault"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() != 1 {
            return Err(err(
                "spec.config",
                format!(
                    "exactly one of generated, secretRef, intermediateRef, vault must be set; found {}",
                    if set.is_empty() { "none".to_string() } else { set.join(" and ") }
                ),
            ));
        }
        let ca = if let Some(g) = &cfg.generated {
            CaMode::Generated {
                key_algorithm: parse_alg("spec.config.generated.keyAlgorithm", &g.key_algorithm)?,
                ttl: parse_duration("spec.config.generated.ttl", &g.ttl, Duration::from_secs(87600 * 3600))?,
                organization: g.org_name.clone().unwrap_or_else(|| "meshca".into()),
            }
        } else if let Some(r) = &cfg.secret_ref {
            CaMode::SecretRef(check_ref("spec.config.secretRef", r, &namespace)?)
        } else if let Some(r) = &cfg.intermediate_ref {
            let secret = check_ref(
                "spec.config.intermediateRef",
                &SecretRef { namespace: r.namespace.clone(), name: r.name.clone() },
                &namespace,
            )?;
            CaMode::IntermediateRef {
                secret,
                expiry_warning: parse_duration(
                    "spec.config.intermediateRef.expiryWarning",
                    &r.expiry_warning,
                    Duration::from_secs(720 * 3600),
                )?,
            }
        } else if let Some(v) = &cfg.vault {
            validate_vault(v)?;
            CaMode::Vault(Box::new(v.clone()))
        } else {
            return Err(err("spec.config", "no CA mode set"));
        };

        let o = &spec.intermediate_cert_options;
        let ratio = o.secret_rotation_grace_period_ratio.unwrap_or(0.2);
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(err(
                "spec.intermediateCertOptions.secretRotationGracePeriodRatio",
                format!("{ratio} is outside (0, 1)"),
            ));
        }
        let mut permitted = o.permitted_dns_domains.clone();
        if !permitted.is_empty() {
            for name in ISTIOD_SERVING_NAMES {
                if !permitted.iter().any(|p| p == name) {
                    permitted.push(name.to_string());
                }
            }
        }
        let intermediate = IntermediateOptions {
            key_algorithm: parse_alg("spec.intermediateCertOptions.keyAlgorithm", &o.key_algorithm)?,
            ttl: parse_duration("spec.intermediateCertOptions.ttl", &o.ttl, Duration::from_secs(720 * 3600))?,
            grace_period_ratio: ratio,
            organization: o.org_name.clone().unwrap_or_else(|| "meshca".into()),
            permitted_dns_domains: permitted,
        };
        Ok(Policy {
            name: doc.metadata.name.clone(),
            namespace,
            trust_domain,
            clusters,
            ca,
            intermediate,
            auto_restart_pods: spec.auto_restart_pods,
        })
    }

    /// A digest of everything in the policy that shapes a cluster intermediate. The management
    /// plane combines it with the signer's fingerprint into the *policy generation*; when the
    /// generation changes, every covered cluster re-issues.
    pub fn intermediate_digest(&self) -> String {
        let i = &self.intermediate;
        let text = format!(
            "td={}\nalg={}\nttl={}\norg={}\ndns={}\nmode={}",
            self.trust_domain,
            i.key_algorithm,
            i.ttl.as_secs(),
            i.organization,
            i.permitted_dns_domains.join(","),
            self.ca.name(),
        );
        // In Vault mode the signer is Vault: another server, signing path, key-generating
        // path or namespace can mean another root, so each re-issues (how the agent logs in
        // does not shape the certificate and does not).
        let text = match &self.ca {
            CaMode::Vault(v) => format!(
                "{text}\nvault={}|{}|{}|{}",
                v.server,
                v.ca_path,
                v.csr_path.as_deref().unwrap_or(""),
                v.namespace.as_deref().unwrap_or("")
            ),
            _ => text,
        };
        hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref()[..12])
    }

    /// A default policy for the embedded demo: a generated root, every cluster.
    pub fn generated_default(intermediate_ttl: Duration) -> Policy {
        Policy {
            name: "mesh".into(),
            namespace: "meshca".into(),
            trust_domain: TrustDomain::new("cluster.local").expect("cluster.local is a valid trust domain"),
            clusters: ClusterSelector::All,
            ca: CaMode::Generated {
                key_algorithm: KeyAlgorithm::EcdsaP256,
                ttl: Duration::from_secs(87600 * 3600),
                organization: "meshca".into(),
            },
            intermediate: IntermediateOptions {
                key_algorithm: KeyAlgorithm::EcdsaP256,
                ttl: intermediate_ttl,
                grace_period_ratio: 0.2,
                organization: "meshca".into(),
                permitted_dns_domains: Vec::new(),
            },
            auto_restart_pods: false,
        }
    }
}

fn validate_vault(v: &VaultDoc) -> Result<(), PolicyError> {
    if !(v.server.starts_with("https://") || v.server.starts_with("http://")) {
        return Err(err("spec.config.vault.server", format!("{:?} must be an http(s):// URL", v.server)));
    }
    if v.ca_path.trim().is_empty() {
        return Err(err("spec.config.vault.caPath", "is required (e.g. pki/root/sign-intermediate)"));
    }
    let a = &v.auth;
    let methods: Vec<&str> = [
        a.token.as_ref().map(|_| "token"),
        a.app_role.as_ref().map(|_| "appRole"),
        a.kubernetes.as_ref().map(|_| "kubernetes"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if methods.len() != 1 {
        return Err(err(
            "spec.config.vault.auth",
            format!(
                "exactly one of token, appRole, kubernetes must be set; found {}",
                if methods.is_empty() { "none".to_string() } else { methods.join(" and ") }
            ),
        ));
    }
    if let Some(t) = &a.token
        && t.secret_ref.is_none()
        && t.token_file.is_none()
    {
        return Err(err("spec.config.vault.auth.token", "set secretRef or tokenFile"));
    }
    if let Some(r) = &a.app_role {
        if r.role_id.is_empty() {
            return Err(err("spec.config.vault.auth.appRole.roleId", "is required"));
        }
        if r.secret_id_ref.is_none() && r.secret_id_file.is_none() {
            return Err(err("spec.config.vault.auth.appRole", "set secretIdRef or secretIdFile"));
        }
    }
    if let Some(k) = &a.kubernetes
        && k.role.is_empty()
    {
        return Err(err("spec.config.vault.auth.kubernetes.role", "is required"));
    }
    Ok(())
}

/// Cluster names are DNS-1123 labels (they become object names and certificate fields).
pub fn is_cluster_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: meshca.io/v1alpha1
kind: RootTrustPolicy
metadata: { name: mesh, namespace: meshca }
spec:
  trustDomain: cluster.local
  clusters: [cluster-1, cluster-2]
  config:
    generated: { keyAlgorithm: ecdsa-p256, ttl: 87600h, orgName: meshca }
  intermediateCertOptions: { keyAlgorithm: ecdsa-p384, ttl: 720h, secretRotationGracePeriodRatio: 0.2 }
"#;

    fn with(config: &str, options: &str) -> String {
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: p }}\nspec:\n  config:\n{config}\n  intermediateCertOptions:\n{options}\n"
        )
    }

    #[test]
    fn the_design_example_parses() {
        let p = Policy::from_yaml(GOOD).expect("valid");
        assert_eq!(p.trust_domain.as_str(), "cluster.local");
        assert!(p.clusters.covers("cluster-2") && !p.clusters.covers("cluster-3"));
        assert_eq!(p.intermediate.key_algorithm, KeyAlgorithm::EcdsaP384);
        assert_eq!(p.intermediate.ttl, Duration::from_secs(720 * 3600));
        assert!(matches!(p.ca, CaMode::Generated { key_algorithm: KeyAlgorithm::EcdsaP256, .. }));
    }

    #[test]
    fn mistakes_name_the_field() {
        let cases = [
            (
                with("    generated: {}\n    secretRef: { name: r }", "    ttl: 1h"),
                "spec.config",
                "generated and secretRef",
            ),
            (with("    {}", "    ttl: 1h"), "spec.config", "found none"),
            (
                with("    generated: {}", "    secretRotationGracePeriodRatio: 1.5"),
                "spec.intermediateCertOptions.secretRotationGracePeriodRatio",
                "outside",
            ),
            (
                with("    generated: {}", "    secretRotationGracePeriodRatio: 0"),
                "spec.intermediateCertOptions.secretRotationGracePeriodRatio",
                "outside",
            ),
            (
                with("    generated: {}", "    keyAlgorithm: ed25519"),
                "spec.intermediateCertOptions.keyAlgorithm",
                "ecdsa-p256",
            ),
            (with("    generated: {}", "    ttl: soon"), "spec.intermediateCertOptions.ttl", "not a positive duration"),
            (with("    secretRef: { namespace: x }", "    ttl: 1h"), "spec.config.secretRef.name", "required"),
            (with("    vault: { server: vault:8200, caPath: p }", "    ttl: 1h"), "spec.config.vault.server", "URL"),
            (
                with("    vault: { server: 'https://v', caPath: pki/root/sign-intermediate }", "    ttl: 1h"),
                "spec.config.vault.auth",
                "found none",
            ),
        ];
        for (text, field, needle) in cases {
            let e = Policy::from_yaml(&text).expect_err(&text);
            assert_eq!(e.field, field, "{text}\n{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
        let e = Policy::from_yaml("apiVersion: x\nkind: RootTrustPolicy\nspec: { config: { generated: {} } }")
            .expect_err("bad");
        assert_eq!(e.field, "apiVersion");
        let e = Policy::from_yaml("kind: [").expect_err("yaml");
        assert_eq!(e.field, "policy");
        let e = Policy::from_yaml(&GOOD.replace("trustDomain", "trustDomian")).expect_err("unknown field");
        assert!(e.message.contains("trustDomian"), "{e}");
    }

    #[test]
    fn name_constraints_always_permit_istiods_serving_names() {
        let p =
            Policy::from_yaml(&with("    generated: {}", "    permittedDnsDomains: [cluster.local]")).expect("valid");
        assert_eq!(p.intermediate.permitted_dns_domains, ["cluster.local", "istiod.istio-system.svc", "localhost"]);
    }

    #[test]
    fn the_digest_changes_with_what_shapes_an_intermediate_only() {
        let a = Policy::from_yaml(GOOD).expect("valid");
        let mut b = a.clone();
        b.intermediate.ttl = Duration::from_secs(3600);
        assert_ne!(a.intermediate_digest(), b.intermediate_digest());
        let mut c = a.clone();
        c.intermediate.key_algorithm = KeyAlgorithm::Rsa2048;
        assert_ne!(a.intermediate_digest(), c.intermediate_digest());
        let mut d = a.clone();
        d.clusters = ClusterSelector::All;
        d.intermediate.grace_period_ratio = 0.5;
        assert_eq!(a.intermediate_digest(), d.intermediate_digest());
    }

    #[test]
    fn in_vault_mode_another_signer_re_issues_but_another_login_does_not() {
        let vault = |path: &str, file: &str| {
            Policy::from_yaml(&with(
                &format!("    vault: {{ server: 'https://v:8200', caPath: {path}, auth: {{ token: {{ tokenFile: {file} }} }} }}"),
                "    ttl: 1h",
            ))
            .expect("valid")
        };
        let a = vault("pki/root/sign-intermediate", "/t");
        assert_ne!(a.intermediate_digest(), vault("pki2/root/sign-intermediate", "/t").intermediate_digest());
        assert_eq!(a.intermediate_digest(), vault("pki/root/sign-intermediate", "/other").intermediate_digest());
    }
}
