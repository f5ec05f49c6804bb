//! [`VaultSource`]: cluster intermediates from Vault, for the agent's loop.
//!
//! The settings come from the policy's `vault` block, which the management plane delivers in
//! `TrustState.vault` (a `VaultConfig`, read back through the policy crate's own validation:
//! [`meshca_policy::VaultDelivery::from_wire`]); local [`Overrides`] (flags) win, for
//! development. On every request:
//! 1. a token from the [`Session`] (logging in if needed);
//! 2. the pre-flight checks ([`crate::pki::preflight`]);
//! 3. the key: generated here in memory (`caPath` only), or by Vault
//!    (`csrPath`: `<mount>/intermediate/generate/exported`, key and CSR in the answer);
//! 4. `sign-intermediate`, and the four `cacerts` files assembled in memory.
//!
//! If Vault refuses the token on the way (HTTP 403: revoked, expired), the session drops it and
//! the request is made once more after a fresh login. Nothing here writes a file: the agent
//! validates the bundle and writes it only to the memory-backed folder.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshca_agent::AgentError;
use meshca_agent::source::{IntermediateSource, KeyLocation, Obtained, Request, csr_for};
use meshca_clock::SharedClock;
use meshca_pki::{CaBundle, PrivateKey, RootSet};
use meshca_policy::VaultDelivery;
use meshca_proto::mgmt::{TrustState, VaultConfig};

use crate::VaultError;
use crate::auth::{AuthMethod, Session};
use crate::client::{DEFAULT_TIMEOUT, VaultClient};
use crate::pki::{self, GeneratePath, SignPath, Want};

/// Local settings that win over the delivered ones (`meshca vault-agent --vault-*` flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Vault's address.
    pub server: Option<String>,
    /// CA file for Vault's TLS certificate.
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise namespace.
    pub namespace: Option<String>,
    /// `caPath`.
    pub ca_path: Option<String>,
    /// `csrPath`.
    pub csr_path: Option<String>,
    /// The auth method, replacing the policy's.
    pub auth: Option<AuthMethod>,
    /// Trust domain, when no policy delivers one.
    pub trust_domain: Option<String>,
    /// Timeout of one Vault call (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Option<Duration>,
}

/// The resolved settings of one Vault connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Vault's address.
    pub server: String,
    /// CA file for Vault's TLS certificate.
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise namespace.
    pub namespace: Option<String>,
    /// Where intermediates are signed.
    pub sign: SignPath,
    /// Where Vault generates the key (`csrPath` flow), if it does.
    pub generate: Option<GeneratePath>,
    /// How to log in.
    pub auth: AuthMethod,
    /// Trust domain.
    pub trust_domain: String,
    /// `O=`.
    pub organization: String,
    /// Timeout of one call.
    pub timeout: Duration,
}

impl Settings {
    /// Resolves the settings from what the management plane delivered (`None` outside Vault
    /// mode) and the overrides.
    pub fn resolve(delivered: Option<&VaultConfig>, o: &Overrides) -> Result<Settings, VaultError> {
        let delivered = delivered.map(VaultDelivery::from_wire).transpose().map_err(|e| VaultError::Config {
            field: e.field,
            message: format!("from the management plane: {}", e.message),
        })?;
        let spec = delivered.as_ref().map(|d| &d.spec);
        let missing = |what: &str, flag: &str| VaultError::Config {
            field: format!("spec.config.vault.{what}"),
            message: format!(
                "not set: the management plane's policy is not in Vault mode (put a spec.config.vault block in the \
                 RootTrustPolicy), and {flag} was not given"
            ),
        };
        let server = o
            .server
            .clone()
            .or_else(|| spec.map(|d| d.server.clone()))
            .ok_or_else(|| missing("server", "--vault-addr"))?;
        let ca_path = o
            .ca_path
            .clone()
            .or_else(|| spec.map(|d| d.ca_path.clone()))
            .ok_or_else(|| missing("caPath", "--vault-ca-path"))?;
        let csr_path = o.csr_path.clone().or_else(|| spec.and_then(|d| d.csr_path.clone())).filter(|s| !s.is_empty());
        let auth = match (&o.auth, spec) {
            (Some(a), _) => a.clone(),
            (None, Some(d)) => AuthMethod::from_spec(&d.auth)?,
            (None, None) => {
                return Err(missing("auth", "a --vault-token-file / --vault-approle-* / --vault-k8s-* flag"));
            }
        };
        Ok(Settings {
            server,
            ca_file: o.ca_file.clone().or_else(|| spec.and_then(|d| d.tls_ca_file.as_ref().map(PathBuf::from))),
            namespace: o.namespace.clone().or_else(|| spec.and_then(|d| d.namespace.clone())),
            sign: SignPath::parse(&ca_path)?,
            generate: csr_path.as_deref().map(GeneratePath::parse).transpose()?,
            auth,
            trust_domain: delivered
                .as_ref()
                .map(|d| d.trust_domain.to_string())
                .or_else(|| o.trust_domain.clone())
                .unwrap_or_else(|| meshca_policy::defaults::TRUST_DOMAIN.into()),
            organization: delivered
                .as_ref()
                .map(|d| d.organization.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| meshca_policy::defaults::ORGANIZATION.into()),
            timeout: o.timeout.unwrap_or(DEFAULT_TIMEOUT),
        })
    }
}

