//! What `store-crash-writer` writes, shared with `tests/crash.rs` (included there by path) so the
//! test checks exactly what the writer wrote.

use meshca_store::Secret;

/// The data keys: those of Istio's `cacerts`, the object this store most needs to keep whole.
pub const KEYS: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

/// Bytes per key: several pages each, so a write takes long enough for kills to land inside it.
const VALUE_LEN: usize = 16 * 1024;

/// The label (and annotation) holding the generation number N.
pub const N_LABEL: &str = "meshca.io/crash-test-n";

/// Generation `n`: every key holds its own name and `n`, repeated; the labels and annotations say
/// `n` too, so data and metadata from different generations cannot go unnoticed.
pub fn secret(n: u64) -> Secret {
    let value = |key: &str| {
        let line = format!("{key} {n}\n");
        line.repeat(VALUE_LEN / line.len() + 1)
    };
    Secret::with_data(KEYS.map(|k| (k, value(k)))).label(N_LABEL, &n.to_string()).annotation(N_LABEL, &n.to_string())
}

/// The generation a secret claims to be (by its label), if any.
pub fn n_of(secret: &Secret) -> Option<u64> {
    secret.labels.get(N_LABEL)?.parse().ok()
}

/// Writers besides the one of the main object, each on an object of its own in namespace `extra`.
pub const EXTRA_WRITERS: usize = 3;

/// The object of extra writer `i`.
pub fn extra_key(name: &str, i: usize) -> meshca_store::ObjectKey {
    meshca_store::ObjectKey::new("extra", &format!("{name}-{i}")).expect("a valid name")
}
