//! The RootTrustPolicy custom resource (`deploy/crds/roottrustpolicies.meshca.io.yaml`) as the
//! management plane's [`PolicySource`]: read and watched through the API server, changed by
//! operators with `kubectl`, and given a status by the leader. Every RootTrustPolicy object in the
//! namespace is a mesh of its own (or only the one named by `meshca server --policy-resource`);
//! each object's status is its own mesh's.
//!
//! The status says, per cluster, its phase, its intermediate's serial and NotAfter and the root
//! set it trusts, plus the mesh's root-set fingerprint and two conditions with
//! `lastTransitionTime`s: `Accepted` (the policy is valid and its CA loaded; otherwise the message
//! names the field) and `Ready` (every covered cluster reports a current intermediate under the
//! current policy generation and root set). A transition time changes only when its condition's
//! status does, as Kubernetes' conventions ask.

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use meshca_mgmt::MgmtError;
use meshca_mgmt::authority::Authority;
use meshca_mgmt::loader::PolicySource;
use meshca_policy::{Policy, PolicyError, PolicySet, RootTrustPolicyDoc};
use meshca_proto::mgmt::MeshStatus;
use meshca_store::StoreError;
use serde_json::{Value, json};

/// The API group.
pub const GROUP: &str = "meshca.io";
/// The version served.
pub const VERSION: &str = "v1alpha1";
/// The plural (the URL segment).
pub const PLURAL: &str = "roottrustpolicies";

/// The RootTrustPolicy resource, for dynamic API access (kube's typed API would need the
/// `derive` feature and its schema generator; the CRD's schema is written by hand instead, to
/// express the one-mode rule).
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, meshca_policy::KIND), PLURAL)
}

/// The RootTrustPolicies of a namespace (or one of them) as custom resources.
pub struct CrdPolicy {
    api: Api<DynamicObject>,
    namespace: String,
    /// Only this object; `None`: every one in the namespace.
    name: Option<String>,
}

impl CrdPolicy {
    /// The RootTrustPolicies in `namespace` (only `name`, when given) on the API server `client`
    /// talks to.
    pub fn new(client: Client, namespace: &str, name: Option<&str>) -> Self {
        CrdPolicy {
            api: Api::namespaced_with(client, namespace, &api_resource()),
            namespace: namespace.to_string(),
            name: name.map(str::to_string),
        }
    }

    fn what(&self) -> String {
        match &self.name {
            Some(n) => format!("RootTrustPolicy {}/{n}", self.namespace),
            None => format!("the RootTrustPolicies in namespace {}", self.namespace),
        }
    }

    fn backend(&self, e: kube::Error) -> MgmtError {
        let reason = match crate::api_status(&e) {
            Some((code, m)) => format!("{}: API server answered {code}: {m}", self.what()),
            None => format!("{}: {e}", self.what()),
        };
        MgmtError::Store(StoreError::Backend(reason))
    }
}

/// Validates a RootTrustPolicy object as read from the API server.
pub fn policy_from_object(obj: &DynamicObject) -> Result<Policy, PolicyError> {
    let doc = json!({
        "apiVersion": obj.types.as_ref().map(|t| t.api_version.as_str()).unwrap_or(meshca_policy::API_VERSION),
        "kind": obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or(meshca_policy::KIND),
        "metadata": {
            "name": obj.metadata.name,
            "namespace": obj.metadata.namespace,
            "generation": obj.metadata.generation,
        },
        "spec": obj.data.get("spec").cloned().unwrap_or(Value::Null),
    });
    let doc: RootTrustPolicyDoc =
        serde_json::from_value(doc).map_err(|e| PolicyError { field: "spec".into(), message: e.to_string() })?;
    Policy::from_doc(&doc)
}

