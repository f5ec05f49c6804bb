//! Logging in to Vault and keeping the token alive.
//!
//! Three methods, as the policy's `vault.auth` says: a **token** read from a file, **AppRole**
//! (role ID + a secret ID read from a file) and **Kubernetes** (the service-account JWT file sent
//! to `auth/<mount>/login`). Credential files are read at every login, so a rotated secret ID or
//! projected service-account token is picked up without a restart.
//!
//! A [`Session`] is one task that owns the token. Callers ask it for the token; it logs in when
//! it has none, renews the token (`auth/token/renew-self`) at about half its lease, and logs in
//! afresh when renewal fails or Vault caps the renewal (`token_max_ttl` reached). A caller whose
//! request Vault refused (HTTP 403: revoked or expired) tells the session, which then drops that
//! token — only that one, by generation, so a late report never discards a fresh token.
//!
//! Invariants: a credential is only ever held in a [`Secret`], whose `Debug` prints nothing, and
//! no error or log line carries one; login errors name the method and its mount.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::SharedClock;
use meshca_policy::VaultAuth;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::{VaultClient, VaultError};

/// Where Kubernetes mounts a pod's service-account token.
pub const DEFAULT_K8S_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// A credential (token, secret ID, JWT): wiped on drop, never printed.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    /// Wraps a credential.
    pub fn new(s: String) -> Self {
        Secret(Arc::new(Zeroizing::new(s)))
    }

    /// The credential itself, to put on the wire.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The kind of auth method, as named in errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// A token from a file.
    Token,
    /// AppRole.
    AppRole,
    /// Kubernetes service-account JWT.
    Kubernetes,
}

impl fmt::Display for AuthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthKind::Token => "token",
            AuthKind::AppRole => "AppRole",
            AuthKind::Kubernetes => "Kubernetes",
        })
    }
}

/// How the agent authenticates to Vault.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// A token read from `token_file`.
    Token {
        /// The file.
        token_file: PathBuf,
    },
    /// AppRole: `POST auth/<mount>/login {role_id, secret_id}`.
    AppRole {
        /// Mount path (`approle` by default).
        mount: String,
        /// The role ID (not printed either: it is half of the credential).
        role_id: String,
        /// File holding the secret ID.
        secret_id_file: PathBuf,
    },
    /// Kubernetes: `POST auth/<mount>/login {role, jwt}`.
    Kubernetes {
        /// Mount path (`kubernetes` by default).
        mount: String,
        /// The Vault role.
        role: String,
        /// File holding the service-account JWT.
        jwt_file: PathBuf,
    },
}

impl fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthMethod::Token { token_file } => f.debug_struct("Token").field("token_file", token_file).finish(),
            AuthMethod::AppRole { mount, secret_id_file, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", &"[redacted]")
                .field("secret_id_file", secret_id_file)
                .finish(),
            AuthMethod::Kubernetes { mount, role, jwt_file } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_file", jwt_file)
                .finish(),
        }
    }
}

fn clean_mount(m: Option<&str>, default: &str) -> String {
    let m = m.map(|m| m.trim().trim_matches('/')).unwrap_or_default();
    let m = m.strip_prefix("auth/").unwrap_or(m);
    if m.is_empty() { default.to_string() } else { m.to_string() }
}

impl AuthMethod {
    /// The method's kind.
    pub fn kind(&self) -> AuthKind {
        match self {
            AuthMethod::Token { .. } => AuthKind::Token,
            AuthMethod::AppRole { .. } => AuthKind::AppRole,
            AuthMethod::Kubernetes { .. } => AuthKind::Kubernetes,
        }
    }

    /// The auth mount (`token` for a token).
    pub fn mount(&self) -> &str {
        match self {
            AuthMethod::Token { .. } => "token",
            AuthMethod::AppRole { mount, .. } | AuthMethod::Kubernetes { mount, .. } => mount,
        }
    }

    /// An AppRole method; `mount` defaults to `approle`.
    pub fn app_role(mount: Option<&str>, role_id: &str, secret_id_file: &Path) -> Self {
        AuthMethod::AppRole {
            mount: clean_mount(mount, "approle"),
            role_id: role_id.to_string(),
            secret_id_file: secret_id_file.to_path_buf(),
        }
    }

