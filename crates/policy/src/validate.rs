//! Validation: the document in, the typed [`Policy`] out, or a [`PolicyError`] naming the field.

use std::collections::BTreeMap;
use std::time::Duration;

use meshca_pki::{KeyAlgorithm, TrustDomain};

use crate::doc::{RootRotationDoc, RootTrustPolicyDoc, SecretRef};
use crate::vault::VaultSpec;
use crate::{API_VERSION, KIND, PolicyError, defaults, duration, err};

/// Which clusters the policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSelector {
    /// Every registered cluster.
    All,
    /// Only these.
    Named(Vec<String>),
    /// The clusters whose records carry every one of these labels (`spec.clusterSelector`).
    Labels(BTreeMap<String, String>),
}

impl ClusterSelector {
    /// Whether the cluster `name`, labelled `labels`, is covered.
    pub fn covers(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            ClusterSelector::All => true,
            ClusterSelector::Named(v) => v.iter().any(|c| c == name),
            ClusterSelector::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }

    /// The clusters named outright (a list), which status shows even before they register.
    pub fn named(&self) -> &[String] {
        match self {
            ClusterSelector::Named(v) => v,
            _ => &[],
        }
    }
}

/// A label key as Kubernetes writes them: an optional DNS-subdomain prefix and `/`, then a name
/// of at most 63 characters, alphanumeric at both ends, with `-`, `_` and `.` inside.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(is_cluster_name));
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A label value: at most 63 characters, empty or alphanumeric at both ends with `-`, `_` and `.`
/// inside.
pub fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    v.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
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
    Vault(Box<VaultSpec>),
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

/// How root rotations run (`spec.rootRotation`). The waits of a rotation follow from these:
/// after every cluster trusts both roots, half of `max_leaf_lifetime` plus `skew` (every
/// workload has renewed, so has learned the new root); after every cluster signs under the new
/// root, `max_leaf_lifetime` plus `skew` (every leaf under the old root has expired).
#[derive(Debug, Clone, PartialEq)]
pub struct RootRotationOptions {
    /// Generated mode: rotate when less than this fraction of the root's lifetime remains; in
    /// (0, 1).
    pub trigger_ratio: f64,
    /// The longest lifetime of any leaf in the mesh.
    pub max_leaf_lifetime: Duration,
    /// Allowance for clock skew and propagation delays.
    pub skew: Duration,
}

impl Default for RootRotationOptions {
    fn default() -> Self {
        RootRotationOptions {
            trigger_ratio: defaults::ROOT_ROTATION_TRIGGER_RATIO,
            max_leaf_lifetime: defaults::MAX_LEAF_LIFETIME,
            skew: defaults::ROOT_ROTATION_SKEW,
        }
    }
}

