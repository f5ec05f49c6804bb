//! Vault's PKI engine: where the intermediate is signed, the checks made before asking, and the
//! two ways to get the key.
//!
//! Pre-flight (every time, before the first PKI request; all read-only):
//! 1. the mount exists and is a `pki` mount — `sys/internal/ui/mounts/<mount>`, which any token
//!    with a capability under the mount may read, else `sys/mounts/<mount>` for a precise answer;
//! 2. the requested TTL fits the mount's *effective* max lease TTL — Vault does not refuse a
//!    longer `ttl`, it silently caps it (docs/peers.md), which would shorten every intermediate;
//! 3. the TTL ends before the issuing CA does — Vault would silently truncate `notAfter` too;
//! 4. the intermediate's key type is one the root signs for this mesh: the same family (EC or
//!    RSA) as the issuing CA's key. A mixed chain is valid X.509, but it is the RSA/EC mismatch
//!    users of other meshes' Vault providers trip over, and meshca refuses it with a clear error
//!    rather than let clusters end up with chains some peers reject.

use std::time::{Duration, SystemTime};

use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, PublicKeyKind};
use serde_json::{Value, json};

use crate::auth::Secret;
use crate::{VaultClient, VaultError};

/// Where intermediates are signed: `<mount>/root/sign-intermediate` or
/// `<mount>/issuer/<ref>/sign-intermediate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignPath {
    /// The PKI mount holding the root (may contain `/`).
    pub mount: String,
    /// The issuer reference, when the path names one (the mount's default issuer otherwise).
    pub issuer: Option<String>,
    /// The full API path.
    pub path: String,
}

/// Where Vault generates the key in the `csrPath` flow: `<mount>/intermediate/generate/exported`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratePath {
    /// The PKI mount that generates the key.
    pub mount: String,
    /// The full API path.
    pub path: String,
}

fn trim_path(s: &str) -> &str {
    let s = s.trim().trim_matches('/');
    s.strip_prefix("v1/").unwrap_or(s)
}

impl SignPath {
    /// Parses `spec.config.vault.caPath`.
    pub fn parse(ca_path: &str) -> Result<Self, VaultError> {
        let path = trim_path(ca_path);
        let bad = || VaultError::Config {
            field: "spec.config.vault.caPath".into(),
            message: format!(
                "{ca_path:?} is not a sign-intermediate path: use <mount>/root/sign-intermediate or \
                 <mount>/issuer/<issuer>/sign-intermediate (e.g. pki/root/sign-intermediate)"
            ),
        };
        if let Some(mount) = path.strip_suffix("/root/sign-intermediate") {
            if mount.is_empty() {
                return Err(bad());
            }
            return Ok(SignPath { mount: mount.to_string(), issuer: None, path: path.to_string() });
        }
        let rest = path.strip_suffix("/sign-intermediate").ok_or_else(bad)?;
        let (mount, issuer) = rest.rsplit_once("/issuer/").ok_or_else(bad)?;
        if mount.is_empty() || issuer.is_empty() || issuer.contains('/') {
            return Err(bad());
        }
        Ok(SignPath { mount: mount.to_string(), issuer: Some(issuer.to_string()), path: path.to_string() })
    }

    /// The issuer read by the pre-flight check (unauthenticated in Vault ≥ 1.11).
    pub fn issuer_path(&self) -> String {
        format!("{}/issuer/{}/json", self.mount, self.issuer.as_deref().unwrap_or("default"))
    }
}

impl GeneratePath {
    /// Parses `spec.config.vault.csrPath`.
    pub fn parse(csr_path: &str) -> Result<Self, VaultError> {
        let path = trim_path(csr_path);
        let field = "spec.config.vault.csrPath";
        if path.ends_with("/generate/internal") {
            return Err(VaultError::Config {
                field: field.into(),
                message: format!(
                    "{csr_path:?} keeps the key inside Vault, but istiod (or meshca's workload CA) must sign with it: \
                     use <mount>/intermediate/generate/exported"
                ),
            });
        }
        let mount = path
            .strip_suffix("/intermediate/generate/exported")
            .or_else(|| path.strip_suffix("/issuers/generate/intermediate/exported"))
            .filter(|m| !m.is_empty())
            .ok_or_else(|| VaultError::Config {
                field: field.into(),
                message: format!("{csr_path:?} is not <mount>/intermediate/generate/exported"),
            })?;
        Ok(GeneratePath { mount: mount.to_string(), path: path.to_string() })
    }
}