/// One Vault connection and its token keeper, for one set of settings.
struct Active {
    settings: Settings,
    client: Arc<VaultClient>,
    session: Session,
}

/// The agent's source of intermediates in Vault mode. The key is reported as `memory`.
pub struct VaultSource {
    overrides: Overrides,
    clock: SharedClock,
    /// Replaced when the settings change (a new policy); never held across an await.
    active: Mutex<Option<Arc<Active>>>,
}

impl VaultSource {
    /// A source with these local overrides, on `clock`.
    pub fn new(overrides: Overrides, clock: SharedClock) -> Self {
        VaultSource { overrides, clock, active: Mutex::new(None) }
    }

    fn active_for(&self, settings: Settings) -> Result<Arc<Active>, VaultError> {
        let mut slot = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = slot.as_ref().filter(|a| a.settings == settings) {
            return Ok(a.clone());
        }
        let client = Arc::new(VaultClient::new(
            &settings.server,
            settings.ca_file.as_deref(),
            settings.namespace.as_deref(),
            settings.timeout,
        )?);
        let session = Session::start(client.clone(), settings.auth.clone(), self.clock.clone());
        tracing::info!(
            server = %settings.server,
            ca_path = %settings.sign.path,
            csr_path = settings.generate.as_ref().map(|g| g.path.as_str()).unwrap_or("-"),
            auth = %settings.auth.kind(),
            auth_mount = %settings.auth.mount(),
            "Vault settings in force"
        );
        let a = Arc::new(Active { settings, client, session });
        *slot = Some(a.clone());
        Ok(a)
    }

    /// Obtains an intermediate, with one fresh login if Vault refuses the token.
    pub async fn obtain_intermediate(
        &self,
        delivered: Option<&VaultConfig>,
        roots: Option<&RootSet>,
        want_cluster: &str,
        ttl: Duration,
        key_algorithm: meshca_pki::KeyAlgorithm,
    ) -> Result<Obtained, VaultError> {
        let settings = Settings::resolve(delivered, &self.overrides)?;
        let active = self.active_for(settings)?;
        let s = &active.settings;
        let want = Want {
            cluster: want_cluster.to_string(),
            trust_domain: s.trust_domain.clone(),
            organization: s.organization.clone(),
            ttl,
            key_algorithm,
        };
        let mut retried = false;
        loop {
            let (generation, token) = active.session.token().await?;
            match once(&active, &token, &want, roots, self.clock.now()).await {
                Err(e) if e.is_token_refused() && !retried => {
                    tracing::warn!(error = %e, "Vault refused the token; logging in afresh and retrying once");
                    active.session.refused(generation).await;
                    retried = true;
                }
                other => return other,
            }
        }
    }
}

/// One request. `roots` is the root set the management plane says clusters trust (both roots
/// during a root rotation): written as `root-cert.pem` if it holds the root Vault's chain ends
/// at; without it, that root alone.
async fn once(
    active: &Active,
    token: &crate::Secret,
    want: &Want,
    roots: Option<&RootSet>,
    now: SystemTime,
) -> Result<Obtained, VaultError> {
    let s = &active.settings;
    let client = active.client.as_ref();
    let issuer = pki::preflight(client, token, &s.sign, s.generate.as_ref(), want, now).await?;
    let (key, csr) = match &s.generate {
        None => {
            let key = PrivateKey::generate(want.key_algorithm)
                .map_err(|e| VaultError::Config { field: "keyAlgorithm".into(), message: e.to_string() })?;
            let csr = csr_for(&key, &want.organization, &want.cluster)
                .map_err(|e| VaultError::Config { field: "csr".into(), message: e.to_string() })?;
            (key, csr)
        }
        Some(g) => pki::generate(client, token, g, want).await?,
    };
    let signed = pki::sign(client, token, &s.sign, &issuer, &csr, want).await?;
    let bad = |reason: String| VaultError::BadResponse { path: s.sign.path.clone(), reason };
    if !signed.cert.has_public_key(key.public_key_spki()) {
        return Err(bad("the certificate Vault returned is not for the key in the CSR".into()));
    }
    let root = signed.chain_above.last().cloned().ok_or_else(|| bad("no chain above the intermediate".into()))?;
    let roots = match roots {
        Some(set) if set.contains(&root) => set.clone(),
        Some(set) => {
            return Err(bad(format!(
                "Vault signed under {} ({}), which is not in the root set the management plane says to trust ({});                  was the mount's root replaced in place?",
                root.subject(),
                root.fingerprint(),
                set.fingerprint()
            )));
        }
        None => RootSet::from_certs(vec![root]).map_err(|e| bad(e.to_string()))?,
    };
    let files = CaBundle::assemble(&key, &signed.cert, &signed.chain_above, &roots);
    let serial = signed.cert.serial_hex();
    tracing::info!(
        serial = %serial,
        not_after = %meshca_pki::chain::rfc3339(signed.cert.not_after()),
        issuer = %issuer.cert.subject(),
        key = if s.generate.is_some() { "generated by Vault" } else { "generated in memory" },
        "Vault signed the cluster intermediate"
    );
    Ok(Obtained { files, serial })
}

