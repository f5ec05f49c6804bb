//! Compromise response: `meshca revoke` ([`revoke`]) and the CRL the management plane publishes
//! ([`publish`], kept fresh by [`Publisher`]).
//!
//! A revocation is recorded in the cluster's record together with a rotation request, in one
//! compare-and-swap: the cluster's agent re-issues with a new key at once (the `meshca rotate`
//! machinery), and a management plane stopped right after the write still has both. The CRL is
//! derived from the records, never the other way round: the publisher signs a new one whenever
//! what the records list differs from what the last CRL lists, when the signer changed, and at
//! half of the CRL's lifetime, so it is always re-signed before its nextUpdate. Only the leader
//! signs; the CRL is stored, so every replica serves the same one.
//!
//! What is published (`TrustState.crl`) is every CRL istiod needs for the certificates above a
//! cluster intermediate: the one the management plane's signer signs (the root; your own
//! intermediate in that mode) and, in bring-your-own-intermediate mode, the CRLs of the CAs above
//! it, which only their owner can sign: they are read from `ca-crl.pem` in the referenced secret.
//! When one is missing the record says so (`note`) and agents write no `ca-crl.pem` rather than
//! one istiod would refuse.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::{SharedClock, from_unix, unix};
use meshca_pki::CaSigner;
use meshca_pki::crl::{self, Crl, CrlParams, Reason, Revoked};
use meshca_store::{ObjectKey, Store, StoreError, typed};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authority::{self, Authority};
use crate::records::{self, ClusterRecord, CrlRecord, Keyspace, RevokedIntermediate, StatusRecord};
use crate::replica::{self, Leader};

/// Default lifetime of a published CRL (nextUpdate − thisUpdate). Re-signed at half of it.
pub const DEFAULT_CRL_TTL: Duration = Duration::from_secs(24 * 3600);

/// The shortest CRL lifetime accepted: it is re-signed at half of it, and relying parties
/// (OpenSSL, Envoy) compare its times at one-second precision.
pub const MIN_CRL_TTL: Duration = Duration::from_secs(10);

/// Refuses a CRL lifetime shorter than [`MIN_CRL_TTL`].
pub fn check_crl_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < MIN_CRL_TTL {
        return Err(format!(
            "a CRL lifetime must be at least {}s (it is re-signed at half of it)",
            MIN_CRL_TTL.as_secs()
        ));
    }
    Ok(())
}

/// Why a revocation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The cluster is not registered.
    #[error("cluster {0} is not registered (`meshca status` lists the registered ones)")]
    NotRegistered(String),
    /// The serial was never issued to this cluster by this management plane.
    #[error(
        "serial {serial} was never issued to cluster {cluster} by this management plane (`meshca status -o json` lists each cluster's issued serials)"
    )]
    UnknownSerial {
        /// The cluster.
        cluster: String,
        /// The serial asked for.
        serial: String,
    },
    /// No serial was given and the cluster has no intermediate from this management plane.
    #[error(
        "cluster {0} has no intermediate issued by this management plane (in Vault mode, revoke in Vault: the CRL comes from its PKI)"
    )]
    NothingIssued(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The revocation (the earlier one when it was already revoked).
    pub revoked: RevokedIntermediate,
    /// It was revoked before; nothing changed.
    pub already: bool,
}

