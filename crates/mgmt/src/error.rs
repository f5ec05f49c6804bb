//! The management plane's errors.

use meshca_store::StoreError;

/// What can go wrong in the management plane. Messages name the object or field at fault and
/// never carry key material or token secrets.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The policy is invalid.
    #[error("policy: {0}")]
    Policy(#[from] meshca_policy::PolicyError),
    /// A secret referenced by the policy is missing or unusable.
    #[error("{field}: secret {secret}: {reason}")]
    Secret {
        /// The policy field that references it.
        field: &'static str,
        /// `namespace/name`.
        secret: String,
        /// What is wrong.
        reason: String,
    },
    /// A PKI operation failed.
    #[error("{0}")]
    Pki(String),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// This replica led and lost its lease: it must stop signing, so the server stops (the
    /// process exits and, restarted, rejoins as a follower).
    #[error("lost the leadership lease ({0}); stopping so that only the new leader signs")]
    LostLeadership(String),
    /// An I/O failure at the edge (credentials files, sockets).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl MgmtError {
    /// Wraps a PKI error with context.
    pub fn pki(context: &str, e: impl std::fmt::Display) -> Self {
        MgmtError::Pki(format!("{context}: {e}"))
    }
}

/// The one mapping from an unexpected failure inside the management plane (the store, the disk,
/// a bug) to what its caller — an agent, an operator, a metrics scraper — is told.
///
/// The detail (file-system paths, store keys, OS errors) goes only to the server's log, under a
/// random error id; the caller gets the id, so an operator can find the log line, and nothing
/// about the server's layout. A full disk is reported as what it is (`UNAVAILABLE`, retryable:
/// agents back off and try again), anything else as `INTERNAL`.
pub fn caller_status(error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    let id = error_id();
    let full = out_of_space(error);
    tracing::error!(error_id = %id, error = %chain(error), out_of_space = full, "internal error; the caller was given only the error id");
    if full {
        tonic::Status::unavailable(format!(
            "the management plane is out of storage space; retry later (error id {id}; the server's log has the details)"
        ))
    } else {
        tonic::Status::internal(format!("internal error (error id {id}; the server's log has the details)"))
    }
}

/// [`caller_status`]'s text for callers that are not gRPC (the metrics endpoint): the message only.
pub fn caller_message(error: &(dyn std::error::Error + 'static)) -> String {
    caller_status(error).message().to_string()
}

/// A short random id that ties what a caller saw to the server's log line.
fn error_id() -> String {
    let mut b = [0u8; 6];
    // The id only correlates log lines; should the random source fail, zeros are still an id.
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

/// Whether an I/O error in `e`'s chain says the disk (or the user's quota) is full.
pub fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
                || matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT)))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The error and its causes on one line, for the log.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // `#[error(transparent)]` and "{path}: {source}" wrappers repeat their cause's text.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(path: &str, kind: std::io::Error) -> meshca_store::StoreError {
        meshca_store::StoreError::Io { path: path.into(), source: kind }
    }

    #[test]
    fn callers_see_an_error_id_and_never_a_path() {
        let full =
            MgmtError::Store(io("/srv/meshca/store/meshca/cluster-x/..v1", std::io::Error::from_raw_os_error(28)));
        let s = caller_status(&full);
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains("out of storage space") && s.message().contains("error id"), "{s:?}");
        assert!(!s.message().contains("/srv"), "{s:?}");

        let other = io("/srv/meshca/store/x", std::io::Error::other("bad sector"));
        let s = caller_status(&other);
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("/srv") && !s.message().contains("sector"), "{s:?}");
        let id = s.message().split("error id ").nth(1).and_then(|r| r.get(..12)).expect("an id");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_ne!(caller_status(&other).message(), s.message(), "a fresh id each time");
    }
}
