//! SPIFFE identities as types: a trust domain and a workload ID parse from, and print to, their
//! URI form, so nothing downstream handles identities as loose strings.

use std::fmt;
use std::str::FromStr;

/// Why a trust domain or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The URI does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain has characters outside `[a-z0-9.-_]`, or is empty or too long.
    #[error("invalid trust domain {0:?}: use 1-255 lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// A path segment is empty, `.`/`..`, or has characters outside `[A-Za-z0-9.-_]`.
    #[error("invalid SPIFFE path {0:?}: segments must be non-empty [A-Za-z0-9.-_], not '.' or '..'")]
    Path(String),
    /// The ID is longer than the 2048 bytes SPIFFE allows.
    #[error("SPIFFE ID longer than 2048 bytes")]
    TooLong,
    /// The ID is not of the Istio workload form `ns/<namespace>/sa/<service-account>`.
    #[error("{0} is not an Istio workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NotWorkload(String),
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates and wraps a trust-domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeError> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok { Ok(TrustDomain(name.to_string())) } else { Err(SpiffeError::TrustDomain(name.to_string())) }
    }

    /// The trust-domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<trust-domain>`, the URI a cluster intermediate carries.
    pub fn uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// A SPIFFE ID with a non-empty path, e.g. `spiffe://cluster.local/ns/default/sa/sleep`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl SpiffeId {
    /// Builds an ID from a trust domain and a path (without the leading `/`).
    pub fn new(trust_domain: TrustDomain, path: &str) -> Result<Self, SpiffeError> {
        if !path.split('/').all(valid_segment) {
            return Err(SpiffeError::Path(path.to_string()));
        }
        if "spiffe://".len() + trust_domain.0.len() + 1 + path.len() > 2048 {
            return Err(SpiffeError::TooLong);
        }
        Ok(SpiffeId { trust_domain, path: path.to_string() })
    }

    /// The Istio workload identity `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, SpiffeError> {
        for part in [namespace, service_account] {
            if !valid_segment(part) {
                return Err(SpiffeError::Path(part.to_string()));
            }
        }
        SpiffeId::new(trust_domain.clone(), &format!("ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path without the leading `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service_account)` when this is an Istio workload identity.
    pub fn workload_parts(&self) -> Result<(&str, &str), SpiffeError> {
        let parts: Vec<&str> = self.path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Ok((ns, sa)),
            _ => Err(SpiffeError::NotWorkload(self.to_string())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(SpiffeError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeError::Scheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| SpiffeError::Path(String::new()))?;
        SpiffeId::new(TrustDomain::new(td)?, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn workload_ids_round_trip_and_split() {
        let td = TrustDomain::new("cluster.local").expect("td");
        let id = SpiffeId::workload(&td, "default", "sleep").expect("id");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        let back: SpiffeId = id.to_string().parse().expect("parse");
        assert_eq!(back, id);
        assert_eq!(back.workload_parts().expect("workload"), ("default", "sleep"));
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        assert!(matches!("https://x/y".parse::<SpiffeId>(), Err(SpiffeError::Scheme(_))));
        assert!(matches!("spiffe://UPPER/x".parse::<SpiffeId>(), Err(SpiffeError::TrustDomain(_))));
        assert!(matches!("spiffe://td/a//b".parse::<SpiffeId>(), Err(SpiffeError::Path(_))));
        assert!(matches!("spiffe://td/a/../b".parse::<SpiffeId>(), Err(SpiffeError::Path(_))));
        assert!(matches!("spiffe://td".parse::<SpiffeId>(), Err(SpiffeError::Path(_))));
        let td = TrustDomain::new("td").expect("td");
        assert!(SpiffeId::workload(&td, "a/b", "sa").is_err());
        let not_wl: SpiffeId = "spiffe://td/cluster/one".parse().expect("parse");
        assert!(matches!(not_wl.workload_parts(), Err(SpiffeError::NotWorkload(_))));
    }

    proptest! {
        #[test]
        fn any_valid_workload_round_trips(ns in "[a-z0-9][a-z0-9-]{0,20}", sa in "[a-z0-9][a-z0-9.-]{0,20}") {
            prop_assume!(sa != "." && sa != "..");
            let td = TrustDomain::new("example.org").expect("td");
            let id = SpiffeId::workload(&td, &ns, &sa).expect("valid");
            let back: SpiffeId = id.to_string().parse().expect("round trip");
            prop_assert_eq!(back.workload_parts().expect("wl"), (ns.as_str(), sa.as_str()));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,100}") {
            let _ = s.parse::<SpiffeId>();
        }
    }
}