/// What the cluster intermediate must be.
#[derive(Debug, Clone)]
pub struct Want {
    /// The cluster (`L=`).
    pub cluster: String,
    /// `spiffe://<trust domain>` goes in the URI SAN.
    pub trust_domain: String,
    /// `O=`.
    pub organization: String,
    /// Lifetime (the policy's `intermediateCertOptions.ttl`).
    pub ttl: Duration,
    /// Key algorithm (the policy's `intermediateCertOptions.keyAlgorithm`).
    pub key_algorithm: KeyAlgorithm,
}

/// A PKI mount as the pre-flight check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount path.
    pub mount: String,
    /// Its engine type (`pki`).
    pub kind: String,
    /// Its effective max lease TTL.
    pub max_lease_ttl: Duration,
}

/// The CA that signs the intermediates, and its chain up to the root.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The issuing CA (the root, or an intermediate the mount signs with).
    pub cert: Cert,
    /// The issuing CA first, then every certificate above it, root last.
    pub chain: Vec<Cert>,
}

impl Issuer {
    /// The root the chain ends at.
    pub fn root(&self) -> &Cert {
        self.chain.last().unwrap_or(&self.cert)
    }
}

/// The signed intermediate and the chain above it (issuer first, root last).
#[derive(Debug, Clone)]
pub struct Signed {
    /// The cluster intermediate.
    pub cert: Cert,
    /// Above it.
    pub chain_above: Vec<Cert>,
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Reads a mount's type and effective max lease TTL.
pub async fn mount_info(client: &VaultClient, token: &Secret, mount: &str) -> Result<MountInfo, VaultError> {
    let ui = format!("sys/internal/ui/mounts/{mount}");
    let data = match client.call(http::Method::GET, &ui, Some(token), None).await {
        Ok(v) => v.get("data").cloned().unwrap_or(Value::Null),
        // A refused token is not a missing mount: let the caller log in afresh.
        Err(e) if e.is_token_refused() => return Err(e),
        Err(VaultError::Api { status: 400 | 403 | 404, message, .. }) => {
            // Not visible to this token: ask the privileged endpoint, which says precisely
            // whether the mount exists (when the token may read it).
            let precise = match client.call(http::Method::GET, &format!("sys/mounts/{mount}"), Some(token), None).await
            {
                Err(VaultError::Api { message, .. }) => message,
                Ok(_) => message,
                Err(e) => return Err(e),
            };
            return Err(VaultError::Preflight(format!(
                "there is no secrets engine mounted at {mount}/ on {} that this token may use (Vault: {precise}). \
                 Mount a PKI engine there (`vault secrets enable -path={mount} pki`), or fix the mount in \
                 spec.config.vault.caPath / csrPath, or grant the token's policy access under {mount}/",
                client.server()
            )));
        }
        Err(e) => return Err(e),
    };
    let kind = data.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let max = data
        .get("config")
        .and_then(|c| c.get("max_lease_ttl"))
        .and_then(as_u64)
        .ok_or_else(|| VaultError::BadResponse { path: ui.clone(), reason: "no config.max_lease_ttl".into() })?;
    Ok(MountInfo { mount: mount.to_string(), kind, max_lease_ttl: Duration::from_secs(max) })
}

fn certs_from(v: &Value, path: &str) -> Result<Vec<Cert>, VaultError> {
    let bad = |reason: String| VaultError::BadResponse { path: path.to_string(), reason };
    let mut out = Vec::new();
    let mut push = |pem: &str| -> Result<(), VaultError> {
        for c in Cert::parse_pem_bundle(pem.as_bytes()).map_err(|e| bad(e.to_string()))? {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        Ok(())
    };
    match v {
        Value::String(s) => push(s)?,
        Value::Array(a) => {
            for s in a.iter().filter_map(Value::as_str) {
                push(s)?;
            }
        }
        _ => {}
    }
    Ok(out)
}

/// The root Vault signs under at `spec`'s `caPath`: the end of its issuer's chain. Read without
/// a token (the issuer endpoint is unauthenticated), so the management plane can learn a mount's
/// root before any cluster signs under it (root rotation).
pub async fn signing_root(spec: &meshca_policy::VaultSpec) -> Result<Cert, VaultError> {
    let client = VaultClient::new(
        &spec.server,
        spec.tls_ca_file.as_deref().map(std::path::Path::new),
        spec.namespace.as_deref(),
        crate::client::DEFAULT_TIMEOUT,
    )?;
    let issuer = read_issuer(&client, &SignPath::parse(&spec.ca_path)?).await?;
    let root = issuer.root().clone();
    if !root.is_self_issued() {
        return Err(VaultError::Preflight(format!(
            "the chain of {} ends at {}, which is not a root (issued by {}); configure the mount's full CA chain              (`vault write {}/config/ca` or an issuer with its chain)",
            spec.ca_path,
            root.subject(),
            root.issuer(),
            spec.ca_path.split("/root/").next().unwrap_or(&spec.ca_path)
        )));
    }
    Ok(root)
}

/// The CRL of the issuer the sign path uses (PEM), as Vault publishes it
/// (`<mount>/issuer/<ref>/crl`, unauthenticated). An answer without one is an error: the
/// cluster's `ca-crl.pem` cannot carry it (the agent reports it, and the management plane alerts).
pub async fn read_crl(client: &VaultClient, sign: &SignPath) -> Result<String, VaultError> {
    let path = format!("{}/issuer/{}/crl", sign.mount, sign.issuer.as_deref().unwrap_or("default"));
    let v = client.call(http::Method::GET, &path, None, None).await?;
    let crl = v.get("data").and_then(|d| d.get("crl")).and_then(Value::as_str).unwrap_or_default().trim();
    if crl.is_empty() {
        return Err(VaultError::BadResponse {
            path,
            reason: "Vault publishes no CRL for this issuer (is CRL building disabled on the mount?)".into(),
        });
    }
    Ok(crl.to_string())
}

/// Reads the issuing CA (and its chain) the sign path uses.
pub async fn read_issuer(client: &VaultClient, sign: &SignPath) -> Result<Issuer, VaultError> {
    let path = sign.issuer_path();
    let v = client.call(http::Method::GET, &path, None, None).await.map_err(|e| match e {
        VaultError::Api { status, message, .. } => VaultError::Preflight(format!(
            "the PKI mount {}/ has no issuer {} to sign with (HTTP {status}: {message}); generate or import the root \
             there first (`vault write {}/root/generate/internal ...`)",
            sign.mount,
            sign.issuer.as_deref().unwrap_or("default"),
            sign.mount
        )),
        other => other,
    })?;
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let cert = certs_from(data.get("certificate").unwrap_or(&Value::Null), &path)?
        .into_iter()
        .next()
        .ok_or_else(|| VaultError::BadResponse { path: path.clone(), reason: "no certificate".into() })?;
    let mut chain = vec![cert.clone()];
    for c in certs_from(data.get("ca_chain").unwrap_or(&Value::Null), &path)? {
        if !chain.contains(&c) {
            chain.push(c);
        }
    }
    Ok(Issuer { cert, chain })
}

fn family(k: PublicKeyKind) -> &'static str {
    match k {
        PublicKeyKind::Ec(_) => "EC",
        PublicKeyKind::Rsa { .. } => "RSA",
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) { format!("{}h", s / 3600) } else { format!("{s}s") }
}

/// The pure part of the pre-flight check (see the [module documentation](self)).
pub fn check(mounts: &[&MountInfo], issuer: &Issuer, want: &Want, now: SystemTime) -> Result<(), VaultError> {
    for m in mounts {
        if m.kind != "pki" {
            return Err(VaultError::Preflight(format!(
                "{}/ is a {:?} secrets engine, not pki; spec.config.vault.caPath (and csrPath) must name PKI mounts",
                m.mount, m.kind
            )));
        }
    }
    if let Some(m) = mounts.first()
        && want.ttl > m.max_lease_ttl
    {
        return Err(VaultError::Preflight(format!(
            "the intermediate TTL {} (spec.intermediateCertOptions.ttl) is longer than the max lease TTL {} of the \
             PKI mount {}/; Vault would silently cap it. Lower the TTL, or raise the mount's max: \
             `vault secrets tune -max-lease-ttl={} {}`",
            human(want.ttl),
            human(m.max_lease_ttl),
            m.mount,
            human(want.ttl),
            m.mount
        )));
    }
    let ends = now + want.ttl;
    if ends > issuer.cert.not_after() {
        return Err(VaultError::Preflight(format!(
            "an intermediate of {} issued now would outlive its issuer {} (expires {}); Vault would silently \
             truncate it. Lower spec.intermediateCertOptions.ttl or rotate the root",
            human(want.ttl),
            issuer.cert.subject(),
            meshca_pki::chain::rfc3339(issuer.cert.not_after())
        )));
    }
    let root_kind = issuer.cert.key_kind();
    let want_kind = want.key_algorithm.kind();
    if family(root_kind) != family(want_kind) {
        return Err(VaultError::Preflight(format!(
            "key type mismatch: the issuing CA {} has a {root_kind} key, but spec.intermediateCertOptions.keyAlgorithm \
             asks for {} intermediates. meshca keeps one key family per chain: use an {} key algorithm \
             (e.g. {}) or a root with a {} key",
            issuer.cert.subject(),
            want.key_algorithm,
            family(root_kind),
            if family(root_kind) == "EC" { "ecdsa-p256" } else { "rsa-2048" },
            family(want_kind),
        )));
    }
    Ok(())
}

/// Runs the whole pre-flight check; returns the issuer for the bundle's chain.
pub async fn preflight(
    client: &VaultClient,
    token: &Secret,
    sign: &SignPath,
    generate: Option<&GeneratePath>,
    want: &Want,
    now: SystemTime,
) -> Result<Issuer, VaultError> {
    let sign_mount = mount_info(client, token, &sign.mount).await?;
    let gen_mount = match generate {
        Some(g) if g.mount != sign.mount => Some(mount_info(client, token, &g.mount).await?),
        _ => None,
    };
    let issuer = read_issuer(client, sign).await?;
    let mut mounts = vec![&sign_mount];
    mounts.extend(gen_mount.as_ref());
    check(&mounts, &issuer, want, now)?;
    Ok(issuer)
}

/// `key_type` and `key_bits` for Vault.
fn vault_key(alg: KeyAlgorithm) -> (&'static str, u32) {
    match alg {
        KeyAlgorithm::EcdsaP256 => ("ec", 256),
        KeyAlgorithm::EcdsaP384 => ("ec", 384),
        KeyAlgorithm::Rsa2048 => ("rsa", 2048),
        KeyAlgorithm::Rsa3072 => ("rsa", 3072),
        KeyAlgorithm::Rsa4096 => ("rsa", 4096),
    }
}

/// Has Vault sign `csr` (PEM) as the cluster intermediate. Only the CSR's key is used
/// (`use_csr_values: false`): the subject, SAN and constraints are meshca's profile.
pub async fn sign(
    client: &VaultClient,
    token: &Secret,
    sign: &SignPath,
    issuer: &Issuer,
    csr: &str,
    want: &Want,
) -> Result<Signed, VaultError> {
    let body = json!({
        "csr": csr,
        "common_name": meshca_pki::profile::INTERMEDIATE_COMMON_NAME,
        "organization": want.organization,
        "locality": want.cluster,
        "uri_sans": format!("spiffe://{}", want.trust_domain),
        "ttl": format!("{}s", want.ttl.as_secs()),
        "format": "pem",
        "max_path_length": 0,
        "use_csr_values": false,
        "key_usage": ["DigitalSignature", "CertSign", "CRLSign"],
    });
    let v = client.call(http::Method::POST, &sign.path, Some(token), Some(&body)).await?;
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let cert = certs_from(data.get("certificate").unwrap_or(&Value::Null), &sign.path)?
        .into_iter()
        .next()
        .ok_or_else(|| VaultError::BadResponse { path: sign.path.clone(), reason: "no certificate".into() })?;
    // `ca_chain` (issuer first) may or may not repeat the new certificate; fall back to the
    // issuer's own chain when Vault's answer stops short of a self-signed root.
    let mut above: Vec<Cert> = certs_from(data.get("ca_chain").unwrap_or(&Value::Null), &sign.path)?
        .into_iter()
        .filter(|c| *c != cert)
        .collect();
    if above.is_empty() {
        above = certs_from(data.get("issuing_ca").unwrap_or(&Value::Null), &sign.path)?;
    }
    if !above.last().is_some_and(Cert::is_self_issued) {
        above = issuer.chain.clone();
    }
    Ok(Signed { cert, chain_above: above })
}

/// The `csrPath` flow's first step: Vault generates the key and a CSR for it, and returns both.
pub async fn generate(
    client: &VaultClient,
    token: &Secret,
    path: &GeneratePath,
    want: &Want,
) -> Result<(PrivateKey, String), VaultError> {
    let (key_type, key_bits) = vault_key(want.key_algorithm);
    let body = json!({
        "common_name": meshca_pki::profile::INTERMEDIATE_COMMON_NAME,
        "organization": want.organization,
        "locality": want.cluster,
        "key_type": key_type,
        "key_bits": key_bits,
        "format": "pem",
        "private_key_format": "pkcs8",
    });
    let v = client.call(http::Method::POST, &path.path, Some(token), Some(&body)).await?;
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let bad = |reason: &str| VaultError::BadResponse { path: path.path.clone(), reason: reason.to_string() };
    let csr = data.get("csr").and_then(Value::as_str).ok_or_else(|| bad("no csr"))?.to_string();
    let pem = zeroize::Zeroizing::new(
        data.get("private_key")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no private_key (use generate/exported)"))?
            .to_string(),
    );
    let key = PrivateKey::from_pem(pem.as_bytes()).map_err(|e| bad(&format!("private_key: {e}")))?;
    if key.kind() != want.key_algorithm.kind() {
        return Err(bad(&format!("Vault generated a {} key, not {}", key.kind(), want.key_algorithm)));
    }
    Ok((key, csr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_paths() {
        let p = SignPath::parse("pki/root/sign-intermediate").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.mount.as_str(), p.issuer.as_deref()), ("pki", None));
        assert_eq!(p.issuer_path(), "pki/issuer/default/json");
        let p = SignPath::parse("/v1/mesh/pki/issuer/root-2026/sign-intermediate/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.mount.as_str(), p.issuer.as_deref()), ("mesh/pki", Some("root-2026")));
        assert_eq!(p.path, "mesh/pki/issuer/root-2026/sign-intermediate");
        for bad in ["pki", "pki/root/generate/internal", "/root/sign-intermediate", "pki/issuer//sign-intermediate"] {
            let e = SignPath::parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with("spec.config.vault.caPath"), "{bad}: {e}");
        }
    }

    fn issuer(alg: KeyAlgorithm, ttl: Duration, now: SystemTime) -> Issuer {
        let key = PrivateKey::generate(alg).unwrap_or_else(|e| panic!("{e}"));
        let params = meshca_pki::RootParams { ttl, ..meshca_pki::RootParams::new("test") };
        let root = meshca_pki::CaSigner::new_root(key, &params, now).unwrap_or_else(|e| panic!("{e}"));
        Issuer { cert: root.cert().clone(), chain: vec![root.cert().clone()] }
    }

    #[test]
    fn preflight_rules() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let day = Duration::from_secs(86400);
        let root = issuer(KeyAlgorithm::EcdsaP256, 3650 * day, now);
        let pki = MountInfo { mount: "pki".into(), kind: "pki".into(), max_lease_ttl: 365 * day };
        let want = Want {
            cluster: "c1".into(),
            trust_domain: "cluster.local".into(),
            organization: "meshca".into(),
            ttl: 30 * day,
            key_algorithm: KeyAlgorithm::EcdsaP384,
        };
        let err = |mounts: &[&MountInfo], issuer: &Issuer, want: &Want| {
            check(mounts, issuer, want, now).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(check(&[&pki], &root, &want, now).is_ok(), "EC root signs P-384 intermediates");

        let long = Want { ttl: 400 * day, ..want.clone() };
        let e = err(&[&pki], &root, &long);
        assert!(e.contains("9600h") && e.contains("8760h") && e.contains("vault secrets tune"), "{e}");

        let kv = MountInfo { kind: "kv".into(), ..pki.clone() };
        assert!(err(&[&kv], &root, &want).contains("not pki"));

        let rsa = Want { key_algorithm: KeyAlgorithm::Rsa2048, ..want.clone() };
        let e = err(&[&pki], &root, &rsa);
        assert!(e.contains("key type mismatch") && e.contains("ECDSA P-256") && e.contains("rsa-2048"), "{e}");

        let short_root = issuer(KeyAlgorithm::EcdsaP256, 10 * day, now);
        assert!(err(&[&pki], &short_root, &want).contains("outlive its issuer"));
    }

    #[test]
    fn generate_paths() {
        let g = GeneratePath::parse("pki_int/intermediate/generate/exported").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.mount, "pki_int");
        let e = GeneratePath::parse("pki_int/intermediate/generate/internal").err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("exported"));
        assert!(GeneratePath::parse("pki_int/root/sign-intermediate").is_err());
    }
}
