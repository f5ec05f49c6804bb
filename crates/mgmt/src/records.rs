//! What the management plane persists, and where. Everything lives in the store (namespace
//! [`NAMESPACE`]), so a replica holds no state of its own.

use meshca_proto::{IssueReason, IstiodState, Phase};
use meshca_store::{ObjectKey, StoreError};
use serde::{Deserialize, Serialize};

/// The management plane's namespace in its store.
pub const NAMESPACE: &str = "meshca";

pub(crate) fn fixed(name: &'static str) -> ObjectKey {
    // The constant names below are valid DNS-1123 names (checked by a unit test).
    ObjectKey::new(NAMESPACE, name).unwrap_or_else(|_| unreachable!("constant object name {name:?}"))
}

fn key(name: &str) -> Result<ObjectKey, StoreError> {
    ObjectKey::new(NAMESPACE, name)
}

/// Where one mesh's own records live (its generated root, root rotation journal, CRL, federated
/// bundles, audit marker): each RootTrustPolicy has its own, so nothing one mesh does touches
/// another's. The mesh a single-policy management plane always had keeps the plain names
/// ([`Keyspace::legacy`]: an upgrade moves nothing); every other mesh's are
/// `mesh.<policy>.<name>` ([`Keyspace::named`]). Which mesh holds which is kept in
/// [`mesh_index`] (`crate::meshes::keyspaces`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keyspace {
    prefix: String,
}

impl Keyspace {
    /// The plain names.
    pub fn legacy() -> Keyspace {
        Keyspace { prefix: String::new() }
    }

    /// The names of the mesh of policy `policy` (a DNS-1123 label, checked by the policy set).
    pub fn named(policy: &str) -> Keyspace {
        Keyspace { prefix: format!("mesh.{policy}.") }
    }

    /// Whether these are the plain names.
    pub fn is_legacy(&self) -> bool {
        self.prefix.is_empty()
    }

    /// The object `base` of this mesh.
    pub fn object(&self, base: &str) -> Result<ObjectKey, StoreError> {
        key(&format!("{}{base}", self.prefix))
    }

    fn fixed(&self, base: &'static str) -> ObjectKey {
        // A DNS-1123 label prefix and a constant name make a valid subdomain (unit-tested).
        self.object(base).unwrap_or_else(|_| unreachable!("mesh object {}{base:?}", self.prefix))
    }

    /// The generated root (option 1): `ca-cert.pem`, `ca-key.pem`.
    pub fn root_ca(&self) -> ObjectKey {
        self.fixed(ROOT_CA)
    }

    /// The CRL the mesh publishes ([`CrlRecord`]).
    pub fn crl(&self) -> ObjectKey {
        self.fixed("published-crl")
    }

    /// What the leader knows of each trust domain's bundle the mesh federates with
    /// ([`crate::federation::poll::FederationRecord`]).
    pub fn federation(&self) -> ObjectKey {
        self.fixed("federated-bundles")
    }

    /// The digest of the mesh's last policy from the Kubernetes resource recorded in the audit
    /// log (`crate::loader::audit_applied`).
    pub fn policy_audited(&self) -> ObjectKey {
        self.fixed("policy-applied-audit")
    }
}

/// The base name of a mesh's generated root.
pub const ROOT_CA: &str = "root-ca";

/// Which mesh's records have which names ([`Keyspace`]), kept by `crate::meshes::keyspaces`.
pub fn mesh_index() -> ObjectKey {
    fixed("mesh-index")
}

/// The relay CA that issues control-plane identities.
pub fn relay_ca() -> ObjectKey {
    fixed("relay-ca")
}

/// The RootTrustPolicy in force (`policy.yaml`).
pub fn policy() -> ObjectKey {
    fixed("root-trust-policy")
}

/// When bootstrap-token records were last swept (`crate::tokens::create`).
pub fn token_sweep() -> ObjectKey {
    fixed("token-sweep")
}

/// A cluster's registration record.
pub fn cluster(name: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("cluster-{name}"))
}

/// A bootstrap token.
pub fn token(id: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("bootstrap-token-{id}"))
}

/// A cluster's issued-certificate log.
pub fn issued(cluster: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("issued-{cluster}"))
}

