//! `spec.federation`: the foreign trust domains whose bundles the management plane fetches from
//! their SPIFFE bundle endpoints and hands to its clusters (docs/federation.md).

use meshca_pki::{RootSet, SpiffeId, TrustDomain};

use crate::doc::FederationDoc;
use crate::{PolicyError, err};

/// The `https_web` profile's name in the policy.
pub const PROFILE_WEB: &str = "https_web";
/// The `https_spiffe` profile's name in the policy.
pub const PROFILE_SPIFFE: &str = "https_spiffe";

/// One foreign trust domain, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// The foreign trust domain (never the mesh's own).
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint, `https://…`.
    pub url: String,
    /// How the endpoint proves itself.
    pub profile: FederationProfile,
}

/// How a foreign bundle endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederationProfile {
    /// `https_web`: a certificate for the URL's host name from one of these CAs.
    Web {
        /// `endpointCa`.
        ca: RootSet,
    },
    /// `https_spiffe`: an SVID with exactly this ID, under the bundle held — at first the
    /// operator's `firstBundle`, checked in full (expiry included) when the management plane
    /// starts polling, since that needs the time.
    Spiffe {
        /// `endpointSpiffeId`.
        endpoint_id: SpiffeId,
        /// `firstBundle`: the trust domain's bundle document (a JWK Set), as given.
        first_bundle: String,
    },
}

/// Validates `spec.federation` for a mesh of trust domain `own`.
pub fn from_docs(docs: &[FederationDoc], own: &TrustDomain) -> Result<Vec<Federation>, PolicyError> {
    let mut out: Vec<Federation> = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        let field = |f: &str| format!("spec.federation[{i}].{f}");
        let trust_domain = TrustDomain::new(&d.trust_domain).map_err(|e| err(&field("trustDomain"), e.to_string()))?;
        if &trust_domain == own {
            return Err(err(
                &field("trustDomain"),
                format!(
                    "{trust_domain} is the mesh's own trust domain: its roots come from this policy, and a foreign \
                     bundle must never vouch for it"
                ),
            ));
        }
        if let Some(j) = out.iter().position(|f| f.trust_domain == trust_domain) {
            return Err(err(
                &field("trustDomain"),
                format!("{trust_domain} is already federated by spec.federation[{j}]; name each trust domain once"),
            ));
        }
        if !d.bundle_endpoint_url.starts_with("https://") || d.bundle_endpoint_url.len() <= "https://".len() {
            return Err(err(
                &field("bundleEndpointUrl"),
                format!("{:?} is not an https:// URL: a bundle is fetched over TLS only", d.bundle_endpoint_url),
            ));
        }
        let only_spiffe = |name: &str, set: bool| {
            if set { Err(err(&field(name), format!("is for the {PROFILE_SPIFFE} profile only"))) } else { Ok(()) }
        };
        let profile = match d.profile.as_str() {
            PROFILE_WEB => {
                only_spiffe("endpointSpiffeId", d.endpoint_spiffe_id.is_some())?;
                only_spiffe("firstBundle", d.first_bundle.is_some())?;
                let pem = d.endpoint_ca.as_deref().ok_or_else(|| {
                    err(
                        &field("endpointCa"),
                        "is required with https_web: the CA certificates (PEM) the endpoint's certificate chains to",
                    )
                })?;
                let ca = RootSet::from_pem(pem.as_bytes()).map_err(|e| err(&field("endpointCa"), e.to_string()))?;
                FederationProfile::Web { ca }
            }
            PROFILE_SPIFFE => {
                if d.endpoint_ca.is_some() {
                    return Err(err(&field("endpointCa"), format!("is for the {PROFILE_WEB} profile only")));
                }
                let id = d.endpoint_spiffe_id.as_deref().ok_or_else(|| {
                    err(
                        &field("endpointSpiffeId"),
                        "is required with https_spiffe: the SPIFFE ID the endpoint presents",
                    )
                })?;
                let endpoint_id: SpiffeId =
                    id.parse().map_err(|e: meshca_pki::SpiffeError| err(&field("endpointSpiffeId"), e.to_string()))?;
                if endpoint_id.trust_domain() != &trust_domain {
                    return Err(err(
                        &field("endpointSpiffeId"),
                        format!("{endpoint_id} is not in trust domain {trust_domain}"),
                    ));
                }
                let first_bundle = d.first_bundle.clone().ok_or_else(|| {
                    err(
                        &field("firstBundle"),
                        "is required with https_spiffe: the trust domain's bundle (JWK Set), obtained out of band, \
                         authenticates the endpoint's first answer",
                    )
                })?;
                serde_json::from_str::<serde_json::Value>(&first_bundle)
                    .ok()
                    .filter(|v| v.get("keys").is_some_and(serde_json::Value::is_array))
                    .ok_or_else(|| {
                        err(&field("firstBundle"), "is not a JWK Set (a JSON object with a \"keys\" array)")
                    })?;
                FederationProfile::Spiffe { endpoint_id, first_bundle }
            }
            other => {
                return Err(err(
                    &field("profile"),
                    format!("{other:?} is not a bundle endpoint profile; use {PROFILE_WEB} or {PROFILE_SPIFFE}"),
                ));
            }
        };
        out.push(Federation { trust_domain, url: d.bundle_endpoint_url.clone(), profile });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use meshca_pki::{CaSigner, KeyAlgorithm, PrivateKey, RootParams};

    use crate::Policy;

    use super::*;

    fn policy(federation: &str) -> Result<Policy, PolicyError> {
        Policy::from_yaml(&format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: p }}\nspec:\n  trustDomain: mesh.example\n  config: {{ generated: {{}} }}\n  federation:\n{federation}"
        ))
    }

    const SPIFFE: &str = r#"  - trustDomain: other.example
    bundleEndpointUrl: https://bundle.other.example:8443/
    profile: https_spiffe
    endpointSpiffeId: spiffe://other.example/meshca/bundle-endpoint
    firstBundle: '{"keys": []}'
