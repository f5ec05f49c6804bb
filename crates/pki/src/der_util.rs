//! Small DER and PEM helpers shared by the certificate and CSR code.
//!
//! Certificates and CSRs share one outer shape, `SEQUENCE { tbs, signatureAlgorithm, signature }`.
//! Signatures must be checked over the *original* bytes of `tbs`, so [`split_signed`] slices them
//! out of the input instead of re-encoding a parsed structure.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912;
use der::asn1::{BitStringRef, ObjectIdentifier as Oid};
use der::{Decode, Reader, SliceReader, Tagged};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

use crate::key::{Curve, PublicKeyKind};

/// `AlgorithmIdentifier` for ecdsa-with-SHA256 (no parameters).
pub(crate) const ALG_ECDSA_SHA256: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// `AlgorithmIdentifier` for ecdsa-with-SHA384 (no parameters).
pub(crate) const ALG_ECDSA_SHA384: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
/// `AlgorithmIdentifier` for sha256WithRSAEncryption (NULL parameters).
pub(crate) const ALG_RSA_SHA256: &[u8] =
    &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00];

const OID_SECP256K1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.10");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_ED448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.113");
const OID_ECDSA_SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");
const OID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");

/// The three parts of a signed structure (certificate, CSR, CRL).
pub(crate) struct Signed<'a> {
    /// The complete TLV of the signed body, exactly as in the input.
    pub tbs: &'a [u8],
    /// The outer signature algorithm.
    pub algorithm: AlgorithmIdentifierRef<'a>,
    /// The signature bits.
    pub signature: &'a [u8],
}

/// Splits a DER signed structure into its parts; rejects trailing bytes.
pub(crate) fn split_signed(der: &[u8]) -> Result<Signed<'_>, der::Error> {
    let mut reader = SliceReader::new(der)?;
    let signed = reader.sequence(|r| {
        let tbs = r.tlv_bytes()?;
        let algorithm = AlgorithmIdentifierRef::decode(r)?;
        let sig = BitStringRef::decode(r)?;
        let signature = sig.as_bytes().ok_or_else(|| der::Tag::BitString.value_error())?;
        Ok::<_, der::Error>(Signed { tbs, algorithm, signature })
    })?;
    reader.finish()?;
    Ok(signed)
}

/// Assembles `SEQUENCE { tbs, algorithm, BIT STRING signature }` from already-encoded parts.
pub(crate) fn assemble_signed(tbs: &[u8], algorithm: &[u8], signature: &[u8]) -> Result<Vec<u8>, der::Error> {
    let mut bitstring = Vec::with_capacity(signature.len() + 6);
    bitstring.push(0x03);
    encode_len(&mut bitstring, signature.len() + 1);
    bitstring.push(0); // no unused bits
    bitstring.extend_from_slice(signature);

    let body_len = tbs.len() + algorithm.len() + bitstring.len();
    let mut out = Vec::with_capacity(body_len + 6);
    out.push(0x30);
    encode_len(&mut out, body_len);
    out.extend_from_slice(tbs);
    out.extend_from_slice(algorithm);
    out.extend_from_slice(&bitstring);
    Ok(out)
}

/// DER definite-length encoding.
fn encode_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// Why a public key is not one meshca can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    /// An EC key on a curve other than P-256/P-384.
    #[error("unsupported elliptic curve {0} (only P-256 and P-384 are accepted)")]
    UnsupportedCurve(String),
    /// A key type meshca never accepts.
    #[error("unsupported key type {0} (only ECDSA P-256/P-384 and RSA are accepted)")]
    UnsupportedKeyType(String),
    /// The key bytes do not parse.
    #[error("malformed public key: {0}")]
    Malformed(String),
}

