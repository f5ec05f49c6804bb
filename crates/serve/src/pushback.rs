//! `RESOURCE_EXHAUSTED` that tells the caller when to come back, so that a refused herd spreads
//! its retries instead of returning all at once (or timing out).
//!
//! The hint travels twice: as gRPC's retry pushback trailer [`PUSHBACK_HEADER`]
//! (`grpc-retry-pushback-ms`, which gRPC clients with a retry policy obey, gRFC A6) and as a
//! `google.rpc.RetryInfo` in the status details (`grpc-status-details-bin`, what
//! `status.Details()` in Go and `tonic-types` in Rust read); the message says it in words.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// gRPC's retry pushback trailer: milliseconds the client should wait before retrying.
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// `RESOURCE_EXHAUSTED` with `message` and a retry hint of `retry_after` (at least 1 ms).
pub fn resource_exhausted(message: impl Into<String>, retry_after: Duration) -> Status {
    let retry_after = retry_after.max(Duration::from_millis(1));
    let message = format!("{}; retry in {}", message.into(), words(retry_after));
    let mut status =
        Status::with_error_details(Code::ResourceExhausted, message, ErrorDetails::with_retry_info(Some(retry_after)));
    let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    status.metadata_mut().insert(PUSHBACK_HEADER, MetadataValue::from(ms));
    status
}

/// The retry hint of a status made by [`resource_exhausted`]: the pushback trailer, else the
/// `RetryInfo` detail.
pub fn retry_after(status: &Status) -> Option<Duration> {
    let trailer = status
        .metadata()
        .get(PUSHBACK_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    trailer.or_else(|| status.get_details_retry_info().and_then(|r| r.retry_delay))
}

/// `10s`, `1.5s`, `250ms`.
fn words(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_is_in_the_trailer_the_details_and_the_message() {
        let s = resource_exhausted("the workload CA is busy", Duration::from_millis(1500));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "the workload CA is busy; retry in 1.5s");
        assert_eq!(s.metadata().get(PUSHBACK_HEADER).and_then(|v| v.to_str().ok()), Some("1500"));
        assert_eq!(retry_after(&s), Some(Duration::from_millis(1500)));
        assert_eq!(
            s.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(1500)),
            "RetryInfo in grpc-status-details-bin"
        );
        // A status that crossed the wire keeps both: the trailers are parsed back into metadata.
        let http: http::Response<()> = s.clone().into_http();
        let wire = Status::from_header_map(http.headers()).unwrap_or_else(|| Status::ok(""));
        assert_eq!(wire.code(), Code::ResourceExhausted);
        assert_eq!(retry_after(&wire), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn a_zero_hint_is_raised_to_one_millisecond() {
        assert_eq!(retry_after(&resource_exhausted("busy", Duration::ZERO)), Some(Duration::from_millis(1)));
        assert_eq!(retry_after(&Status::resource_exhausted("no hint")), None);
    }
}
