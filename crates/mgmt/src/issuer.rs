//! The certificate issuer as a domain service: [`Issuer::issue`] decides whether a cluster gets
//! an intermediate for a CSR and signs it, with no gRPC in sight. The gRPC handler
//! ([`crate::grpc`]) authenticates the caller, calls it, and maps [`Denied`] to a status in one
//! place ([`Denied::into_status`]); in-process tests call it directly.
//!
//! The rules, in the order they are checked: the cluster is registered; the policy covers it;
//! the management plane signs (not Vault, not a broken CA); the cluster is within its rate limit;
//! the CSR proves possession of a key of the policy's algorithm and, if it names a cluster in
//! `L=`, names the caller; the key is not a revoked intermediate's; this replica leads; the key
//! was never certified before. The issued serial is recorded, and the issuance's audit entry
//! written, before the answer: an intermediate whose audit entry cannot be written is not handed
//! out ([`Denied::Unaudited`]). On a store with transactions (SQLite) the serial's record and the
//! audit entry are one transaction, batched with concurrent issuances' ([`audit::append_with`]):
//! one durable commit per issuance on the critical path, and never one without the other.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::unix;
use meshca_pki::{CsrError, CsrPolicy, IntermediateParams, IssueError, verify_csr};
use meshca_proto::IssueReason;
use meshca_store::{Precondition, Store, StoreError, Write, typed};
use tokio::sync::watch;
use tonic::Status;

use crate::audit::{self, AppendError};
use crate::authority::Capability;
use crate::meshes::{MeshView, Placement};
use crate::ratelimit::RateLimiter;
use crate::records::{self, ClusterRecord, IssuedLog, IssuedRecord};
use crate::replica::Leader;

/// A cluster intermediate, as handed to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The intermediate (PEM).
    pub certificate: String,
    /// The chain above it, issuer first, root last (PEM, one per element).
    pub chain: Vec<String>,
    /// The root set for `root-cert.pem` (PEM bundle).
    pub root_set: String,
    /// The policy generation it was issued under.
    pub generation: String,
    /// Serial, uppercase hex.
    pub serial: String,
    /// NotAfter, unix seconds.
    pub not_after: i64,
}