/// Revokes `cluster`'s intermediate `serial` (its current one when `None`) for `reason` at `now`,
/// and asks the cluster to re-issue; the audit log gets one entry. Idempotent: a serial revoked
/// before is answered with the first revocation and changes nothing (and adds no entry).
pub async fn revoke(
    store: &dyn Store,
    cluster: &str,
    serial: Option<&str>,
    reason: Reason,
    by: &str,
    now: SystemTime,
) -> Result<Outcome, RevokeError> {
    let not_registered = || RevokeError::NotRegistered(cluster.to_string());
    let key = records::cluster(cluster).map_err(|_| not_registered())?;
    if typed::get::<ClusterRecord>(store, &key).await?.is_none() {
        return Err(not_registered());
    }
    let issued = records::read_issued(store, cluster).await?.map(|v| v.value).unwrap_or_default();
    let target = match serial {
        Some(s) => {
            let wanted = s.trim().trim_start_matches("0x").to_ascii_uppercase().replace(':', "");
            issued.records().iter().find(|r| r.serial.eq_ignore_ascii_case(&wanted)).ok_or_else(|| {
                RevokeError::UnknownSerial { cluster: cluster.to_string(), serial: meshca_proto::text::bounded(s, 80) }
            })?
        }
        None => {
            // The one in service as the agent last reported it; before any report, the newest.
            let reported = typed::get::<StatusRecord>(store, &records::status(cluster)?)
                .await?
                .map(|v| v.value.intermediate_serial)
                .unwrap_or_default();
            issued
                .records()
                .iter()
                .find(|r| !reported.is_empty() && r.serial.eq_ignore_ascii_case(&reported))
                .or(issued.records().first())
                .ok_or_else(|| RevokeError::NothingIssued(cluster.to_string()))?
        }
    };
    let entry = RevokedIntermediate {
        serial: target.serial.clone(),
        reason: reason.as_str().to_string(),
        revoked_at: unix(now),
        by: by.to_string(),
        not_after: target.not_after,
        public_key_sha256: target.public_key_sha256.clone(),
        issuer_fingerprint: target.issuer_fingerprint.clone(),
    };
    let mut earlier = None;
    typed::update::<ClusterRecord, _>(store, &key, |cur| {
        let rec = cur?;
        earlier = rec.revocation(&entry.serial).cloned();
        if earlier.is_some() {
            return None;
        }
        let mut next = rec.clone();
        next.revoked.push(entry.clone());
        next.rotate_requests += 1;
        Some(next)
    })
    .await?;
    Ok(match earlier {
        Some(revoked) => Outcome { revoked, already: true },
        None => {
            let event = crate::audit::Event::new(crate::audit::Action::IntermediateRevoked, by, cluster)
                .with("serial", &entry.serial)
                .with("reason", &entry.reason)
                .with("keySha256", &entry.public_key_sha256);
            crate::audit::record(store, event, now).await;
            Outcome { revoked: entry, already: false }
        }
    })
}

/// Every revocation of every registered cluster, and of every removed one (`meshca cluster
/// remove` archives the record; a revoked key stays revoked), still within its certificate's
/// lifetime at `now` (an expired certificate need not be listed: RFC 5280 §3.3).
pub async fn all_revoked(store: &dyn Store, now: i64) -> Result<Vec<RevokedIntermediate>, StoreError> {
    let mut out = Vec::new();
    for cluster in records::cluster_names(store).await? {
        let Ok(key) = records::cluster(&cluster) else { continue };
        if let Some(v) = typed::get::<ClusterRecord>(store, &key).await? {
            out.extend(v.value.revoked.into_iter().filter(|r| r.not_after > now));
        }
    }
    for name in store.list(records::NAMESPACE).await? {
        if !name.starts_with(records::ARCHIVE_PREFIX) {
            continue;
        }
        let key = ObjectKey::new(records::NAMESPACE, &name)?;
        let Some(archive) = store.get(&key).await? else { continue };
        let Some(bytes) = archive.value.get(records::ARCHIVED_CLUSTER_KEY) else { continue };
        let rec: ClusterRecord = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: format!("cluster.json: {e}") })?;
        out.extend(rec.revoked.into_iter().filter(|r| r.not_after > now));
    }
    out.sort_by(|a, b| a.serial.cmp(&b.serial));
    Ok(out)
}

/// A digest of what is published: what the signer's CRL lists and the CRLs from above, to tell
/// whether the stored record is still what the records and the secret say.
fn listed_digest(entries: &[Revoked], above: &[Crl]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for e in entries {
        ctx.update(format!("{}:{}:{};", e.serial_hex, e.reason, unix(e.revoked_at)).as_bytes());
    }
    for c in above {
        ctx.update(b"above:");
        ctx.update(c.der());
    }
    hex::encode(ctx.finish())
}

