//! Compiles the protos with protox (pure Rust), so no `protoc` binary is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/istio/v1/auth/ca.proto", "proto/meshca/v1alpha1/mgmt.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // The shared vocabulary is also what the management plane's records and the Kubernetes status
    // store: serde names are the variant names ("Ready", "PolicyInvalid"), as they were stored
    // when these were strings.
    let mut config = tonic_prost_build::configure();
    for e in ["KeyAlgorithm", "IssueReason", "Phase", "AlertKind", "IstiodState", "RotationPhase"] {
        config =
            config.enum_attribute(format!(".meshca.v1alpha1.{e}"), "#[derive(serde::Serialize, serde::Deserialize)]");
    }
    config.compile_fds(fds)?;
    Ok(())
}
