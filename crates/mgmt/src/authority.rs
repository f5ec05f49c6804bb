//! The authority: what the management plane can do with the RootTrustPolicy in force — sign
//! cluster intermediates itself, leave that to Vault, or nothing (and why) — derived from the
//! policy and the secrets it references. [`crate::loader`] keeps it current.
//!
//! The *policy generation* (computed by [`meshca_policy::generation()`]) digests everything that
//! shapes a cluster intermediate: the policy's intermediate options, the signer, the root set.
//! Agents record the generation their `cacerts` was issued under and re-issue when it changes —
//! so changing a lifetime, a key algorithm or the referenced secret rotates every affected
//! cluster.

use std::sync::Arc;
use std::time::SystemTime;

use meshca_pki::{CaSigner, Cert, RootParams, RootSet};
use meshca_policy::{CaMode, Policy, SignerMaterial, VaultDelivery};
use meshca_store::{ObjectKey, Store};

use crate::castore;
use crate::error::MgmtError;
use crate::records::Keyspace;

/// A CA the management plane signs with, and the root set it publishes.
#[derive(Debug)]
pub struct Signing {
    /// The signer of cluster intermediates: the root, or the user's intermediate.
    pub signer: Arc<CaSigner>,
    /// The root set clusters trust.
    pub roots: RootSet,
    /// Other CAs clusters may still be under — during a root rotation, the root not signing —
    /// whose CRL the published one carries too, so those clusters can still write a
    /// `ca-crl.pem` istiod accepts (it wants a CRL from every certificate of their chain).
    pub crl_also: Vec<Arc<CaSigner>>,
}

/// Vault signs cluster intermediates: what each cluster's `meshca vault-agent` is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Delegation {
    /// The Vault block to use (the policy's; during a root rotation, the mount of the phase).
    pub delivery: VaultDelivery,
    /// The root set clusters are to write, when the management plane knows it (it reads the
    /// mount's root for root rotations); otherwise each cluster takes the root Vault's chain
    /// ends at.
    pub roots: Option<RootSet>,
}

/// What the management plane can do under the policy in force.
#[derive(Debug, Clone)]
pub enum Capability {
    /// It signs cluster intermediates itself.
    Signing(Arc<Signing>),
    /// Vault signs them, asked by each cluster's `meshca vault-agent`; the management plane
    /// delivers the Vault block and tracks status.
    Delegated(Box<Delegation>),
    /// It cannot sign: the policy's CA cannot be loaded. `reason` names the policy field.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// The management plane's signing state.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The policy in force (the last valid one).
    pub policy: Policy,
    /// What it allows.
    pub capability: Capability,
    /// The policy generation.
    pub generation: String,
    /// A warning that does not stop signing (e.g. a generated root that no longer matches the
    /// policy's root parameters, or a broken secret while the last good CA stays in force).
    pub warning: Option<String>,
}

impl Authority {
    /// An authority for `policy` with `capability`; the generation follows from both.
    pub fn new(policy: Policy, capability: Capability, warning: Option<String>) -> Self {
        let generation = match &capability {
            Capability::Signing(s) => meshca_policy::generation(
                &policy,
                SignerMaterial::Local { signer: &s.signer.cert().fingerprint(), roots: &s.roots.fingerprint() },
            ),
            Capability::Delegated(d) => {
                // The mount actually used (not the policy's during a root rotation) and the root
                // set shape the intermediate.
                let mut shaped = policy.clone();
                shaped.ca = CaMode::Vault(Box::new(d.delivery.spec.clone()));
                let roots = d.roots.as_ref().map(RootSet::fingerprint);
                let material = match &roots {
                    Some(r) => SignerMaterial::VaultRoots { roots: r },
                    None => SignerMaterial::Vault,
                };
                meshca_policy::generation(&shaped, material)
            }
            Capability::Unavailable { .. } => meshca_policy::generation(&policy, SignerMaterial::Unavailable),
        };
        Authority { policy, capability, generation, warning }
    }

    /// The CA the management plane signs with, if it signs.
    pub fn signing(&self) -> Option<&Arc<Signing>> {
        match &self.capability {
            Capability::Signing(s) => Some(s),
            _ => None,
        }
    }

