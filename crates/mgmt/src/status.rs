//! The mesh's status for operators, and the alerts that say when a person is needed.

use std::time::Duration;

use meshca_clock::unix;
use meshca_proto::mgmt::{Alert, CertificateSummary, ClusterStatus, ClusterView, IssuedRecord, MeshStatus};
use meshca_proto::{AlertKind, IstiodState};
use meshca_store::{Store, typed};

use crate::authority::Authority;
use crate::error::MgmtError;
use crate::meshes::{Mesh, MeshView, Placement};
use crate::records::{self, ClusterRecord, IstiodRecord, StatusRecord};

/// A cluster is "connected" when it reported within this many report intervals.
pub const CONNECTED_INTERVALS: i64 = 3;

fn to_proto(s: &StatusRecord) -> ClusterStatus {
    ClusterStatus {
        phase: s.phase as i32,
        intermediate_serial: s.intermediate_serial.clone(),
        intermediate_not_after: s.intermediate_not_after,
        intermediate_not_before: s.intermediate_not_before,
        root_set_fingerprint: s.root_set_fingerprint.clone(),
        policy_generation: s.policy_generation.clone(),
        last_renewal: s.last_renewal,
        last_error: s.last_error.clone(),
        key_location: s.key_location.clone(),
        next_renewal: s.next_renewal,
        agent_version: s.agent_version.clone(),
        consecutive_failures: s.consecutive_failures,
        istiod: s.istiod.as_ref().map(IstiodRecord::to_wire),
        istiod_only: false,
        foreign_cacerts: s.foreign_cacerts,
        chain_root_fingerprint: s.chain_root_fingerprint.clone(),
        intermediate_issuer_fingerprint: s.intermediate_issuer_fingerprint.clone(),
        crl_note: s.crl_note.clone(),
        upstream_crl_unavailable: s.upstream_crl_unavailable,
    }
}

