//! `meshca up --meshes N`: N meshes under the one management plane, each a RootTrustPolicy with
//! its own generated root and trust domain, selecting its clusters by label. With `--federate`
//! each policy federates with every other through the management plane's own SPIFFE bundle
//! endpoint (`https://localhost:<port>/<trust domain>`, `https_web` with a certificate `up`
//! makes).
//!
//! With one mesh nothing here applies: `up` runs the embedded default policy (`mesh`, every
//! cluster, `--trust-domain`), exactly as before there could be several.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use meshca_pki::TrustDomain;
use meshca_policy::{
    ClusterSelectorDoc, ConfigDoc, FederationDoc, GeneratedDoc, IntermediateCertOptionsDoc, Metadata, RootRotationDoc,
    RootTrustPolicyDoc, SpecDoc,
};

/// The label `up` puts on each cluster's record (through its bootstrap token) naming its mesh;
/// each policy's `clusterSelector` matches it.
pub const MESH_LABEL: &str = "meshca.io/mesh";

/// One mesh of `up`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPlan {
    /// Its policy's name (`mesh` alone; `mesh-1`, `mesh-2`, … with several).
    pub name: String,
    /// Its trust domain (`--trust-domain` alone; `<name>.<--trust-domain>` with several).
    pub trust_domain: TrustDomain,
    /// Its clusters' numbers (`cluster-<n>`).
    pub clusters: Vec<usize>,
}

impl MeshPlan {
    /// The labels of its clusters' records: none with one mesh (the default policy selects
    /// every cluster), [`MESH_LABEL`] with several.
    pub fn labels(&self, several: bool) -> BTreeMap<String, String> {
        if several { BTreeMap::from([(MESH_LABEL.to_string(), self.name.clone())]) } else { BTreeMap::new() }
    }
}

/// The trust domains `mesh` federates with: every other mesh's with `--federate`, none without.
pub fn federated_with(plans: &[MeshPlan], mesh: &MeshPlan, federate: bool) -> Vec<TrustDomain> {
    if !federate {
        return Vec::new();
    }
    plans.iter().filter(|o| o.name != mesh.name).map(|o| o.trust_domain.clone()).collect()
}

/// Splits clusters `1..=clusters` into `meshes` meshes of consecutive clusters, as even as can be
/// (the first meshes get one more when it does not divide).
pub fn plan(meshes: usize, clusters: usize, trust_domain: &TrustDomain) -> anyhow::Result<Vec<MeshPlan>> {
    anyhow::ensure!(meshes >= 1, "--meshes must be at least 1");
    anyhow::ensure!(
        clusters >= meshes,
        "--clusters {clusters} cannot fill --meshes {meshes}: each mesh needs at least one cluster"
    );
    if meshes == 1 {
        let name = meshca_policy::Policy::generated_default(Duration::ZERO).name;
        return Ok(vec![MeshPlan { name, trust_domain: trust_domain.clone(), clusters: (1..=clusters).collect() }]);
    }
    (1..=meshes)
        .map(|k| {
            let name = format!("mesh-{k}");
            let td = format!("{name}.{trust_domain}");
            let trust_domain =
                TrustDomain::new(&td).with_context(|| format!("mesh {k}'s trust domain {td:?} (--trust-domain)"))?;
            // Cluster i (0-based) is in mesh i * meshes / clusters: consecutive, sizes differing
            // by at most one.
            let clusters = (1..=clusters).filter(|i| (i - 1) * meshes / clusters + 1 == k).collect();
            Ok(MeshPlan { name, trust_domain, clusters })
        })
        .collect()
}

/// What each of several meshes' policy says besides its name, trust domain and clusters: the
/// same lifetimes and rotation options `up`'s flags give the single mesh.
#[derive(Debug, Clone)]
pub struct Options {
    pub root_ttl: Duration,
    pub intermediate_ttl: Duration,
    pub grace_ratio: f64,
    pub root_rotation_ratio: f64,
    pub max_leaf_lifetime: Duration,
    pub rotation_skew: Duration,
}

/// Where each mesh fetches the others' bundles: `<base><trust domain>` (`base` ends in `/`), an
/// `https_web` endpoint whose certificate chains to `endpoint_ca` (PEM).
#[derive(Debug, Clone)]
pub struct Federate {
    pub base: String,
    pub endpoint_ca: String,
}

