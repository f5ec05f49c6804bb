//! istiod's Deployment, patched by the agent (`meshca agent --istiod-deployment`): the restart
//! `kubectl rollout restart` would do, and in Vault mode the Vault agent sidecar with its
//! memory-backed `cacerts` volume. The decisions are the agent's ([`meshca_agent::istiod`]); here
//! are the API calls.
//!
//! Both changes are server-side applies, each with a field manager of its own, so each is one
//! atomic request that owns exactly the fields it sets:
//! - [`RESTART_MANAGER`] owns two pod-template annotations: `kubectl.kubernetes.io/restartedAt`
//!   and `meshca.io/restarted-for` (the intermediate serial). It is forced, as `kubectl rollout
//!   restart` overwrites the annotation whoever set it last.
//! - [`SIDECAR_MANAGER`] owns the sidecar container, its init container twin (which obtains the
//!   first intermediate before istiod starts, so istiod never starts self-signed), their two
//!   volumes, and in istiod's own container one `volumeMount` and the `ROOT_CA_DIR` variable that
//!   points istiod at the memory-backed folder. It is never forced: if any of those fields
//!   belongs to someone else, the API server refuses the whole apply (409) and nothing changes.
//!   Leaving Vault mode applies an empty configuration with the same manager, which removes
//!   exactly what it added.
//!
//! istiod's own `cacerts` volume (the optional Secret Istio's chart mounts at `/etc/cacerts`) is
//! left as it is: two volumes cannot share a mount path, and changing istiod's would touch a field
//! meshca does not own. istiod reads the folder `ROOT_CA_DIR` names instead (Istio's own
//! setting), and the sidecar writes it at `/etc/cacerts` in its own container.

use std::time::SystemTime;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use meshca_agent::istiod::{IstiodControl, Observed, Problem, RESTARTED_AT, RESTARTED_FOR};
use meshca_proto::IstiodState;
use serde_json::{Value, json};

/// The field manager of the restart annotations.
pub const RESTART_MANAGER: &str = "meshca-istiod-restart";
/// The field manager of the Vault agent sidecar.
pub const SIDECAR_MANAGER: &str = "meshca-vault-sidecar";
/// The sidecar container.
pub const SIDECAR: &str = "meshca-vault-agent";
/// The init container that obtains the first intermediate before istiod starts.
pub const INIT: &str = "meshca-vault-init";
/// The memory-backed volume the sidecar writes `cacerts` into.
pub const CACERTS_VOLUME: &str = "meshca-cacerts";
/// The volume holding the sidecar's bootstrap token and relay CA (an optional Secret).
pub const BOOTSTRAP_VOLUME: &str = "meshca-vault-bootstrap";
/// Where the sidecar writes `cacerts`, in its own container.
pub const SIDECAR_CACERTS: &str = "/etc/cacerts";
/// Where istiod reads it (`ROOT_CA_DIR`).
pub const ISTIOD_CACERTS: &str = "/var/run/meshca/cacerts";
/// Where the bootstrap Secret is mounted in the sidecar.
pub const BOOTSTRAP_DIR: &str = "/var/run/meshca/bootstrap";

/// What the Vault agent sidecar is made of; everything but the image and the bootstrap Secret
/// follows from the agent's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSidecar {
    /// The meshca image.
    pub image: String,
    /// The cluster.
    pub cluster: String,
    /// The management plane, `host:port`, and its TLS name.
    pub server: String,
    /// The management plane's TLS server name.
    pub server_name: String,
    /// The Secret (in istiod's namespace) with `token` and `relay-ca.pem` for the sidecar's
    /// registration; optional once the sidecar's identity Secret exists.
    pub bootstrap_secret: String,
    /// The Secret (in istiod's namespace) the sidecar keeps its own identity in.
    pub identity_secret: String,
}