/// Classifies a `SubjectPublicKeyInfo`.
pub(crate) fn public_key_kind(spki: &SubjectPublicKeyInfoRef<'_>) -> Result<PublicKeyKind, PublicKeyError> {
    let oid = spki.algorithm.oid;
    if oid == rfc5912::ID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<Oid>().ok())
            .ok_or_else(|| PublicKeyError::Malformed("EC key without a named curve".into()))?;
        let (curve, point_len) = if curve == rfc5912::SECP_256_R_1 {
            (Curve::P256, 65)
        } else if curve == rfc5912::SECP_384_R_1 {
            (Curve::P384, 97)
        } else if curve == OID_SECP256K1 {
            return Err(PublicKeyError::UnsupportedCurve("secp256k1".into()));
        } else {
            return Err(PublicKeyError::UnsupportedCurve(oid_name(&curve)));
        };
        let point = spki.subject_public_key.raw_bytes();
        if point.len() != point_len || point[0] != 0x04 {
            return Err(PublicKeyError::Malformed(format!(
                "{curve} public key is not an uncompressed point of {point_len} bytes"
            )));
        }
        Ok(PublicKeyKind::Ec(curve))
    } else if oid == rfc5912::RSA_ENCRYPTION {
        let bits = signature::RsaParameters::public_modulus_len(spki.subject_public_key.raw_bytes())
            .map_err(|_| PublicKeyError::Malformed("RSA public key does not parse".into()))?;
        Ok(PublicKeyKind::Rsa { bits: bits as usize })
    } else if oid == OID_ED25519 {
        Err(PublicKeyError::UnsupportedKeyType("Ed25519".into()))
    } else if oid == OID_ED448 {
        Err(PublicKeyError::UnsupportedKeyType("Ed448".into()))
    } else if oid == OID_RSASSA_PSS {
        Err(PublicKeyError::UnsupportedKeyType("RSASSA-PSS".into()))
    } else {
        Err(PublicKeyError::UnsupportedKeyType(oid_name(&oid)))
    }
}

/// The public exponent of an RSA `SubjectPublicKeyInfo`, as big-endian bytes without leading
/// zeros (`RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`, RFC 8017).
pub(crate) fn rsa_public_exponent(spki: &SubjectPublicKeyInfoRef<'_>) -> Result<Vec<u8>, PublicKeyError> {
    Ok(rsa_public_key(spki)?.public_exponent.as_bytes().to_vec())
}

#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

fn rsa_public_key<'a>(spki: &SubjectPublicKeyInfoRef<'a>) -> Result<RsaPublicKey<'a>, PublicKeyError> {
    let bytes = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| PublicKeyError::Malformed("RSA public key is not a whole number of bytes".into()))?;
    RsaPublicKey::from_der(bytes).map_err(|e| PublicKeyError::Malformed(format!("RSA public key: {e}")))
}

/// A readable name for an OID: its registered name where known, else the dotted form.
pub(crate) fn oid_name(oid: &ObjectIdentifier) -> String {
    const_oid::db::DB.by_oid(oid).map(str::to_string).unwrap_or_else(|| oid.to_string())
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature algorithm is not one meshca accepts.
    #[error("unsupported signature algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// SHA-1 and MD5 signatures are refused outright.
    #[error("weak signature algorithm {0} is refused")]
    Weak(String),
    /// The algorithm does not fit the key (e.g. an ECDSA signature for an RSA key).
    #[error("signature algorithm {alg} does not match a {key} key")]
    KeyMismatch {
        /// Signature algorithm.
        alg: String,
        /// Key kind.
        key: PublicKeyKind,
    },
    /// The signature is wrong.
    #[error("the signature does not verify")]
    Invalid,
}