/// A cluster's last reported status.
pub fn status(cluster: &str) -> Result<ObjectKey, StoreError> {
    key(&format!("status-{cluster}"))
}

/// The SPIFFE bundle's sequence number per trust domain
/// ([`crate::federation::publish::Sequences`]).
pub fn spiffe_bundle() -> ObjectKey {
    fixed("spiffe-bundle")
}

/// Operator credentials issued and revoked ([`OperatorLog`]).
pub fn operators() -> ObjectKey {
    fixed("operator-credentials")
}

/// Where a removed cluster's records are kept (`meshca cluster remove`): its registration,
/// issued log and last status, as they were at `removed_at` (unix seconds). The name is
/// `archived.<cluster>.<removed_at>`: dots separate the parts, so any cluster name fits, and no
/// other record's prefix matches it.
pub fn archived_cluster(name: &str, removed_at: i64) -> Result<ObjectKey, StoreError> {
    key(&format!("{ARCHIVE_PREFIX}{name}.{removed_at}"))
}

/// The data key of an archived cluster's registration record (its `revoked` list stays in force).
pub const ARCHIVED_CLUSTER_KEY: &str = "cluster.json";

/// Prefix of cluster records, for listing.
pub const CLUSTER_PREFIX: &str = "cluster-";

/// The names of the registered clusters, sorted.
pub async fn cluster_names(store: &dyn meshca_store::Store) -> Result<Vec<String>, meshca_store::StoreError> {
    let mut names: Vec<String> = store
        .list(NAMESPACE)
        .await?
        .into_iter()
        .filter_map(|n| n.strip_prefix(CLUSTER_PREFIX).map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Prefix of archived clusters, for listing.
pub const ARCHIVE_PREFIX: &str = "archived.";

/// Prefix of bootstrap-token records, for listing.
pub const TOKEN_PREFIX: &str = "bootstrap-token-";

/// The data key of the policy document.
pub const POLICY_KEY: &str = "policy.yaml";

/// A registered cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Cluster name.
    pub name: String,
    /// Unix seconds.
    pub registered_at: i64,
    /// Serial of the agent identity last issued: the only one accepted, besides the one below.
    pub identity_serial: String,
    /// SHA-256 (hex) of the key `identity_serial` certifies: a renewal whose answer was lost is
    /// retried for the same key, which only the agent holds (see [`crate::identities`]).
    #[serde(default)]
    pub identity_key_sha256: String,
    /// Serial of the identity `identity_serial` replaced at a renewal, still accepted until
    /// `previous_identity_until` so calls on connections made before the renewal finish. Empty
    /// after a registration: a new bootstrap token ends every earlier identity at once.
    #[serde(default)]
    pub previous_identity_serial: String,
    /// Unix seconds: the end of the predecessor's overlap window.
    #[serde(default)]
    pub previous_identity_until: i64,
    /// Operator-requested rotations (`meshca rotate`); the agent re-issues when this grows.
    #[serde(default)]
    pub rotate_requests: u64,
    /// The cluster's intermediates revoked with `meshca revoke`, oldest first. Kept in this
    /// record so a revocation and the re-issue it forces (`rotate_requests`) are one write: a
    /// management plane stopped in between cannot leave one without the other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedIntermediate>,
    /// The cluster's labels (`meshca cluster add NAME --label k=v`), which a RootTrustPolicy's
    /// `spec.clusterSelector` matches to put the cluster in its mesh.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl ClusterRecord {
    /// The revocation of `serial`, if it is revoked.
    pub fn revocation(&self, serial: &str) -> Option<&RevokedIntermediate> {
        self.revoked.iter().find(|r| r.serial.eq_ignore_ascii_case(serial))
    }
}

/// A revoked cluster intermediate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedIntermediate {
    /// Uppercase hex.
    pub serial: String,
    /// The RFC 5280 reason name (`keyCompromise`).
    pub reason: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// The operator who revoked it.
    pub by: String,
    /// Unix seconds: its NotAfter (after which it need not be listed).
    pub not_after: i64,
    /// SHA-256 of its public key, hex: the issuer never certifies that key again.
    pub public_key_sha256: String,
    /// SHA-256 fingerprint of the certificate that signed it: the CRL of that signer lists it.
    pub issuer_fingerprint: String,
}