impl VaultSidecar {
    fn args(&self, namespace: &str, once: bool) -> Vec<String> {
        let mut args = vec![
            "vault-agent".to_string(),
            format!("--cluster={}", self.cluster),
            format!("--server={}", self.server),
            format!("--server-name={}", self.server_name),
            "--in-cluster".into(),
            format!("--identity-secret={namespace}/{}", self.identity_secret),
            format!("--memory-dir={SIDECAR_CACERTS}"),
            format!("--token-file={BOOTSTRAP_DIR}/token"),
            format!("--relay-ca={BOOTSTRAP_DIR}/relay-ca.pem"),
        ];
        if once {
            args.push("--once".into());
        }
        args
    }

    fn container(&self, name: &str, namespace: &str, once: bool, run_as: &RunAs) -> Value {
        let mut c = json!({
            "name": name,
            "image": self.image,
            "args": self.args(namespace, once),
            "volumeMounts": [
                { "name": CACERTS_VOLUME, "mountPath": SIDECAR_CACERTS },
                { "name": BOOTSTRAP_VOLUME, "mountPath": BOOTSTRAP_DIR, "readOnly": true },
            ],
            "securityContext": {
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
                "seccompProfile": { "type": "RuntimeDefault" },
            },
            "resources": { "requests": { "cpu": "10m", "memory": "32Mi" }, "limits": { "memory": "128Mi" } },
        });
        if let Some(u) = run_as.user {
            c["securityContext"]["runAsUser"] = json!(u);
        }
        if let Some(g) = run_as.group {
            c["securityContext"]["runAsGroup"] = json!(g);
        }
        c
    }
}

/// The user and group istiod's container runs as, copied to the sidecar: the files it writes
/// are 0600, and istiod must be able to read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunAs {
    /// `runAsUser`.
    pub user: Option<i64>,
    /// `runAsGroup`.
    pub group: Option<i64>,
}

/// istiod's Deployment through the API server.
#[derive(Clone)]
pub struct KubeIstiod {
    api: Api<Deployment>,
    namespace: String,
    name: String,
    /// istiod's own container (`discovery` in Istio's charts).
    container: String,
    sidecar: Option<VaultSidecar>,
}

impl std::fmt::Debug for KubeIstiod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KubeIstiod({}/{})", self.namespace, self.name)
    }
}

impl KubeIstiod {
    /// The Deployment `namespace/name` whose istiod container is `container`; `sidecar` is what
    /// to add in Vault mode (`None`: Vault mode is refused with a clear message).
    pub fn new(client: Client, namespace: &str, name: &str, container: &str, sidecar: Option<VaultSidecar>) -> Self {
        KubeIstiod {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            container: container.into(),
            sidecar,
        }
    }

    fn problem(&self, what: &str, e: kube::Error) -> Problem {
        let (state, message) = match crate::api_status(&e) {
            Some((404, m)) => (IstiodState::NotFound, m),
            Some((403, m)) => (
                IstiodState::Forbidden,
                format!("{m} (grant the agent get and patch on this Deployment: the chart's istiod.manage)"),
            ),
            Some((409, m)) => (
                IstiodState::Conflict,
                format!("{m} (another field manager owns a field meshca would set; nothing was applied)"),
            ),
            Some((code, m)) => (IstiodState::Failed, format!("API server answered {code}: {m}")),
            None => (IstiodState::Failed, e.to_string()),
        };
        Problem { state, message: format!("{what} {}/{}: {message}", self.namespace, self.name) }
    }

    fn apply_params(manager: &str, force: bool) -> PatchParams {
        let p = PatchParams::apply(manager);
        if force { p.force() } else { p }
    }

