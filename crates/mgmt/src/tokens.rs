//! Single-use, expiring bootstrap tokens for cluster registration.
//!
//! A token is `<id>.<secret>`: 6 + 24 characters of `[a-z0-9]` (the secret carries ~124 bits).
//! Only a SHA-256 of the secret is stored. Consuming a token is a compare-and-swap on its record,
//! so two agents racing with one token cannot both register.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use meshca_clock::unix;
use meshca_store::typed;
use meshca_store::{Precondition, Store, StoreError};

use crate::error::MgmtError;
use crate::records::{self, TokenRecord};

const ID_LEN: usize = 6;
const SECRET_LEN: usize = 24;
/// Ids drawn again when one is taken, before giving up.
const ID_ATTEMPTS: usize = 8;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why a token was refused. Deliberately coarse where detail would help an attacker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the `<id>.<secret>` form.
    #[error("malformed bootstrap token (expected <6 chars>.<24 chars> of [a-z0-9])")]
    Malformed,
    /// No such token, or the secret does not match.
    #[error("unknown bootstrap token {0}")]
    Unknown(String),
    /// Already used by a registration.
    #[error("bootstrap token {0} was already used; create a new one with `meshca cluster add`")]
    AlreadyUsed(String),
    /// Registers another cluster than the caller says it is; the token is not consumed.
    #[error("bootstrap token {id} registers cluster {token_cluster}, not {asked}")]
    OtherCluster {
        /// Token id.
        id: String,
        /// The cluster the token is for.
        token_cluster: String,
        /// The cluster the agent serves.
        asked: String,
    },
    /// Past its expiry.
    #[error("bootstrap token {id} expired at {}; create a new one with `meshca cluster add`", meshca_pki::chain::rfc3339(meshca_clock::from_unix(*expired_at)))]
    Expired {
        /// Token id.
        id: String,
        /// When it expired.
        expired_at: i64,
    },
}

/// A freshly created token.
#[derive(Debug)]
pub struct NewToken {
    /// The whole token, shown once to the operator.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

fn random_string(n: usize) -> Result<String, MgmtError> {
    let mut bytes = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| MgmtError::Pki("random source failed".into()))?;
    // 256 % 36 != 0, so reject the top values to keep every character equally likely.
    let mut out = String::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        if i == bytes.len() {
            aws_lc_rs::rand::fill(&mut bytes).map_err(|_| MgmtError::Pki("random source failed".into()))?;
            i = 0;
        }
        let b = bytes[i];
        i += 1;
        if usize::from(b) < 252 {
            out.push(char::from(ALPHABET[usize::from(b) % 36]));
        }
    }
    Ok(out)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes()))
}

/// How long a used or expired token's record is kept, so that a late retry is told "already
/// used" or "expired" rather than "unknown". After that it is deleted (by [`create`], within
/// [`SWEEP_INTERVAL`]), so the store does not grow with every cluster ever added.
pub const RECORD_RETENTION: Duration = Duration::from_secs(7 * 86400);

