//! Fuzzes CSR parsing and verification: the bytes a workload CA and the issuer service accept
//! from the network. Any panic, hang or sanitizer report is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_pki::{CsrPolicy, verify_csr};

fuzz_target!(|data: &[u8]| {
    let _ = verify_csr(data, &CsrPolicy::default());
});