/// Whether the stored CRL must be re-signed at `now`.
fn due(current: Option<&CrlRecord>, signer: &str, digest: &str, now: i64, ttl: Duration) -> bool {
    match current {
        None => true,
        Some(c) => {
            let half = i64::try_from(ttl.as_secs() / 2).unwrap_or(i64::MAX);
            c.signer_fingerprint != signer
                || c.listed_digest != digest
                || now >= c.this_update.saturating_add(half)
                || now >= c.next_update
        }
    }
}

/// When the stored CRL is next due for re-signing.
pub fn refresh_at(current: &CrlRecord, ttl: Duration) -> SystemTime {
    let half = i64::try_from(ttl.as_secs() / 2).unwrap_or(i64::MAX);
    from_unix(current.this_update.saturating_add(half).min(current.next_update))
}

/// Signs and stores a new CRL when the records, the signer or the time call for it; returns the
/// CRL record in force. Without a signer (Vault mode, a broken CA), nothing is published.
pub async fn publish(
    store: &dyn Store,
    keys: &Keyspace,
    auth: &Authority,
    now: SystemTime,
    ttl: Duration,
) -> Result<Option<CrlRecord>, PublishError> {
    let Some(signing) = auth.signing() else { return Ok(None) };
    let signer = &signing.signer;
    let fingerprint = signer.cert().fingerprint();
    let revoked = all_revoked(store, unix(now)).await?;
    // What `ca` lists: the revocations of what it issued (an entry without an issuer, from an
    // older record, goes to the signer's).
    let listed_by = |ca: &CaSigner, main: bool| -> Vec<Revoked> {
        let fp = ca.cert().fingerprint();
        revoked
            .iter()
            .filter(|r| r.issuer_fingerprint == fp || main && r.issuer_fingerprint.is_empty())
            .map(|r| Revoked {
                serial_hex: r.serial.clone(),
                revoked_at: from_unix(r.revoked_at),
                reason: r.reason.parse().unwrap_or(Reason::Unspecified),
            })
            .collect()
    };
    let entries = listed_by(signer, true);
    // During a root rotation, the other root's CRL too (its clusters may not have re-issued yet).
    let also: Vec<(&CaSigner, Vec<Revoked>)> =
        signing.crl_also.iter().map(|ca| (ca.as_ref(), listed_by(ca, false))).collect();
    let above = upstream_crls(store, keys, auth).await;
    let mut digest = listed_digest(&entries, &above);
    for (ca, listed) in &also {
        digest = format!("{digest}+{}:{}", ca.cert().fingerprint(), listed_digest(listed, &[]));
    }
    let current = typed::get::<CrlRecord>(store, &keys.crl()).await?.map(|v| v.value);
    if !due(current.as_ref(), &fingerprint, &digest, unix(now), ttl) {
        return Ok(current);
    }
    let mut signed = None;
    let next = typed::update::<CrlRecord, _>(store, &keys.crl(), |cur| {
        signed = None;
        if !due(cur, &fingerprint, &digest, unix(now), ttl) {
            return None;
        }
        let number = cur.map_or(1, |c| c.number + 1);
        let params = CrlParams { number, this_update: now, next_update: now + ttl, revoked: entries.clone() };
        let own = match signer.sign_crl(&params) {
            Ok(c) => c,
            Err(e) => {
                signed = Some(Err(e));
                return None;
            }
        };
        let mut all = vec![own];
        all.extend(above.iter().cloned());
        for (ca, listed) in &also {
            match ca.sign_crl(&CrlParams { revoked: listed.clone(), ..params.clone() }) {
                Ok(c) => all.push(c),
                Err(e) => tracing::warn!(ca = %ca.cert().subject(), error = %e, "the other root's CRL cannot be signed"),
            }
        }
        let note = match crl::check_chain_coverage(&all, signer.chain()) {
            Ok(()) => String::new(),
            Err(e) => format!(
                "{e}; put the CRLs of the CAs above your intermediate in ca-crl.pem of its secret (until then clusters write no ca-crl.pem)"
            ),
        };
        signed = Some(Ok(number));
        Some(CrlRecord {
            number,
            pem: crl::to_pem_bundle(&all),
            signer_fingerprint: fingerprint.clone(),
            listed_digest: digest.clone(),
            this_update: unix(now),
            next_update: unix(now + ttl),
            note,
        })
    })
    .await?;
    match signed {
        Some(Err(e)) => Err(PublishError::Sign(e)),
        Some(Ok(number)) => {
            tracing::info!(number, revoked = entries.len(), "published a new CRL");
            Ok(next)
        }
        None => Ok(next),
    }
}

