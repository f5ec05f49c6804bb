//! Distinguished names meshca writes into certificates it issues.
//!
//! Names meshca *copies* (an issuer's subject) are never rebuilt: they are carried as the exact DER
//! of the issuer certificate's subject, because Go's crypto/x509 (and so Istio) matches issuer to
//! subject byte for byte. This module only builds the names meshca itself chooses.

use const_oid::ObjectIdentifier;
use const_oid::db::rfc4519;
use der::Encode;
use der::asn1::{Any, Utf8StringRef};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::name::{RdnSequence, RelativeDistinguishedName};

/// A name attribute meshca sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameAttr {
    /// organizationName (O).
    Organization,
    /// commonName (CN).
    CommonName,
    /// localityName (L) — Istio's intermediates carry the cluster name here.
    Locality,
    /// organizationalUnitName (OU).
    OrganizationalUnit,
}

impl NameAttr {
    fn oid(self) -> ObjectIdentifier {
        match self {
            NameAttr::Organization => rfc4519::O,
            NameAttr::CommonName => rfc4519::CN,
            NameAttr::Locality => rfc4519::L,
            NameAttr::OrganizationalUnit => rfc4519::OU,
        }
    }
}

/// Why a name could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A value is empty or longer than the 64 characters X.520 allows for these attributes.
    #[error("name attribute {attr:?} must be 1-64 characters, got {len}")]
    Length {
        /// Which attribute.
        attr: NameAttr,
        /// Its length.
        len: usize,
    },
    /// DER encoding failed.
    #[error("cannot encode name: {0}")]
    Encoding(String),
}

/// Builds a name of single-valued RDNs in the given order, UTF8String values, and returns its DER.
pub fn build_name(attrs: &[(NameAttr, &str)]) -> Result<Vec<u8>, NameError> {
    let enc = |e: der::Error| NameError::Encoding(e.to_string());
    let mut seq = RdnSequence::default();
    for (attr, value) in attrs {
        let len = value.chars().count();
        if len == 0 || len > 64 {
            return Err(NameError::Length { attr: *attr, len });
        }
        let value = Any::encode_from(&Utf8StringRef::new(value).map_err(enc)?).map_err(enc)?;
        let atv = AttributeTypeAndValue { oid: attr.oid(), value };
        let rdn = RelativeDistinguishedName::try_from(vec![atv]).map_err(enc)?;
        seq.push(rdn);
    }
    // An RdnSequence encodes exactly as the Name that wraps it.
    seq.to_der().map_err(enc)
}

/// DER of the empty name (`SEQUENCE {}`), the subject of every workload leaf.
pub const EMPTY_NAME_DER: &[u8] = &[0x30, 0x00];

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;
    use x509_cert::name::Name;

    #[test]
    fn builds_names_in_order_and_refuses_bad_lengths() {
        let der = build_name(&[
            (NameAttr::Organization, "meshca"),
            (NameAttr::CommonName, "meshca intermediate"),
            (NameAttr::Locality, "cluster-1"),
        ])
        .expect("name");
        let name = Name::from_der(&der).expect("decodes");
        // RFC 4514 prints the most specific RDN first.
        assert_eq!(name.to_string(), "L=cluster-1,CN=meshca intermediate,O=meshca");
        assert!(matches!(build_name(&[(NameAttr::CommonName, "")]), Err(NameError::Length { .. })));
        let long = "x".repeat(65);
        assert!(build_name(&[(NameAttr::Locality, &long)]).is_err());
    }
}