/// The CRL the management plane publishes, as last signed (by the leader).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrlRecord {
    /// The CRL number of the last one signed (grows by one each time).
    pub number: u64,
    /// The CRLs to publish (PEM): the signer's, then any supplied for the certificates above it.
    pub pem: String,
    /// Fingerprint of the certificate that signed the first one.
    pub signer_fingerprint: String,
    /// A digest of what is published: the serials and reasons the signed CRL lists, and the CRLs
    /// from above it (see `crate::revocation`).
    pub listed_digest: String,
    /// Unix seconds.
    pub this_update: i64,
    /// Unix seconds.
    pub next_update: i64,
    /// Why the published set cannot satisfy istiod (a certificate above the signer without a
    /// CRL), empty when it can.
    #[serde(default)]
    pub note: String,
}

/// A bootstrap token: only a hash of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Cluster the token registers.
    pub cluster: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds when it was used; tokens are single-use.
    pub used_at: Option<i64>,
    /// The labels the cluster's record gets when it registers with this token.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One certificate the issuer signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Uppercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Why the agent asked (stored by its name, `renewal`; a name this version does not know
    /// reads back as `Unspecified`).
    #[serde(with = "reason_name")]
    pub reason: IssueReason,
    /// Policy generation it was issued under.
    pub policy_generation: String,
    /// SHA-256 of the certified public key (SubjectPublicKeyInfo DER), hex: a key is certified
    /// once. Empty in records written before it was kept.
    #[serde(default)]
    pub public_key_sha256: String,
    /// Unix seconds: the certificate's NotBefore (backdated from `issued_at`). 0 in older records.
    #[serde(default)]
    pub not_before: i64,
    /// The certified key's algorithm ("ECDSA P-256", ...). Empty in older records.
    #[serde(default)]
    pub key_algorithm: String,
    /// SHA-256 fingerprint of the signing certificate, hex. Empty in older records.
    #[serde(default)]
    pub issuer_fingerprint: String,
}

/// Operator credentials: those the management plane issued, and those revoked. Every operator
/// call is checked against `revoked`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorLog {
    /// Newest first; at most [`OPERATORS_KEEP`], expired ones dropped first.
    #[serde(default)]
    pub issued: Vec<OperatorCert>,
    /// Revoked serials, newest first; an entry is dropped once its certificate has expired.
    #[serde(default)]
    pub revoked: Vec<RevokedOperator>,
}

/// An operator certificate the management plane issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCert {
    /// The operator's name (`spiffe://meshca.internal/operator/<name>`).
    pub name: String,
    /// Uppercase hex.
    pub serial: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// A revoked operator certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedOperator {
    /// Uppercase hex.
    pub serial: String,
    /// The operator's name, when the certificate is in the issued list.
    #[serde(default)]
    pub name: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Unix seconds: the certificate's NotAfter (0 when unknown: kept until the list is full).
    #[serde(default)]
    pub not_after: i64,
    /// The operator who revoked it.
    pub by: String,
}

/// How many operator certificates (issued, and revoked) are remembered.
pub const OPERATORS_KEEP: usize = 512;

impl OperatorLog {
    /// Whether `serial` was revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.iter().any(|r| r.serial.eq_ignore_ascii_case(serial))
    }

    /// Forgets what can no longer matter at `now`: expired certificates, issued or revoked (an
    /// expired certificate fails the TLS handshake anyway), then the oldest beyond the cap.
    pub fn prune(&mut self, now: i64) {
        self.issued.retain(|c| c.not_after > now);
        self.issued.truncate(OPERATORS_KEEP);
        self.revoked.retain(|r| r.not_after == 0 || r.not_after > now);
        self.revoked.truncate(OPERATORS_KEEP);
    }
}

/// How many issued records are kept per cluster, at least (up to [`ISSUED_CHUNK`] − 1 more, so
/// that the log is pruned a whole chunk at a time).
pub const ISSUED_KEEP: usize = 64;

