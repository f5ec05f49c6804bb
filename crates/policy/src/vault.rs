//! Vault mode's settings (`spec.config.vault`): validated here once, into [`VaultSpec`], and
//! carried to each cluster's `meshca vault-agent` as the protobuf [`VaultConfig`]. The agent
//! reads the message back through the same validation ([`VaultDelivery::from_wire`]), so both
//! sides agree on what a valid Vault block is.

use meshca_pki::TrustDomain;
use meshca_proto::mgmt as wire;
use meshca_proto::mgmt::VaultConfig;

use crate::doc::{SecretRef, VaultAppRoleDoc, VaultAuthDoc, VaultDoc, VaultKubernetesDoc, VaultTlsDoc, VaultTokenDoc};
use crate::{PolicyError, err};

/// How the Vault agent logs in to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A Vault token, read from a file (or named as a secret).
    Token {
        /// The secret holding the token.
        secret_ref: Option<SecretRef>,
        /// The file holding the token.
        token_file: Option<String>,
    },
    /// AppRole: a role ID and a secret ID.
    AppRole {
        /// Mount path of the auth method (`approle` when `None`).
        mount_path: Option<String>,
        /// The role ID.
        role_id: String,
        /// The secret holding the secret ID.
        secret_id_ref: Option<SecretRef>,
        /// The file holding the secret ID.
        secret_id_file: Option<String>,
    },
    /// Kubernetes: a Vault role and the pod's service-account token.
    Kubernetes {
        /// The Vault role.
        role: String,
        /// Mount path of the auth method (`kubernetes` when `None`).
        mount_path: Option<String>,
        /// Where the service-account token is (the projected token path when `None`).
        token_path: Option<String>,
    },
}

/// A validated `spec.config.vault`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSpec {
    /// Vault's `http(s)://` address.
    pub server: String,
    /// Where Vault signs intermediates (`<mount>/root/sign-intermediate` or an issuer path).
    pub ca_path: String,
    /// Where Vault generates the key instead of the agent, if it does.
    pub csr_path: Option<String>,
    /// Vault Enterprise namespace.
    pub namespace: Option<String>,
    /// CA file for Vault's TLS certificate.
    pub tls_ca_file: Option<String>,
    /// How to log in.
    pub auth: VaultAuth,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl VaultSpec {
    /// Validates the document's vault block.
    pub fn from_doc(v: &VaultDoc) -> Result<VaultSpec, PolicyError> {
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
        let auth = match (&a.token, &a.app_role, &a.kubernetes) {
            (Some(t), None, None) => {
                if t.secret_ref.is_none() && non_empty(&t.token_file).is_none() {
                    return Err(err("spec.config.vault.auth.token", "set secretRef or tokenFile"));
                }
                VaultAuth::Token { secret_ref: t.secret_ref.clone(), token_file: non_empty(&t.token_file) }
            }
            (None, Some(r), None) => {
                if r.role_id.is_empty() {
                    return Err(err("spec.config.vault.auth.appRole.roleId", "is required"));
                }
                if r.secret_id_ref.is_none() && non_empty(&r.secret_id_file).is_none() {
                    return Err(err("spec.config.vault.auth.appRole", "set secretIdRef or secretIdFile"));
                }
                VaultAuth::AppRole {
                    mount_path: non_empty(&r.mount_path),
                    role_id: r.role_id.clone(),
                    secret_id_ref: r.secret_id_ref.clone(),
                    secret_id_file: non_empty(&r.secret_id_file),
                }
            }
            (None, None, Some(k)) => {
                if k.role.is_empty() {
                    return Err(err("spec.config.vault.auth.kubernetes.role", "is required"));
                }
                VaultAuth::Kubernetes {
                    role: k.role.clone(),
                    mount_path: non_empty(&k.mount_path),
                    token_path: non_empty(&k.token_path),
                }
            }
            _ => {
                return Err(err(
                    "spec.config.vault.auth",
                    format!(
                        "exactly one of token, appRole, kubernetes must be set; found {}",
                        if methods.is_empty() { "none".to_string() } else { methods.join(" and ") }
                    ),
                ));
            }
        };
        Ok(VaultSpec {
            server: v.server.clone(),
            ca_path: v.ca_path.trim().to_string(),
            csr_path: non_empty(&v.csr_path),
            namespace: non_empty(&v.namespace),
            tls_ca_file: v.tls.as_ref().and_then(|t| non_empty(&t.ca_file)),
            auth,
        })
    }

    /// The document form (what [`VaultSpec::from_doc`] accepts back).
    pub fn to_doc(&self) -> VaultDoc {
        let auth = match &self.auth {
            VaultAuth::Token { secret_ref, token_file } => VaultAuthDoc {
                token: Some(VaultTokenDoc { secret_ref: secret_ref.clone(), token_file: token_file.clone() }),
                ..Default::default()
            },
            VaultAuth::AppRole { mount_path, role_id, secret_id_ref, secret_id_file } => VaultAuthDoc {
                app_role: Some(VaultAppRoleDoc {
                    mount_path: mount_path.clone(),
                    role_id: role_id.clone(),
                    secret_id_ref: secret_id_ref.clone(),
                    secret_id_file: secret_id_file.clone(),
                }),
                ..Default::default()
            },
            VaultAuth::Kubernetes { role, mount_path, token_path } => VaultAuthDoc {
                kubernetes: Some(VaultKubernetesDoc {
                    role: role.clone(),
                    mount_path: mount_path.clone(),
                    token_path: token_path.clone(),
                }),
                ..Default::default()
            },
        };
        VaultDoc {
            server: self.server.clone(),
            ca_path: self.ca_path.clone(),
            csr_path: self.csr_path.clone(),
            namespace: self.namespace.clone(),
            tls: self.tls_ca_file.as_ref().map(|f| VaultTlsDoc { ca_file: Some(f.clone()) }),
            auth,
        }
    }
}

