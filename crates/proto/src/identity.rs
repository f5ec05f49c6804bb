//! Control-plane identities: who a caller of the management plane is, as written in the URI SAN
//! of its client certificate (issued by the relay CA, never by the mesh root).

use std::fmt;

/// Trust domain of control-plane identities. Distinct from any mesh trust domain, so a workload
/// leaf can never pass as an agent or an operator.
pub const RELAY_TRUST_DOMAIN: &str = "meshca.internal";

/// A caller of the management plane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The agent of a workload cluster.
    Agent {
        /// The cluster's name.
        cluster: String,
    },
    /// An operator (the CLI).
    Operator {
        /// The operator's name.
        name: String,
    },
}

impl Caller {
    /// The URI SAN for this identity.
    pub fn uri(&self) -> String {
        match self {
            Caller::Agent { cluster } => format!("spiffe://{RELAY_TRUST_DOMAIN}/cluster/{cluster}"),
            Caller::Operator { name } => format!("spiffe://{RELAY_TRUST_DOMAIN}/operator/{name}"),
        }
    }

    /// Parses a URI SAN; `None` for anything that is not a control-plane identity.
    pub fn from_uri(uri: &str) -> Option<Caller> {
        let path = uri.strip_prefix("spiffe://")?.strip_prefix(RELAY_TRUST_DOMAIN)?.strip_prefix('/')?;
        let (kind, name) = path.split_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        match kind {
            "cluster" => Some(Caller::Agent { cluster: name.to_string() }),
            "operator" => Some(Caller::Operator { name: name.to_string() }),
            _ => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Agent { cluster } => write!(f, "agent of cluster {cluster}"),
            Caller::Operator { name } => write!(f, "operator {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_foreign_uris_are_not_callers() {
        for c in [Caller::Agent { cluster: "c-1".into() }, Caller::Operator { name: "admin".into() }] {
            assert_eq!(Caller::from_uri(&c.uri()), Some(c));
        }
        for bad in [
            "spiffe://cluster.local/ns/default/sa/x",
            "spiffe://meshca.internal/cluster/",
            "spiffe://meshca.internal/cluster/a/b",
            "spiffe://meshca.internal.evil/cluster/a",
            "spiffe://meshca.internal/root/a",
        ] {
            assert_eq!(Caller::from_uri(bad), None, "{bad}");
        }
    }
}
