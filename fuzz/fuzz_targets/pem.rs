//! Fuzzes every PEM/DER reader: certificate bundles, root sets, private keys and whole `cacerts`
//! bundles (the input is split into the four files at NUL bytes).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshca_pki::bundle::{BundleFiles, CaBundle};
use meshca_pki::{Cert, PrivateKey, RootSet};

fuzz_target!(|data: &[u8]| {
    let _ = Cert::parse_pem_bundle(data);
    let _ = RootSet::from_pem(data);
    let _ = PrivateKey::from_pem(data);
    let _ = Cert::from_der(data.to_vec());
    let mut parts = data.split(|b| *b == 0);
    let mut next = || parts.next().map(<[u8]>::to_vec).unwrap_or_default();
    let files = BundleFiles { ca_cert: next(), ca_key: next().into(), cert_chain: next(), root_cert: next() };
    let _ = CaBundle::validate(&files, SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
});
