//! The RootTrustPolicy (see `docs/architecture.md`, "Root-of-trust modes"): the document an
//! operator writes, in YAML or as a Kubernetes custom resource, and the validated, typed
//! [`Policy`] the rest of meshca runs on.
//!
//! - [`doc`]: the document as written.
//! - [`validate`]: the typed policy and the validation that names the field at fault: two CA
//!   modes, none, an unknown key algorithm, a ratio outside (0, 1), an unparsable duration, a
//!   missing secret reference.
//! - [`vault`]: Vault mode's block, validated once and carried to the Vault agents.
//! - [`mod@generation`]: the policy generation (what makes clusters re-issue), and the wire form of
//!   key algorithms.
//! - [`defaults`]: what an omitted field means.
//! - [`set`]: several policies under one management plane, and which one a cluster belongs to.
#![forbid(unsafe_code)]

pub mod defaults;
pub mod doc;
pub mod duration;
pub mod federation;
pub mod generation;
pub mod set;
pub mod validate;
pub mod vault;

pub use doc::{
    ClusterSelectorDoc, ConfigDoc, FederationDoc, GeneratedDoc, IntermediateCertOptionsDoc, IntermediateRefDoc,
    Metadata, RootRotationDoc, RootTrustPolicyDoc, SecretRef, SpecDoc, VaultAppRoleDoc, VaultAuthDoc, VaultDoc,
    VaultKubernetesDoc, VaultTlsDoc, VaultTokenDoc,
};
pub use federation::{Federation, FederationProfile};
pub use generation::{SignerMaterial, generation, key_algorithm_from_wire, key_algorithm_to_wire};
pub use set::{Assignment, PolicySet};
pub use validate::{
    CaMode, ClusterSelector, IntermediateOptions, Policy, RootRotationOptions, is_cluster_name, is_label_key,
    is_label_value,
};
pub use vault::{VaultAuth, VaultDelivery, VaultSpec};

/// Istio's own serving names, which a DNS name constraint must permit or istiod cannot serve.
pub use defaults::ISTIOD_SERVING_NAMES;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshca_pki::KeyAlgorithm;

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
        let none = std::collections::BTreeMap::new();
        assert!(p.clusters.covers("cluster-2", &none) && !p.clusters.covers("cluster-3", &none));
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
    fn root_rotation_settings_default_to_istios_leaf_lifetime_and_are_checked() {
        let p = Policy::from_yaml(GOOD).expect("valid");
        assert_eq!(p.root_rotation, RootRotationOptions::default());
        assert_eq!(p.root_rotation.trigger_ratio, 0.2);
        assert_eq!(p.root_rotation.max_leaf_lifetime, Duration::from_secs(24 * 3600));
        assert_eq!(p.root_rotation.skew, Duration::from_secs(300));
        let text = format!("{GOOD}  rootRotation: {{ triggerRatio: 0.5, maxLeafLifetime: 30s, skew: 0s }}\n");
        let p = Policy::from_yaml(&text).expect("valid");
        assert_eq!(
            p.root_rotation,
            RootRotationOptions {
                trigger_ratio: 0.5,
                max_leaf_lifetime: Duration::from_secs(30),
                skew: Duration::ZERO
            }
        );
        for (body, field) in [
            ("triggerRatio: 1", "spec.rootRotation.triggerRatio"),
            ("triggerRatio: 0", "spec.rootRotation.triggerRatio"),
            ("maxLeafLifetime: 0s", "spec.rootRotation.maxLeafLifetime"),
            ("maxLeafLifetime: forever", "spec.rootRotation.maxLeafLifetime"),
            ("skew: soon", "spec.rootRotation.skew"),
        ] {
            let e = Policy::from_yaml(&format!("{GOOD}  rootRotation: {{ {body} }}\n")).expect_err(body);
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let e = Policy::from_yaml(&format!("{GOOD}  rootRotation: {{ ratio: 0.3 }}\n")).expect_err("unknown key");
        assert!(e.message.contains("ratio"), "{e}");
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
