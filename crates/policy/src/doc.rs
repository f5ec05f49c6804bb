//! The RootTrustPolicy document, as an operator writes it (YAML, or the Kubernetes custom
//! resource). Nothing here is validated: [`crate::Policy::from_doc`] turns it into the typed
//! policy the rest of meshca runs on.

use serde::{Deserialize, Serialize};

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

impl RootTrustPolicyDoc {
    /// Writes `docs` as YAML documents (`---` between them): what an operator would write (no
    /// field that is left out, so no `null`), and what [`crate::PolicySet::from_yaml`] reads back.
    pub fn to_yaml(docs: &[RootTrustPolicyDoc]) -> Result<String, crate::PolicyError> {
        let failed = |e: String| crate::err("policy", format!("cannot be written: {e}"));
        let mut values = Vec::with_capacity(docs.len());
        for d in docs {
            let mut v = serde_json::to_value(d).map_err(|e| failed(e.to_string()))?;
            drop_nulls(&mut v);
            values.push(v);
        }
        serde_saphyr::to_string_multiple(&values).map_err(|e| failed(e.to_string()))
    }
}

/// Removes every `null` member: an absent optional field means its default.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, m| !m.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
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

/// `spec.clusterSelector`: a label selector over the cluster records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSelectorDoc {
    /// Every label here must be on the cluster, with this value.
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
}

/// `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    /// SPIFFE trust domain; `cluster.local` when absent.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Clusters covered by name; empty (and no `clusterSelector`) means every registered cluster.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Clusters covered by their labels (`meshca cluster add NAME --label k=v`), instead of a
    /// list of names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<ClusterSelectorDoc>,
    /// Exactly one CA mode.
    pub config: ConfigDoc,
    /// The cluster intermediates' profile.
    #[serde(default)]
    pub intermediate_cert_options: IntermediateCertOptionsDoc,
    /// Restart istiod pods after a rotation (for real istiod without hot reload).
    #[serde(default)]
    pub auto_restart_pods: bool,
    /// How root rotations run (every CA mode).
    #[serde(default)]
    pub root_rotation: RootRotationDoc,
    /// Foreign trust domains whose bundles the mesh accepts SVIDs of (docs/federation.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federation: Vec<FederationDoc>,
}

/// `spec.federation[]`: one foreign trust domain and its SPIFFE bundle endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederationDoc {
    /// The foreign trust domain (not the mesh's own).
    #[serde(default)]
    pub trust_domain: String,
    /// Its bundle endpoint, `https://host:port/path`.
    #[serde(default)]
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    #[serde(default)]
    pub profile: String,
    /// `https_spiffe`: the SPIFFE ID the endpoint presents.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`: the trust domain's bundle (a JWK Set document), obtained out of band.
    #[serde(default)]
    pub first_bundle: Option<String>,
    /// `https_web`: the CA certificates (PEM) the endpoint's certificate chains to.
    #[serde(default)]
    pub endpoint_ca: Option<String>,
}

/// `spec.rootRotation`: when a generated root is rotated, and the leaf lifetimes the rotation's
/// waits are computed from (docs/root-rotation.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootRotationDoc {
    /// Generated mode: start a rotation when less than this fraction of the root's lifetime
    /// remains; in (0, 1), 0.2 by default.
    #[serde(default)]
    pub trigger_ratio: Option<f64>,
    /// The longest lifetime of any workload leaf in the mesh (istiod's or the workload CA's
    /// maximum); `24h` by default (Istio's default workload certificate lifetime).
    #[serde(default)]
    pub max_leaf_lifetime: Option<String>,
    /// Allowance for clock skew and propagation (a Secret reaching istiod's mount, a reload);
    /// `5m` by default, `0s` allowed.
    #[serde(default)]
    pub skew: Option<String>,
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
