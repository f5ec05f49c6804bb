//! gRPC definitions. `istio` is Istio's CA API exactly as Istio defines it (the workload CA serves
//! it to stock Istio clients); `mgmt` is meshca's management-plane API. [`identity`] names the
//! control-plane callers; [`text`] makes text received over these APIs safe to print.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all)]

/// Istio's `istio.v1.auth` package.
pub mod istio {
    tonic::include_proto!("istio.v1.auth");
}

/// meshca's `meshca.v1alpha1` package.
pub mod mgmt {
    tonic::include_proto!("meshca.v1alpha1");
}

pub mod identity;
mod names;
pub mod text;

pub use mgmt::{AlertKind, IssueReason, IstiodState, Phase, RotationPhase};
pub use names::UnknownName;
