//! Operator credentials: relay-CA client certificates for the operator API.
//!
//! - The server's own operator credentials (`<data-dir>/operator`, for the CLI on the same
//!   machine) are issued once and **reused** at later starts while they are valid — issued by
//!   the current relay CA, matching their key, not revoked, with more than [`RENEW_BEFORE`] left.
//!   Start-up writes nothing else there (the `server` address file only when the address
//!   changed), so a server whose disk is full still starts.
//! - Further operators get their own credentials (`meshca operator issue NAME`), so one can be
//!   revoked without locking the others out.
//! - `meshca operator revoke` puts a serial on the deny list ([`OperatorLog::revoked`]) that
//!   every operator call is checked against ([`crate::grpc`]). When the revoked certificate is the
//!   server's own, it writes fresh credentials in their place at once.
//!
//! Every certificate issued is recorded ([`OperatorLog::issued`]) so a revocation can name it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshca_clock::unix;
use meshca_pki::{Cert, CsrPolicy, KeyAlgorithm, PrivateKey, Usage, build_csr, verify_chain, verify_csr};
use meshca_proto::identity::Caller;
use meshca_store::{Store, fsutil, typed};

use crate::error::MgmtError;
use crate::records::{self, OperatorCert, OperatorLog, RevokedOperator};
use crate::relay::RelayCa;
use crate::server::creds;

/// Lifetime of operator certificates.
pub const OPERATOR_TTL: Duration = Duration::from_secs(365 * 86400);

/// The server's own operator credentials are replaced when less than this is left of them.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);

/// The operator name of the server's own credentials.
pub const LOCAL_OPERATOR: &str = "admin";

/// Where the server keeps its own operator's credentials, and the address written beside them.
#[derive(Debug, Clone)]
pub struct LocalCredentials {
    /// The credentials folder.
    pub dir: PathBuf,
    /// The server's `host:port`, written to the `server` file for the CLI.
    pub addr: SocketAddr,
}

/// Why the credentials in a folder cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// None there yet.
    Missing,
    /// Unreadable, unparsable, or the key does not match the certificate.
    Broken(String),
    /// Not issued by the current relay CA (or expired).
    NotOurs(String),
    /// Revoked with `meshca operator revoke`.
    Revoked,
    /// Less than [`RENEW_BEFORE`] left.
    Expiring,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Missing => f.write_str("there are none yet"),
            Unusable::Broken(why) => write!(f, "they are unreadable ({why})"),
            Unusable::NotOurs(why) => write!(f, "the relay CA does not vouch for them ({why})"),
            Unusable::Revoked => f.write_str("they were revoked"),
            Unusable::Expiring => write!(f, "less than {} days of them are left", RENEW_BEFORE.as_secs() / 86400),
        }
    }
}

/// Checks the credentials in `dir`: the certificate to keep using, or why they must be replaced.
pub fn inspect(dir: &Path, relay: &RelayCa, log: &OperatorLog, now: SystemTime) -> Result<Cert, Unusable> {
    let read = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Unusable::Missing),
        Err(e) => Err(Unusable::Broken(format!("{name}: {e}"))),
    };
    let cert = Cert::from_pem(&read(creds::CERT)?).map_err(|e| Unusable::Broken(format!("{}: {e}", creds::CERT)))?;
    let key = PrivateKey::from_pem(&read(creds::KEY)?).map_err(|e| Unusable::Broken(format!("{}: {e}", creds::KEY)))?;
    if !cert.has_public_key(key.public_key_spki()) {
        return Err(Unusable::Broken("the key does not match the certificate".into()));
    }
    if read(creds::RELAY_CA)? != relay.roots().to_pem().into_bytes() {
        return Err(Unusable::NotOurs(format!("{} is not the current relay CA", creds::RELAY_CA)));
    }
    verify_chain(&cert, &[], relay.roots(), now, Usage::ClientAuth).map_err(|e| Unusable::NotOurs(e.to_string()))?;
    if !cert.uri_sans().iter().any(|u| matches!(Caller::from_uri(u), Some(Caller::Operator { .. }))) {
        return Err(Unusable::NotOurs("not an operator identity".into()));
    }
    if log.is_revoked(&cert.serial_hex()) {
        return Err(Unusable::Revoked);
    }
    if cert.not_after() <= now + RENEW_BEFORE {
        return Err(Unusable::Expiring);
    }
    Ok(cert)
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> MgmtError {
    move |source| MgmtError::Io { context, source }
}

/// Signs an operator certificate for `name` and `spki_der`, recorded in the operator log before
/// it is handed out.
pub async fn issue(
    store: &dyn Store,
    relay: &RelayCa,
    name: &str,
    spki_der: &[u8],
    ttl: Duration,
    now: SystemTime,
) -> Result<Cert, MgmtError> {
    let cert = relay.issue_identity(spki_der, &Caller::Operator { name: name.to_string() }, ttl, now)?;
    let entry = OperatorCert {
        name: name.to_string(),
        serial: cert.serial_hex(),
        issued_at: unix(now),
        not_after: unix(cert.not_after()),
    };
    typed::update::<OperatorLog, _>(store, &records::operators(), |cur| {
        let mut log = cur.cloned().unwrap_or_default();
        log.issued.insert(0, entry.clone());
        log.prune(unix(now));
        Some(log)
    })
    .await?;
    Ok(cert)
}

