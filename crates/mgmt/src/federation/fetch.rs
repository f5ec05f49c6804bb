//! Reading another trust domain's bundle from its bundle endpoint: one fetch, authenticated by
//! the endpoint's profile, bounded in time and size, checked by [`Bundle::parse`]; and the pure
//! step ([`Federated::observe`]) that keeps the last good bundle when a fetch fails and says when
//! to fetch again (the publisher's refresh hint, within bounds).
//!
//! [`super::poll`] runs them for the trust domains a policy federates with.

use std::time::{Duration, SystemTime};

use meshca_http::{Client, HttpError, Url};
use meshca_pki::{RootSet, SpiffeId, TrustDomain};
use meshca_spiffe_bundle::{Bundle, BundleError, MAX_DOCUMENT_BYTES};
use meshca_tls::{ClientAuth, PeerPolicy, ServerTrust, SpiffeVerifier, Versions};

/// How long one fetch (connect, handshake, answer) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The refresh interval when a bundle gives no hint (the specification's suggested default).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// Refresh hints are honoured within these bounds: no endpoint makes meshca poll it more than
/// twice a minute, and none is left unread for more than a day.
pub const REFRESH_BOUNDS: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(24 * 3600));

/// After a failed fetch, the next try.
pub const RETRY: Duration = Duration::from_secs(30);

/// The first retry after a failure: soon, since the commonest failure is a moment's one (a
/// management plane whose own bundle is not published yet when another mesh of it first asks, a
/// restart). The wait then doubles with the time the fetches have been failing, up to [`RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(2);

/// How long to wait before the next fetch when fetches have been failing since `since`:
/// [`FIRST_RETRY`], then about as long as they have been failing (so the waits double), at most
/// [`RETRY`].
pub fn retry_after(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default().clamp(FIRST_RETRY, RETRY)
}

/// How a bundle endpoint proves itself.
#[derive(Debug, Clone)]
pub enum EndpointAuth {
    /// `https_web`: a certificate for the URL's host from one of these CAs.
    Web(RootSet),
    /// `https_spiffe`: an SVID with exactly this SPIFFE ID, under the trust domain's bundle held
    /// (at first, the one the operator configured).
    Spiffe(SpiffeId),
}

/// A foreign trust domain's bundle endpoint.
#[derive(Debug, Clone)]
pub struct Source {
    /// The trust domain the endpoint serves (the operator's `<trust domain, endpoint>` pair).
    pub trust_domain: TrustDomain,
    /// `https://host:port/path`.
    pub url: String,
    /// How the endpoint is authenticated.
    pub auth: EndpointAuth,
    /// How long one fetch may take ([`FETCH_TIMEOUT`] unless a test says otherwise).
    pub timeout: Duration,
}

/// Why a fetch gave no usable bundle.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL or the profile cannot be used.
    #[error("bundle endpoint of {trust_domain}: {reason}")]
    Config {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Why.
        reason: String,
    },
    /// No answer: unreachable, refused in the TLS handshake, too slow, too large.
    #[error("fetching the bundle of {trust_domain} from {url}: {source}")]
    Http {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The endpoint.
        url: String,
        /// What failed.
        #[source]
        source: HttpError,
    },
    /// An answer other than 200.
    #[error("fetching the bundle of {trust_domain} from {url}: HTTP status {status}")]
    Status {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The endpoint.
        url: String,
        /// The status.
        status: u16,
    },
    /// The document was refused.
    #[error("the bundle of {trust_domain} from {url} was refused: {source}")]
    Bundle {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The endpoint.
        url: String,
        /// Why.
        #[source]
        source: BundleError,
    },
}

/// Fetches and checks `source`'s bundle at `now`. For `https_spiffe`, `held` is the trust
/// domain's bundle meshca holds (the last good one, or the operator's first one): the endpoint's
/// SVID must chain to it.
pub async fn fetch(source: &Source, held: Option<&Bundle>, now: SystemTime) -> Result<Bundle, FetchError> {
    let td = &source.trust_domain;
    let config = |reason: String| FetchError::Config { trust_domain: td.clone(), reason };
    let url = Url::parse(&source.url).map_err(|e| config(e.to_string()))?;
    if !url.https {
        return Err(config(format!("{} is not https: a bundle must be fetched over TLS", source.url)));
    }
    let trust = match &source.auth {
        EndpointAuth::Web(roots) => ServerTrust::Roots(roots),
        EndpointAuth::Spiffe(id) => {
            if id.trust_domain() != td {
                return Err(config(format!("the endpoint SPIFFE ID {id} is not in trust domain {td}")));
            }
            let held = held.ok_or_else(|| config("https_spiffe needs a first bundle of the trust domain".into()))?;
            let roots = RootSet::from_certs(held.authorities.clone())
                .map_err(|e| config(format!("the bundle held cannot authenticate the endpoint: {e}")))?;
            let verifier = SpiffeVerifier::new(&roots, PeerPolicy::AnyOf(vec![id.clone()]), false)
                .map_err(|e| config(e.to_string()))?;
            ServerTrust::Verifier(verifier)
        }
    };
    let tls =
        meshca_tls::client_config(trust, ClientAuth::None, Versions::Tls13And12).map_err(|e| config(e.to_string()))?;
    let client = Client::new(&url, Some(tls), source.timeout, MAX_DOCUMENT_BYTES).map_err(|e| config(e.to_string()))?;
    let resp = client.send(http::Method::GET, &url.path, &[], None).await.map_err(|e| FetchError::Http {
        trust_domain: td.clone(),
        url: source.url.clone(),
        source: e,
    })?;
    if resp.status != 200 {
        return Err(FetchError::Status { trust_domain: td.clone(), url: source.url.clone(), status: resp.status });
    }
    Bundle::parse(&resp.body, td, now).map_err(|e| FetchError::Bundle {
        trust_domain: td.clone(),
        url: source.url.clone(),
        source: e,
    })
}

