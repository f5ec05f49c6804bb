//! meshca's management plane: it holds the mesh's root of trust (as the RootTrustPolicy says),
//! registers clusters with single-use bootstrap tokens, runs the certificate issuer service that
//! signs cluster intermediates, records what it issued, and answers operators.
//!
//! - [`authority`]: what the management plane can do under the policy in force
//!   ([`authority::Capability`]: sign, leave it to Vault, or nothing and why); [`loader`] keeps it
//!   current as the policy and its secrets change.
//! - [`issuer`]: the certificate issuer as a domain service ([`issuer::Issuer::issue`]); the
//!   gRPC layer ([`grpc`], [`registration`], [`operator`]) authenticates and translates.
//! - [`identities`]: which agent and operator certificates are accepted (the current identity,
//!   its predecessor for a short overlap, never a revoked or removed one); [`operators`]: operator
//!   credentials, reused while valid and revocable; [`removal`]: `meshca cluster remove`.
//! - [`revocation`]: `meshca revoke` and the CRL the management plane publishes (re-signed
//!   before its nextUpdate, derived from the records).
//! - [`audit`]: the hash-chained audit log of every trust-changing action.
//! - [`report`]: what is accepted from an agent's status report (validated, escaped, bounded).
//! - [`records`], [`tokens`], [`castore`], [`relay`]: what is kept in the store.
//! - [`rotation`]: root rotation, gated on every cluster's reports ([`convergence`], the
//!   reusable barrier); its controller turns the loader's authority into the *effective* one
//!   (the signer and root set of the rotation's phase) that everything else reads.
//! - [`error`]: the errors, and the one mapping from an internal failure to what a caller sees
//!   ([`error::caller_status`]: an error id, never a path).
//! - [`federation`]: the SPIFFE bundle endpoint, serving the root set to other trust domains
//!   with a sequence number that follows the root rotation.
//! - [`status`], [`metrics`], [`dashboard`]: what operators see; [`replica`]: several replicas,
//!   one leader.
//! - [`server`]: the wiring, with every task supervised.
#![forbid(unsafe_code)]
// `status::document` builds one large `json!` literal (its per-cluster object has many fields).
#![recursion_limit = "256"]

pub mod audit;
pub mod authority;
pub mod castore;
pub mod convergence;
pub mod dashboard;
pub mod error;
pub mod federation;
pub mod grpc;
pub mod identities;
pub mod issuer;
pub mod loader;
pub mod meshes;
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod ratelimit;
pub mod records;
pub mod registration;
pub mod relay;
pub mod removal;
pub mod replica;
pub mod report;
pub mod revocation;
pub mod rotation;
pub mod server;
pub mod status;
pub mod tokens;

pub use dashboard::DashboardListener;
pub use error::MgmtError;
pub use federation::BundleEndpoint;
pub use grpc::Settings;
pub use server::{ServeWith, ServerOptions, serve, serve_with};