    /// The sidecar's configuration for this Deployment (what [`IstiodControl::sidecar`] applies),
    /// running as `run_as` (istiod's container's user and group).
    pub fn sidecar_config(&self, sidecar: &VaultSidecar, run_as: &RunAs) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": self.name, "namespace": self.namespace },
            "spec": { "template": { "spec": {
                "initContainers": [ sidecar.container(INIT, &self.namespace, true, run_as) ],
                // istiod's container first: the merged list keeps its order, the sidecar after it.
                "containers": [
                    {
                        "name": self.container,
                        "env": [ { "name": "ROOT_CA_DIR", "value": ISTIOD_CACERTS } ],
                        "volumeMounts": [ { "name": CACERTS_VOLUME, "mountPath": ISTIOD_CACERTS, "readOnly": true } ],
                    },
                    sidecar.container(SIDECAR, &self.namespace, false, run_as),
                ],
                "volumes": [
                    // In memory only: the intermediate's key never reaches a disk (docs/vault.md).
                    { "name": CACERTS_VOLUME, "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } },
                    { "name": BOOTSTRAP_VOLUME, "secret": { "secretName": sidecar.bootstrap_secret, "optional": true } },
                ],
            } } },
        })
    }

    fn empty_config(&self) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": self.name, "namespace": self.namespace },
        })
    }
}

fn observed(d: &Deployment) -> Observed {
    let template = d.spec.as_ref().map(|s| &s.template);
    let restarted_for = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(RESTARTED_FOR).cloned());
    let sidecar =
        template.and_then(|t| t.spec.as_ref()).is_some_and(|s| s.containers.iter().any(|c| c.name == SIDECAR));
    Observed { restarted_for, sidecar }
}

#[async_trait::async_trait]
impl IstiodControl for KubeIstiod {
    fn deployment(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn read(&self) -> Result<Option<Observed>, Problem> {
        match self.api.get_opt(&self.name).await {
            Ok(d) => Ok(d.as_ref().map(observed)),
            Err(e) => Err(self.problem("reading", e)),
        }
    }

    async fn restart(&self, serial: &str, at: SystemTime) -> Result<(), Problem> {
        let at = k8s_openapi::jiff::Timestamp::try_from(at)
            .map(|t| t.to_string())
            .map_err(|e| Problem { state: IstiodState::Failed, message: format!("the restart time: {e}") })?;
        let config = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": self.name, "namespace": self.namespace },
            "spec": { "template": { "metadata": { "annotations": { RESTARTED_AT: at, RESTARTED_FOR: serial } } } },
        });
        self.api
            .patch(&self.name, &Self::apply_params(RESTART_MANAGER, true), &Patch::Apply(&config))
            .await
            .map(drop)
            .map_err(|e| self.problem("restarting", e))
    }

    async fn sidecar(&self, present: bool) -> Result<(), Problem> {
        let config = match (present, &self.sidecar) {
            (false, _) => self.empty_config(),
            (true, None) => {
                return Err(Problem {
                    state: IstiodState::Failed,
                    message: "the policy is in Vault mode but the agent has no --vault-agent-image to add the Vault agent sidecar to istiod"
                        .into(),
                });
            }
            (true, Some(s)) => {
                // istiod's own container must be there: applying to a name that is not would add
                // an incomplete container (and the API server would refuse the Deployment).
                let d = self.api.get(&self.name).await.map_err(|e| self.problem("reading", e))?;
                let istiod = d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|s| s.containers.iter().find(|c| c.name == self.container));
                let Some(istiod) = istiod else {
                    return Err(Problem {
                        state: IstiodState::NotFound,
                        message: format!(
                            "Deployment {}/{} has no container {:?} (set the agent's --istiod-container)",
                            self.namespace, self.name, self.container
                        ),
                    });
                };
                let sc = istiod.security_context.as_ref();
                let run_as = RunAs { user: sc.and_then(|c| c.run_as_user), group: sc.and_then(|c| c.run_as_group) };
                self.sidecar_config(s, &run_as)
            }
        };
        let d = self
            .api
            .patch(&self.name, &Self::apply_params(SIDECAR_MANAGER, false), &Patch::Apply(&config))
            .await
            .map_err(|e| {
            self.problem(
                if present { "adding the Vault agent sidecar to" } else { "removing the Vault agent sidecar from" },
                e,
            )
        })?;
        tracing::debug!(resource_version = ?d.resource_version(), "istiod Deployment applied");
        Ok(())
    }
}