/// What meshca knows of one foreign trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federated {
    /// The last bundle that passed every check (the operator's first one until a fetch succeeds).
    pub last_good: Option<Bundle>,
    /// When it was fetched (`None`: the operator's, never fetched).
    pub fetched_at: Option<SystemTime>,
    /// The last fetch's failure, while fetches fail: what, and since when.
    pub failure: Option<(String, SystemTime)>,
    /// When to fetch next.
    pub next_fetch: SystemTime,
}

impl Federated {
    /// Nothing fetched yet; `first` is the operator's first bundle (needed for `https_spiffe`).
    pub fn new(first: Option<Bundle>, now: SystemTime) -> Self {
        Federated { last_good: first, fetched_at: None, failure: None, next_fetch: now }
    }

    /// The pure step after a fetch at `now`. A good bundle replaces the last good one (unless
    /// its sequence goes back with different roots: an older copy of the document, refused) and
    /// schedules the next fetch at its refresh hint, within [`REFRESH_BOUNDS`]. A failure keeps
    /// the last good bundle, records why (since the first failure of a run), and retries after
    /// [`retry_after`] (2 s, doubling, at most [`RETRY`]).
    pub fn observe(&self, result: Result<Bundle, FetchError>, now: SystemTime) -> Federated {
        let failed = |why: String| {
            let since = self.failure.as_ref().map_or(now, |(_, since)| *since);
            Federated {
                last_good: self.last_good.clone(),
                fetched_at: self.fetched_at,
                failure: Some((why, since)),
                next_fetch: now + retry_after(since, now),
            }
        };
        match result {
            Ok(b) => {
                if let Some(old) =
                    self.last_good.as_ref().filter(|o| self.fetched_at.is_some() && o.sequence > b.sequence)
                    && old.authorities != b.authorities
                {
                    return failed(format!(
                        "the bundle of {} went back from sequence {} to {} with other roots; the newer one is kept",
                        b.trust_domain, old.sequence, b.sequence
                    ));
                }
                let (lo, hi) = REFRESH_BOUNDS;
                let refresh = b.refresh_hint.unwrap_or(DEFAULT_REFRESH).clamp(lo, hi);
                Federated { last_good: Some(b), fetched_at: Some(now), failure: None, next_fetch: now + refresh }
            }
            Err(e) => failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(sequence: u64, hint: Option<Duration>) -> Bundle {
        Bundle {
            trust_domain: TrustDomain::new("foreign.example").expect("td"),
            sequence,
            refresh_hint: hint,
            authorities: Vec::new(),
        }
    }

    #[test]
    fn failures_are_retried_soon_then_less_often_up_to_the_cap() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = Federated::new(None, t0);
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..8 {
            s = s.observe(
                Err(FetchError::Status {
                    trust_domain: TrustDomain::new("foreign.example").expect("td"),
                    url: "https://x/".into(),
                    status: 503,
                }),
                now,
            );
            let wait = s.next_fetch.duration_since(now).unwrap_or_default();
            waits.push(wait.as_secs());
            now = s.next_fetch;
        }
        assert_eq!(waits, [2, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(s.failure.map(|(_, since)| since), Some(t0), "failing since the first failure");
    }

    #[test]
    fn the_refresh_hint_is_honoured_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Federated::new(None, now);
        let at = |hint| s.observe(Ok(bundle(1, hint)), now).next_fetch;
        assert_eq!(at(None), now + DEFAULT_REFRESH);
        assert_eq!(at(Some(Duration::from_secs(600))), now + Duration::from_secs(600));
        assert_eq!(at(Some(Duration::from_secs(1))), now + REFRESH_BOUNDS.0);
        assert_eq!(at(Some(Duration::from_secs(30 * 86400))), now + REFRESH_BOUNDS.1);
    }

    #[test]
    fn an_older_copy_with_the_same_roots_is_accepted_and_the_operators_first_bundle_never_blocks() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // The operator's first bundle (never fetched) may carry any sequence.
        let s = Federated::new(Some(bundle(9, None)), now).observe(Ok(bundle(3, None)), now);
        assert_eq!((s.last_good.map(|b| b.sequence), s.failure), (Some(3), None));
        // A fetched bundle followed by a lower sequence with the same roots (a replica behind).
        let s = Federated::new(None, now).observe(Ok(bundle(5, None)), now).observe(Ok(bundle(4, None)), now);
        assert_eq!(s.failure, None);
    }
}