/// How many records one stored chunk of an issued log holds, where the store writes only the
/// keys a put changes ([`meshca_store::Store::partial_writes`]). An issuance then rewrites one
/// chunk (about 3 kB) instead of the whole log (25 kB at 64 records), and encodes only that
/// chunk: full chunks never change, and their bytes are kept ([`IssuedLog`]). Smaller chunks
/// would write fewer bytes but cost a row (a statement, a key, an allocation) each.
pub const ISSUED_CHUNK: usize = 8;

const CHUNK: u64 = ISSUED_CHUNK as u64;

/// The data key of the chunk holding the records numbered `n * ISSUED_CHUNK ..`.
fn chunk_key(n: u64) -> String {
    format!("records.{n}.json")
}

/// A cluster's issued log, newest first.
///
/// Stored one of two ways, and read in both ([`IssuedLog::from_secret`]): as one JSON record
/// ([`meshca_store::typed::RECORD_KEY`], `{"records": [...]}`), or, on a store that writes only
/// changed keys, in chunks: the log's records are numbered from the oldest it ever had, and key
/// `records.<n>.json` holds records `n·C … n·C + C − 1` (C = [`ISSUED_CHUNK`]) as a JSON array,
/// oldest first. A new record only ever changes the newest chunk, and pruning drops whole
/// chunks, so every other key is written once. (C is part of the stored form: a version with
/// another C would read these chunks as corrupt.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedLog {
    /// Newest first. Private: `next` and `full` follow it, so it changes only through
    /// [`IssuedLog::push`].
    records: Vec<IssuedRecord>,
    /// The number the next record gets: the count of records this log has had, oldest pruned
    /// ones included. Not in the single-record form (where it is read as the record count).
    #[serde(skip)]
    next: u64,
    /// The encoded bytes of each full chunk, by number: they never change, so an issuance
    /// encodes only the newest chunk.
    #[serde(skip)]
    full: EncodedChunks,
}

/// Encoded full chunks of an [`IssuedLog`]: only a cache of what its records say, so it takes
/// no part in comparing two logs.
#[derive(Clone, Default)]
struct EncodedChunks(std::collections::BTreeMap<u64, Vec<u8>>);

impl std::fmt::Debug for EncodedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl PartialEq for EncodedChunks {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for EncodedChunks {}

fn encode_chunk(records: &[&IssuedRecord]) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(records).map_err(|e| StoreError::Backend(e.to_string()))
}

impl IssuedLog {
    /// A log of `records`, newest first (as read from the single-record form).
    pub fn from_records(records: Vec<IssuedRecord>) -> IssuedLog {
        IssuedLog { next: records.len() as u64, records, full: EncodedChunks::default() }
    }

    /// The records, newest first.
    pub fn records(&self) -> &[IssuedRecord] {
        &self.records
    }

    /// The number of the oldest record kept.
    fn oldest(&self) -> u64 {
        self.next - self.records.len() as u64
    }

    /// Adds `record` as the newest, then prunes whole chunks while at least [`ISSUED_KEEP`]
    /// records remain.
    pub fn push(&mut self, record: IssuedRecord) -> Result<(), StoreError> {
        self.records.insert(0, record);
        self.next += 1;
        let keep_from = self.next.saturating_sub(ISSUED_KEEP as u64) / CHUNK * CHUNK;
        self.records.truncate((self.next - keep_from) as usize);
        self.full.0.retain(|&n, _| n * CHUNK >= keep_from);
        if self.next.is_multiple_of(CHUNK) && self.oldest() <= self.next - CHUNK {
            let newest: Vec<&IssuedRecord> = self.records[..ISSUED_CHUNK].iter().rev().collect();
            self.full.0.insert(self.next / CHUNK - 1, encode_chunk(&newest)?);
        }
        Ok(())
    }

    /// The log as stored: in chunks when `chunked` (a store that writes only changed keys),
    /// otherwise as one record.
    pub fn to_secret(&self, chunked: bool) -> Result<meshca_store::Secret, StoreError> {
        if !chunked {
            return meshca_store::typed::encode_compact(self);
        }
        let mut secret = meshca_store::Secret::default();
        // Oldest first, each chunk cut where the numbering says.
        let oldest: Vec<&IssuedRecord> = self.records.iter().rev().collect();
        let mut seq = self.oldest();
        let mut rest = &oldest[..];
        while !rest.is_empty() {
            let n = seq / CHUNK;
            let (chunk, tail) = rest.split_at((((n + 1) * CHUNK - seq) as usize).min(rest.len()));
            let bytes = match self.full.0.get(&n) {
                Some(bytes) if chunk.len() == ISSUED_CHUNK => bytes.clone(),
                _ => encode_chunk(chunk)?,
            };
            secret.data.insert(chunk_key(n), bytes);
            seq += chunk.len() as u64;
            rest = tail;
        }
        Ok(secret)
    }