/// Verifies `signature` over `message` made with the key in `spki`.
pub(crate) fn verify_signature(
    spki: &SubjectPublicKeyInfoRef<'_>,
    key: PublicKeyKind,
    algorithm: &AlgorithmIdentifierRef<'_>,
    message: &[u8],
    sig: &[u8],
) -> Result<(), SignatureError> {
    let alg = algorithm.oid;
    let mismatch = || SignatureError::KeyMismatch { alg: oid_name(&alg), key };
    let verifier: &'static dyn VerificationAlgorithm = match key {
        PublicKeyKind::Ec(curve) => {
            // ECDSA signature algorithms carry no parameters (RFC 5758 §3.2).
            if algorithm.parameters.is_some() {
                return Err(SignatureError::UnsupportedAlgorithm(format!("{} with parameters", oid_name(&alg))));
            }
            match (alg, curve) {
                (rfc5912::ECDSA_WITH_SHA_256, Curve::P256) => &signature::ECDSA_P256_SHA256_ASN1,
                (rfc5912::ECDSA_WITH_SHA_384, Curve::P256) => &signature::ECDSA_P256_SHA384_ASN1,
                (rfc5912::ECDSA_WITH_SHA_256, Curve::P384) => &signature::ECDSA_P384_SHA256_ASN1,
                (rfc5912::ECDSA_WITH_SHA_384, Curve::P384) => &signature::ECDSA_P384_SHA384_ASN1,
                (rfc5912::ECDSA_WITH_SHA_512, Curve::P384) => &signature::ECDSA_P384_SHA512_ASN1,
                (rfc5912::ECDSA_WITH_SHA_512, Curve::P256) => &signature::ECDSA_P256_SHA512_ASN1,
                (OID_ECDSA_SHA1, _) => return Err(SignatureError::Weak(oid_name(&alg))),
                (a, _) if is_rsa_sig(&a) => return Err(mismatch()),
                _ => return Err(SignatureError::UnsupportedAlgorithm(oid_name(&alg))),
            }
        }
        PublicKeyKind::Rsa { .. } => {
            // RFC 4055: these algorithms take NULL parameters; absent is tolerated as many
            // encoders omit it.
            if let Some(p) = &algorithm.parameters
                && p.tag() != der::Tag::Null
            {
                return Err(SignatureError::UnsupportedAlgorithm(format!(
                    "{} with non-NULL parameters",
                    oid_name(&alg)
                )));
            }
            match alg {
                rfc5912::SHA_256_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA256,
                rfc5912::SHA_384_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA384,
                rfc5912::SHA_512_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA512,
                rfc5912::SHA_1_WITH_RSA_ENCRYPTION | rfc5912::MD_5_WITH_RSA_ENCRYPTION => {
                    return Err(SignatureError::Weak(oid_name(&alg)));
                }
                OID_RSASSA_PSS => return Err(SignatureError::UnsupportedAlgorithm("RSASSA-PSS".into())),
                a if is_ecdsa_sig(&a) => return Err(mismatch()),
                _ => return Err(SignatureError::UnsupportedAlgorithm(oid_name(&alg))),
            }
        }
    };
    UnparsedPublicKey::new(verifier, spki.subject_public_key.raw_bytes())
        .verify(message, sig)
        .map_err(|_| SignatureError::Invalid)
}

fn is_rsa_sig(oid: &ObjectIdentifier) -> bool {
    oid.as_bytes().starts_with(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01])
}

fn is_ecdsa_sig(oid: &ObjectIdentifier) -> bool {
    oid.as_bytes().starts_with(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04])
}

/// Encodes DER as PEM with LF line endings.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    // Encoding into a String cannot fail for a valid label and in-memory input.
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// Iterates over the PEM blocks in `input` as `(label, der)`, failing on the first malformed one.
pub(crate) fn pem_blocks(input: &[u8]) -> Result<Vec<(String, Vec<u8>)>, der::pem::Error> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    let mut blocks = Vec::new();
    let mut rest = input;
    while let Some(start) = find(rest, BEGIN) {
        let after = &rest[start..];
        let end_marker = find(after, END).ok_or(der::pem::Error::PostEncapsulationBoundary)?;
        // The END line runs to the next "-----" after "-----END <label>".
        let tail = &after[end_marker + END.len()..];
        let close = find(tail, b"-----").ok_or(der::pem::Error::PostEncapsulationBoundary)?;
        let block_len = end_marker + END.len() + close + 5;
        let block = &after[..block_len];
        let (label, der) = match rewrapped(block) {
            Some(canonical) => der::pem::decode_vec(canonical.as_bytes()).map(|(l, d)| (l.to_string(), d))?,
            None => der::pem::decode_vec(block).map(|(l, d)| (l.to_string(), d))?,
        };
        blocks.push((label, der));
        rest = &after[block_len..];
    }
    Ok(blocks)
}