/// Every cluster's view — each registered one and each a policy lists that has not registered
/// yet — placed in its mesh (`policy`) or not (`placement` says why). `only`: just the clusters
/// of that mesh.
async fn cluster_views(
    store: &dyn Store,
    view: &MeshView,
    only: Option<&str>,
    now: i64,
    report_interval: Duration,
) -> Result<Vec<ClusterView>, MgmtError> {
    let mut clusters = Vec::new();
    let mut names = records::cluster_names(store).await?;
    for m in view.meshes() {
        for n in m.authority().policy.clusters.named() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names.sort();
    for name in names {
        let record = typed::get::<ClusterRecord>(store, &records::cluster(&name)?).await?.map(|v| v.value);
        let labels = record.as_ref().map(|r| r.labels.clone()).unwrap_or_default();
        let (policy, placement) = match view.place(&name, &labels) {
            Placement::Mesh(m) => (m.name.clone(), String::new()),
            Placement::Outside(why) => (String::new(), why),
        };
        if only.is_some_and(|o| o != policy) {
            continue;
        }
        let registered = record.is_some();
        let status = typed::get::<StatusRecord>(store, &records::status(&name)?).await?.map(|v| v.value);
        let issued = records::read_issued(store, &name).await?.map(|v| v.value).unwrap_or_default();
        let last_seen = status.as_ref().map(|s| s.reported_at).unwrap_or(0);
        clusters.push(ClusterView {
            connected: last_seen > 0 && now - last_seen <= CONNECTED_INTERVALS * report_interval.as_secs() as i64,
            enrolled: !policy.is_empty(),
            policy,
            placement,
            labels: labels.into_iter().collect(),
            registered,
            last_seen,
            status: status.as_ref().map(to_proto),
            issued: issued
                .records()
                .iter()
                .take(8)
                .map(|r| {
                    let revoked = record.as_ref().and_then(|c| c.revocation(&r.serial));
                    IssuedRecord {
                        revoked_at: revoked.map_or(0, |x| x.revoked_at),
                        revocation_reason: revoked.map(|x| x.reason.clone()).unwrap_or_default(),
                        revoked_by: revoked.map(|x| x.by.clone()).unwrap_or_default(),
                        serial: r.serial.clone(),
                        not_after: r.not_after,
                        issued_at: r.issued_at,
                        reason: r.reason as i32,
                        not_before: r.not_before,
                        key_algorithm: r.key_algorithm.clone(),
                        issuer_fingerprint: r.issuer_fingerprint.clone(),
                    }
                })
                .collect(),
            name,
        });
    }
    Ok(clusters)
}

/// The status of the management plane as `meshca status` shows it: every cluster (naming its
/// mesh, or why it is in none) and every mesh's own status in `meshes` (without clusters); the
/// alerts of all, each naming its policy, plus `ClusterPolicyConflict` for a cluster two
/// policies claim. With one policy, its status fills the top-level fields as well — the same
/// document a single-mesh management plane always gave.
pub async fn overview(
    store: &dyn Store,
    view: &MeshView,
    now: i64,
    report_interval: Duration,
) -> Result<MeshStatus, MgmtError> {
    // Every cluster's records are read once, here, and each mesh gets its own.
    let clusters = cluster_views(store, view, None, now, report_interval).await?;
    let single = view.meshes().len() == 1;
    let mut meshes = Vec::new();
    for m in view.meshes() {
        let own = clusters.iter().filter(|c| single || c.policy == m.name).cloned().collect();
        let mut st = of_mesh(store, view, m, own, now, report_interval).await?;
        st.clusters.clear();
        meshes.push(st);
    }
    let mut top = match meshes.as_slice() {
        [one] => one.clone(),
        _ => MeshStatus { now, ..MeshStatus::default() },
    };
    top.alerts = meshes.iter().flat_map(|m| m.alerts.iter().cloned()).collect();
    for c in clusters.iter().filter(|c| c.placement.contains("selected by RootTrustPolicies")) {
        top.alerts.push(alert(AlertKind::ClusterPolicyConflict, &c.name, c.placement.clone()));
    }
    top.clusters = clusters;
    top.meshes = meshes;
    Ok(top)
}

/// One mesh's status: its CA, roots, root rotation, federation and alerts, and its clusters
/// (with a single mesh, every cluster, those it does not cover shown as such).
pub async fn collect(
    store: &dyn Store,
    view: &MeshView,
    mesh: &Mesh,
    now: i64,
    report_interval: Duration,
) -> Result<MeshStatus, MgmtError> {
    let only = if view.meshes().len() == 1 { None } else { Some(mesh.name.as_str()) };
    let clusters = cluster_views(store, view, only, now, report_interval).await?;
    of_mesh(store, view, mesh, clusters, now, report_interval).await
}

/// [`collect`] with the mesh's cluster views already read.
async fn of_mesh(
    store: &dyn Store,
    view: &MeshView,
    mesh: &Mesh,
    clusters: Vec<ClusterView>,
    now: i64,
    report_interval: Duration,
) -> Result<MeshStatus, MgmtError> {
    let authority = &*mesh.authority();
    let (root_fp, root_not_after) = match authority.roots() {
        Some(r) => (r.fingerprint(), unix(r.earliest_expiry())),
        None => (String::new(), 0),
    };
    let mut alerts = alerts(now, authority, &clusters, report_interval);
    let journal = crate::rotation::controller::read_journal(store, &mesh.keys).await?.value;
    let reports = crate::convergence::reports(store, &authority.policy, Some(view), now, report_interval).await?;
    let (root_rotation, stalled) =
        crate::rotation::describe(&journal, &reports, &authority.policy, now, report_interval);
    alerts.extend(stalled);
    let federated = crate::federation::poll::read(store, &mesh.keys).await?;
    alerts.extend(crate::federation::poll::alerts(&federated, &authority.policy.federation));
    for a in &mut alerts {
        a.policy = mesh.name.clone();
    }
    let mut roots: Vec<CertificateSummary> =
        authority.roots().into_iter().flat_map(|r| r.iter()).map(|c| summary(c, None)).collect();
    roots.sort_by_key(|r| r.not_after);
    let upstream = authority.upstream();
    // The user's intermediate hangs under the root that signed it (by signature, not by name).
    let upstream_issuer = upstream.and_then(|u| {
        authority
            .roots()
            .into_iter()
            .flat_map(|r| r.iter())
            .find(|r| u.verify_signed_by(r).is_ok())
            .map(|r| r.fingerprint())
    });
    Ok(MeshStatus {
        trust_domain: authority.policy.trust_domain.to_string(),
        ca_mode: authority.policy.ca.name().to_string(),
        root_set_fingerprint: root_fp,
        root_not_after,
        policy_generation: authority.generation.clone(),
        policy_error: authority.error().map(str::to_string).or_else(|| authority.warning.clone()).unwrap_or_default(),
        clusters,
        alerts,
        now,
        upstream_intermediate_subject: authority.upstream().map(|c| c.subject()).unwrap_or_default(),
        upstream_intermediate_not_after: authority.upstream().map(|c| unix(c.not_after())).unwrap_or(0),
        roots,
        upstream_intermediate: upstream.map(|u| summary(u, upstream_issuer)),
        root_rotation_threshold: root_rotation_threshold(authority).unwrap_or(0),
        root_rotation: Some(root_rotation),
        policy: mesh.name.clone(),
        meshes: Vec::new(),
    })
}

fn summary(c: &meshca_pki::Cert, issuer_fingerprint: Option<String>) -> CertificateSummary {
    CertificateSummary {
        subject: c.subject(),
        serial: c.serial_hex(),
        not_before: unix(c.not_before()),
        not_after: unix(c.not_after()),
        fingerprint: c.fingerprint(),
        key_algorithm: c.key_kind().to_string(),
        issuer_fingerprint: issuer_fingerprint.unwrap_or_default(),
    }
}

/// The moment (unix seconds) from which the earliest root expires within one intermediate
/// lifetime: from then on new intermediates are cut short, so the root should have been rotated.
/// `None` without a root.
pub fn root_rotation_threshold(authority: &Authority) -> Option<i64> {
    let roots = authority.roots()?;
    Some(unix(roots.earliest_expiry()) - authority.policy.intermediate.ttl.as_secs() as i64)
}

fn alert(kind: AlertKind, cluster: &str, message: String) -> Alert {
    Alert { kind: kind as i32, cluster: cluster.into(), message, policy: String::new() }
}

/// Human form of a number of seconds.
pub fn human(secs: i64) -> String {
    let neg = secs < 0;
    let s = secs.unsigned_abs();
    let text = if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    };
    if neg { format!("-{text}") } else { text }
}

