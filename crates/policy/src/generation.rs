//! The *policy generation*: one short digest of everything that shapes a cluster intermediate.
//!
//! Agents record the generation their `cacerts` was issued under and re-issue when the
//! management plane announces another, so changing a lifetime, a key algorithm, the trust domain,
//! the signer or the root set rotates every covered cluster. It is computed here, by
//! [`generation`], in one format for every CA mode.

use meshca_pki::KeyAlgorithm;

use crate::{CaMode, Policy};

/// What signs cluster intermediates, as far as the generation is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignerMaterial<'a> {
    /// meshca signs with a CA it holds.
    Local {
        /// Fingerprint of the signing certificate.
        signer: &'a str,
        /// Fingerprint of the root set clusters trust.
        roots: &'a str,
    },
    /// Vault signs; its address and paths are part of the policy digest already.
    Vault,
    /// Vault signs, and the management plane knows the root set clusters are to trust (always
    /// once it has read the mount's root; during a root rotation the set of its phase).
    VaultRoots {
        /// Fingerprint of the root set.
        roots: &'a str,
    },
    /// Nothing can sign (the policy's CA cannot be loaded).
    Unavailable,
}

fn sha256_hex(text: &str, bytes: usize) -> String {
    hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref()[..bytes])
}

impl Policy {
    /// A digest of everything in the policy itself that shapes a cluster intermediate (not which
    /// clusters it covers, nor when they renew). [`generation`] adds the signer.
    pub fn intermediate_digest(&self) -> String {
        let i = &self.intermediate;
        let mut text = format!(
            "td={}\nalg={}\nttl={}\norg={}\ndns={}\nmode={}",
            self.trust_domain,
            i.key_algorithm,
            i.ttl.as_secs(),
            i.organization,
            i.permitted_dns_domains.join(","),
            self.ca.name(),
        );
        // In Vault mode the signer is Vault: another server, signing path, key-generating
        // path or namespace can mean another root, so each re-issues (how the agent logs in
        // does not shape the certificate and does not).
        if let CaMode::Vault(v) = &self.ca {
            text.push_str(&format!(
                "\nvault={}|{}|{}|{}",
                v.server,
                v.ca_path,
                v.csr_path.as_deref().unwrap_or(""),
                v.namespace.as_deref().unwrap_or("")
            ));
        }
        sha256_hex(&text, 12)
    }
}

/// The policy generation of `policy` signed by `signer`: 20 hex characters.
pub fn generation(policy: &Policy, signer: SignerMaterial<'_>) -> String {
    let material = match signer {
        SignerMaterial::Local { signer, roots } => format!("local|{signer}|{roots}"),
        SignerMaterial::Vault => "vault".to_string(),
        SignerMaterial::VaultRoots { roots } => format!("vault|{roots}"),
        SignerMaterial::Unavailable => "unavailable".to_string(),
    };
    sha256_hex(&format!("generation/1\n{}\n{material}", policy.intermediate_digest()), 10)
}

/// The wire form of a key algorithm.
pub fn key_algorithm_to_wire(k: KeyAlgorithm) -> meshca_proto::mgmt::KeyAlgorithm {
    use meshca_proto::mgmt::KeyAlgorithm as W;
    match k {
        KeyAlgorithm::EcdsaP256 => W::EcdsaP256,
        KeyAlgorithm::EcdsaP384 => W::EcdsaP384,
        KeyAlgorithm::Rsa2048 => W::Rsa2048,
        KeyAlgorithm::Rsa3072 => W::Rsa3072,
        KeyAlgorithm::Rsa4096 => W::Rsa4096,
    }
}

/// A key algorithm from the wire. An unset or unknown value is an error, never a guess: an
/// agent that made the wrong kind of key would only be refused by the issuer later.
pub fn key_algorithm_from_wire(v: i32) -> Result<KeyAlgorithm, crate::PolicyError> {
    use meshca_proto::mgmt::KeyAlgorithm as W;
    match W::try_from(v) {
        Ok(W::EcdsaP256) => Ok(KeyAlgorithm::EcdsaP256),
        Ok(W::EcdsaP384) => Ok(KeyAlgorithm::EcdsaP384),
        Ok(W::Rsa2048) => Ok(KeyAlgorithm::Rsa2048),
        Ok(W::Rsa3072) => Ok(KeyAlgorithm::Rsa3072),
        Ok(W::Rsa4096) => Ok(KeyAlgorithm::Rsa4096),
        Ok(W::Unspecified) | Err(_) => Err(crate::err(
            "spec.intermediateCertOptions.keyAlgorithm",
            format!(
                "the management plane sent key algorithm {v}, which this agent does not know; upgrade the agent \
                 to the management plane's version"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_algorithms_round_trip_and_unknown_ones_are_errors() {
        for k in KeyAlgorithm::ALL {
            assert_eq!(key_algorithm_from_wire(key_algorithm_to_wire(k) as i32), Ok(k));
        }
        assert!(key_algorithm_from_wire(0).is_err(), "unspecified is not P-256");
        assert!(key_algorithm_from_wire(99).is_err());
    }

    #[test]
    fn one_format_for_every_mode_and_each_signer_its_own_generation() {
        let p = Policy::generated_default(std::time::Duration::from_secs(3600));
        let a = generation(&p, SignerMaterial::Local { signer: "s1", roots: "r1" });
        let b = generation(&p, SignerMaterial::Local { signer: "s2", roots: "r1" });
        let c = generation(&p, SignerMaterial::Local { signer: "s1", roots: "r2" });
        let v = generation(&p, SignerMaterial::Vault);
        let u = generation(&p, SignerMaterial::Unavailable);
        let vr = generation(&p, SignerMaterial::VaultRoots { roots: "r1" });
        for g in [&a, &b, &c, &v, &u, &vr] {
            assert_eq!(g.len(), 20);
            assert!(g.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let all = [&a, &b, &c, &v, &u, &vr];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(a, generation(&p, SignerMaterial::Local { signer: "s1", roots: "r1" }), "deterministic");
    }
}
