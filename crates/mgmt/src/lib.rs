//! meshca's management plane: it holds the mesh's root of trust (as the RootTrustPolicy says),
//! registers clusters with single-use bootstrap tokens, runs the certificate issuer service that
//! signs cluster intermediates, records what it issued, and answers operators.
#![forbid(unsafe_code)]

pub mod authority;
pub mod castore;
pub mod error;
pub mod metrics;
pub mod ratelimit;
pub mod records;
pub mod relay;
pub mod replica;
pub mod server;
pub mod service;
pub mod status;
pub mod tokens;

pub use error::MgmtError;
pub use server::{ServeWith, ServerOptions, serve, serve_with};
pub use service::Settings;