    /// A Kubernetes method; `mount` defaults to `kubernetes`, the JWT file to the pod's token.
    pub fn kubernetes(mount: Option<&str>, role: &str, jwt_file: Option<&Path>) -> Self {
        AuthMethod::Kubernetes {
            mount: clean_mount(mount, "kubernetes"),
            role: role.to_string(),
            jwt_file: jwt_file.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(DEFAULT_K8S_TOKEN_PATH)),
        }
    }

    /// The method the policy's `vault.auth` block names. Secrets referenced by `secretRef`
    /// live in the management plane's store, which the agent cannot read: only the file forms
    /// work here (in Kubernetes, mount the secret as a file).
    pub fn from_spec(auth: &VaultAuth) -> Result<Self, VaultError> {
        let cfg = |field: &str, message: &str| VaultError::Config {
            field: format!("spec.config.vault.auth.{field}"),
            message: message.to_string(),
        };
        match auth {
            VaultAuth::Token { token_file, .. } => match token_file {
                Some(f) => Ok(AuthMethod::Token { token_file: PathBuf::from(f) }),
                None => Err(cfg(
                    "token",
                    "meshca vault-agent reads the token from a file: set tokenFile (mount the secret as a file)",
                )),
            },
            VaultAuth::AppRole { mount_path, role_id, secret_id_file, .. } => match secret_id_file {
                Some(f) => Ok(AuthMethod::app_role(mount_path.as_deref(), role_id, Path::new(f))),
                None => Err(cfg(
                    "appRole",
                    "meshca vault-agent reads the secret ID from a file: set secretIdFile (mount the secret as a file)",
                )),
            },
            VaultAuth::Kubernetes { role, mount_path, token_path } => {
                Ok(AuthMethod::kubernetes(mount_path.as_deref(), role, token_path.as_deref().map(Path::new)))
            }
        }
    }

    fn read_credential(&self, what: &'static str, path: &Path) -> Result<Secret, VaultError> {
        let err = |reason: String| VaultError::CredentialFile {
            method: self.kind(),
            what,
            path: path.display().to_string(),
            reason,
        };
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        let text = std::str::from_utf8(&raw).map_err(|_| err("not UTF-8 text".into()))?.trim();
        if text.is_empty() {
            return Err(err("the file is empty".into()));
        }
        Ok(Secret::new(text.to_string()))
    }
}

/// A token and its lease, as a login or renewal answered.
struct Lease {
    token: Secret,
    /// Zero: no expiry (a root token, or a token without TTL).
    lease: Duration,
    renewable: bool,
}

