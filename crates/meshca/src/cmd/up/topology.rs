//! `topology.json`: what scripts and other tools need to drive the demo.

use serde::Serialize;

#[derive(Serialize)]
pub struct Topology {
    /// Each mesh (one RootTrustPolicy each; one unless `--meshes`).
    pub meshes: Vec<TopologyMesh>,
    pub clusters: Vec<TopologyCluster>,
    pub management_plane: TopologyMgmt,
}

/// One mesh.
#[derive(Serialize)]
pub struct TopologyMesh {
    /// Its RootTrustPolicy's name (`meshca status --policy`, `meshca rotate root --policy`).
    pub policy: String,
    pub trust_domain: String,
    /// Its clusters' names.
    pub clusters: Vec<String>,
    /// Its bundle on the SPIFFE bundle endpoint: `<endpoint>/<trust domain>`.
    pub bundle_url: String,
    /// The trust domains it federates with (`--federate`).
    pub federates_with: Vec<String>,
}

#[derive(Serialize)]
pub struct TopologyCluster {
    pub name: String,
    /// Its mesh's policy.
    pub mesh: String,
    pub trust_domain: String,
    pub cacerts_dir: String,
    pub workload_ca: TopologyCa,
    pub token_file: String,
    pub jwt_issuer: String,
    /// Its sample workloads.
    pub workloads: Vec<TopologyWorkload>,
}

/// A sample workload: where it serves mutual TLS, and the file holding its current leaf's chain
/// (rewritten at every renewal).
#[derive(Serialize)]
pub struct TopologyWorkload {
    pub id: String,
    pub address: String,
    pub cert_chain: String,
}

#[derive(Serialize)]
pub struct TopologyCa {
    pub address: String,
    pub ca_file: String,
    pub server_name: String,
    pub metrics: String,
    pub metrics_token_file: String,
}

#[derive(Serialize)]
pub struct TopologyMgmt {
    pub address: String,
    pub credentials: String,
    /// The dashboard's URL (its login token is printed, not written).
    pub dashboard: String,
    /// The SPIFFE bundle endpoint.
    pub bundle_endpoint: TopologyBundle,
}

#[derive(Serialize)]
pub struct TopologyBundle {
    /// `https://<host>:<port>/`.
    pub url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// The serving SVID's SPIFFE ID (`https_spiffe`).
    pub spiffe_id: Option<String>,
    /// With `--federate`: the CA of its `https_web` certificate (PEM file).
    pub ca_file: Option<String>,
}