    /// Reads the log from either stored form; `key` names the object in errors.
    pub fn from_secret(key: &ObjectKey, secret: &meshca_store::Secret) -> Result<IssuedLog, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { key: key.clone(), reason };
        if let Some(raw) = secret.get(meshca_store::typed::RECORD_KEY) {
            let log: IssuedLog = serde_json::from_slice(raw)
                .map_err(|e| corrupt(format!("{}: {e}", meshca_store::typed::RECORD_KEY)))?;
            return Ok(IssuedLog::from_records(log.records));
        }
        let mut chunks = std::collections::BTreeMap::new();
        for (name, raw) in &secret.data {
            let n = name
                .strip_prefix("records.")
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&n| chunk_key(n) == *name)
                .ok_or_else(|| corrupt(format!("unexpected key {name:?} in an issued log")))?;
            let records: Vec<IssuedRecord> =
                serde_json::from_slice(raw).map_err(|e| corrupt(format!("{name}: {e}")))?;
            chunks.insert(n, (records, raw));
        }
        let Some(&first) = chunks.keys().next() else {
            return Err(corrupt(format!("an issued log with neither {} nor chunks", meshca_store::typed::RECORD_KEY)));
        };
        let mut log = IssuedLog { next: first * CHUNK, ..IssuedLog::default() };
        let last = chunks.len() - 1;
        for (i, (n, (chunk, raw))) in chunks.into_iter().enumerate() {
            // Chunks are filled in turn and pruned whole: none is missing, each starts at its
            // number, each but the newest is full.
            if n * CHUNK != log.next
                || chunk.is_empty()
                || chunk.len() > ISSUED_CHUNK
                || (i < last && chunk.len() != ISSUED_CHUNK)
            {
                return Err(corrupt(format!(
                    "issued-log chunk {n} holds {} records where record {} was expected to start a chunk of {ISSUED_CHUNK}",
                    chunk.len(),
                    log.next
                )));
            }
            log.next += chunk.len() as u64;
            if chunk.len() == ISSUED_CHUNK {
                log.full.0.insert(n, raw.clone());
            }
            log.records.extend(chunk);
        }
        log.records.reverse();
        Ok(log)
    }
}

/// Reads cluster `cluster`'s issued log (either stored form); `Ok(None)` when it has none.
pub async fn read_issued(
    store: &dyn meshca_store::Store,
    cluster: &str,
) -> Result<Option<meshca_store::Versioned<IssuedLog>>, StoreError> {
    let key = issued(cluster)?;
    let Some(v) = store.get(&key).await? else { return Ok(None) };
    Ok(Some(meshca_store::Versioned { value: IssuedLog::from_secret(&key, &v.value)?, version: v.version }))
}

