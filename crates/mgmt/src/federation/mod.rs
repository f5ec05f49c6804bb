//! SPIFFE federation: the trust domain's bundle, served to other trust domains (SPIRE, other
//! meshes, Istio's `spiffeBundleUrl`) over the SPIFFE bundle endpoint.
//!
//! - [`publish`]: the effective root set as a SPIFFE bundle, with a persisted sequence number
//!   that grows with every change of the root set (so a root rotation propagates).
//! - [`endpoint`]: the HTTPS server (`https_web` or `https_spiffe`) and its serving SVID.
//! - [`fetch`]: the other way: reading a foreign trust domain's bundle from its endpoint, checked,
//!   keeping the last good one.
//! - [`poll`]: the policy's `spec.federation`, polled by the leader; the last good bundles are
//!   stored for the trust streams and the `FederationFailing` alert.
//!
//! The management plane serves one trust domain today (its policy's); what is kept per trust
//! domain (the sequence) is already keyed by it.

pub mod endpoint;
pub mod fetch;
pub mod poll;
pub mod publish;

pub use endpoint::{BundleEndpoint, Profile};
