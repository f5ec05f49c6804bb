//! Watching one object: its state now, then every change: at once for writes through the same
//! store instance (announced on a broadcast channel), within a poll interval for any other (another
//! process, or another instance on the same files). Shared by the directory backends and the
//! SQLite backend: each says how to read an object and how to learn its version cheaply.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::dir::{run_blocking, versioned};
use crate::{ObjectKey, Secret, StoreError, Versioned, WatchStream};

type WatchItem = Result<Option<Versioned<Secret>>, StoreError>;

/// Where a watched object lives: the watch only needs its current version (cheap: a `readlink` of
/// `..data`, or one indexed row) and, when that moved, the object. Implemented for an object of a
/// [`crate::dir::DirStore`] tree, the single object of a [`crate::single::SingleObjectDir`] and an
/// object of a [`crate::sqlite::SqliteStore`].
pub(crate) trait WatchedObject: Send + Sync + 'static {
    /// The object's version now (`None`: absent). An error makes the watch read the object, which
    /// reports what is wrong.
    fn current_version(&self) -> Result<Option<u64>, StoreError>;
    /// The object now, consistent with its version.
    fn read(&self) -> Result<Option<(u64, Secret)>, StoreError>;
}

/// The watch stream of one object: its state now, then every change, seen at once for writes
/// announced on `changes` and within `poll_interval` for any other write.
pub(crate) fn watch_stream(
    object: Arc<dyn WatchedObject>,
    key: ObjectKey,
    changes: broadcast::Receiver<ObjectKey>,
    poll_interval: Duration,
) -> WatchStream {
    let state =
        WatchState { object, key, changes: Some(changes), ticker: None, poll_interval, last: None, failing: false };
    // No background task: all the work happens while the consumer polls, so dropping the
    // stream drops everything (at most one short blocking read may still finish).
    futures::stream::unfold(state, WatchState::next_item).boxed()
}

struct WatchState {
    object: Arc<dyn WatchedObject>,
    key: ObjectKey,
    /// `None` once the channel closed (a closed receiver returns at once, so keeping it would
    /// spin).
    changes: Option<broadcast::Receiver<ObjectKey>>,
    /// Created on the first wait: an interval needs a runtime, and `watch` may be called outside one.
    ticker: Option<tokio::time::Interval>,
    poll_interval: Duration,
    /// The version last yielded (`Some(None)`: absent); `None` before the first item and after an error.
    last: Option<Option<u64>>,
    /// The last item was an error: don't repeat it every tick.
    failing: bool,
}

impl WatchState {
    async fn next_item(mut self) -> Option<(WatchItem, WatchState)> {
        loop {
            if self.last.is_some() || self.failing {
                self.wait().await;
                if let Some(last) = self.last {
                    // The cheap check: no data read unless the version moved.
                    let object = Arc::clone(&self.object);
                    let unchanged = run_blocking(move || object.current_version()).await.is_ok_and(|v| v == last);
                    if unchanged {
                        continue;
                    }
                }
            }
            let object = Arc::clone(&self.object);
            match run_blocking(move || object.read()).await {
                Ok(found) => {
                    let version = found.as_ref().map(|(v, _)| *v);
                    self.failing = false;
                    if self.last == Some(version) {
                        continue;
                    }
                    self.last = Some(version);
                    return Some((Ok(found.map(versioned)), self));
                }
                Err(e) => {
                    self.last = None;
                    if self.failing {
                        continue;
                    }
                    self.failing = true;
                    return Some((Err(e), self));
                }
            }
        }
    }

    /// Until the next poll tick or an in-process write of this key, whichever comes first.
    async fn wait(&mut self) {
        let period = self.poll_interval;
        let ticker = self.ticker.get_or_insert_with(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        tokio::select! {
            _ = ticker.tick() => {}
            () = next_change(&mut self.changes, &self.key) => {}
        }
    }
}

async fn next_change(changes: &mut Option<broadcast::Receiver<ObjectKey>>, key: &ObjectKey) {
    loop {
        let Some(rx) = changes.as_mut() else { return std::future::pending().await };
        match rx.recv().await {
            Ok(changed) if changed == *key => return,
            Ok(_) => {}
            // We may have missed our key among the dropped ones: check.
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => *changes = None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Store;
    use crate::dir::DirStore;

    #[tokio::test]
    async fn the_watch_stream_leaves_no_task_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path().join("root")).unwrap();
        let mut w = store.watch(&ObjectKey::new("ns", "a").unwrap());
        assert!(w.next().await.unwrap().unwrap().is_none());
        drop(w);
        assert_eq!(tokio::runtime::Handle::current().metrics().num_alive_tasks(), 0);
    }
}