fn auth_lease(v: &Value, path: &str) -> Result<Lease, VaultError> {
    let auth = v.get("auth").ok_or_else(|| VaultError::BadResponse { path: path.into(), reason: "no auth".into() })?;
    let token = auth
        .get("client_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| VaultError::BadResponse { path: path.into(), reason: "no auth.client_token".into() })?;
    Ok(Lease {
        token: Secret::new(token.to_string()),
        lease: Duration::from_secs(auth.get("lease_duration").and_then(Value::as_u64).unwrap_or(0)),
        renewable: auth.get("renewable").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// Replaces every credential that was sent with `[redacted]`: Vault's messages are not supposed
/// to echo them, and this makes sure.
fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut out = message.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "[redacted]");
    }
    out
}

fn login_error(method: &AuthMethod, e: VaultError, secrets: &[&str]) -> VaultError {
    match e {
        VaultError::Api { status, message, .. } => VaultError::Login {
            method: method.kind(),
            mount: method.mount().to_string(),
            status,
            message: scrub(&message, secrets),
        },
        other => other,
    }
}

/// Logs in once.
async fn login(client: &VaultClient, method: &AuthMethod) -> Result<Lease, VaultError> {
    match method {
        AuthMethod::Token { token_file } => {
            let token = method.read_credential("token", token_file)?;
            // A token needs no login: look it up, to learn its lease and fail early if it is bad.
            let v = client
                .call(http::Method::GET, "auth/token/lookup-self", Some(&token), None)
                .await
                .map_err(|e| login_error(method, e, &[token.expose()]))?;
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            Ok(Lease {
                lease: Duration::from_secs(data.get("ttl").and_then(Value::as_u64).unwrap_or(0)),
                renewable: data.get("renewable").and_then(Value::as_bool).unwrap_or(false),
                token,
            })
        }
        AuthMethod::AppRole { mount, role_id, secret_id_file } => {
            let secret_id = method.read_credential("secret ID", secret_id_file)?;
            let path = format!("auth/{mount}/login");
            let body = json!({ "role_id": role_id, "secret_id": secret_id.expose() });
            let v = client
                .call(http::Method::POST, &path, None, Some(&body))
                .await
                .map_err(|e| login_error(method, e, &[secret_id.expose(), role_id]))?;
            auth_lease(&v, &path)
        }
        AuthMethod::Kubernetes { mount, role, jwt_file } => {
            let jwt = method.read_credential("service-account JWT", jwt_file)?;
            let path = format!("auth/{mount}/login");
            let body = json!({ "role": role, "jwt": jwt.expose() });
            let v = client
                .call(http::Method::POST, &path, None, Some(&body))
                .await
                .map_err(|e| login_error(method, e, &[jwt.expose()]))?;
            auth_lease(&v, &path)
        }
    }
}

/// `auth/token/renew-self`, asking for the lease granted at login again.
async fn renew(client: &VaultClient, token: &Secret, increment: Duration) -> Result<Lease, VaultError> {
    let path = "auth/token/renew-self";
    let body = json!({ "increment": format!("{}s", increment.as_secs()) });
    let v = client.call(http::Method::POST, path, Some(token), Some(&body)).await?;
    let mut lease = auth_lease(&v, path)?;
    // The token does not change on renewal; keep ours (and its wiping) rather than Vault's echo.
    lease.token = token.clone();
    Ok(lease)
}

/// When to renew a lease: at half of it (`None` for a token that does not expire or cannot be
/// renewed; such a token is used until Vault refuses it).
fn renew_after(lease: &Lease) -> Option<Duration> {
    (lease.renewable && !lease.lease.is_zero()).then(|| lease.lease / 2)
}

/// Whether a renewal answer means "log in afresh": Vault capped it well below what the login
/// granted (`token_max_ttl` reached), so renewing again would only shorten it further.
fn renewal_capped(renewed: &Lease, granted: Duration) -> bool {
    renewed.lease < granted / 3
}

struct Held {
    token: Secret,
    generation: u64,
    /// The lease granted at login (what renewals ask for again).
    granted: Duration,
    renew_at: Option<SystemTime>,
}

enum Cmd {
    Get(oneshot::Sender<Result<(u64, Secret), VaultError>>),
    Refused(u64),
}

/// The token keeper for one Vault and one auth method; see the [module documentation](self).
/// Dropping it stops its task.
pub struct Session {
    tx: mpsc::Sender<Cmd>,
}

impl Session {
    /// Starts the session's task. Nothing is sent to Vault until the first [`Session::token`].
    pub fn start(client: Arc<VaultClient>, method: AuthMethod, clock: SharedClock) -> Session {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run(client, method, rx, clock));
        Session { tx }
    }

    /// The current token and its generation, logging in first if there is none.
    pub async fn token(&self) -> Result<(u64, Secret), VaultError> {
        let (reply, answer) = oneshot::channel();
        let gone = || VaultError::Config { field: "vault".into(), message: "the Vault session has stopped".into() };
        self.tx.send(Cmd::Get(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Reports that Vault refused the token of `generation`; it is dropped and the next
    /// [`Session::token`] logs in afresh.
    pub async fn refused(&self, generation: u64) {
        let _ = self.tx.send(Cmd::Refused(generation)).await;
    }
}

async fn run(client: Arc<VaultClient>, method: AuthMethod, mut rx: mpsc::Receiver<Cmd>, clock: SharedClock) {
    let (kind, mount) = (method.kind(), method.mount().to_string());
    let mut held: Option<Held> = None;
    let mut generation = 0u64;
    // One place that turns a login result into the held token.
    let mut take = |lease: Lease, why: &str| {
        generation += 1;
        let at = renew_after(&lease).map(|d| clock.now() + d);
        tracing::info!(method = %kind, mount = %mount, lease_seconds = lease.lease.as_secs(), renewable = lease.renewable, "logged in to Vault ({why})");
        Held { token: lease.token, generation, granted: lease.lease, renew_at: at }
    };
    loop {
        let renew_at = held.as_ref().and_then(|h| h.renew_at);
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Get(reply)) => {
                    if held.is_none() {
                        match login(&client, &method).await {
                            Ok(lease) => held = Some(take(lease, "no token held")),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                        }
                    }
                    if let Some(h) = &held {
                        let _ = reply.send(Ok((h.generation, h.token.clone())));
                    }
                }
                Some(Cmd::Refused(g)) => {
                    if held.as_ref().is_some_and(|h| h.generation == g) {
                        tracing::warn!(method = %kind, mount = %mount, "Vault refused the token (revoked or expired); logging in afresh");
                        held = None;
                    }
                }
            },
            _ = clock.sleep_until(renew_at.unwrap_or(std::time::UNIX_EPOCH)), if renew_at.is_some() => {
                let Some(h) = held.take() else { continue };
                match renew(&client, &h.token, h.granted).await {
                    Ok(lease) if !renewal_capped(&lease, h.granted) => {
                        tracing::info!(method = %kind, mount = %mount, lease_seconds = lease.lease.as_secs(), "Vault token renewed");
                        let at = renew_after(&lease).map(|d| clock.now() + d);
                        held = Some(Held { renew_at: at, ..h });
                    }
                    result => {
                        match &result {
                            Ok(lease) => tracing::info!(method = %kind, mount = %mount, lease_seconds = lease.lease.as_secs(), "the Vault token reached its maximum lifetime; logging in afresh"),
                            Err(e) => tracing::warn!(method = %kind, mount = %mount, error = %e, "renewing the Vault token failed; logging in afresh"),
                        }
                        match login(&client, &method).await {
                            Ok(lease) => held = Some(take(lease, "renewal ended")),
                            // Keep what we had while it lasts (the next request retries the login).
                            Err(e) => {
                                tracing::warn!(error = %e, "Vault login failed; the next request retries");
                                if result.is_ok() {
                                    held = Some(Held { renew_at: None, ..h });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        let s = Secret::new("hvs.supersecret".into());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        let m = AuthMethod::app_role(None, "role-id-1234", Path::new("/f"));
        assert!(!format!("{m:?}").contains("role-id-1234"));
        assert_eq!(scrub("bad secret_id abcd1234 for x", &["abcd1234", "ab"]), "bad secret_id [redacted] for x");
    }

    #[test]
    fn methods_from_the_policy() {
        let m =
            AuthMethod::from_spec(&VaultAuth::Kubernetes { role: "meshca".into(), mount_path: None, token_path: None })
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.kind(), m.mount()), (AuthKind::Kubernetes, "kubernetes"));
        assert!(matches!(&m, AuthMethod::Kubernetes { jwt_file, .. } if jwt_file == Path::new(DEFAULT_K8S_TOKEN_PATH)));

        let ar = VaultAuth::AppRole {
            mount_path: Some("/auth/ar/".into()),
            role_id: "r".into(),
            secret_id_ref: None,
            secret_id_file: Some("/s".into()),
        };
        assert_eq!(AuthMethod::from_spec(&ar).map(|m| m.mount().to_string()).ok().as_deref(), Some("ar"));

        let token = VaultAuth::Token { secret_ref: Some(Default::default()), token_file: None };
        let e = AuthMethod::from_spec(&token).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("spec.config.vault.auth.token") && e.contains("tokenFile"), "{e}");
    }

    #[test]
    fn renewal_timing() {
        let l = |secs, renewable| Lease { token: Secret::new("t".into()), lease: Duration::from_secs(secs), renewable };
        assert_eq!(renew_after(&l(3600, true)), Some(Duration::from_secs(1800)));
        assert_eq!(renew_after(&l(0, true)), None);
        assert_eq!(renew_after(&l(3600, false)), None);
        assert!(!renewal_capped(&l(3600, true), Duration::from_secs(3600)));
        assert!(renewal_capped(&l(600, true), Duration::from_secs(3600)));
    }
}
