//! meshca's agent: one per workload cluster.
//!
//! It registers once with a bootstrap token (then reuses its stored identity), generates the
//! cluster's intermediate key in memory, sends only a CSR, and writes `cacerts` through the store
//! in one atomic update after validating it exactly as istiod would. It renews before expiry
//! (and when the policy, the root set or an operator says so), with a new key each time. When the
//! management plane is unreachable it keeps the current `cacerts`, retries with capped
//! exponential backoff and says so; it never deletes or half-writes `cacerts`.
//!
//! - [`plan`]: when to ask for an intermediate, and why (pure).
//! - [`runner`]: the lifecycle as a pure state machine: observations in, effects out.
//! - [`driver`]: the async loop that observes, carries out the effects and reports back.
//! - [`istiod`]: istiod's Deployment — restarts after `cacerts` changes, the Vault agent sidecar
//!   (pure; the driver patches it through [`istiod::IstiodControl`]).
//! - [`cacerts`]: the `cacerts` object held and written; [`identity`]: the agent's own
//!   certificate; [`connection`]: the mTLS channel, replaced when that certificate is renewed;
//!   [`source`]: where intermediates come from (the management plane, or Vault).
#![forbid(unsafe_code)]

pub mod cacerts;
pub mod connection;
pub mod driver;
pub mod federated;
pub mod identity;
pub mod istiod;
pub mod plan;
pub mod runner;
pub mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::time::Duration;

use meshca_clock::SharedClock;
use meshca_pki::BundleError;
use meshca_store::{ObjectKey, StoreError};

pub use driver::{run, run_with};
pub use meshca_store::labels::{ANN_GENERATION, ANN_ISSUED_AT, ANN_ROTATE, ANN_SERIAL, MANAGED_BY};

/// How a call to the management plane failed, for deciding what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The management plane (or the network) is down: retry with backoff.
    Outage,
    /// The management plane is rate-limiting this cluster: retry after the backoff.
    Throttled,
    /// It said no for a reason retrying will not fix by itself.
    Refused,
}

/// What went wrong in the agent. Every variant keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent's identity is missing, corrupt, or could not be obtained.
    #[error("agent identity: {0}")]
    Identity(String),
    /// A call to the management plane failed.
    #[error("management plane {}: {:?}: {}", failure_word(status), status.code(), status.message())]
    Rpc {
        /// The call.
        call: &'static str,
        /// Its status.
        #[source]
        status: tonic::Status,
    },
    /// The intermediate obtained would be refused by istiod.
    #[error("the intermediate obtained is a bundle istiod would refuse: {0}")]
    BadBundle(#[source] BundleError),
    /// The intermediate obtained has a root set that may not follow the current one.
    #[error(transparent)]
    RootTransition(BundleError),
    /// The management plane's answer could not be read.
    #[error("the management plane's answer to {call} is unusable: {reason}")]
    BadAnswer {
        /// The call.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The policy's parameters cannot be used by this agent (e.g. an unknown key algorithm).
    #[error(transparent)]
    Policy(#[from] meshca_policy::PolicyError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// A source other than the management plane (Vault) failed; retried with backoff like any
    /// failed issuance.
    #[error(transparent)]
    Upstream(Box<dyn std::error::Error + Send + Sync>),
}

fn failure_word(s: &tonic::Status) -> &'static str {
    match classify(s.code()) {
        Failure::Outage => "unreachable",
        Failure::Throttled => "rate-limited this cluster",
        Failure::Refused => "refused",
    }
}

fn classify(code: tonic::Code) -> Failure {
    use tonic::Code;
    match code {
        Code::ResourceExhausted => Failure::Throttled,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => Failure::Outage,
        _ => Failure::Refused,
    }
}

impl AgentError {
    /// A failed call to the management plane.
    pub fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> AgentError {
        move |status| AgentError::Rpc { call, status }
    }

    /// How this failure should be handled.
    pub fn failure(&self) -> Failure {
        match self {
            AgentError::Rpc { status, .. } => classify(status.code()),
            _ => Failure::Refused,
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The cluster this agent serves (must match its identity).
    pub cluster: String,
    /// Management plane `host:port`.
    pub server: String,
    /// TLS server name of the management plane.
    pub server_name: String,
    /// Bootstrap token, needed only for the first start.
    pub bootstrap_token: Option<String>,
    /// The relay CA (PEM), needed only for the first start.
    pub relay_ca: Option<Vec<u8>>,
    /// Where `cacerts` goes.
    pub cacerts: ObjectKey,
    /// Where the agent keeps its identity.
    pub identity: ObjectKey,
    /// Take over a `cacerts` meshca did not write.
    pub adopt_existing: bool,
    /// First retry delay.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// The time.
    pub clock: SharedClock,
    /// istiod's Deployment, when the agent manages it (restarts, the Vault agent sidecar).
    pub istiod: Option<std::sync::Arc<dyn istiod::IstiodControl>>,
    /// Stop once the first `cacerts` is written (the Vault agent's init container: istiod then
    /// starts on it instead of a self-signed CA).
    pub once: bool,
}

impl AgentOptions {
    /// Defaults for `cluster` talking to `server`: `istio-system/cacerts`,
    /// `meshca-system/agent-identity`, backoff 1 s → 30 s, the system clock.
    pub fn new(cluster: &str, server: &str) -> Result<Self, AgentError> {
        Ok(AgentOptions {
            cluster: cluster.to_string(),
            server: server.to_string(),
            server_name: "localhost".into(),
            bootstrap_token: None,
            relay_ca: None,
            cacerts: ObjectKey::new("istio-system", "cacerts")?,
            identity: ObjectKey::new("meshca-system", "agent-identity")?,
            adopt_existing: false,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            clock: meshca_clock::system(),
            istiod: None,
            once: false,
        })
    }
}

/// A number in [0, 1) from the system's random source, for spreading retries and renewals.
pub fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
