//! Fuzzes service-account token parsing: the bearer tokens every caller of the workload CA sends.
//! The first byte picks what the rest is:
//! - even: a whole token, given to the JWT verifier (header, base64, signature, claims) and to the
//!   unverified time-claims reader of the TokenReview path;
//! - odd: a claims payload (JSON or not), signed with a trusted key first, so the claim parsing
//!   and range checks behind the signature check are reached too (huge `exp`, floats, strings).
//!
//! Any panic, hang or sanitizer report is a bug; an accepted token must name a time in range.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshca_workload_ca::authn::{MAX_CLAIM_TIME, read_time_claims};
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE, JwtAuthenticator};

const ISSUER: &str = "https://idp.fuzz";

fn setup() -> &'static (DemoIdp, JwtAuthenticator) {
    static S: OnceLock<(DemoIdp, JwtAuthenticator)> = OnceLock::new();
    S.get_or_init(|| {
        let idp = DemoIdp::generate(ISSUER).expect("idp");
        let clock = meshca_clock::ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let auth = JwtAuthenticator::from_jwks(ISSUER, &idp.jwks_json(), ISTIO_CA_AUDIENCE)
            .expect("jwks")
            .with_clock(clock.shared());
        (idp, auth)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (idp, auth) = setup();
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // A token whose signature verifies, whatever its payload.
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
            let _ = read_time_claims(&format!(
                "e30.{}.c2ln",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rest)
            ));
            return;
        };
        match idp.sign_claims(&claims) {
            Ok(t) => t,
            Err(_) => return,
        }
    };
    let _ = read_time_claims(&token);
    if let Ok(a) = auth.verify(&token) {
        let exp = meshca_clock::unix(a.expires_at);
        assert!((0..=MAX_CLAIM_TIME as i64).contains(&exp), "accepted an expiry out of range: {exp}");
    }
});
