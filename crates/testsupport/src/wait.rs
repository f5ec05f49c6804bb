//! Polling until something a test waits for is true, with a deadline and a message naming what
//! never happened.
//!
//! Tests that drive real processes cannot be told when something happened, so they look every
//! [`POLL`]. Tests of in-process logic should use a manual clock instead of these.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the helpers look.
pub const POLL: Duration = Duration::from_millis(100);

/// Calls `f` every [`POLL`] until it returns `Some`, and returns that; panics naming `what` when
/// `timeout` passes first.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// Calls `f` every [`POLL`] until it is true; panics naming `what` when `timeout` passes first.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    wait_for(timeout, what, || f().then_some(()))
}

/// [`wait_for`] for async conditions (inside a tokio runtime; sleeps with `tokio::time`).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// A JSON file's content; `None` while it is missing or half-written (for files a process
/// rewrites, such as `meshca up`'s `topology.json` and `status.json`).
pub fn json_file(path: &std::path::Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_first_value_and_times_out_naming_what() {
        let mut n = 0;
        assert_eq!(wait_for(Duration::from_secs(5), "n to reach 3", || (n += 1, n >= 3).1.then_some(n)), 3);
        let err = std::panic::catch_unwind(|| wait_until(Duration::ZERO, "nothing", || false)).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("waiting for nothing"), "{msg}");
    }
}