/// Why the issuer said no. Each variant says what would make it say yes.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// No registration record for the caller's cluster.
    #[error("cluster {0} is not registered")]
    NotRegistered(String),
    /// No policy selects the cluster, or several do (the reason names them).
    #[error("{0}")]
    NotCovered(String),
    /// Vault signs this mesh's intermediates.
    #[error("this mesh's root lives in Vault: use `meshca vault-agent`")]
    DelegatedToVault,
    /// The policy's CA cannot be loaded.
    #[error("{0}")]
    CannotSign(String),
    /// The cluster is over its issuance rate limit.
    #[error("cluster {cluster} is over its issuance rate limit")]
    RateLimited {
        /// The cluster.
        cluster: String,
        /// When a permit is back.
        retry_after: Duration,
    },
    /// The CSR is refused.
    #[error("intermediate CSR from {cluster}: {source}")]
    BadCsr {
        /// The cluster.
        cluster: String,
        /// What is wrong with it.
        #[source]
        source: CsrError,
    },
    /// The CSR names another cluster than the caller.
    #[error("the CSR names cluster {named:?} but the caller is cluster {caller}")]
    OtherCluster {
        /// The cluster in the CSR's `L=`.
        named: String,
        /// The caller.
        caller: String,
    },
    /// This replica does not hold the leader lease.
    #[error("this management-plane replica does not hold the leader lease; retry (the leader answers)")]
    NotLeader,
    /// Signing failed (e.g. the signer expires before the intermediate would start).
    #[error("cannot issue for {cluster}: {source}")]
    Signing {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: IssueError,
    },
    /// The key belongs to a revoked intermediate of the cluster.
    #[error("the key in this CSR belongs to revoked intermediate {serial} of {cluster}; send a CSR with a new key")]
    KeyRevoked {
        /// The cluster.
        cluster: String,
        /// The revoked intermediate.
        serial: String,
    },
    /// The key was certified before (a replayed CSR).
    #[error("an intermediate for this key was already issued to {0}; send a CSR with a new key")]
    KeyReused(String),
    /// The issuance's audit entry could not be written, so the certificate was not handed out.
    /// On a store with transactions (SQLite) its serial was not recorded either, and the same CSR
    /// sent again is issued like a first request. On one without (the directory tree,
    /// Kubernetes) the serial stays in the issued log (it was signed, and is never used), so the
    /// same CSR is then refused as a replay ([`Denied::KeyReused`]); a retry with a new key, as
    /// the agent makes, is issued.
    #[error("the audit log could not be written, so no intermediate was handed out to {cluster}; retry")]
    Unaudited {
        /// The cluster.
        cluster: String,
        /// Why the entry could not be written.
        #[source]
        source: StoreError,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl Denied {
    /// The gRPC status for this denial: the one place where issuer decisions become codes.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Denied::NotRegistered(_) => Status::permission_denied(message),
            Denied::NotCovered(_) | Denied::DelegatedToVault | Denied::CannotSign(_) | Denied::Signing { .. } => {
                Status::failed_precondition(message)
            }
            Denied::RateLimited { retry_after, .. } => meshca_serve::resource_exhausted(message, retry_after),
            Denied::BadCsr { .. } => Status::invalid_argument(message),
            Denied::OtherCluster { .. } => Status::permission_denied(message),
            Denied::NotLeader => Status::unavailable(message),
            Denied::KeyReused(_) => Status::already_exists(message),
            Denied::KeyRevoked { .. } => Status::permission_denied(message),
            // The store's error names files and keys: logged, and the caller gets an error id.
            Denied::Store(e) => crate::error::caller_status(&e),
            // Retryable: the next attempt (a new key) is audited or refused the same way.
            Denied::Unaudited { source, .. } => {
                let logged = crate::error::caller_status(&source);
                Status::unavailable(format!("{message} ({})", logged.message()))
            }
        }
    }
}

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        d.into_status()
    }
}

/// The certificate issuer.
pub struct Issuer {
    store: Arc<dyn Store>,
    meshes: watch::Receiver<Arc<MeshView>>,
    limiter: RateLimiter,
    leader: Option<watch::Receiver<Leader>>,
    logs: LogCache,
}

/// How many clusters' issued logs the issuer keeps in memory. A full log (64 records, and the
/// encoded bytes of its full chunks) is about 65 kB in memory, so this bounds the cache near
/// 33 MB (measured: 512 clusters with full logs add 17 MB of peak RSS to the server over logs
/// kept without their encoded chunks); a cluster past it is read from the store.
const LOG_CACHE_CLUSTERS: usize = 512;

/// Each cluster's issued log as this replica last wrote it, with the version the store gave the
/// write: the next issuance for the cluster starts from it instead of reading and decoding the
/// log again (on a busy leader, a tenth of an issuance's CPU; docs/benchmarks.md). It is only a
/// starting guess: the write is a compare-and-swap against that version, so a log changed by
/// anyone else since (another replica, a cluster's removal) refuses the write, and the issuer
/// forgets the entry and reads the log from the store. A key is still certified once.
#[derive(Default)]
struct LogCache {
    logs: std::sync::Mutex<std::collections::HashMap<String, (meshca_store::ResourceVersion, IssuedLog)>>,
}

