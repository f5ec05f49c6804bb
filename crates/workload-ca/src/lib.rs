//! meshca's workload CA: istiod's CA role. It serves Istio's `CreateCertificate` API, authenticates
//! callers by their service-account token, signs SPIFFE leaves from the cluster intermediate in
//! `cacerts`, and picks up a rotated intermediate without a restart.
#![forbid(unsafe_code)]

pub mod authn;
pub mod ca;
pub mod idp;
pub mod metrics;
pub mod server;
pub mod service;

pub use authn::{Authenticator, CachingAuthenticator, Caller, ISTIO_CA_AUDIENCE, JwtAuthenticator};
pub use idp::DemoIdp;
pub use metrics::Metrics;
pub use server::{Options, serve};
pub use service::TtlPolicy;