impl RootRotationOptions {
    fn from_doc(d: &RootRotationDoc) -> Result<Self, PolicyError> {
        let trigger_ratio = d.trigger_ratio.unwrap_or(defaults::ROOT_ROTATION_TRIGGER_RATIO);
        if !(trigger_ratio > 0.0 && trigger_ratio < 1.0) {
            return Err(err("spec.rootRotation.triggerRatio", format!("{trigger_ratio} is outside (0, 1)")));
        }
        let max_leaf_lifetime =
            parse_duration("spec.rootRotation.maxLeafLifetime", &d.max_leaf_lifetime, defaults::MAX_LEAF_LIFETIME)?;
        let skew = match &d.skew {
            None => defaults::ROOT_ROTATION_SKEW,
            Some(s) => duration::parse(s).ok_or_else(|| {
                err("spec.rootRotation.skew", format!("{s:?} is not a duration (examples: 5m, 30s, 0s)"))
            })?,
        };
        Ok(RootRotationOptions { trigger_ratio, max_leaf_lifetime, skew })
    }
}

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
    /// How root rotations run.
    pub root_rotation: RootRotationOptions,
    /// Foreign trust domains federated with (`spec.federation`).
    pub federation: Vec<crate::Federation>,
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
        let namespace = if doc.metadata.namespace.is_empty() {
            defaults::NAMESPACE.to_string()
        } else {
            doc.metadata.namespace.clone()
        };
        let spec = &doc.spec;
        let trust_domain = TrustDomain::new(spec.trust_domain.as_deref().unwrap_or(defaults::TRUST_DOMAIN))
            .map_err(|e| err("spec.trustDomain", e.to_string()))?;
        let clusters = if let Some(sel) = &spec.cluster_selector {
            if !spec.clusters.is_empty() {
                return Err(err("spec.clusterSelector", "set spec.clusters or spec.clusterSelector, not both"));
            }
            if sel.match_labels.is_empty() {
                return Err(err(
                    "spec.clusterSelector.matchLabels",
                    "is empty, which would select every cluster; omit spec.clusterSelector for that",
                ));
            }
            for (k, v) in &sel.match_labels {
                if !is_label_key(k) {
                    return Err(err("spec.clusterSelector.matchLabels", format!("{k:?} is not a label key")));
                }
                if !is_label_value(v) {
                    return Err(err(
                        &format!("spec.clusterSelector.matchLabels.{k}"),
                        format!("{v:?} is not a label value"),
                    ));
                }
            }
            ClusterSelector::Labels(sel.match_labels.clone())
        } else if spec.clusters.is_empty() {
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
                ttl: parse_duration("spec.config.generated.ttl", &g.ttl, defaults::ROOT_TTL)?,
                organization: g.org_name.clone().unwrap_or_else(|| defaults::ORGANIZATION.into()),
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
                    defaults::EXPIRY_WARNING,
                )?,
            }
        } else if let Some(v) = &cfg.vault {
            CaMode::Vault(Box::new(VaultSpec::from_doc(v)?))
        } else {
            return Err(err("spec.config", "no CA mode set"));
        };

        let o = &spec.intermediate_cert_options;
        let ratio = o.secret_rotation_grace_period_ratio.unwrap_or(defaults::GRACE_PERIOD_RATIO);
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(err(
                "spec.intermediateCertOptions.secretRotationGracePeriodRatio",
                format!("{ratio} is outside (0, 1)"),
            ));
        }
        let mut permitted = o.permitted_dns_domains.clone();
        if !permitted.is_empty() {
            for name in defaults::ISTIOD_SERVING_NAMES {
                if !permitted.iter().any(|p| p == name) {
                    permitted.push(name.to_string());
                }
            }
        }
        let intermediate = IntermediateOptions {
            key_algorithm: parse_alg("spec.intermediateCertOptions.keyAlgorithm", &o.key_algorithm)?,
            ttl: parse_duration("spec.intermediateCertOptions.ttl", &o.ttl, defaults::INTERMEDIATE_TTL)?,
            grace_period_ratio: ratio,
            organization: o.org_name.clone().unwrap_or_else(|| defaults::ORGANIZATION.into()),
            permitted_dns_domains: permitted,
        };
        let federation = crate::federation::from_docs(&spec.federation, &trust_domain)?;
        Ok(Policy {
            name: doc.metadata.name.clone(),
            namespace,
            trust_domain,
            clusters,
            ca,
            intermediate,
            auto_restart_pods: spec.auto_restart_pods,
            root_rotation: RootRotationOptions::from_doc(&spec.root_rotation)?,
            federation,
        })
    }

    /// A default policy for the embedded demo: a generated root, every cluster.
    pub fn generated_default(intermediate_ttl: Duration) -> Policy {
        Policy {
            name: "mesh".into(),
            namespace: defaults::NAMESPACE.into(),
            trust_domain: TrustDomain::new(defaults::TRUST_DOMAIN).expect("the default trust domain is valid"),
            clusters: ClusterSelector::All,
            ca: CaMode::Generated {
                key_algorithm: KeyAlgorithm::EcdsaP256,
                ttl: defaults::ROOT_TTL,
                organization: defaults::ORGANIZATION.into(),
            },
            intermediate: IntermediateOptions {
                key_algorithm: KeyAlgorithm::EcdsaP256,
                ttl: intermediate_ttl,
                grace_period_ratio: defaults::GRACE_PERIOD_RATIO,
                organization: defaults::ORGANIZATION.into(),
                permitted_dns_domains: Vec::new(),
            },
            auto_restart_pods: false,
            root_rotation: RootRotationOptions::default(),
            federation: Vec::new(),
        }
    }
}

/// Cluster names are DNS-1123 labels (they become object names and certificate fields).
pub fn is_cluster_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