/// The block with its base64 body re-wrapped at 64 columns, LF line endings. RFC 7468 (§2)
/// lets generators choose other line lengths (76 is common: MIME's) and asks parsers to accept
/// them, but the `der` crate's decoder insists on 64. `None` when the block is not a plain
/// BEGIN / base64 / END block (e.g. it carries RFC 1421 headers): the strict decoder then gives
/// its own precise error.
fn rewrapped(block: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(block).ok()?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let begin = lines.next()?;
    let mut body: Vec<&str> = lines.collect();
    let end = body.pop()?;
    if !begin.starts_with("-----BEGIN ") || !end.starts_with("-----END ") {
        return None;
    }
    let b64: String = body.concat().chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if !b64.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) {
        return None;
    }
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + begin.len() + end.len() + 4);
    out.push_str(begin);
    out.push('\n');
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).ok()?);
        out.push('\n');
    }
    out.push_str(end);
    out.push('\n');
    Some(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Lowercase hex of a SHA-256 digest.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_encode_minimally() {
        let mut v = Vec::new();
        encode_len(&mut v, 0x7f);
        assert_eq!(v, [0x7f]);
        v.clear();
        encode_len(&mut v, 0x80);
        assert_eq!(v, [0x81, 0x80]);
        v.clear();
        encode_len(&mut v, 0x1234);
        assert_eq!(v, [0x82, 0x12, 0x34]);
    }

    #[test]
    fn pem_blocks_splits_a_bundle_and_rejects_a_truncated_one() {
        let a = pem_encode("CERTIFICATE", &[1, 2, 3]);
        let b = pem_encode("PRIVATE KEY", &[4, 5]);
        let both = format!("junk\n{a}more junk\n{b}");
        let blocks = pem_blocks(both.as_bytes()).expect("parses");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], ("CERTIFICATE".to_string(), vec![1, 2, 3]));
        assert_eq!(blocks[1].0, "PRIVATE KEY");
        assert!(pem_blocks(&a.as_bytes()[..a.len() - 10]).is_err());
    }

    /// The body of `pem` re-wrapped at `width` columns with `eol` line endings.
    fn rewrap(pem: &str, width: usize, eol: &str) -> String {
        let lines: Vec<&str> = pem.lines().collect();
        let body: String = lines[1..lines.len() - 1].concat();
        let mut out = format!("{}{eol}", lines[0]);
        for chunk in body.as_bytes().chunks(width) {
            out.push_str(std::str::from_utf8(chunk).expect("ascii"));
            out.push_str(eol);
        }
        out.push_str(lines[lines.len() - 1]);
        out.push_str(eol);
        out
    }

    #[test]
    fn pem_lines_of_any_length_are_accepted_as_rfc_7468_asks() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let pem = pem_encode("CERTIFICATE REQUEST", &der);
        for (width, eol) in [(76, "\n"), (76, "\r\n"), (1, "\n"), (63, "\n"), (65, "\n"), (10_000, "\n")] {
            let blocks = pem_blocks(rewrap(&pem, width, eol).as_bytes())
                .unwrap_or_else(|e| panic!("{width} columns, {eol:?}: {e}"));
            assert_eq!(blocks, vec![("CERTIFICATE REQUEST".to_string(), der.clone())], "{width} columns");
        }
        // Still refused: a body that is not base64, and a truncated block.
        let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
        lines[1].replace_range(0..1, "*");
        let bad = lines.join("\n");
        assert!(pem_blocks(bad.as_bytes()).is_err());
        let cut = rewrap(&pem, 76, "\n");
        assert!(pem_blocks(&cut.as_bytes()[..cut.len() - 12]).is_err());
    }
}

/// The numbers of a public key, as a JSON Web Key carries them (RFC 7518 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKeyComponents {
    /// An EC point: the curve and its coordinates, each the curve's full width (big-endian).
    Ec {
        /// The curve.
        curve: Curve,
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
    /// An RSA key: modulus and public exponent, big-endian without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
}

/// The components of a `SubjectPublicKeyInfo` meshca accepts (P-256/P-384 or RSA).
pub(crate) fn public_key_components(spki_der: &[u8]) -> Result<PublicKeyComponents, PublicKeyError> {
    let spki = SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| PublicKeyError::Malformed(format!("SubjectPublicKeyInfo: {e}")))?;
    match public_key_kind(&spki)? {
        PublicKeyKind::Ec(curve) => {
            // `public_key_kind` checked: an uncompressed point, 0x04 || X || Y.
            let point = &spki.subject_public_key.raw_bytes()[1..];
            let (x, y) = point.split_at(point.len() / 2);
            Ok(PublicKeyComponents::Ec { curve, x: x.to_vec(), y: y.to_vec() })
        }
        PublicKeyKind::Rsa { .. } => {
            let key = rsa_public_key(&spki)?;
            Ok(PublicKeyComponents::Rsa {
                n: key.modulus.as_bytes().to_vec(),
                e: key.public_exponent.as_bytes().to_vec(),
            })
        }
    }
}