#[async_trait::async_trait]
impl PolicySource for CrdPolicy {
    async fn read(&self) -> Result<Option<PolicySet>, MgmtError> {
        let objects = match &self.name {
            Some(n) => self.api.get_opt(n).await.map_err(|e| self.backend(e))?.into_iter().collect(),
            None => self.api.list(&ListParams::default()).await.map_err(|e| self.backend(e))?.items,
        };
        if objects.is_empty() {
            return Ok(None);
        }
        // One object's mistake names the object: the set is refused and the meshes in force stay.
        let policies = objects
            .iter()
            .map(|obj| {
                policy_from_object(obj).map_err(|e| {
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    PolicyError { field: format!("RootTrustPolicy {name}: {}", e.field), message: e.message }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(PolicySet::new(policies)?))
    }

    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        let config = match &self.name {
            Some(n) => watcher::Config::default().fields(&format!("metadata.name={n}")),
            None => watcher::Config::default(),
        };
        watcher::watcher(self.api.clone(), config)
            .filter_map(|e| async move {
                match e {
                    Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some(()),
                    // A list in progress, or an error the watcher retries by itself (the loader's
                    // resync covers anything missed meanwhile).
                    _ => None,
                }
            })
            .boxed()
    }

    async fn apply(&self, _text: &str) -> Result<(), MgmtError> {
        Err(MgmtError::Policy(PolicyError {
            field: "policy".into(),
            message: format!(
                "in Kubernetes mode the policy is the {} resource; change it with `kubectl apply` (the management plane only reads it and writes its status)",
                self.what()
            ),
        }))
    }

    fn audit_actor(&self, policy: &Policy) -> Option<String> {
        // The object the policy came from.
        Some(format!("kubernetes RootTrustPolicy {}/{}", self.namespace, policy.name))
    }

    async fn publish_status(&self, st: &MeshStatus, authority: &Authority) -> Result<(), MgmtError> {
        // The object of the mesh's policy (a policy in force from before a removal has none).
        let name = &authority.policy.name;
        let Some(obj) = self.api.get_opt(name).await.map_err(|e| self.backend(e))? else { return Ok(()) };
        let previous = obj.data.get("status").cloned().unwrap_or(Value::Null);
        let status = build_status(st, authority, obj.metadata.generation, &previous, Timestamp::now());
        if status == previous {
            return Ok(());
        }
        let patch = json!({ "status": status });
        self.api
            .patch_status(
                name,
                &PatchParams { field_manager: Some(crate::FIELD_MANAGER.into()), ..Default::default() },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| self.backend(e))?;
        Ok(())
    }
}

fn rfc3339(unix: i64) -> Option<String> {
    (unix > 0).then(|| Timestamp::from_second(unix).map(|t| t.to_string()).ok()).flatten()
}

/// The status object for `st`; condition transition times are kept from `previous` when the
/// condition's status has not changed.
pub fn build_status(
    st: &MeshStatus,
    authority: &Authority,
    generation: Option<i64>,
    previous: &Value,
    now: Timestamp,
) -> Value {
    let clusters: Vec<Value> = st
        .clusters
        .iter()
        .map(|c| {
            let s = c.status.clone().unwrap_or_default();
            let mut v = json!({
                "name": c.name,
                "registered": c.registered,
                "enrolled": c.enrolled,
                "connected": c.connected,
                "phase": match s.phase() {
                    meshca_proto::Phase::Unspecified => if c.registered { "Waiting" } else { "NotRegistered" },
                    p => p.name(),
                },
                "intermediateSerial": s.intermediate_serial,
                "rootSetFingerprint": s.root_set_fingerprint,
                "policyGeneration": s.policy_generation,
                "lastError": s.last_error,
            });
            if let Some(t) = rfc3339(s.intermediate_not_after) {
                v["intermediateNotAfter"] = json!(t);
            }
            if let Some(t) = rfc3339(c.last_seen) {
                v["lastReported"] = json!(t);
            }
            let mut conditions = Vec::new();
            if s.foreign_cacerts {
                conditions.push(json!({
                    "type": "CacertsOwned", "status": "False", "reason": "ForeignCacerts",
                    "message": "cacerts was not written by meshca and is left alone: delete it, or start the agent with --adopt-existing",
                }));
            }
            if let Some(i) = &s.istiod {
                let state = i.state();
                if state != meshca_proto::IstiodState::Unspecified {
                    let wired = state == meshca_proto::IstiodState::Wired;
                    conditions.push(json!({
                        "type": "IstiodWired", "status": if wired { "True" } else { "False" },
                        "reason": state.name(), "message": if wired { format!("{} as the policy asks", i.deployment) } else { i.message.clone() },
                    }));
                }
                let mut istiod = json!({
                    "deployment": i.deployment, "state": state.name(), "message": i.message,
                    "restartedForSerial": i.restarted_for_serial, "vaultSidecar": i.vault_sidecar,
                });
                if let Some(t) = rfc3339(i.restarted_at) {
                    istiod["restartedAt"] = json!(t);
                }
                if let Some(o) = istiod.as_object_mut() {
                    o.retain(|_, x| x.as_str() != Some(""));
                }
                v["istiod"] = istiod;
            }
            if !conditions.is_empty() {
                v["conditions"] = json!(conditions);
            }
            // Unset is absent, not "": a merge patch of "" reached the API server as null, which
            // the schema (type: string) refuses.
            if let Some(o) = v.as_object_mut() {
                o.retain(|_, x| x.as_str() != Some(""));
            }
            v
        })
        .collect();

    let accepted = match (authority.error(), &authority.warning) {
        (Some(e), _) => ("False", "PolicyInvalid", e.to_string()),
        (None, Some(w)) => ("True", "AcceptedWithWarning", w.clone()),
        (None, None) => ("True", "Accepted", format!("{} CA loaded", st.ca_mode)),
    };
    let covered: Vec<_> = st.clusters.iter().filter(|c| c.enrolled).collect();
    let lagging: Vec<String> = covered
        .iter()
        .filter(|c| {
            let s = c.status.clone().unwrap_or_default();
            !(c.registered
                && s.phase() == meshca_proto::Phase::Ready
                && s.policy_generation == st.policy_generation
                && (st.root_set_fingerprint.is_empty() || s.root_set_fingerprint == st.root_set_fingerprint))
        })
        .map(|c| c.name.clone())
        .collect();
    let ready = if authority.error().is_some() {
        ("False", "PolicyInvalid", "the policy's CA cannot sign".to_string())
    } else if covered.is_empty() {
        ("False", "NoClusters", "no cluster is registered under this policy yet".to_string())
    } else if lagging.is_empty() {
        ("True", "AllClustersReady", format!("{} cluster(s) hold a current intermediate", covered.len()))
    } else {
        ("False", "ClustersNotReady", format!("not ready under the current policy generation: {}", lagging.join(", ")))
    };
    let mut conditions: Vec<Value> = [("Accepted", accepted), ("Ready", ready)]
        .into_iter()
        .map(|(kind, (status, reason, message))| {
            let before = previous["conditions"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["type"] == kind))
                .filter(|c| c["status"] == status)
                .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string));
            json!({
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": before.unwrap_or_else(|| now.to_string()),
                "observedGeneration": generation,
            })
        })
        .collect();
    let (rotation, condition) = root_rotation(st, previous, generation, now);
    conditions.push(condition);

    let mut status = json!({
        "observedGeneration": generation,
        "caMode": st.ca_mode,
        "trustDomain": st.trust_domain,
        "policyGeneration": st.policy_generation,
        "rootSetFingerprint": st.root_set_fingerprint,
        "clusters": clusters,
        "conditions": conditions,
    });
    if let Some(t) = rfc3339(st.root_not_after) {
        status["rootNotAfter"] = json!(t);
    }
    status["rootRotation"] = rotation;
    status
}