/// A cluster's last status report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// Unix seconds when it was received.
    pub reported_at: i64,
    /// The phase the agent reported.
    pub phase: Phase,
    /// Serial of the intermediate in service.
    pub intermediate_serial: String,
    /// Unix seconds.
    pub intermediate_not_after: i64,
    /// Unix seconds.
    pub intermediate_not_before: i64,
    /// Root set the cluster trusts.
    pub root_set_fingerprint: String,
    /// Generation its cacerts was issued under.
    pub policy_generation: String,
    /// Unix seconds of the last successful renewal.
    pub last_renewal: i64,
    /// Last error, empty when healthy.
    pub last_error: String,
    /// "store" or "memory".
    pub key_location: String,
    /// Unix seconds of the next planned renewal.
    pub next_renewal: i64,
    /// Agent version.
    pub agent_version: String,
    /// Attempts in a row that failed.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// `cacerts` exists but is not meshca's (and adoption was not asked for).
    #[serde(default)]
    pub foreign_cacerts: bool,
    /// What the agent did to istiod's Deployment, when it manages it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istiod: Option<IstiodRecord>,
    /// SHA-256 fingerprint of the root its intermediate chains to. Empty in older records.
    #[serde(default)]
    pub chain_root_fingerprint: String,
    /// SHA-256 fingerprint of its intermediate's issuer. Empty in older records.
    #[serde(default)]
    pub intermediate_issuer_fingerprint: String,
    /// Unix seconds when the `cacerts` part of the record (everything but `istiod`) was last
    /// reported: an istiod-only report (Vault mode) refreshes `reported_at` but says nothing new
    /// about `cacerts`, and a root rotation's barrier must not take it for news. 0 in older
    /// records (read as `reported_at`).
    #[serde(default)]
    pub cacerts_reported_at: i64,
    /// Why the cluster's `cacerts` has no (current) `ca-crl.pem`, as its agent says; empty when
    /// all is well.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crl_note: String,
    /// The upstream PKI (Vault) publishes no CRL for the signing issuer, or it cannot be read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upstream_crl_unavailable: bool,
}

/// What a cluster's agent reported about istiod's Deployment (`IstiodStatus` on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IstiodRecord {
    /// Whether the agent could do what the policy asks.
    pub state: IstiodState,
    /// `namespace/name`.
    pub deployment: String,
    /// Why, when not wired.
    pub message: String,
    /// The intermediate serial istiod was last restarted for.
    pub restarted_for_serial: String,
    /// Unix seconds of that restart.
    pub restarted_at: i64,
    /// Whether the Vault agent sidecar is on the Deployment.
    pub vault_sidecar: bool,
}

impl IstiodRecord {
    /// From the wire, with its strings clipped by `clip`.
    pub fn from_wire(w: &meshca_proto::mgmt::IstiodStatus, clip: impl Fn(&str) -> String) -> Self {
        IstiodRecord {
            state: w.state(),
            deployment: clip(&w.deployment),
            message: clip(&w.message),
            restarted_for_serial: clip(&w.restarted_for_serial),
            restarted_at: w.restarted_at,
            vault_sidecar: w.vault_sidecar,
        }
    }

    /// To the wire.
    pub fn to_wire(&self) -> meshca_proto::mgmt::IstiodStatus {
        meshca_proto::mgmt::IstiodStatus {
            state: self.state as i32,
            deployment: self.deployment.clone(),
            message: self.message.clone(),
            restarted_for_serial: self.restarted_for_serial.clone(),
            restarted_at: self.restarted_at,
            vault_sidecar: self.vault_sidecar,
        }
    }
}

impl StatusRecord {
    /// The record after a report `s` received at `now` (unix seconds), given the stored one, or
    /// why the report is refused ([`crate::report::accept`] checks every field). Two processes
    /// may report for one cluster (in Vault mode the agent reports istiod, the vault-agent sidecar
    /// the intermediate): an istiod-only report keeps everything else as it was, including when
    /// `cacerts` was last reported; a full report keeps the istiod part it does not carry.
    pub fn after_report(
        current: Option<&StatusRecord>,
        s: &meshca_proto::mgmt::ClusterStatus,
        now: i64,
    ) -> Result<StatusRecord, crate::report::InvalidReport> {
        let fresh = crate::report::accept(s, now)?;
        let mut rec = match (s.istiod_only, current) {
            (true, Some(cur)) => cur.clone(),
            _ => StatusRecord { istiod: current.and_then(|c| c.istiod.clone()), ..fresh },
        };
        rec.reported_at = now;
        if let Some(i) = &s.istiod {
            rec.istiod =
                Some(IstiodRecord::from_wire(i, |t| meshca_proto::text::bounded(t, crate::report::MAX_ERROR_CHARS)));
        }
        Ok(rec)
    }

    /// When what the record says about `cacerts` was reported.
    pub fn cacerts_at(&self) -> i64 {
        if self.cacerts_reported_at > 0 { self.cacerts_reported_at } else { self.reported_at }
    }
}