/// Deletes token records that expired, or were used, more than [`RECORD_RETENTION`] ago.
/// Returns how many it deleted. A record changed meanwhile is left for the next sweep.
pub async fn prune(store: &dyn Store, now: SystemTime) -> Result<usize, MgmtError> {
    let horizon = unix(now) - RECORD_RETENTION.as_secs() as i64;
    let mut deleted = 0;
    for name in store.list(records::NAMESPACE).await? {
        let Some(id) = name.strip_prefix("bootstrap-token-") else { continue };
        let key = records::token(id)?;
        let Some(current) = typed::get::<TokenRecord>(store, &key).await? else { continue };
        let done_at = current.value.used_at.unwrap_or(current.value.expires_at).min(current.value.expires_at);
        if done_at < horizon {
            match store.delete(&key, Precondition::Version(current.version)).await {
                Ok(()) => deleted += 1,
                Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(deleted)
}

/// How often [`create`] sweeps old token records. A sweep reads every token record, so sweeping on
/// every create would make adding N clusters cost N² reads; records are deleted within
/// [`RECORD_RETENTION`] plus this.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// When the last sweep ran (unix seconds), kept in the store so every replica sees it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SweepRecord {
    swept_at: i64,
}

/// Sweeps old token records if the last sweep was [`SWEEP_INTERVAL`] ago or more.
async fn sweep_if_due(store: &dyn Store, now: SystemTime) -> Result<(), MgmtError> {
    let key = records::token_sweep();
    let last = typed::get::<SweepRecord>(store, &key).await.ok().flatten().map(|v| v.value.swept_at);
    if last.is_some_and(|t| unix(now) < t + SWEEP_INTERVAL.as_secs() as i64) {
        return Ok(());
    }
    prune(store, now).await?;
    typed::put(store, &key, &SweepRecord { swept_at: unix(now) }, Precondition::Any).await?;
    Ok(())
}

/// Creates a token registering `cluster`, valid for `ttl` (and, every [`SWEEP_INTERVAL`], sweeps
/// old records).
/// Creates a bootstrap token for `cluster`, labelled `labels` once it registers, valid for `ttl`
/// from `now`, on behalf of `by` (the operator, for the audit log, which records the token's id
/// and never its secret).
pub async fn create(
    store: &dyn Store,
    cluster: &str,
    labels: &BTreeMap<String, String>,
    ttl: Duration,
    by: &str,
    now: SystemTime,
) -> Result<NewToken, MgmtError> {
    if let Err(e) = sweep_if_due(store, now).await {
        tracing::warn!(error = %e, "sweeping old bootstrap-token records failed; will retry on the next token");
    }
    let secret = random_string(SECRET_LEN)?;
    let expires_at = unix(now + ttl);
    let record = TokenRecord {
        cluster: cluster.to_string(),
        secret_sha256: sha256_hex(&secret),
        expires_at,
        used_at: None,
        labels: labels.clone(),
    };
    // Ids are short (six characters of 36), so among thousands of live tokens two can meet: a
    // taken id is drawn again rather than failing the request (10,000 tokens: ~2 % of the time).
    let mut attempts = 0;
    let id = loop {
        let id = random_string(ID_LEN)?;
        match typed::put(store, &records::token(&id)?, &record, Precondition::Absent).await {
            Ok(()) => break id,
            Err(StoreError::AlreadyExists(_)) if attempts < ID_ATTEMPTS => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    };
    let mut event = crate::audit::Event::new(crate::audit::Action::BootstrapTokenCreated, by, cluster)
        .with("tokenId", &id)
        .with("expiresAt", expires_at.to_string());
    if !labels.is_empty() {
        event = event.with("labels", labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","));
    }
    // Fail closed: a token whose creation is not in the audit log is never shown (its record
    // without its secret is useless, and swept once it expires).
    crate::audit::append(store, &event, now).await?;
    Ok(NewToken { token: format!("{id}.{secret}"), expires_at })
}

fn parse(token: &str) -> Result<(&str, &str), TokenError> {
    let (id, secret) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
    if ok(id, ID_LEN) && ok(secret, SECRET_LEN) { Ok((id, secret)) } else { Err(TokenError::Malformed) }
}

/// Consumes a token: checks it (and, when `expected_cluster` is given, that it is for that
/// cluster — a mismatch leaves the token unused) and marks it used, atomically. Returns the
/// cluster it registers and the labels it gives it.
pub async fn consume(
    store: &dyn Store,
    token: &str,
    expected_cluster: Option<&str>,
    now: SystemTime,
) -> Result<Result<(String, BTreeMap<String, String>), TokenError>, MgmtError> {
    let (id, secret) = match parse(token) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let key = records::token(id)?;
    let Some(current) = typed::get::<TokenRecord>(store, &key).await? else {
        return Ok(Err(TokenError::Unknown(id.to_string())));
    };
    let rec = &current.value;
    if aws_lc_rs::constant_time::verify_slices_are_equal(rec.secret_sha256.as_bytes(), sha256_hex(secret).as_bytes())
        .is_err()
    {
        return Ok(Err(TokenError::Unknown(id.to_string())));
    }
    if rec.used_at.is_some() {
        return Ok(Err(TokenError::AlreadyUsed(id.to_string())));
    }
    if rec.expires_at <= unix(now) {
        return Ok(Err(TokenError::Expired { id: id.to_string(), expired_at: rec.expires_at }));
    }
    if let Some(asked) = expected_cluster
        && !asked.is_empty()
        && asked != rec.cluster
    {
        return Ok(Err(TokenError::OtherCluster {
            id: id.to_string(),
            token_cluster: rec.cluster.clone(),
            asked: asked.to_string(),
        }));
    }
    let used = TokenRecord { used_at: Some(unix(now)), ..rec.clone() };
    match typed::put(store, &key, &used, Precondition::Version(current.version)).await {
        Ok(()) => Ok(Ok((rec.cluster.clone(), rec.labels.clone()))),
        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => Ok(Err(TokenError::AlreadyUsed(id.to_string()))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_clock::Clock as _;
    use meshca_store::dir::DirStore;

    #[tokio::test]
    async fn tokens_are_single_use_expire_and_do_not_leak_whether_a_secret_was_close() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DirStore::open(dir.path()).expect("store");
        let now = meshca_clock::ManualClock::at_2026().now();
        let t = create(&store, "cluster-1", &BTreeMap::new(), Duration::from_secs(60), "operator test", now)
            .await
            .expect("create");
        assert_eq!(t.token.len(), 31);
        let (id, _) = parse(&t.token).expect("well formed");

        let wrong = format!("{id}.{}", "a".repeat(24));
        assert_eq!(consume(&store, &wrong, None, now).await.expect("ok"), Err(TokenError::Unknown(id.into())));
        assert_eq!(consume(&store, "nope", None, now).await.expect("ok"), Err(TokenError::Malformed));
        assert!(matches!(
            consume(&store, &t.token, Some("cluster-9"), now).await.expect("ok"),
            Err(TokenError::OtherCluster { .. })
        ));
        assert_eq!(
            consume(&store, &t.token, Some("cluster-1"), now).await.expect("ok"),
            Ok(("cluster-1".into(), BTreeMap::new()))
        );
        assert_eq!(consume(&store, &t.token, None, now).await.expect("ok"), Err(TokenError::AlreadyUsed(id.into())));

        let t2 = create(&store, "cluster-2", &BTreeMap::new(), Duration::from_secs(60), "operator test", now)
            .await
            .expect("create");
        let later = now + Duration::from_secs(61);
        assert!(matches!(consume(&store, &t2.token, None, later).await.expect("ok"), Err(TokenError::Expired { .. })));

        // Nothing in the store holds the secret itself.
        let (_, secret) = parse(&t2.token).expect("well formed");
        for entry in walk(dir.path()) {
            let text = std::fs::read(&entry).unwrap_or_default();
            assert!(!String::from_utf8_lossy(&text).contains(secret), "{}", entry.display());
        }
    }

    #[tokio::test]
    async fn old_used_and_expired_records_are_swept_and_current_ones_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DirStore::open(dir.path()).expect("store");
        let t0 = meshca_clock::ManualClock::at_2026().now();
        let used = create(&store, "cluster-1", &BTreeMap::new(), Duration::from_secs(3600), "operator test", t0)
            .await
            .expect("create");
        consume(&store, &used.token, None, t0).await.expect("ok").expect("registers");
        let expired = create(&store, "cluster-2", &BTreeMap::new(), Duration::from_secs(60), "operator test", t0)
            .await
            .expect("create");
        let fresh = create(&store, "cluster-3", &BTreeMap::new(), Duration::from_secs(3600), "operator test", t0)
            .await
            .expect("create");
        let long = create(&store, "cluster-4", &BTreeMap::new(), Duration::from_secs(30 * 86400), "operator test", t0)
            .await
            .expect("create");

        // Within the retention, a late retry still gets the precise answer.
        let soon = t0 + Duration::from_secs(86400);
        assert_eq!(prune(&store, soon).await.expect("prune"), 0);
        assert!(matches!(consume(&store, &used.token, None, soon).await.expect("ok"), Err(TokenError::AlreadyUsed(_))));

        // Past it, the used and the expired records go; an unused, unexpired one stays usable.
        let later = t0 + RECORD_RETENTION + Duration::from_secs(2 * 3600);
        create(&store, "cluster-5", &BTreeMap::new(), Duration::from_secs(60), "operator test", later)
            .await
            .expect("create sweeps");
        for gone in [&used.token, &expired.token, &fresh.token] {
            assert!(matches!(consume(&store, gone, None, later).await.expect("ok"), Err(TokenError::Unknown(_))));
        }
        assert_eq!(
            consume(&store, &long.token, None, later).await.expect("ok"),
            Ok(("cluster-4".into(), BTreeMap::new()))
        );
    }

    fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() && !path.is_symlink() {
                out.extend(walk(&path));
            } else if path.is_file() {
                out.push(path);
            }
        }
        out
    }
}
