//! Running several management-plane replicas against one store (Kubernetes mode).
//!
//! All state is in the store, so any replica could answer anything — except that two replicas
//! must never both sign and rotate. One replica is elected leader (a Lease, in `meshca-kube`);
//! the election publishes its view as a [`Leader`] here.
//!
//! **Followers forward connections, not requests.** A follower accepts a TCP connection and, if
//! a leader is known, copies its bytes to the leader's advertised address without terminating
//! TLS: the agent's mutual TLS ends at the leader, which authenticates the agent itself. So a
//! follower holds no authority to impersonate anyone, and agents (behind one Kubernetes Service
//! that spreads connections over all replicas) reach the leader through whichever replica they
//! land on. With no leader known (an election in progress) a follower closes the connection and
//! the agent retries with backoff, keeping its current `cacerts`.
//!
//! **A leader that loses its lease stops.** [`serve_with`](crate::server::serve_with) returns
//! [`MgmtError::LostLeadership`](crate::MgmtError::LostLeadership) and the process exits, as
//! Kubernetes' own controllers do; that drops every connection it served, agents reconnect
//! through the Service to the new leader, and the restarted pod rejoins as a follower. Within
//! a term, every signing call also checks [`is_leader`] right before it signs.

use std::time::Duration;

use meshca_serve::Route;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// This replica's view of the leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// No leader known (starting, or the lease expired and nobody has taken it yet).
    Unknown,
    /// This replica leads until `until` unless it renews; after that it must not sign.
    Me {
        /// When this replica's claim runs out (the last renewal plus the renew deadline, which
        /// is shorter than the lease duration the followers wait for).
        until: Instant,
    },
    /// Another replica leads.
    Other {
        /// Its identity (the Lease's `holderIdentity`).
        holder: String,
        /// Where it accepts connections (`host:port`), if it advertised one.
        address: Option<String>,
    },
}

/// Whether the view says this replica may sign now. `None` (no election: a single replica) is
/// always allowed.
pub fn is_leader(leader: Option<&watch::Receiver<Leader>>) -> bool {
    match leader {
        None => true,
        Some(rx) => matches!(*rx.borrow(), Leader::Me { until } if until > Instant::now()),
    }
}

/// What becomes of each new connection: served while this replica leads; as a follower,
/// forwarded to the leader (see the module documentation) by a task the server owns; closed when
/// no leader is known.
pub fn router(leader: watch::Receiver<Leader>) -> meshca_serve::server::Router {
    Box::new(move |peer| {
        let view = leader.borrow().clone();
        match view {
            Leader::Me { until } if until > Instant::now() => Route::Serve,
            Leader::Other { holder, address: Some(address) } => {
                Route::Forward(Box::new(move |tcp| Box::pin(forward(tcp, peer, holder, address))))
            }
            other => {
                tracing::debug!(%peer, leader = ?other, "no leader to serve or forward to; closing the connection");
                Route::Close
            }
        }
    })
}

/// Copies one connection's bytes to the leader and back until either side closes.
async fn forward(mut client: TcpStream, peer: std::net::SocketAddr, holder: String, address: String) {
    let mut upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, leader = %holder, %address, error = %e, "cannot reach the leader; closing the connection");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, leader = %holder, %address, "connecting to the leader timed out; closing the connection");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    tracing::debug!(%peer, leader = %holder, %address, "forwarding a connection to the leader");
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Resolves when this replica, having led, no longer does (or its claim ran out unrenewed).
pub async fn lost(mut leader: watch::Receiver<Leader>) {
    let mut led = false;
    loop {
        let deadline = match *leader.borrow_and_update() {
            Leader::Me { until } => {
                led = true;
                Some(until)
            }
            _ if led => return,
            _ => None,
        };
        match deadline {
            Some(until) => tokio::select! {
                r = leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(until) => {
                    if !matches!(*leader.borrow(), Leader::Me { until } if until > Instant::now()) {
                        return;
                    }
                }
            },
            None => {
                if leader.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_is_lost_when_it_moves_or_runs_out() {
        let (tx, rx) = watch::channel(Leader::Unknown);
        assert!(!is_leader(Some(&rx)));
        assert!(is_leader(None));
        let lost_fut = tokio::spawn(lost(rx.clone()));
        tx.send_replace(Leader::Me { until: Instant::now() + Duration::from_secs(10) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(is_leader(Some(&rx)));
        assert!(!lost_fut.is_finished());
        // Renewed: still leading past the first deadline.
        tx.send_replace(Leader::Me { until: Instant::now() + Duration::from_secs(20) });
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(!lost_fut.is_finished());
        // Not renewed: lost when the claim runs out.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!is_leader(Some(&rx)));
        tokio::task::yield_now().await;
        assert!(lost_fut.is_finished());

        let lost2 = tokio::spawn(lost(rx.clone()));
        tx.send_replace(Leader::Me { until: Instant::now() + Duration::from_secs(10) });
        tokio::task::yield_now().await;
        tx.send_replace(Leader::Other { holder: "b".into(), address: None });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(lost2.is_finished());
    }
}