/// Makes sure the server's own operator credentials in `local.dir` are usable, writing only what
/// is missing or stale. Returns the serial in use.
pub async fn ensure_local(
    store: &dyn Store,
    relay: &RelayCa,
    local: &LocalCredentials,
    now: SystemTime,
) -> Result<String, MgmtError> {
    let log = typed::get::<OperatorLog>(store, &records::operators()).await?.map(|v| v.value).unwrap_or_default();
    let dir = &local.dir;
    match fsutil::remove_temp_files(dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed the temporary files of an interrupted credentials write"),
        Err(e) => tracing::warn!(error = %e, "could not tidy the operator credentials folder"),
    }
    let serial = match inspect(dir, relay, &log, now) {
        Ok(cert) => {
            tracing::info!(serial = %cert.serial_hex(), not_after = %meshca_pki::chain::rfc3339(cert.not_after()), "reusing the operator credentials");
            cert.serial_hex()
        }
        Err(why) => {
            tracing::info!(reason = %why, "writing new operator credentials");
            write_new(store, relay, dir, now).await?
        }
    };
    let addr = local.addr.to_string();
    if std::fs::read_to_string(dir.join(creds::SERVER)).ok().as_deref() != Some(addr.as_str()) {
        let path = dir.join(creds::SERVER);
        fsutil::write_atomic(&path, addr.as_bytes(), 0o644).map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(serial)
}

/// Issues the local operator fresh credentials and writes them to `dir`, the key first (0600).
async fn write_new(store: &dyn Store, relay: &RelayCa, dir: &Path, now: SystemTime) -> Result<String, MgmtError> {
    fsutil::create_private_dir(dir).map_err(io(format!("creating {}", dir.display())))?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| MgmtError::pki("operator key", e))?;
    let csr = build_csr(&key, &[]).map_err(|e| MgmtError::pki("operator CSR", e))?;
    let csr = verify_csr(csr.as_bytes(), &CsrPolicy::default()).map_err(|e| MgmtError::pki("operator CSR", e))?;
    let cert = issue(store, relay, LOCAL_OPERATOR, csr.public_key_spki(), OPERATOR_TTL, now).await?;
    let w = |name: &str, data: &[u8], mode| {
        let path = dir.join(name);
        fsutil::write_atomic(&path, data, mode).map_err(io(format!("writing {}", path.display())))
    };
    w(creds::KEY, key.to_pkcs8_pem().as_bytes(), 0o600)?;
    w(creds::CERT, cert.to_pem().as_bytes(), 0o644)?;
    w(creds::RELAY_CA, relay.roots().to_pem().as_bytes(), 0o644)?;
    Ok(cert.serial_hex())
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The operator the certificate was issued to, when it is in the log.
    pub name: String,
    /// Whether it was revoked before.
    pub already: bool,
}

/// Puts `serial` on the deny list (by operator `by`, at `now`).
pub async fn revoke(store: &dyn Store, serial: &str, by: &str, now: SystemTime) -> Result<Revoked, MgmtError> {
    let serial = serial.to_ascii_uppercase();
    let mut outcome = Revoked { name: String::new(), already: false };
    typed::update::<OperatorLog, _>(store, &records::operators(), |cur| {
        let mut log = cur.cloned().unwrap_or_default();
        let known = log.issued.iter().find(|c| c.serial == serial).cloned();
        outcome.name = known.as_ref().map(|c| c.name.clone()).unwrap_or_default();
        outcome.already = log.is_revoked(&serial);
        if outcome.already {
            return None;
        }
        log.revoked.insert(
            0,
            RevokedOperator {
                serial: serial.clone(),
                name: outcome.name.clone(),
                revoked_at: unix(now),
                not_after: known.map(|c| c.not_after).unwrap_or(0),
                by: by.to_string(),
            },
        );
        log.prune(unix(now));
        Some(log)
    })
    .await?;
    Ok(outcome)
}

/// After a revocation: replaces the server's own credentials if they are the ones revoked.
/// Returns whether it did.
pub async fn replace_local_if_revoked(
    store: &dyn Store,
    relay: &RelayCa,
    local: &LocalCredentials,
    serial: &str,
    now: SystemTime,
) -> Result<bool, MgmtError> {
    let current = std::fs::read(local.dir.join(creds::CERT)).ok().and_then(|pem| Cert::from_pem(&pem).ok());
    if !current.is_some_and(|c| c.serial_hex().eq_ignore_ascii_case(serial)) {
        return Ok(false);
    }
    let new = write_new(store, relay, &local.dir, now).await?;
    tracing::info!(revoked = %serial, serial = %new, "the server's own operator credentials were revoked; wrote new ones");
    Ok(true)
}