    /// The root set clusters trust, when the management plane knows it (in Vault mode once it
    /// has read the mount's root; until then each cluster learns it from Vault's chain).
    pub fn roots(&self) -> Option<&RootSet> {
        match &self.capability {
            Capability::Signing(s) => Some(&s.roots),
            Capability::Delegated(d) => d.roots.as_ref(),
            Capability::Unavailable { .. } => None,
        }
    }

    /// Why the policy's CA cannot sign, if it cannot.
    pub fn error(&self) -> Option<&str> {
        match &self.capability {
            Capability::Unavailable { reason } => Some(reason),
            _ => None,
        }
    }

    /// In bring-your-own-intermediate mode: the user's intermediate (the signer), which meshca
    /// does not rotate and whose expiry it watches.
    pub fn upstream(&self) -> Option<&Cert> {
        match (&self.policy.ca, self.signing()) {
            (CaMode::IntermediateRef { .. }, Some(s)) => Some(s.signer.cert()),
            _ => None,
        }
    }
}

/// The store object a policy's CA mode reads, if any (`keys`: the mesh's records).
pub fn referenced_secret(keys: &Keyspace, policy: &Policy) -> Option<ObjectKey> {
    match &policy.ca {
        CaMode::Generated { .. } => Some(keys.root_ca()),
        CaMode::SecretRef(r) => ObjectKey::new(&r.namespace, &r.name).ok(),
        CaMode::IntermediateRef { secret, .. } => ObjectKey::new(&secret.namespace, &secret.name).ok(),
        CaMode::Vault(_) => None,
    }
}

/// What a referenced secret must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefKind {
    /// Option 2: a self-signed root (`spec.config.secretRef`).
    Root,
    /// Option 3: an intermediate below the user's root (`spec.config.intermediateRef`).
    Intermediate,
}

impl RefKind {
    fn field(self) -> &'static str {
        match self {
            RefKind::Root => "spec.config.secretRef",
            RefKind::Intermediate => "spec.config.intermediateRef",
        }
    }
}

/// Why `policy` could not be put in force, checked before it is (`meshca policy apply`,
/// `meshca server --policy`): its secret is missing, not a CA, expired. A generated root is made
/// by its mesh when it starts, so there is nothing to check (and nothing is created here).
pub async fn trial(store: &dyn Store, policy: &Policy, now: SystemTime) -> Option<String> {
    if matches!(policy.ca, CaMode::Generated { .. }) {
        return None;
    }
    // Only a generated root lives in the mesh's own records: any keyspace reads the others.
    load(store, &Keyspace::legacy(), policy.clone(), now).await.error().map(str::to_string)
}

/// Builds the authority for `policy` from the store, at `now`; `keys` are the mesh's records
/// (where its generated root is).
pub async fn load(store: &dyn Store, keys: &Keyspace, policy: Policy, now: SystemTime) -> Authority {
    let mut warning = None;
    let loaded = match &policy.ca {
        CaMode::Generated { key_algorithm, ttl, organization } => {
            let params = RootParams { ttl: *ttl, ..RootParams::new(organization) };
            let loaded = castore::load_or_create_root(store, &keys.root_ca(), *key_algorithm, &params, now).await;
            if let Ok(s) = &loaded
                && s.cert().key_kind() != key_algorithm.kind()
            {
                warning = Some(format!(
                    "spec.config.generated.keyAlgorithm: the generated root already exists with a {} key; \
                     the policy asks for {key_algorithm}. Changing a root's key needs a root rotation; the existing root stays.",
                    s.cert().key_kind()
                ));
            }
            loaded
        }
        CaMode::SecretRef(r) => load_ref(store, RefKind::Root, &r.namespace, &r.name).await.and_then(|signer| {
            // An expired root signs nothing. Refused here, a policy naming it is refused and
            // the working CA stays in force, instead of every issuance failing afterwards.
            let cert = signer.cert();
            if cert.not_after() <= now {
                return Err(MgmtError::Secret {
                    field: RefKind::Root.field(),
                    secret: format!("{}/{}", r.namespace, r.name),
                    reason: format!(
                        "{} expired at {}; nothing can be issued from it",
                        cert.subject(),
                        meshca_pki::chain::rfc3339(cert.not_after())
                    ),
                });
            }
            Ok(signer)
        }),
        CaMode::IntermediateRef { secret, .. } => load_intermediate(store, &secret.namespace, &secret.name, now).await,
        CaMode::Vault(spec) => {
            // The root lives in Vault: clusters obtain intermediates through `meshca vault-agent`;
            // the management plane signs nothing and only tracks status.
            let delivery = VaultDelivery {
                trust_domain: policy.trust_domain.clone(),
                organization: policy.intermediate.organization.clone(),
                spec: (**spec).clone(),
            };
            return Authority::new(policy, Capability::Delegated(Box::new(Delegation { delivery, roots: None })), None);
        }
    };
    let capability = loaded
        .and_then(|signer| {
            let roots = RootSet::from_certs(vec![signer.root().clone()]).map_err(|e| MgmtError::pki("root set", e))?;
            Ok(Capability::Signing(Arc::new(Signing { signer: Arc::new(signer), roots, crl_also: Vec::new() })))
        })
        .unwrap_or_else(|e| Capability::Unavailable { reason: unavailable_reason(&e) });
    Authority::new(policy, capability, warning)
}

