//! Fuzzes SPIFFE bundle parsing: the document a management plane fetches from another trust
//! domain's bundle endpoint (untrusted until it parses and checks). Any panic, hang or sanitizer
//! report is a bug.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use meshca_pki::TrustDomain;
use meshca_spiffe_bundle::Bundle;

fuzz_target!(|data: &[u8]| {
    let Ok(td) = TrustDomain::new("example.org") else { return };
    let _ = Bundle::parse(data, &td, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
});