/// In bring-your-own-intermediate mode: the CRLs of the CAs above the signer, from
/// `ca-crl.pem` in the referenced secret (those that verify against one of them).
async fn upstream_crls(store: &dyn Store, keys: &Keyspace, auth: &Authority) -> Vec<Crl> {
    let Some(signing) = auth.signing() else { return Vec::new() };
    let above = &signing.signer.chain()[1..];
    if above.is_empty() {
        return Vec::new();
    }
    let Some(key) = authority::referenced_secret(keys, &auth.policy) else { return Vec::new() };
    let pem = match store.get(&key).await {
        Ok(Some(v)) => v.value.get("ca-crl.pem").map(<[u8]>::to_vec).unwrap_or_default(),
        _ => Vec::new(),
    };
    match Crl::parse_pem_bundle(&pem) {
        Ok(crls) => crls.into_iter().filter(|c| above.iter().any(|a| c.verify_signed_by(a).is_ok())).collect(),
        Err(e) => {
            tracing::warn!(secret = %key, error = %e, "ca-crl.pem of the intermediate's secret does not parse; ignored");
            Vec::new()
        }
    }
}

/// Why a CRL could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The signer cannot sign CRLs (e.g. your intermediate's keyUsage lacks cRLSign).
    #[error("signing the CRL: {0}")]
    Sign(#[source] meshca_pki::IssueError),
}

/// The CRL the mesh whose records are `keys` published, as stored (any replica).
pub async fn published(store: &dyn Store, keys: &Keyspace) -> Result<Option<CrlRecord>, StoreError> {
    Ok(typed::get::<CrlRecord>(store, &keys.crl()).await?.map(|v| v.value))
}

/// Keeps the published CRL current, on the leader: at start, whenever the authority changes or
/// `nudge` fires (a revocation), and at half of the CRL's lifetime. `nudge` is bumped after every
/// new CRL, so trust streams send it.
pub struct Publisher {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The mesh's records.
    pub keys: Keyspace,
    /// The mesh's authority in force.
    pub authority: watch::Receiver<Arc<Authority>>,
    /// Woken by revocations; bumped after every new CRL.
    pub nudge: watch::Sender<u64>,
    /// The time.
    pub clock: SharedClock,
    /// The CRLs' lifetime.
    pub ttl: Duration,
    /// With replicas: whether this one leads (only the leader signs).
    pub leader: Option<watch::Receiver<Leader>>,
}

impl Publisher {
    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let retry = Duration::from_secs(5).min(self.ttl / 4);
        let mut nudged = self.nudge.subscribe();
        loop {
            let mut wake = self.clock.now() + self.ttl / 2;
            if replica::is_leader(self.leader.as_ref()) {
                let auth = self.authority.borrow_and_update().clone();
                let store = self.store.as_ref();
                let before = published(store, &self.keys).await.ok().flatten().map(|c| c.number);
                match publish(store, &self.keys, &auth, self.clock.now(), self.ttl).await {
                    Ok(Some(rec)) => {
                        if Some(rec.number) != before {
                            self.nudge.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        wake = refresh_at(&rec, self.ttl);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "publishing the CRL failed; will retry");
                        wake = self.clock.now() + retry;
                    }
                }
            } else {
                wake = self.clock.now() + retry;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.authority.changed() => if r.is_err() { return },
                r = nudged.changed() => if r.is_err() { return },
                _ = self.clock.sleep_until(wake) => {}
            }
        }
    }
}
