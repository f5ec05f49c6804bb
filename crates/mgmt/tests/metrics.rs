//! The Prometheus metrics of a management plane with two RootTrustPolicies: every mesh's figures
//! carry its policy's name, so one mesh's root expiry, rotation phase and alerts can be told from
//! the other's; a cluster's series names its mesh; an alert of no mesh in particular (a cluster
//! two policies claim) is counted with an empty `policy`.
#![allow(clippy::unwrap_used)]

use meshca_proto::mgmt::{Alert, CertificateSummary, ClusterView, MeshStatus, RootRotation};
use meshca_proto::{AlertKind, RotationPhase};

fn mesh(policy: &str, root_not_after: i64, phase: RotationPhase) -> MeshStatus {
    MeshStatus {
        policy: policy.into(),
        trust_domain: format!("{policy}.example"),
        root_not_after,
        roots: vec![CertificateSummary {
            subject: format!("CN={policy} root"),
            fingerprint: format!("fp-{policy}"),
            not_after: root_not_after,
            ..Default::default()
        }],
        root_rotation: Some(RootRotation { phase: phase as i32, phase_since: 100, ..Default::default() }),
        ..Default::default()
    }
}

#[test]
fn every_mesh_has_its_own_series() {
    let alert = |kind: AlertKind, cluster: &str, policy: &str| Alert {
        kind: kind as i32,
        cluster: cluster.into(),
        message: "m".into(),
        policy: policy.into(),
    };
    let cluster = |name: &str, policy: &str| ClusterView {
        name: name.into(),
        registered: true,
        connected: true,
        policy: policy.into(),
        ..Default::default()
    };
    let st = MeshStatus {
        meshes: vec![mesh("prod", 5_000, RotationPhase::Distributing), mesh("staging", 9_000, RotationPhase::Idle)],
        clusters: vec![cluster("east-1", "prod"), cluster("staging-1", "staging"), cluster("clash", "")],
        alerts: vec![
            alert(AlertKind::ClusterNotReporting, "east-1", "prod"),
            alert(AlertKind::ClusterPolicyConflict, "clash", ""),
        ],
        ..Default::default()
    };
    let text = meshca_mgmt::metrics::render(&st, &meshca_serve::ServeMetrics::default());
    for line in [
        r#"meshca_root_expiry_timestamp_seconds{policy="prod"} 5000"#,
        r#"meshca_root_expiry_timestamp_seconds{policy="staging"} 9000"#,
        r#"meshca_root_rotation_phase{policy="prod",phase="Distributing"} 1"#,
        r#"meshca_root_rotation_phase{policy="prod",phase="Idle"} 0"#,
        r#"meshca_root_rotation_phase{policy="staging",phase="Idle"} 1"#,
        r#"meshca_alerts{kind="ClusterNotReporting",policy="prod"} 1"#,
        r#"meshca_alerts{kind="ClusterNotReporting",policy="staging"} 0"#,
        r#"meshca_alerts{kind="ClusterPolicyConflict",policy=""} 1"#,
        r#"meshca_cluster_connected{cluster="east-1",policy="prod"} 1"#,
        r#"meshca_cluster_connected{cluster="clash",policy=""} 1"#,
        r#"meshca_root_cert_expiry_timestamp_seconds{policy="staging",subject="CN=staging root",fingerprint="fp-staging"} 9000"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
    }
}