/// An [`IssueReason`] by its name, as the issued log has always stored it.
mod reason_name {
    use meshca_proto::IssueReason;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &IssueReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match r {
            IssueReason::Unspecified => "unspecified",
            other => other.name(),
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IssueReason, D::Error> {
        let name = String::deserialize(d)?;
        Ok(name.parse().unwrap_or(IssueReason::Unspecified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_names_are_valid_and_input_names_are_checked() {
        let _ = (relay_ca(), policy(), operators(), token_sweep(), mesh_index());
        let longest = "m".repeat(63);
        for keys in [Keyspace::legacy(), Keyspace::named(&longest)] {
            let _ = (keys.root_ca(), keys.crl(), keys.federation(), keys.policy_audited());
            for base in crate::rotation::journal::objects::ALL {
                keys.object(base).expect("a rotation object of any mesh");
            }
        }
        assert_eq!(Keyspace::named("staging").root_ca().name(), "mesh.staging.root-ca");
        assert_eq!(Keyspace::legacy().root_ca().name(), "root-ca");
        assert!(archived_cluster(&"c".repeat(63), i64::MAX).is_ok(), "the longest cluster name archives");
        let a = archived_cluster("cluster-1", 1).expect("archive");
        assert!(!a.name().starts_with(CLUSTER_PREFIX) && !a.name().starts_with(TOKEN_PREFIX), "{a}");
        assert!(cluster("cluster-1").is_ok());
        assert!(cluster("../etc").is_err());
        assert!(status("UPPER").is_err());
    }

    #[test]
    fn an_istiod_only_report_is_no_news_about_cacerts() {
        use meshca_proto::mgmt::ClusterStatus;
        let full = ClusterStatus {
            phase: Phase::Ready as i32,
            root_set_fingerprint: "sha256:ab".into(),
            chain_root_fingerprint: "b".into(),
            ..Default::default()
        };
        let rec = StatusRecord::after_report(None, &full, 100).expect("valid");
        assert_eq!((rec.reported_at, rec.cacerts_at()), (100, 100));
        let istiod_only = ClusterStatus { phase: Phase::Ready as i32, istiod_only: true, ..Default::default() };
        let after = StatusRecord::after_report(Some(&rec), &istiod_only, 200).expect("valid");
        assert_eq!(after.reported_at, 200, "the cluster is connected");
        assert_eq!(after.cacerts_at(), 100, "but its cacerts was last reported at 100");
        assert_eq!(after.chain_root_fingerprint, "b");
        let bad = ClusterStatus { phase: 0, ..Default::default() };
        assert!(StatusRecord::after_report(None, &bad, 1).is_err());
    }

    #[test]
    fn issued_records_keep_their_reason_names_and_tolerate_unknown_ones() {
        let rec = IssuedRecord {
            serial: "AB".into(),
            not_after: 2,
            issued_at: 1,
            reason: IssueReason::PolicyChange,
            policy_generation: "g".into(),
            public_key_sha256: String::new(),
            not_before: 0,
            key_algorithm: String::new(),
            issuer_fingerprint: String::new(),
        };
        let json = serde_json::to_string(&rec).expect("json");
        assert!(json.contains(r#""reason":"policy-change""#), "{json}");
        assert_eq!(serde_json::from_str::<IssuedRecord>(&json).expect("back"), rec);
        let old = json.replace("policy-change", "from-a-newer-version");
        assert_eq!(serde_json::from_str::<IssuedRecord>(&old).expect("tolerated").reason, IssueReason::Unspecified);
        let status: StatusRecord =
            serde_json::from_str(r#"{"reported_at":1,"phase":"Degraded","intermediate_serial":"","intermediate_not_after":0,"intermediate_not_before":0,"root_set_fingerprint":"","policy_generation":"","last_renewal":0,"last_error":"","key_location":"store","next_renewal":0,"agent_version":""}"#)
                .expect("a record written when phases were strings");
        assert_eq!(status.phase, Phase::Degraded);
    }

    fn record(n: u64) -> IssuedRecord {
        IssuedRecord {
            serial: format!("{n:04X}"),
            not_after: 1000 + n as i64,
            issued_at: n as i64,
            reason: IssueReason::Renewal,
            policy_generation: "g".into(),
            public_key_sha256: format!("{n:064x}"),
            not_before: 0,
            key_algorithm: "ECDSA P-256".into(),
            issuer_fingerprint: String::new(),
        }
    }

    fn key() -> ObjectKey {
        issued("cluster-1").expect("key")
    }

    /// In chunks, an issuance changes the newest chunk only (and, when the log is full, drops
    /// the oldest whole): every other key is written byte for byte as before. At least
    /// [`ISSUED_KEEP`] records are kept, the newest first, and both forms read back the same log.
    #[test]
    fn an_issuance_changes_only_the_newest_chunk_of_a_full_log() {
        let mut log = IssuedLog::default();
        let mut before = log.to_secret(true).expect("encode");
        for n in 0..200u64 {
            log.push(record(n)).expect("push");
            let after = log.to_secret(true).expect("encode");
            let newest = format!("records.{}.json", n / ISSUED_CHUNK as u64);
            for (k, v) in &after.data {
                if *k != newest {
                    assert_eq!(before.get(k), Some(v.as_slice()), "record {n} rewrote {k}");
                }
            }
            let dropped: Vec<&String> = before.data.keys().filter(|k| !after.data.contains_key(*k)).collect();
            assert!(dropped.len() <= 1, "record {n} dropped {dropped:?}");
            assert!((ISSUED_KEEP.min(n as usize + 1)..ISSUED_KEEP + ISSUED_CHUNK).contains(&log.records.len()));
            assert_eq!(log.records[0].serial, format!("{n:04X}"), "newest first");
            assert_eq!(IssuedLog::from_secret(&key(), &after).expect("chunks"), log);
            before = after;
        }
        let single = IssuedLog::from_secret(&key(), &log.to_secret(false).expect("one record")).expect("read");
        assert_eq!(single.records, log.records);
    }

    /// A log written as one record (by a store that rewrites whole objects, or before chunks)
    /// goes on in chunks where the store writes only changed keys, losing nothing.
    #[test]
    fn a_single_record_log_goes_on_in_chunks() {
        let old = IssuedLog::from_records((0..64u64).rev().map(record).collect());
        let stored = meshca_store::typed::encode(&old).expect("encode");
        let mut log = IssuedLog::from_secret(&key(), &stored).expect("read");
        assert_eq!(log.records, old.records);
        log.push(record(64)).expect("push");
        let chunked = log.to_secret(true).expect("encode");
        assert!(chunked.get(meshca_store::typed::RECORD_KEY).is_none());
        let back = IssuedLog::from_secret(&key(), &chunked).expect("read");
        let serials: Vec<String> = back.records.iter().map(|r| r.serial.clone()).collect();
        assert_eq!(serials, (0..65u64).rev().map(|n| format!("{n:04X}")).collect::<Vec<_>>());
    }

    /// A chunked log whose chunks do not follow on (one missing between others), with a chunk
    /// overfull or garbled, or with a key that is no chunk is reported corrupt, naming the
    /// object, not read as a shorter log (a key certified in the lost records could otherwise be
    /// certified again).
    #[test]
    fn a_chunked_log_with_a_gap_or_a_stranger_is_corrupt() {
        let mut log = IssuedLog::default();
        for n in 0..3 * CHUNK + 2 {
            log.push(record(n)).expect("push");
        }
        let good = log.to_secret(true).expect("encode");
        assert_eq!(good.data.len(), 4);
        let mut gap = good.clone();
        gap.data.remove("records.1.json");
        let mut overfull = good.clone();
        let too_many: Vec<IssuedRecord> = (0..=CHUNK).map(record).collect();
        overfull.data.insert("records.0.json".into(), serde_json::to_vec(&too_many).expect("json"));
        let mut stranger = good.clone();
        stranger.data.insert("notes.txt".into(), b"hi".to_vec());
        let mut garbled = good;
        garbled.data.insert("records.1.json".into(), b"[{".to_vec());
        for (what, secret) in [("gap", gap), ("overfull", overfull), ("stranger", stranger), ("garbled", garbled)] {
            match IssuedLog::from_secret(&key(), &secret) {
                Err(StoreError::Corrupt { key: k, reason }) => assert_eq!(k, key(), "{what}: {reason}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(IssuedLog::from_secret(&key(), &meshca_store::Secret::default()).is_err(), "an empty object");
    }
}
