//! The writer thread: group commit. It owns the database's one write connection, takes the first
//! queued request and everything queued behind it (up to [`MAX_BATCH`]), applies each under its
//! own savepoint (a request is one write, or the several writes of a `put_all` transaction, which
//! stand or fall together), commits the lot with one fsync and only then answers each writer and
//! announces the changed keys.
//!
//! Invariant: a writer is answered `Ok` only after the `COMMIT` that contains its write returned,
//! i.e. after SQLite fsynced the WAL (`synchronous=FULL`). If the commit fails, every write of
//! the batch is answered with the error, and none of them took effect.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{WriteStats, db_err, disk_full, sqlite_error, version_of};
use crate::dir::{check_delete_precondition, check_precondition};
use crate::{ObjectKey, Precondition, Secret, StoreError};

/// Most writes committed together. Bounds the latency one commit adds to the first write queued
/// and the memory a batch holds; a full queue simply makes the next batch.
pub(super) const MAX_BATCH: usize = 512;

/// A write.
pub(super) enum Op {
    Put { secret: Secret, precondition: Precondition },
    Delete { precondition: Precondition },
}

/// Writes that stand or fall together, and where to send their outcome (each new version, or 0
/// for a delete).
pub(super) struct Request {
    pub(super) writes: Vec<(ObjectKey, Op)>,
    pub(super) reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// The writer thread's counts (see [`WriteStats`]).
#[derive(Default)]
pub(super) struct Counters {
    received: AtomicU64,
    answered: AtomicU64,
    commits: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> WriteStats {
        WriteStats {
            received: self.received.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
        }
    }
}

/// Runs until every sender of `queue` is gone.
pub(super) fn run(
    mut conn: Connection,
    path: &Path,
    mut queue: mpsc::Receiver<Request>,
    changes: &broadcast::Sender<ObjectKey>,
    counters: &Counters,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let outcomes = commit(&mut conn, path, &batch);
        counters.commits.fetch_add(1, Ordering::Relaxed);
        counters.answered.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            if outcome.is_ok() {
                for (key, _) in &request.writes {
                    // An error only means nobody is watching.
                    let _ = changes.send(key.clone());
                }
            }
            // The writer may have given up waiting (its future was dropped); the write stands.
            let _ = request.reply.send(outcome);
        }
    }
}

/// Applies `batch` in one transaction; one outcome per request, in order.
fn commit(conn: &mut Connection, path: &Path, batch: &[Request]) -> Vec<Result<Vec<u64>, StoreError>> {
    let fail_all = |e: rusqlite::Error| {
        let (full, message) = (disk_full(&e), e.to_string());
        batch.iter().map(|_| Err(sqlite_error(path, full, message.clone()))).collect()
    };
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(e),
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch {
        let outcome = match tx.savepoint() {
            Ok(mut sp) => {
                let outcome: Result<Vec<u64>, StoreError> =
                    request.writes.iter().map(|(key, op)| apply(&sp, path, key, op)).collect();
                // A failed request leaves nothing behind; the batch's other requests go on.
                let closed = if outcome.is_ok() { sp.commit() } else { sp.rollback().and_then(|()| sp.commit()) };
                match closed {
                    Ok(()) => outcome,
                    Err(e) => return fail_all(e),
                }
            }
            Err(e) => return fail_all(e),
        };
        outcomes.push(outcome);
    }
    match tx.commit() {
        Ok(()) => outcomes,
        Err(e) => fail_all(e),
    }
}

/// One write: the precondition against the current version (which sees the batch's earlier
/// writes), then the change, under a fresh version from the database's counter.
fn apply(conn: &Connection, path: &Path, key: &ObjectKey, op: &Op) -> Result<u64, StoreError> {
    let err = db_err(path);
    let current = version_of(conn, path, key)?;
    match op {
        Op::Put { secret, precondition } => {
            check_precondition(key, precondition, current)?;
            let version = next_version(conn, path)?;
            let labels = serde_json::to_string(&secret.labels)
                .map_err(|e| StoreError::Backend(format!("encoding the labels of {key}: {e}")))?;
            let annotations = serde_json::to_string(&secret.annotations)
                .map_err(|e| StoreError::Backend(format!("encoding the annotations of {key}: {e}")))?;
            conn.prepare_cached(
                "INSERT INTO objects (namespace, name, version, labels, annotations) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (namespace, name) DO UPDATE
                 SET version = excluded.version, labels = excluded.labels, annotations = excluded.annotations",
            )
            .and_then(|mut st| st.execute(params![key.namespace(), key.name(), version as i64, labels, annotations]))
            .map_err(&err)?;
            if current.is_some() {
                delete_stale_data(conn, path, key, secret)?;
            }
            // A row whose value is unchanged is left alone: with `secure_delete` a rewritten row
            // costs its pages twice (written anew, the old ones zeroed), so an object of which
            // one key changed (a cluster's issued log, stored in chunks) writes only that key.
            let mut upsert = conn
                .prepare_cached(
                    "INSERT INTO object_data (namespace, name, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (namespace, name, key) DO UPDATE
                     SET value = excluded.value WHERE value IS NOT excluded.value",
                )
                .map_err(&err)?;
            for (data_key, value) in &secret.data {
                upsert.execute(params![key.namespace(), key.name(), data_key, value]).map_err(&err)?;
            }
            Ok(version)
        }
        Op::Delete { precondition } => {
            check_delete_precondition(key, precondition, current)?;
            if current.is_some() {
                conn.prepare_cached("DELETE FROM objects WHERE namespace = ?1 AND name = ?2")
                    .and_then(|mut st| st.execute(params![key.namespace(), key.name()]))
                    .map_err(&err)?;
                delete_data(conn, path, key)?;
            }
            Ok(0)
        }
    }
}

/// Deletes the object's data rows whose keys `secret` does not carry (a put replaces the whole
/// object): one statement, given the keys kept as a JSON array.
fn delete_stale_data(conn: &Connection, path: &Path, key: &ObjectKey, secret: &Secret) -> Result<(), StoreError> {
    let kept = serde_json::to_string(&secret.data.keys().collect::<Vec<_>>())
        .map_err(|e| StoreError::Backend(format!("encoding the data keys of {key}: {e}")))?;
    conn.prepare_cached(
        "DELETE FROM object_data WHERE namespace = ?1 AND name = ?2
         AND key NOT IN (SELECT value FROM json_each(?3))",
    )
    .and_then(|mut st| st.execute(params![key.namespace(), key.name(), kept]))
    .map(drop)
    .map_err(db_err(path))
}

fn delete_data(conn: &Connection, path: &Path, key: &ObjectKey) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM object_data WHERE namespace = ?1 AND name = ?2")
        .and_then(|mut st| st.execute(params![key.namespace(), key.name()]))
        .map(drop)
        .map_err(db_err(path))
}

fn next_version(conn: &Connection, path: &Path) -> Result<u64, StoreError> {
    let v: i64 = conn
        .prepare_cached("UPDATE counters SET value = value + 1 WHERE name = 'version' RETURNING value")
        .and_then(|mut st| st.query_row([], |r| r.get(0)))
        .map_err(db_err(path))?;
    Ok(v as u64)
}