impl LogCache {
    /// Takes the cluster's log out (a concurrent issuance for the same cluster reads the store).
    fn take(&self, cluster: &str) -> Option<(meshca_store::ResourceVersion, IssuedLog)> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).remove(cluster)
    }

    /// Keeps `log` as of `version`; when full, an arbitrary other cluster's entry makes room.
    fn keep(&self, cluster: &str, version: meshca_store::ResourceVersion, log: IssuedLog) {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if logs.len() >= LOG_CACHE_CLUSTERS
            && !logs.contains_key(cluster)
            && let Some(evicted) = logs.keys().next().cloned()
        {
            logs.remove(&evicted);
        }
        logs.insert(cluster.to_string(), (version, log));
    }
}

impl Issuer {
    /// An issuer over `store`, signing each cluster's intermediate with its mesh's current
    /// authority (`meshes`), limited per cluster by `limiter` (so one mesh's clusters never use
    /// another's budget), and (with replicas) only while `leader` says this replica leads.
    pub fn new(
        store: Arc<dyn Store>,
        meshes: watch::Receiver<Arc<MeshView>>,
        limiter: RateLimiter,
        leader: Option<watch::Receiver<Leader>>,
    ) -> Self {
        Issuer { store, meshes, limiter, leader, logs: LogCache::default() }
    }

    /// Whether this replica may sign now.
    pub fn leads(&self) -> bool {
        crate::replica::is_leader(self.leader.as_ref())
    }

    /// Issues `cluster` an intermediate for `csr_pem` at `now`, or says why not.
    pub async fn issue(
        &self,
        cluster: &str,
        csr_pem: &str,
        reason: IssueReason,
        now: SystemTime,
    ) -> Result<Issued, Denied> {
        let Some(rec) = typed::get::<ClusterRecord>(self.store.as_ref(), &records::cluster(cluster)?).await? else {
            return Err(Denied::NotRegistered(cluster.to_string()));
        };
        self.issue_registered(cluster, &rec.value, csr_pem, reason, now).await
    }