/// `status.rootRotation` and the `RootRotation` condition: `True` while a rotation runs, its
/// reason the phase (`Idle` when none), its `lastTransitionTime` when that phase began — every
/// phase change is a transition operators watch (`kubectl wait --for=condition=RootRotation=False`
/// waits for the end of a rotation).
fn root_rotation(st: &MeshStatus, previous: &Value, generation: Option<i64>, now: Timestamp) -> (Value, Value) {
    let r = st.root_rotation.clone().unwrap_or_default();
    let phase = match r.phase() {
        meshca_proto::RotationPhase::Unspecified => meshca_proto::RotationPhase::Idle,
        p => p,
    };
    let running = phase != meshca_proto::RotationPhase::Idle;
    let waiting: Vec<String> = r
        .waiting
        .iter()
        .map(|w| if w.cluster.is_empty() { w.reason.clone() } else { format!("{}: {}", w.cluster, w.reason) })
        .collect();
    let message = if running {
        let what = if waiting.is_empty() { "its next step".to_string() } else { waiting.join("; ") };
        format!(
            "root rotation {} is {}{}; waiting for {what}",
            r.id,
            phase.name(),
            if r.aborted { " (aborted)" } else { "" }
        )
    } else if r.note.is_empty() {
        "no root rotation in progress".to_string()
    } else {
        r.note.clone()
    };
    let before = previous["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == "RootRotation"))
        .filter(|c| c["reason"] == phase.name())
        .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string));
    let since = rfc3339(r.phase_since).or(before).unwrap_or_else(|| now.to_string());
    let condition = json!({
        "type": "RootRotation",
        "status": if running { "True" } else { "False" },
        "reason": phase.name(),
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    });
    let mut rotation = json!({ "phase": phase.name() });
    if let Some(t) = rfc3339(r.phase_since) {
        rotation["phaseSince"] = json!(t);
    }
    if running {
        rotation["id"] = json!(r.id);
        rotation["aborted"] = json!(r.aborted);
        rotation["trigger"] = json!(r.trigger);
        if let Some(t) = rfc3339(r.started_at) {
            rotation["startedAt"] = json!(t);
        }
        if let Some(f) = &r.from {
            rotation["fromRoot"] = json!(f.fingerprint);
        }
        if let Some(t) = &r.to {
            rotation["toRoot"] = json!(t.fingerprint);
        }
        rotation["waitingFor"] = json!(waiting);
        rotation["transitions"] = json!(
            r.transitions
                .iter()
                .filter_map(|t| Some(json!({"phase": t.phase().name(), "at": rfc3339(t.at)?, "note": t.note})))
                .collect::<Vec<_>>()
        );
    }
    (rotation, condition)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meshca_proto::mgmt::{ClusterStatus, ClusterView};

    fn authority() -> Authority {
        use meshca_mgmt::authority::{Capability, Signing};
        use meshca_pki::{CaSigner, KeyAlgorithm, PrivateKey, RootParams, RootSet};
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let signer = CaSigner::new_root(key, &RootParams::new("test"), at).unwrap();
        let roots = RootSet::from_certs(vec![signer.cert().clone()]).unwrap();
        let signing = Signing { signer: std::sync::Arc::new(signer), roots, crl_also: Vec::new() };
        let mut a = Authority::new(
            Policy::generated_default(std::time::Duration::from_secs(3600)),
            Capability::Signing(std::sync::Arc::new(signing)),
            None,
        );
        a.generation = "g1".into();
        a
    }

    fn mesh(phase: &str) -> MeshStatus {
        MeshStatus {
            ca_mode: "generated".into(),
            policy_generation: "g1".into(),
            root_set_fingerprint: "sha256:r".into(),
            clusters: vec![ClusterView {
                name: "c1".into(),
                registered: true,
                enrolled: true,
                connected: true,
                last_seen: 1_700_000_000,
                status: Some(ClusterStatus {
                    phase: phase.parse::<meshca_proto::Phase>().unwrap() as i32,
                    intermediate_serial: "AB".into(),
                    intermediate_not_after: 1_700_003_600,
                    root_set_fingerprint: "sha256:r".into(),
                    policy_generation: "g1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn condition<'a>(st: &'a Value, kind: &str) -> &'a Value {
        st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap()
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let t2 = Timestamp::from_second(1_700_000_200).unwrap();
        let t3 = Timestamp::from_second(1_700_000_300).unwrap();
        let s1 = build_status(&mesh("Renewing"), &authority(), Some(3), &Value::Null, t1);
        assert_eq!(condition(&s1, "Ready")["status"], "False");
        assert_eq!(condition(&s1, "Accepted")["status"], "True");
        assert_eq!(s1["clusters"][0]["intermediateNotAfter"], "2023-11-14T23:13:20Z");
        assert_eq!(s1["clusters"][0].get("lastError"), None, "empty strings are left out");
        assert_eq!(s1["observedGeneration"], 3);

        let s2 = build_status(&mesh("Ready"), &authority(), Some(3), &s1, t2);
        assert_eq!(condition(&s2, "Ready")["status"], "True");
        assert_eq!(condition(&s2, "Ready")["lastTransitionTime"], t2.to_string());
        assert_eq!(condition(&s2, "Accepted")["lastTransitionTime"], t1.to_string(), "Accepted did not flip");

        let s3 = build_status(&mesh("Ready"), &authority(), Some(3), &s2, t3);
        assert_eq!(s3, s2, "nothing changed, nothing to write");

        let broken = Authority {
            capability: meshca_mgmt::authority::Capability::Unavailable {
                reason: "spec.config.secretRef: secret meshca/x: not found".into(),
            },
            ..authority()
        };
        let mut wiring = mesh("Ready");
        if let Some(st) = wiring.clusters[0].status.as_mut() {
            st.foreign_cacerts = true;
            st.istiod = Some(meshca_proto::mgmt::IstiodStatus {
                state: meshca_proto::IstiodState::Forbidden as i32,
                deployment: "istio-system/istiod".into(),
                message: "deployments.apps \"istiod\" is forbidden".into(),
                ..Default::default()
            });
        }
        let sw = build_status(&wiring, &authority(), Some(3), &s3, t3);
        let kinds: Vec<(&Value, &Value)> =
            sw["clusters"][0]["conditions"].as_array().unwrap().iter().map(|c| (&c["type"], &c["reason"])).collect();
        assert_eq!(
            kinds,
            [(&json!("CacertsOwned"), &json!("ForeignCacerts")), (&json!("IstiodWired"), &json!("Forbidden"))]
        );
        assert_eq!(sw["clusters"][0]["istiod"]["state"], "Forbidden");
        assert_eq!(sw["clusters"][0]["istiod"].get("restartedForSerial"), None, "empty strings are left out");

        assert_eq!(condition(&s3, "RootRotation")["status"], "False");
        assert_eq!(condition(&s3, "RootRotation")["reason"], "Idle");
        assert_eq!(s3["rootRotation"]["phase"], "Idle");

        // A rotation in Switching since t2: the condition says so, with the phase's start as its
        // transition time, and the journal of phase changes is in the status.
        let mut rotating = mesh("Ready");
        rotating.root_rotation = Some(meshca_proto::mgmt::RootRotation {
            phase: meshca_proto::RotationPhase::Switching as i32,
            phase_since: 1_700_000_200,
            started_at: 1_700_000_100,
            id: "r1".into(),
            waiting: vec![meshca_proto::mgmt::RotationWait {
                cluster: "c1".into(),
                reason: "an intermediate under B".into(),
            }],
            transitions: vec![
                meshca_proto::mgmt::RotationTransition {
                    phase: meshca_proto::RotationPhase::Distributing as i32,
                    at: 1_700_000_100,
                    note: "started".into(),
                },
                meshca_proto::mgmt::RotationTransition {
                    phase: meshca_proto::RotationPhase::Switching as i32,
                    at: 1_700_000_200,
                    note: "barrier".into(),
                },
            ],
            ..Default::default()
        });
        let s5 = build_status(&rotating, &authority(), Some(3), &s3, t3);
        let c = condition(&s5, "RootRotation");
        assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("True"), Some("Switching")));
        assert_eq!(c["lastTransitionTime"], t2.to_string());
        assert!(c["message"].as_str().unwrap().contains("c1: an intermediate under B"), "{c}");
        assert_eq!(s5["rootRotation"]["transitions"][1]["phase"], "Switching");
        assert_eq!(s5["rootRotation"]["transitions"][0]["at"], t1.to_string());

        let s4 = build_status(&mesh("Ready"), &broken, Some(4), &s3, t3);
        assert_eq!(condition(&s4, "Accepted")["status"], "False");
        assert!(condition(&s4, "Accepted")["message"].as_str().unwrap().contains("spec.config.secretRef"));
        assert_eq!(condition(&s4, "Ready")["reason"], "PolicyInvalid");
    }
}