/// The conditions that need a person:
/// - the policy's CA cannot sign (`PolicyInvalid`) or a policy warning (`PolicyWarning`);
/// - the root expires before an intermediate issued now would (`RootExpiresWithinIntermediateLifetime`);
/// - the user's intermediate expires within its warning period (`UpstreamIntermediateExpiring`);
/// - an intermediate past its renewal point and not renewed (`IntermediateRenewalOverdue`), or
///   expired (`IntermediateExpired`);
/// - a registered cluster silent for more than [`CONNECTED_INTERVALS`] report intervals
///   (`ClusterNotReporting`);
/// - a `cacerts` meshca did not write, left alone (`ForeignCacerts`);
/// - an agent that may manage istiod but could not (`IstiodNotWired`: the Deployment is missing,
///   RBAC forbids the patch, another field manager owns a field meshca would set);
/// - a cluster whose upstream PKI (Vault) publishes no CRL for the signing issuer, or whose last
///   read of it failed (`UpstreamCrlUnavailable`).
///
/// [`collect`] adds the stored ones: a stalled root rotation (`RootRotationStalled`) and a
/// federated trust domain whose bundle cannot be fetched (`FederationFailing`).
pub fn alerts(now: i64, authority: &Authority, clusters: &[ClusterView], report_interval: Duration) -> Vec<Alert> {
    let mut out = Vec::new();
    if let Some(e) = authority.error() {
        out.push(alert(AlertKind::PolicyInvalid, "", e.to_string()));
    }
    if let Some(w) = &authority.warning {
        out.push(alert(AlertKind::PolicyWarning, "", w.clone()));
    }
    let ttl = authority.policy.intermediate.ttl.as_secs() as i64;
    if let Some(threshold) = root_rotation_threshold(authority) {
        let root_end = threshold + ttl;
        if now > threshold {
            out.push(alert(
                AlertKind::RootExpiresWithinIntermediateLifetime,
                "",
                format!(
                    "a root expires in {}, sooner than the intermediate lifetime ({}): new intermediates are cut short; plan a root rotation",
                    human(root_end - now),
                    human(ttl)
                ),
            ));
        }
    }
    if let (Some(up), meshca_policy::CaMode::IntermediateRef { expiry_warning, .. }) =
        (authority.upstream(), &authority.policy.ca)
    {
        let end = unix(up.not_after());
        if end - now <= expiry_warning.as_secs() as i64 {
            out.push(alert(
                AlertKind::UpstreamIntermediateExpiring,
                "",
                format!(
                    "your intermediate {} (spec.config.intermediateRef) expires in {}; meshca does not rotate it and clamps cluster intermediates to it — replace the secret with a new intermediate from the same root",
                    up.subject(),
                    human(end - now)
                ),
            ));
        }
    }
    let grace = authority.policy.intermediate.grace_period_ratio;
    let interval = report_interval.as_secs() as i64;
    for c in clusters.iter().filter(|c| c.enrolled && c.registered) {
        match &c.status {
            None => out.push(alert(
                AlertKind::ClusterNotReporting,
                &c.name,
                format!("{} is registered but has never reported", c.name),
            )),
            Some(s) => {
                if s.foreign_cacerts {
                    out.push(alert(
                        AlertKind::ForeignCacerts,
                        &c.name,
                        format!(
                            "{}'s cacerts was not written by meshca and is left alone: delete it, or start the agent with --adopt-existing",
                            c.name
                        ),
                    ));
                }
                if let Some(i) = &s.istiod
                    && !matches!(i.state(), IstiodState::Unspecified | IstiodState::Wired)
                {
                    out.push(alert(
                        AlertKind::IstiodNotWired,
                        &c.name,
                        format!("{}: istiod Deployment {}: {}: {}", c.name, i.deployment, i.state(), i.message),
                    ));
                }
                if s.upstream_crl_unavailable {
                    out.push(alert(
                        AlertKind::UpstreamCrlUnavailable,
                        &c.name,
                        format!(
                            "{}: the upstream PKI's CRL for the issuer that signs its intermediates is missing ({}): ca-crl.pem lacks it or holds a stale one, and a revocation made there does not reach the cluster",
                            c.name,
                            if s.crl_note.is_empty() { "no reason given" } else { &s.crl_note }
                        ),
                    ));
                }
                if now - c.last_seen > CONNECTED_INTERVALS * interval {
                    out.push(alert(
                        AlertKind::ClusterNotReporting,
                        &c.name,
                        format!("{} last reported {} ago", c.name, human(now - c.last_seen)),
                    ));
                }
                if s.intermediate_not_after == 0 {
                    continue;
                }
                let lifetime = (s.intermediate_not_after - s.intermediate_not_before).max(1);
                let window = (grace * lifetime as f64) as i64;
                let due = s.intermediate_not_after - window;
                let slack = (2 * interval).max(window / 4);
                let error =
                    if s.last_error.is_empty() { String::new() } else { format!("; last error: {}", s.last_error) };
                if now >= s.intermediate_not_after {
                    out.push(alert(
                        AlertKind::IntermediateExpired,
                        &c.name,
                        format!(
                            "{}'s intermediate {} expired {} ago{error}",
                            c.name,
                            s.intermediate_serial,
                            human(now - s.intermediate_not_after)
                        ),
                    ));
                } else if now > due + slack {
                    out.push(alert(
                        AlertKind::IntermediateRenewalOverdue,
                        &c.name,
                        format!(
                            "{}'s intermediate {} expires in {} and has not been renewed{error}",
                            c.name,
                            s.intermediate_serial,
                            human(s.intermediate_not_after - now)
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// The mesh's status as one JSON document with stable field names: what `meshca status -o json`
/// prints and what the dashboard renders, so the two never disagree.
///
/// Times are unix seconds (0: unknown). Beyond the status itself, each cluster carries what its
/// current intermediate's issuance record says — the certificate's real `notBefore`
/// (`intermediateCertNotBefore`; `intermediateNotBefore` is the issuance time agents plan renewals
/// from), `keyAlgorithm` and `issuerFingerprint` (the `fingerprint` of a root or of the
/// management intermediate) — empty when the management plane did not sign it (Vault mode).
pub fn document(st: &MeshStatus) -> serde_json::Value {
    use serde_json::json;
    // The zero value of an enum is "not known" and prints as empty.
    let named = |n: &'static str| if n == "Unspecified" { "" } else { n };
    let cert = |c: &CertificateSummary| {
        json!({
            "subject": c.subject, "serial": c.serial, "notBefore": c.not_before, "notAfter": c.not_after,
            "fingerprint": c.fingerprint, "keyAlgorithm": c.key_algorithm, "issuerFingerprint": c.issuer_fingerprint,
        })
    };
    let mut upstream = json!({
        "subject": st.upstream_intermediate_subject, "notAfter": st.upstream_intermediate_not_after,
    });
    if let (Some(u), Some(obj)) = (&st.upstream_intermediate, upstream.as_object_mut())
        && let Some(full) = cert(u).as_object()
    {
        obj.extend(full.clone());
    }
    json!({
        "policy": st.policy,
        "meshes": st.meshes.iter().map(document).collect::<Vec<_>>(),
        "trustDomain": st.trust_domain,
        "caMode": st.ca_mode,
        "rootSetFingerprint": st.root_set_fingerprint,
        "rootNotAfter": st.root_not_after,
        "rootRotationThreshold": st.root_rotation_threshold,
        "roots": st.roots.iter().map(cert).collect::<Vec<_>>(),
        "policyGeneration": st.policy_generation,
        "policyError": st.policy_error,
        "now": st.now,
        "upstreamIntermediate": upstream,
        "clusters": st.clusters.iter().map(|c| {
            let s = c.status.clone().unwrap_or_default();
            let current = c.issued.iter().find(|r| !s.intermediate_serial.is_empty() && r.serial == s.intermediate_serial);
            json!({
                "name": c.name, "registered": c.registered, "enrolled": c.enrolled, "connected": c.connected,
                "policy": c.policy, "placement": c.placement,
                "labels": c.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "lastSeen": c.last_seen, "phase": named(s.phase().name()), "intermediateSerial": s.intermediate_serial,
                "intermediateNotAfter": s.intermediate_not_after, "intermediateNotBefore": s.intermediate_not_before,
                "intermediateCertNotBefore": current.map(|r| r.not_before).unwrap_or(0),
                "keyAlgorithm": current.map(|r| r.key_algorithm.as_str()).unwrap_or(""),
                "issuerFingerprint": current.map(|r| r.issuer_fingerprint.as_str()).unwrap_or(""),
                "rootSetFingerprint": s.root_set_fingerprint, "policyGeneration": s.policy_generation,
                "chainRootFingerprint": s.chain_root_fingerprint,
                "lastRenewal": s.last_renewal, "nextRenewal": s.next_renewal, "lastError": s.last_error, "crlNote": s.crl_note,
                "keyLocation": s.key_location, "foreignCacerts": s.foreign_cacerts,
                "istiod": s.istiod.as_ref().map(|i| json!({
                    "state": named(i.state().name()), "deployment": i.deployment, "message": i.message,
                    "restartedForSerial": i.restarted_for_serial, "restartedAt": i.restarted_at, "vaultSidecar": i.vault_sidecar,
                })),
                "issued": c.issued.iter().map(|r| json!({
                    "serial": r.serial, "notBefore": r.not_before, "notAfter": r.not_after, "issuedAt": r.issued_at,
                    "reason": match r.reason() { meshca_proto::IssueReason::Unspecified => "unspecified", x => x.name() }, "keyAlgorithm": r.key_algorithm, "issuerFingerprint": r.issuer_fingerprint,
                    "revoked": (r.revoked_at > 0).then(|| json!({"at": r.revoked_at, "reason": r.revocation_reason, "by": r.revoked_by})),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "alerts": st.alerts.iter().map(|a| json!({"kind": named(a.kind().name()), "cluster": a.cluster, "message": a.message, "policy": a.policy})).collect::<Vec<_>>(),
        "rootRotation": root_rotation_document(st.root_rotation.as_ref(), &cert),
    })
}

/// `rootRotation` in [`document`]: the phase by name (`Idle` when none is in progress), since
/// when, the two roots, what it waits for, and every phase change.
fn root_rotation_document(
    r: Option<&meshca_proto::mgmt::RootRotation>,
    cert: &dyn Fn(&CertificateSummary) -> serde_json::Value,
) -> serde_json::Value {
    use serde_json::json;
    let Some(r) = r else { return json!({ "phase": "Idle" }) };
    let phase = match r.phase() {
        meshca_proto::RotationPhase::Unspecified => "Idle",
        p => p.name(),
    };
    let mut converged: Vec<(&String, &i64)> = r.converged.iter().collect();
    converged.sort();
    json!({
        "phase": phase,
        "phaseSince": r.phase_since,
        "id": r.id,
        "startedAt": r.started_at,
        "trigger": r.trigger,
        "aborted": r.aborted,
        "from": r.from.as_ref().map(cert),
        "to": r.to.as_ref().map(cert),
        "nextStepAt": r.next_step_at,
        "waitingFor": r.waiting.iter().map(|w| json!({"cluster": w.cluster, "reason": w.reason})).collect::<Vec<_>>(),
        "converged": converged.into_iter().map(|(c, at)| json!({"cluster": c, "since": at})).collect::<Vec<_>>(),
        "transitions": r.transitions.iter().map(|t| json!({"phase": t.phase().name(), "at": t.at, "note": t.note})).collect::<Vec<_>>(),
        "note": r.note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str, not_after: i64) -> CertificateSummary {
        CertificateSummary {
            subject: format!("CN={name}"),
            serial: format!("{name}01"),
            not_before: 1_000,
            not_after,
            fingerprint: format!("fp-{name}"),
            key_algorithm: "ECDSA P-256".into(),
            issuer_fingerprint: String::new(),
        }
    }

    fn cluster(name: &str, serial: &str, issuer: &str) -> ClusterView {
        ClusterView {
            name: name.into(),
            registered: true,
            enrolled: true,
            connected: true,
            last_seen: 1_990,
            status: Some(ClusterStatus {
                phase: meshca_proto::Phase::Ready as i32,
                intermediate_serial: serial.into(),
                intermediate_not_before: 1_500,
                intermediate_not_after: 4_000,
                next_renewal: 3_500,
                key_location: "store".into(),
                ..Default::default()
            }),
            issued: vec![
                IssuedRecord {
                    serial: serial.into(),
                    not_before: 1_380,
                    not_after: 4_000,
                    issued_at: 1_500,
                    reason: meshca_proto::IssueReason::Forced as i32,
                    key_algorithm: "ECDSA P-384".into(),
                    issuer_fingerprint: issuer.into(),
                    ..Default::default()
                },
                IssuedRecord {
                    serial: "OLD".into(),
                    not_before: 1_000,
                    not_after: 3_000,
                    issued_at: 1_120,
                    reason: meshca_proto::IssueReason::Initial as i32,
                    key_algorithm: "ECDSA P-256".into(),
                    issuer_fingerprint: "fp-a".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn status() -> MeshStatus {
        MeshStatus {
            trust_domain: "cluster.local".into(),
            ca_mode: "generated".into(),
            now: 2_000,
            roots: vec![root("a", 9_000), root("b", 19_000)],
            root_not_after: 9_000,
            root_rotation_threshold: 6_000,
            clusters: vec![cluster("cluster-1", "AA", "fp-b"), cluster("cluster-2", "BB", "fp-a")],
            alerts: vec![Alert {
                kind: AlertKind::ClusterNotReporting as i32,
                cluster: "cluster-2".into(),
                message: "m".into(),
                policy: "mesh".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn document_carries_the_root_set_and_each_intermediate_with_its_issuer() {
        let d = document(&status());
        assert_eq!(d["roots"].as_array().map(Vec::len), Some(2));
        assert_eq!(d["roots"][1]["subject"], "CN=b");
        assert_eq!(d["roots"][1]["notBefore"], 1_000);
        assert_eq!(d["rootRotationThreshold"], 6_000);
        let c1 = &d["clusters"][0];
        assert_eq!(c1["intermediateSerial"], "AA");
        // The certificate's own NotBefore, from the record of the serial in service, not the older one.
        assert_eq!(c1["intermediateCertNotBefore"], 1_380);
        assert_eq!(c1["intermediateNotBefore"], 1_500);
        assert_eq!(c1["keyAlgorithm"], "ECDSA P-384");
        assert_eq!(c1["issuerFingerprint"], "fp-b");
        assert_eq!(d["clusters"][1]["issuerFingerprint"], "fp-a");
        assert_eq!(c1["issued"][1]["issuerFingerprint"], "fp-a");
        assert_eq!(c1["issued"][0]["reason"], "forced");
        assert_eq!(c1["nextRenewal"], 3_500);
        assert_eq!(d["alerts"][0]["kind"], "ClusterNotReporting");
    }

    #[test]
    fn a_cluster_without_a_matching_record_has_no_invented_details() {
        let mut st = status();
        // Vault mode: the management plane signed nothing, so there is no record of the serial.
        st.clusters[0].issued.clear();
        let d = document(&st);
        assert_eq!(d["clusters"][0]["intermediateCertNotBefore"], 0);
        assert_eq!(d["clusters"][0]["keyAlgorithm"], "");
        // A cluster that never reported has no serial; an empty serial matches no record.
        st.clusters[1].status = None;
        st.clusters[1].issued[0].serial = String::new();
        let d = document(&st);
        assert_eq!(d["clusters"][1]["intermediateSerial"], "");
        assert_eq!(d["clusters"][1]["issuerFingerprint"], "");
    }

    #[test]
    fn the_upstream_intermediate_keeps_its_old_fields_and_gains_the_full_certificate() {
        let mut st = status();
        assert_eq!(document(&st)["upstreamIntermediate"], serde_json::json!({"subject": "", "notAfter": 0}));
        let mut up = root("mine", 8_000);
        up.issuer_fingerprint = "fp-a".into();
        st.upstream_intermediate_subject = up.subject.clone();
        st.upstream_intermediate_not_after = up.not_after;
        st.upstream_intermediate = Some(up);
        let d = document(&st);
        assert_eq!(d["upstreamIntermediate"]["subject"], "CN=mine");
        assert_eq!(d["upstreamIntermediate"]["notAfter"], 8_000);
        assert_eq!(d["upstreamIntermediate"]["serial"], "mine01");
        assert_eq!(d["upstreamIntermediate"]["issuerFingerprint"], "fp-a");
    }

    #[tokio::test]
    async fn collect_lists_the_roots_and_the_rotation_threshold_the_alert_uses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = meshca_store::dir::DirStore::open(dir.path()).expect("store");
        let now = std::time::SystemTime::now();
        let policy = meshca_policy::Policy::generated_default(Duration::from_secs(3600));
        let keys = crate::records::Keyspace::legacy();
        let authority = crate::authority::load(&store, &keys, policy, now).await;
        let mesh = Mesh {
            name: "mesh".into(),
            keys,
            authority: tokio::sync::watch::channel(std::sync::Arc::new(authority.clone())).1,
            rotation: None,
        };
        let view = MeshView::new(vec![mesh.clone()]);
        let st = collect(&store, &view, &mesh, unix(now), Duration::from_secs(5)).await.expect("status");
        assert_eq!(st.roots.len(), 1);
        let root = &st.roots[0];
        let cert = authority.roots().and_then(|r| r.iter().next()).expect("a root");
        assert_eq!(root.serial, cert.serial_hex());
        assert_eq!(root.fingerprint, cert.fingerprint());
        assert_eq!(root.not_before, unix(cert.not_before()));
        assert_eq!(root.key_algorithm, "ECDSA P-256");
        assert_eq!(st.root_rotation_threshold, root.not_after - 3600);
        assert!(st.upstream_intermediate.is_none());
        // The alert fires exactly once the threshold is passed.
        let kinds = |at: i64| -> Vec<String> {
            alerts(at, &authority, &[], Duration::from_secs(5))
                .into_iter()
                .map(|a| a.kind().name().to_string())
                .collect()
        };
        assert!(kinds(st.root_rotation_threshold).is_empty());
        assert_eq!(kinds(st.root_rotation_threshold + 1), ["RootExpiresWithinIntermediateLifetime"]);
    }

    /// A generated-root authority in a fresh store (kept alive by the returned folder), and now.
    async fn generated_authority() -> (tempfile::TempDir, crate::authority::Authority, std::time::SystemTime) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = meshca_store::dir::DirStore::open(dir.path()).expect("store");
        let now = std::time::SystemTime::now();
        let policy = meshca_policy::Policy::generated_default(Duration::from_secs(3600));
        (dir, crate::authority::load(&store, &crate::records::Keyspace::legacy(), policy, now).await, now)
    }

    #[tokio::test]
    async fn a_foreign_cacerts_and_an_unwired_istiod_are_alerts_a_wired_one_is_not() {
        let (_dir, authority, now) = generated_authority().await;
        let view = |foreign: bool, state: IstiodState| ClusterView {
            name: "c1".into(),
            registered: true,
            enrolled: true,
            connected: true,
            last_seen: unix(now),
            status: Some(ClusterStatus {
                phase: meshca_proto::Phase::Waiting as i32,
                foreign_cacerts: foreign,
                istiod: Some(meshca_proto::mgmt::IstiodStatus {
                    state: state as i32,
                    deployment: "istio-system/istiod".into(),
                    message: "forbidden".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let kinds = |v: ClusterView| -> Vec<String> {
            alerts(unix(now), &authority, &[v], Duration::from_secs(5))
                .into_iter()
                .map(|a| a.kind().name().to_string())
                .collect()
        };
        assert_eq!(kinds(view(true, IstiodState::Forbidden)), ["ForeignCacerts", "IstiodNotWired"]);
        assert!(kinds(view(false, IstiodState::Wired)).is_empty());
        assert!(kinds(view(false, IstiodState::Unspecified)).is_empty(), "an agent that does not manage istiod");
        let a = alerts(unix(now), &authority, &[view(false, IstiodState::NotFound)], Duration::from_secs(5));
        assert_eq!(a[0].message, "c1: istiod Deployment istio-system/istiod: NotFound: forbidden");
    }

    #[tokio::test]
    async fn a_missing_upstream_crl_is_an_alert_naming_the_cluster_and_why() {
        let (_dir, authority, now) = generated_authority().await;
        let view = |missing: bool| ClusterView {
            name: "c1".into(),
            registered: true,
            enrolled: true,
            connected: true,
            last_seen: unix(now),
            status: Some(ClusterStatus {
                phase: meshca_proto::Phase::Ready as i32,
                upstream_crl_unavailable: missing,
                crl_note: if missing {
                    "the upstream CRL cannot be read: Vault publishes no CRL".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let a = alerts(unix(now), &authority, &[view(true)], Duration::from_secs(5));
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].kind(), AlertKind::UpstreamCrlUnavailable);
        assert_eq!(a[0].cluster, "c1");
        assert!(a[0].message.contains("Vault publishes no CRL"), "{}", a[0].message);
        assert!(alerts(unix(now), &authority, &[view(false)], Duration::from_secs(5)).is_empty());
    }
}