impl VaultSource {
    /// Vault's CRL for the issuer that signs the cluster intermediates (see [`pki::read_crl`]).
    pub async fn crl(&self, delivered: Option<&VaultConfig>) -> Result<String, VaultError> {
        let active = self.active_for(Settings::resolve(delivered, &self.overrides)?)?;
        pki::read_crl(active.client.as_ref(), &active.settings.sign).await
    }
}

#[async_trait::async_trait]
impl IntermediateSource for VaultSource {
    async fn upstream_crls(&self, trust: &TrustState) -> Option<Result<String, AgentError>> {
        Some(self.crl(trust.vault.as_ref()).await.map_err(|e| AgentError::Upstream(Box::new(e))))
    }

    fn key_location(&self) -> KeyLocation {
        KeyLocation::Memory
    }

    fn serves_vault_mode(&self) -> bool {
        true
    }

    async fn obtain(&self, req: Request<'_>) -> Result<Obtained, AgentError> {
        let ttl = match req.trust.intermediate_ttl_seconds {
            s if s > 0 => Duration::from_secs(s.unsigned_abs()),
            _ => meshca_policy::defaults::INTERMEDIATE_TTL,
        };
        let roots = if req.trust.root_set.is_empty() {
            None
        } else {
            let set = RootSet::from_pem(req.trust.root_set.as_bytes())
                .map_err(|e| AgentError::BadAnswer { call: "WatchTrust", reason: format!("root set: {e}") })?;
            Some(set)
        };
        self.obtain_intermediate(req.trust.vault.as_ref(), roots.as_ref(), req.cluster, ttl, req.key_algorithm)
            .await
            .map_err(|e| AgentError::Upstream(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use meshca_pki::TrustDomain;
    use meshca_policy::{VaultAuth, VaultSpec};

    use super::*;

    fn delivered(auth: VaultAuth) -> VaultConfig {
        VaultDelivery {
            trust_domain: TrustDomain::new("mesh.example").unwrap_or_else(|e| panic!("{e}")),
            organization: "acme".into(),
            spec: VaultSpec {
                server: "https://vault:8200".into(),
                ca_path: "pki/root/sign-intermediate".into(),
                csr_path: None,
                namespace: None,
                tls_ca_file: Some("/etc/vault/ca.pem".into()),
                auth,
            },
        }
        .to_wire()
    }

    #[test]
    fn settings_from_the_policy_and_the_flags() {
        let approle = VaultAuth::AppRole {
            mount_path: None,
            role_id: "r".into(),
            secret_id_ref: None,
            secret_id_file: Some("/s".into()),
        };
        let d = delivered(approle);
        let s = Settings::resolve(Some(&d), &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.server.as_str(), s.trust_domain.as_str(), s.organization.as_str()),
            ("https://vault:8200", "mesh.example", "acme")
        );
        assert_eq!(s.ca_file.as_deref(), Some(std::path::Path::new("/etc/vault/ca.pem")));
        assert_eq!(s.auth.mount(), "approle");
        assert!(s.generate.is_none());

        let o = Overrides {
            server: Some("http://127.0.0.1:8200".into()),
            csr_path: Some("pki_int/intermediate/generate/exported".into()),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&d), &o).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.server, "http://127.0.0.1:8200");
        assert_eq!(s.generate.map(|g| g.mount), Some("pki_int".to_string()));

        let e = Settings::resolve(None, &Overrides::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not in Vault mode") && e.contains("--vault-addr"), "{e}");
    }

    #[test]
    fn a_vault_block_the_policy_would_refuse_is_refused_on_arrival() {
        let mut d = delivered(VaultAuth::Token { secret_ref: None, token_file: Some("/t".into()) });
        let s = Settings::resolve(Some(&d), &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.auth, AuthMethod::Token { token_file: "/t".into() });
        d.ca_path.clear();
        let e = Settings::resolve(Some(&d), &Overrides::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("spec.config.vault.caPath") && e.contains("from the management plane"), "{e}");
    }
}