/// What the management plane delivers to a Vault agent: the Vault block plus the two policy
/// fields that shape the intermediate Vault signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultDelivery {
    /// The mesh's trust domain (the intermediate's URI SAN).
    pub trust_domain: TrustDomain,
    /// `O=` of the intermediates.
    pub organization: String,
    /// The Vault block.
    pub spec: VaultSpec,
}

fn secret_ref_to_wire(r: &Option<SecretRef>) -> Option<wire::SecretRef> {
    r.as_ref().map(|r| wire::SecretRef { namespace: r.namespace.clone(), name: r.name.clone() })
}

fn secret_ref_from_wire(r: &Option<wire::SecretRef>) -> Option<SecretRef> {
    r.as_ref().map(|r| SecretRef { namespace: r.namespace.clone(), name: r.name.clone() })
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl VaultDelivery {
    /// The wire form.
    pub fn to_wire(&self) -> VaultConfig {
        let s = &self.spec;
        let auth = match &s.auth {
            VaultAuth::Token { secret_ref, token_file } => wire::vault_config::Auth::Token(wire::VaultTokenAuth {
                secret_ref: secret_ref_to_wire(secret_ref),
                token_file: token_file.clone().unwrap_or_default(),
            }),
            VaultAuth::AppRole { mount_path, role_id, secret_id_ref, secret_id_file } => {
                wire::vault_config::Auth::AppRole(wire::VaultAppRoleAuth {
                    mount_path: mount_path.clone().unwrap_or_default(),
                    role_id: role_id.clone(),
                    secret_id_ref: secret_ref_to_wire(secret_id_ref),
                    secret_id_file: secret_id_file.clone().unwrap_or_default(),
                })
            }
            VaultAuth::Kubernetes { role, mount_path, token_path } => {
                wire::vault_config::Auth::Kubernetes(wire::VaultKubernetesAuth {
                    role: role.clone(),
                    mount_path: mount_path.clone().unwrap_or_default(),
                    token_path: token_path.clone().unwrap_or_default(),
                })
            }
        };
        VaultConfig {
            trust_domain: self.trust_domain.to_string(),
            organization: self.organization.clone(),
            server: s.server.clone(),
            ca_path: s.ca_path.clone(),
            csr_path: s.csr_path.clone().unwrap_or_default(),
            namespace: s.namespace.clone().unwrap_or_default(),
            tls_ca_file: s.tls_ca_file.clone().unwrap_or_default(),
            auth: Some(auth),
        }
    }

    /// Reads the wire form back through the policy's own validation: an agent never acts on a
    /// Vault block the management plane's policy crate would have refused.
    pub fn from_wire(c: &VaultConfig) -> Result<VaultDelivery, PolicyError> {
        let trust_domain = TrustDomain::new(&c.trust_domain).map_err(|e| err("spec.trustDomain", e.to_string()))?;
        let mut auth = VaultAuthDoc::default();
        match &c.auth {
            Some(wire::vault_config::Auth::Token(t)) => {
                auth.token = Some(VaultTokenDoc {
                    secret_ref: secret_ref_from_wire(&t.secret_ref),
                    token_file: opt(&t.token_file),
                })
            }
            Some(wire::vault_config::Auth::AppRole(a)) => {
                auth.app_role = Some(VaultAppRoleDoc {
                    mount_path: opt(&a.mount_path),
                    role_id: a.role_id.clone(),
                    secret_id_ref: secret_ref_from_wire(&a.secret_id_ref),
                    secret_id_file: opt(&a.secret_id_file),
                })
            }
            Some(wire::vault_config::Auth::Kubernetes(k)) => {
                auth.kubernetes = Some(VaultKubernetesDoc {
                    role: k.role.clone(),
                    mount_path: opt(&k.mount_path),
                    token_path: opt(&k.token_path),
                })
            }
            None => {}
        }
        let doc = VaultDoc {
            server: c.server.clone(),
            ca_path: c.ca_path.clone(),
            csr_path: opt(&c.csr_path),
            namespace: opt(&c.namespace),
            tls: opt(&c.tls_ca_file).map(|f| VaultTlsDoc { ca_file: Some(f) }),
            auth,
        };
        Ok(VaultDelivery { trust_domain, organization: c.organization.clone(), spec: VaultSpec::from_doc(&doc)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(auth: VaultAuth) -> VaultSpec {
        VaultSpec {
            server: "https://vault:8200".into(),
            ca_path: "pki/root/sign-intermediate".into(),
            csr_path: None,
            namespace: Some("team".into()),
            tls_ca_file: Some("/etc/vault/ca.pem".into()),
            auth,
        }
    }

    #[test]
    fn every_auth_method_survives_the_wire_and_a_bad_block_is_refused_on_arrival() {
        let td = TrustDomain::new("mesh.example").expect("td");
        for auth in [
            VaultAuth::Token { secret_ref: None, token_file: Some("/t".into()) },
            VaultAuth::AppRole {
                mount_path: Some("approle2".into()),
                role_id: "r".into(),
                secret_id_ref: Some(SecretRef { namespace: "ns".into(), name: "s".into() }),
                secret_id_file: Some("/s".into()),
            },
            VaultAuth::Kubernetes { role: "meshca".into(), mount_path: None, token_path: None },
        ] {
            let d = VaultDelivery { trust_domain: td.clone(), organization: "acme".into(), spec: spec(auth) };
            assert_eq!(VaultDelivery::from_wire(&d.to_wire()), Ok(d.clone()));
            assert_eq!(VaultSpec::from_doc(&d.spec.to_doc()), Ok(d.spec.clone()));
        }
        let mut w = VaultDelivery {
            trust_domain: td,
            organization: "acme".into(),
            spec: spec(VaultAuth::Kubernetes { role: "r".into(), mount_path: None, token_path: None }),
        }
        .to_wire();
        w.auth = None;
        assert_eq!(VaultDelivery::from_wire(&w).map_err(|e| e.field), Err("spec.config.vault.auth".to_string()));
        w.server = "vault:8200".into();
        assert_eq!(VaultDelivery::from_wire(&w).map_err(|e| e.field), Err("spec.config.vault.server".to_string()));
    }
}