/// The policy set of several meshes, as YAML documents (what `meshca policy apply` takes): each
/// a generated root, selecting the clusters labelled with its name, and with `federate` naming
/// every other mesh's trust domain.
pub fn policy_set_yaml(plans: &[MeshPlan], o: &Options, federate: Option<&Federate>) -> anyhow::Result<String> {
    let docs: Vec<RootTrustPolicyDoc> = plans
        .iter()
        .map(|p| RootTrustPolicyDoc {
            api_version: meshca_policy::API_VERSION.into(),
            kind: meshca_policy::KIND.into(),
            metadata: Metadata { name: p.name.clone(), ..Metadata::default() },
            spec: SpecDoc {
                trust_domain: Some(p.trust_domain.to_string()),
                clusters: Vec::new(),
                cluster_selector: Some(ClusterSelectorDoc { match_labels: p.labels(true) }),
                config: ConfigDoc {
                    generated: Some(GeneratedDoc { ttl: Some(duration(o.root_ttl)), ..GeneratedDoc::default() }),
                    ..ConfigDoc::default()
                },
                intermediate_cert_options: IntermediateCertOptionsDoc {
                    ttl: Some(duration(o.intermediate_ttl)),
                    secret_rotation_grace_period_ratio: Some(o.grace_ratio),
                    ..IntermediateCertOptionsDoc::default()
                },
                auto_restart_pods: false,
                root_rotation: RootRotationDoc {
                    trigger_ratio: Some(o.root_rotation_ratio),
                    max_leaf_lifetime: Some(duration(o.max_leaf_lifetime)),
                    skew: Some(duration(o.rotation_skew)),
                },
                federation: federate
                    .map(|f| {
                        federated_with(plans, p, true)
                            .iter()
                            .map(|td| FederationDoc {
                                trust_domain: td.to_string(),
                                bundle_endpoint_url: format!("{}{td}", f.base),
                                profile: meshca_policy::federation::PROFILE_WEB.into(),
                                endpoint_ca: Some(f.endpoint_ca.clone()),
                                ..FederationDoc::default()
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            status: None,
        })
        .collect();
    let text = RootTrustPolicyDoc::to_yaml(&docs).context("writing the policy set")?;
    // Through the validation `meshca policy apply` runs, so `up` never starts a set it would refuse.
    meshca_policy::PolicySet::from_yaml(&text).context("the policy set of --meshes")?;
    Ok(text)
}

/// A duration as the policy writes it, exactly: whole seconds compactly (`720h`, `90s`), anything
/// finer in milliseconds.
fn duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { meshca_policy::duration::format(d) } else { format!("{}ms", d.as_millis()) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use meshca_policy::{Assignment, FederationProfile, PolicySet};

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn options() -> Options {
        Options {
            root_ttl: Duration::from_secs(600),
            intermediate_ttl: Duration::from_secs(90),
            grace_ratio: 0.5,
            root_rotation_ratio: 0.3,
            max_leaf_lifetime: Duration::from_secs(30),
            rotation_skew: Duration::from_millis(1500),
        }
    }

    #[test]
    fn one_mesh_is_the_default_policy_over_every_cluster() {
        let p = plan(1, 3, &td()).unwrap();
        assert_eq!(p, [MeshPlan { name: "mesh".into(), trust_domain: td(), clusters: vec![1, 2, 3] }]);
        assert!(p[0].labels(false).is_empty(), "today's clusters carry no label");
    }

    #[test]
    fn clusters_split_into_consecutive_meshes_as_even_as_can_be() {
        let p = plan(2, 4, &td()).unwrap();
        assert_eq!(p[0].clusters, [1, 2]);
        assert_eq!(p[1].clusters, [3, 4]);
        assert_eq!(p[1].trust_domain.as_str(), "mesh-2.cluster.local");
        let p = plan(3, 7, &td()).unwrap();
        let sizes: Vec<usize> = p.iter().map(|m| m.clusters.len()).collect();
        assert_eq!(sizes, [3, 2, 2]);
        assert_eq!(p.iter().flat_map(|m| m.clusters.clone()).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
        let e = plan(3, 2, &td()).unwrap_err().to_string();
        assert!(e.contains("each mesh needs at least one cluster"), "{e}");
    }

    #[test]
    fn the_policy_set_gives_each_mesh_its_clusters_and_the_flags() {
        let plans = plan(2, 4, &td()).unwrap();
        let set = PolicySet::from_yaml(&policy_set_yaml(&plans, &options(), None).unwrap()).unwrap();
        for m in &plans {
            let p = set.get(&m.name).unwrap();
            assert_eq!(p.trust_domain, m.trust_domain);
            assert!(p.federation.is_empty());
            assert_eq!(p.intermediate.ttl, Duration::from_secs(90));
            assert_eq!(p.intermediate.grace_period_ratio, 0.5);
            assert_eq!(p.root_rotation.skew, Duration::from_millis(1500), "sub-second durations are kept");
            assert_eq!(p.root_rotation.max_leaf_lifetime, Duration::from_secs(30));
            assert_eq!(p.root_rotation.trigger_ratio, 0.3);
            assert!(matches!(p.ca, meshca_policy::CaMode::Generated { ttl, .. } if ttl == Duration::from_secs(600)));
            for n in &m.clusters {
                let placed = set.assign(&format!("cluster-{n}"), &m.labels(true));
                assert!(matches!(placed, Assignment::Mesh(q) if q.name == m.name), "cluster-{n}: {placed:?}");
            }
        }
        assert_eq!(set.assign("cluster-1", &BTreeMap::new()), Assignment::Uncovered, "selected by label only");
    }

    #[test]
    fn federating_meshes_name_every_other_trust_domain_at_the_endpoint() {
        let plans = plan(3, 3, &td()).unwrap();
        let key = meshca_pki::PrivateKey::generate(meshca_pki::KeyAlgorithm::EcdsaP256).unwrap();
        let ca = meshca_pki::CaSigner::new_root(key, &meshca_pki::RootParams::new("web"), std::time::SystemTime::now())
            .unwrap();
        let f = Federate { base: "https://localhost:8443/".into(), endpoint_ca: ca.cert().to_pem() };
        let set = PolicySet::from_yaml(&policy_set_yaml(&plans, &options(), Some(&f)).unwrap()).unwrap();
        let p = set.get("mesh-2").unwrap();
        let named: Vec<(&str, &str)> = p.federation.iter().map(|f| (f.trust_domain.as_str(), f.url.as_str())).collect();
        assert_eq!(
            named,
            [
                ("mesh-1.cluster.local", "https://localhost:8443/mesh-1.cluster.local"),
                ("mesh-3.cluster.local", "https://localhost:8443/mesh-3.cluster.local")
            ]
        );
        assert!(matches!(&p.federation[0].profile, FederationProfile::Web { ca: roots } if roots.len() == 1));
    }
}