async fn load_ref(store: &dyn Store, kind: RefKind, ns: &str, name: &str) -> Result<CaSigner, MgmtError> {
    let field = kind.field();
    let secret = format!("{ns}/{name}");
    let key = ObjectKey::new(ns, name).map_err(|e| MgmtError::Secret {
        field,
        secret: secret.clone(),
        reason: e.to_string(),
    })?;
    let v = store.get(&key).await?.ok_or_else(|| MgmtError::Secret {
        field,
        secret: secret.clone(),
        reason: "not found".into(),
    })?;
    let signer = castore::signer_from_secret(&v.value, field, &secret)?;
    if kind == RefKind::Root && !signer.cert().is_self_issued() {
        return Err(MgmtError::Secret {
            field,
            secret,
            reason: format!(
                "{} is not a root (issued by {}); use spec.config.intermediateRef for an intermediate",
                signer.cert().subject(),
                signer.cert().issuer()
            ),
        });
    }
    Ok(signer)
}

/// Loads the user's intermediate (option 3) and checks it can do the job: a CA with keyCertSign
/// whose key matches, not a root, with its chain up to a self-signed root, room for one more CA
/// below it (pathlen), and valid now.
async fn load_intermediate(store: &dyn Store, ns: &str, name: &str, now: SystemTime) -> Result<CaSigner, MgmtError> {
    let signer = load_ref(store, RefKind::Intermediate, ns, name).await?;
    let bad = |reason: String| MgmtError::Secret {
        field: RefKind::Intermediate.field(),
        secret: format!("{ns}/{name}"),
        reason,
    };
    let cert = signer.cert();
    if cert.is_self_issued() {
        return Err(bad(format!("{} is a self-signed root; use spec.config.secretRef for a root", cert.subject())));
    }
    if cert.path_len() == Some(0) {
        return Err(bad(format!(
            "{} has pathlen:0, which forbids any CA below it — but meshca signs a cluster intermediate (a CA) under it. \
             Issue the intermediate with pathlen:1 or more, or without a path length constraint",
            cert.subject()
        )));
    }
    let root = signer.root();
    if !root.is_self_issued() {
        return Err(bad(format!(
            "its chain does not reach a self-signed root: it ends at {} (issued by {}); include the chain up to the root in cert-chain.pem or root-cert.pem (ca.crt for tls.crt/tls.key)",
            root.subject(),
            root.issuer()
        )));
    }
    let roots = RootSet::from_certs(vec![root.clone()]).map_err(|e| bad(e.to_string()))?;
    let chain = signer.chain();
    let middle = if chain.len() > 2 { &chain[1..chain.len() - 1] } else { &[] };
    meshca_pki::verify_chain(cert, middle, &roots, now, meshca_pki::Usage::Ca).map_err(|e| bad(e.to_string()))?;
    Ok(signer)
}

/// Why the policy's CA cannot sign, as agents (refused issuance) and operators (status) are told.
/// A policy problem says which field; a failure of the store or the disk under it is logged in
/// full and reported by error id only, like every internal failure.
fn unavailable_reason(e: &MgmtError) -> String {
    match e {
        MgmtError::Store(_) | MgmtError::Io { .. } => {
            format!("the CA could not be loaded: {}", crate::error::caller_message(e))
        }
        other => other.to_string(),
    }
}