"#;

    #[test]
    fn an_https_spiffe_federation_parses() {
        let p = policy(SPIFFE).expect("valid");
        assert_eq!(p.federation.len(), 1);
        let f = &p.federation[0];
        assert_eq!((f.trust_domain.as_str(), f.url.as_str()), ("other.example", "https://bundle.other.example:8443/"));
        match &f.profile {
            FederationProfile::Spiffe { endpoint_id, first_bundle } => {
                assert_eq!(endpoint_id.to_string(), "spiffe://other.example/meshca/bundle-endpoint");
                assert_eq!(first_bundle, r#"{"keys": []}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_https_web_federation_needs_its_ca() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let ca = CaSigner::new_root(
            key,
            &RootParams::new("web"),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000),
        )
        .expect("root");
        let pem = ca.root().to_pem().replace('\n', "\n      ");
        let doc = format!(
            "  - trustDomain: web.example\n    bundleEndpointUrl: https://bundle.web.example/\n    profile: https_web\n    endpointCa: |\n      {pem}\n"
        );
        let p = policy(&doc).expect("valid");
        assert!(matches!(&p.federation[0].profile, FederationProfile::Web { ca } if ca.len() == 1));
        let e = policy("  - { trustDomain: web.example, bundleEndpointUrl: 'https://x/', profile: https_web }\n")
            .expect_err("no CA");
        assert_eq!(e.field, "spec.federation[0].endpointCa");
    }

    #[test]
    fn bad_federations_are_refused_naming_the_field() {
        let cases = [
            (SPIFFE.replace("other.example\n", "mesh.example\n"), "spec.federation[0].trustDomain", "own trust domain"),
            (format!("{SPIFFE}{SPIFFE}"), "spec.federation[1].trustDomain", "already federated by spec.federation[0]"),
            (SPIFFE.replace("https://bundle", "http://bundle"), "spec.federation[0].bundleEndpointUrl", "not an https"),
            (
                SPIFFE.replace("profile: https_spiffe", "profile: https"),
                "spec.federation[0].profile",
                "use https_web or",
            ),
            (
                SPIFFE.replace("spiffe://other.example/meshca", "spiffe://mesh.example/meshca"),
                "spec.federation[0].endpointSpiffeId",
                "not in trust domain other.example",
            ),
            (
                SPIFFE.replace("firstBundle: '{\"keys\": []}'", "firstBundle: '[]'"),
                "spec.federation[0].firstBundle",
                "JWK Set",
            ),
            (
                SPIFFE.replace("    firstBundle: '{\"keys\": []}'\n", ""),
                "spec.federation[0].firstBundle",
                "is required with https_spiffe",
            ),
            (
                SPIFFE.replace("profile: https_spiffe", "profile: https_web"),
                "spec.federation[0].endpointSpiffeId",
                "https_spiffe profile only",
            ),
        ];
        for (doc, field, message) in cases {
            let e = policy(&doc).expect_err(&doc);
            assert_eq!(e.field, field, "{doc}");
            assert!(e.message.contains(message), "{doc}: {}", e.message);
        }
    }
}