    /// [`Issuer::issue`] for a cluster whose record the caller has just read (the gRPC layer reads
    /// it to check the agent's identity): one store read less per issuance.
    pub async fn issue_registered(
        &self,
        cluster: &str,
        rec: &ClusterRecord,
        csr_pem: &str,
        reason: IssueReason,
        now: SystemTime,
    ) -> Result<Issued, Denied> {
        let view = self.meshes.borrow().clone();
        let auth = match view.place(cluster, &rec.labels) {
            Placement::Mesh(m) => m.authority(),
            Placement::Outside(why) => return Err(Denied::NotCovered(why)),
        };
        let policy = &auth.policy;
        let signing = match &auth.capability {
            Capability::Signing(s) => s.clone(),
            Capability::Delegated(_) => return Err(Denied::DelegatedToVault),
            Capability::Unavailable { reason } => return Err(Denied::CannotSign(reason.clone())),
        };
        if let Err(retry_after) = self.limiter.try_acquire(cluster) {
            tracing::warn!(%cluster, "intermediate issuance rate-limited");
            return Err(Denied::RateLimited { cluster: cluster.to_string(), retry_after });
        }
        let csr = verify_csr(csr_pem.as_bytes(), &CsrPolicy::exactly(policy.intermediate.key_algorithm.kind()))
            .map_err(|source| Denied::BadCsr { cluster: cluster.to_string(), source })?;
        if let Some(named) = csr.subject_locality()
            && named != cluster
        {
            return Err(Denied::OtherCluster { named: named.to_string(), caller: cluster.to_string() });
        }
        let key_sha256 =
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr.public_key_spki()).as_ref());
        // A revoked serial is never renewed: its key is refused even once the issued log no
        // longer remembers it.
        if let Some(r) = rec.revoked.iter().find(|r| r.public_key_sha256 == key_sha256) {
            return Err(Denied::KeyRevoked { cluster: cluster.to_string(), serial: r.serial.clone() });
        }
        let params = IntermediateParams {
            ttl: policy.intermediate.ttl,
            permitted_dns_domains: policy.intermediate.permitted_dns_domains.clone(),
            ..IntermediateParams::cluster(&policy.intermediate.organization, cluster, policy.trust_domain.clone())
        };
        if !self.leads() {
            return Err(Denied::NotLeader);
        }
        let issued = signing
            .signer
            .sign_intermediate(csr.public_key_spki(), &params, now)
            .map_err(|source| Denied::Signing { cluster: cluster.to_string(), source })?;
        let record = IssuedRecord {
            serial: issued.serial_hex.clone(),
            not_after: unix(issued.not_after),
            issued_at: unix(now),
            reason,
            policy_generation: auth.generation.clone(),
            public_key_sha256: key_sha256.clone(),
            not_before: unix(issued.not_before),
            key_algorithm: csr.key_kind().to_string(),
            issuer_fingerprint: signing.signer.cert().fingerprint(),
        };
        let event = audit::Event::new(
            audit::Action::IntermediateIssued,
            meshca_proto::identity::Caller::Agent { cluster: cluster.to_string() }.to_string(),
            cluster,
        )
        .with("serial", &record.serial)
        .with("keySha256", &record.public_key_sha256)
        .with("reason", reason.name())
        .with("policyGeneration", &record.policy_generation)
        .with("issuerFingerprint", &record.issuer_fingerprint)
        .with("notAfter", record.not_after.to_string());
        self.record(cluster, &record, &event, now).await?;
        tracing::info!(%cluster, serial = %record.serial, not_after = record.not_after, reason = %reason, "issued cluster intermediate");
        Ok(Issued {
            certificate: issued.to_pem(),
            chain: signing.signer.chain_pems(),
            root_set: signing.roots.to_pem(),
            generation: auth.generation.clone(),
            serial: record.serial,
            not_after: record.not_after,
        })
    }

    /// Records the issuance in the cluster's issued-serial log and the audit log before the
    /// answer: nothing is handed out that both logs do not show (fail closed). The issued log is
    /// written by compare-and-swap, so when two replicas race on the same request (a leader whose
    /// lease ran out mid-call and its successor) the second finds the first's record for this key
    /// and hands out nothing: a key is certified once. A request whose key is already in the log
    /// (a replay) is refused before anything is written, and leaves no audit entry.
    async fn record(
        &self,
        cluster: &str,
        record: &IssuedRecord,
        event: &audit::Event,
        now: SystemTime,
    ) -> Result<(), Denied> {
        let store = self.store.as_ref();
        let key = records::issued(cluster)?;
        let mut refused = None;
        let mut kept = self.logs.take(cluster);
        for _ in 0..typed::MAX_ATTEMPTS {
            let (mut log, precondition) = match kept.take() {
                Some((version, log)) => (log, Precondition::Version(version)),
                None => match records::read_issued(store, cluster).await? {
                    Some(v) => (v.value, Precondition::Version(v.version)),
                    None => (IssuedLog::default(), Precondition::Absent),
                },
            };
            if log.records().iter().any(|r| r.public_key_sha256 == record.public_key_sha256) {
                return Err(Denied::KeyReused(cluster.to_string()));
            }
            log.push(record.clone())?;
            let with = Write { key: key.clone(), secret: log.to_secret(store.partial_writes())?, precondition };
            match audit::append_with(store, event, now, with).await {
                Ok(appended) => {
                    if let Some(version) = appended.with_version {
                        self.logs.keep(cluster, version, log);
                    }
                    return Ok(());
                }
                // Written by someone else meanwhile (or the log in memory was stale): read it
                // again (a replay is found there).
                Err(AppendError::With(e)) if typed::is_conflict(&e) => refused = Some(e),
                Err(AppendError::With(e)) => return Err(Denied::Store(e)),
                Err(AppendError::Entry(source)) => {
                    return Err(Denied::Unaudited { cluster: cluster.to_string(), source });
                }
            }
        }
        Err(Denied::Store(
            refused.unwrap_or_else(|| StoreError::Backend(format!("{key}: too many conflicting updates"))),
        ))
    }
}
