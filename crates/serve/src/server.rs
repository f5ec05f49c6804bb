//! A gRPC server over meshca's rustls configurations whose every connection, and every call on
//! it, is a task the server owns.
//!
//! Why not tonic's own server loop: it spawns each connection and call as a detached task, has no
//! handshake, preface or idle timeout and no connection cap, and its graceful stop waits for every
//! connection without a bound — one client that never sends the HTTP/2 preface keeps a stopping
//! server alive for ever. Here:
//!
//! - a connection must finish TLS within the handshake timeout, and send the HTTP/2 preface
//!   within the preface timeout after that, or it is closed;
//! - a connection with no call in flight for the idle timeout gets a GOAWAY;
//! - connections are capped per address, per client identity and in total (under the open-file
//!   limit), shedding the oldest idle connection first ([`crate::conn`]);
//! - an accept that fails for want of descriptors is reported as exactly that, and the oldest idle
//!   connection is shed to free one;
//! - on stop, the listener closes at once, every connection gets a GOAWAY, calls in flight have
//!   the drain timeout to finish, and whatever is left after it is closed: [`GrpcServer::serve`]
//!   returns within the drain timeout of the stop signal, and no task it started outlives it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::ServiceExt;

use crate::conn::{Admit, Caps, CloseReason, Entry, Kind, Registry};
use crate::fd;
use crate::metrics::ServeMetrics;

/// How connections are handled. [`ServeConfig::default`] gives meshca's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// Connection caps.
    pub caps: Caps,
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// From the end of the TLS handshake to the client's HTTP/2 connection preface.
    pub preface_timeout: Duration,
    /// How long a connection may go without a call in flight before it gets a GOAWAY.
    pub idle_timeout: Duration,
    /// On stop, how long calls in flight have to finish before their connections are closed.
    pub drain_timeout: Duration,
    /// Calls one connection may have in flight at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive pings to a connection with calls in flight, so a peer that vanished is
    /// noticed (none: no pings).
    pub keepalive_interval: Option<Duration>,
    /// How long a keep-alive ping may go unanswered.
    pub keepalive_timeout: Duration,
}

/// Default cap on all connections, before the open-file limit lowers it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default cap per address.
pub const DEFAULT_MAX_PER_PEER: usize = 128;
/// Default cap per client identity.
pub const DEFAULT_MAX_PER_IDENTITY: usize = 16;

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            caps: Caps {
                total: fd::connections_within(fd::open_file_limit(), DEFAULT_MAX_CONNECTIONS),
                per_peer: DEFAULT_MAX_PER_PEER,
                per_identity: DEFAULT_MAX_PER_IDENTITY,
            },
            handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// How long a connection that got a GOAWAY (idle, or shed while a call raced in) has before it is
/// closed outright.
const SHED_GRACE: Duration = Duration::from_secs(1);
/// Largest header block accepted (a bearer token is a few KB).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control windows: how much request data a client may send before the server has
/// read it, per call (HTTP/2's own default) and per connection (hyper's defaults are 1 MiB each).
/// meshca's requests are a few KB (64 KiB at most for the workload CA), so this costs nothing,
/// and it bounds what a connection can make the server buffer to 256 KiB.
const STREAM_WINDOW: u32 = 65_535;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// The HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) is this long.
const PREFACE_LEN: u64 = 24;

/// What to do with a new connection, decided before TLS (see [`GrpcServer::with_router`]).
pub enum Route {
    /// Serve it here.
    Serve,
    /// Hand the TCP stream to this (a follower forwarding to its leader); the server owns the
    /// task and ends it when it stops.
    Forward(Box<dyn FnOnce(TcpStream) -> BoxFuture<'static, ()> + Send>),
    /// Close it.
    Close,
}

/// Names the identity a client certificate chain proves, for the per-identity cap.
pub type Identify = Arc<dyn Fn(&[CertificateDer<'_>]) -> Option<String> + Send + Sync>;

/// A router deciding, per connection, from its address.
pub type Router = Box<dyn FnMut(SocketAddr) -> Route + Send>;

/// A gRPC server (see the module documentation).
pub struct GrpcServer {
    cfg: ServeConfig,
    tls: Arc<rustls::ServerConfig>,
    routes: tonic::service::Routes,
    router: Option<Router>,
    identify: Option<Identify>,
    metrics: ServeMetrics,
}

/// Logs a condition at most once per interval (a flood must not become a log flood), with how
/// many times it happened in between.
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Throttled { last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last time)` when this occurrence should be logged.
    fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now < l + Self::EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// What every connection task needs.
struct Ctx {
    cfg: ServeConfig,
    acceptor: TlsAcceptor,
    routes: tonic::service::Routes,
    identify: Option<Identify>,
    metrics: ServeMetrics,
    registry: Mutex<Registry>,
    exec: OwnedExecutor,
    stopping: CancellationToken,
    shed_log: Mutex<Throttled>,
    /// Failed handshakes, throttled per distinct error (a flood of one kind of garbage logs
    /// once per interval; a new kind of failure is logged at once).
    handshake_log: Mutex<std::collections::HashMap<String, Throttled>>,
}

impl Ctx {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_handshake_failure(&self, peer: SocketAddr, error: &std::io::Error) {
        let text = error.to_string();
        let mut logs = self.handshake_log.lock().unwrap_or_else(|p| p.into_inner());
        if logs.len() >= 64 && !logs.contains_key(&text) {
            logs.clear();
        }
        if let Some(suppressed) = logs.entry(text).or_insert_with(Throttled::new).hit() {
            tracing::info!(%peer, error = %error, suppressed, "TLS handshake failed");
        }
    }

    fn count_shed(&self, shed: &[Arc<Entry>], why: &str) {
        if shed.is_empty() {
            return;
        }
        let mut log = self.shed_log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = log.hit() {
            tracing::warn!(
                shed = shed.len(),
                oldest_from = %shed[0].peer,
                suppressed,
                "{why}: closing the oldest idle connection(s) to make room"
            );
        }
    }
}

/// Runs hyper's per-call tasks in a tracker the server waits for, cancellable at the drain
/// deadline: no call outlives the server.
#[derive(Clone)]
struct OwnedExecutor {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<F> hyper::rt::Executor<F> for OwnedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }
}

impl GrpcServer {
    /// A server for `routes` over `tls` (whose ALPN must offer `h2`, as
    /// `meshca_tls::grpc::server_config_for_grpc` sets it), counting into `metrics`.
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        routes: tonic::service::Routes,
        cfg: ServeConfig,
        metrics: ServeMetrics,
    ) -> Self {
        GrpcServer { cfg, tls, routes, router: None, identify: None, metrics }
    }

    /// Decides before TLS what becomes of each connection (a replica that does not lead forwards
    /// them). Without a router every connection is served.
    pub fn with_router(mut self, router: Router) -> Self {
        self.router = Some(router);
        self
    }

    /// Charges connections whose client certificate proves an identity to that identity (the
    /// per-identity cap) instead of their address.
    pub fn with_identify(mut self, identify: Identify) -> Self {
        self.identify = Some(identify);
        self
    }

    /// Serves connections from `listener` until `stop` resolves, then drains (see the module
    /// documentation). Returns when every connection and call has ended.
    pub async fn serve(self, listener: TcpListener, stop: impl Future<Output = ()>) {
        let GrpcServer { cfg, tls, routes, mut router, identify, metrics } = self;
        let streams = TaskTracker::new();
        let streams_cancel = CancellationToken::new();
        let ctx = Arc::new(Ctx {
            cfg,
            acceptor: TlsAcceptor::from(tls),
            routes,
            identify,
            metrics,
            registry: Mutex::new(Registry::new(cfg.caps)),
            exec: OwnedExecutor { tracker: streams.clone(), cancel: streams_cancel.clone() },
            stopping: CancellationToken::new(),
            shed_log: Mutex::new(Throttled::new()),
            handshake_log: Mutex::new(std::collections::HashMap::new()),
        });
        let mut conns = JoinSet::new();
        let mut exhausted_log = Throttled::new();
        let mut refused_log = Throttled::new();
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    report_panic(done);
                    continue;
                }
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    let pause = match fd::exhaustion(&e) {
                        Some(what) => {
                            ctx.metrics.exhausted.inc();
                            let victim = ctx.registry().shed_oldest_idle();
                            if let Some(v) = &victim {
                                ctx.metrics.closed(CloseReason::Shed);
                                ctx.count_shed(std::slice::from_ref(v), what.explain());
                                wait_gone(std::slice::from_ref(v)).await;
                            }
                            if let Some(suppressed) = exhausted_log.hit() {
                                tracing::error!(
                                    error = %e,
                                    suppressed,
                                    shed_an_idle_connection = victim.is_some(),
                                    open = ctx.registry().len(),
                                    "accepting a connection failed: {}; lower --max-connections or raise the limit",
                                    what.explain()
                                );
                            }
                            Duration::from_millis(20)
                        }
                        None => {
                            tracing::warn!(error = %e, "accepting a connection failed");
                            Duration::from_millis(50)
                        }
                    };
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            ctx.metrics.accepted.inc();
            // gRPC answers a unary call with several small writes (headers, data, trailers); with
            // Nagle on, the last one waits for the client's delayed ACK: +40 ms on every call.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
            }
            let route = router.as_mut().map_or(Route::Serve, |r| r(peer));
            let kind = match route {
                Route::Serve => Kind::Direct,
                Route::Forward(_) => Kind::Forwarded,
                Route::Close => continue,
            };
            let admitted = ctx.registry().admit(peer, kind, Instant::now());
            let entry = match admitted {
                Admit::Yes { entry, shed } => {
                    for _ in &shed {
                        ctx.metrics.closed(CloseReason::Shed);
                    }
                    ctx.count_shed(&shed, "at a connection cap");
                    // Accept nothing more until their descriptors are free: a flood arriving
                    // faster than the shed tasks run must not push the process past its limit.
                    wait_gone(&shed).await;
                    entry
                }
                Admit::No { cap } => {
                    ctx.metrics.closed(CloseReason::Refused);
                    if let Some(suppressed) = refused_log.hit() {
                        tracing::warn!(%peer, cap, suppressed, "connection refused: at the {cap} connection cap and every connection there has a call in flight");
                    }
                    continue;
                }
            };
            ctx.metrics.open.inc();
            match route {
                Route::Forward(forward) => {
                    conns.spawn(forwarded(forward(tcp), entry, ctx.clone()));
                }
                _ => {
                    conns.spawn(connection(tcp, entry, ctx.clone()));
                }
            }
        }

        // Stop: refuse new connections at once, GOAWAY to every connection, a bounded drain.
        drop(listener);
        ctx.stopping.cancel();
        let grace = ctx.cfg.drain_timeout;
        tracing::info!(connections = conns.len(), ?grace, "stopping: no new connections; calls in flight may finish");
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = conns.join_next().await {
                report_panic(done);
            }
            streams.close();
            streams.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = conns.len(),
                calls = streams.len(),
                ?grace,
                "calls still in flight at the end of the drain; closing their connections"
            );
            conns.abort_all();
            while conns.join_next().await.is_some() {}
            streams_cancel.cancel();
            streams.close();
            streams.wait().await;
        }
        ctx.metrics.open.set(0);
    }
}

/// How long the accept loop waits for a shed connection to close (its task normally does so as
/// soon as it runs; one that raced into a call gets a GOAWAY and [`SHED_GRACE`] instead).
const SHED_WAIT: Duration = Duration::from_millis(250);

/// Waits (bounded by [`SHED_WAIT`] in all) until the shed connections have closed their sockets.
async fn wait_gone(shed: &[Arc<Entry>]) {
    if shed.is_empty() {
        return;
    }
    let _ = tokio::time::timeout(SHED_WAIT, futures::future::join_all(shed.iter().map(|e| e.gone()))).await;
}

fn report_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection task panicked");
    }
}

/// A forwarded connection: the router's future, until it ends or the server stops.
async fn forwarded(forward: BoxFuture<'static, ()>, entry: Arc<Entry>, ctx: Arc<Ctx>) {
    tokio::select! {
        _ = forward => {}
        _ = ctx.stopping.cancelled() => ctx.metrics.closed(CloseReason::Stopping),
        _ = entry.close_token().cancelled() => {}
    }
    entry.set_gone();
    ctx.registry().remove(entry.id);
    ctx.metrics.open.dec();
}

/// One served connection, from TLS to close.
async fn connection(tcp: TcpStream, entry: Arc<Entry>, ctx: Arc<Ctx>) {
    // The socket is dropped when `serve_connection` returns.
    if let Some(reason) = serve_connection(tcp, &entry, &ctx).await {
        ctx.metrics.closed(reason);
    }
    entry.set_gone();
    ctx.registry().remove(entry.id);
    ctx.metrics.open.dec();
}

/// Serves a connection; returns why the server closed it (`None`: the client did, or an error).
async fn serve_connection(tcp: TcpStream, entry: &Arc<Entry>, ctx: &Ctx) -> Option<CloseReason> {
    let peer = entry.peer;
    let tls = tokio::select! {
        r = tokio::time::timeout(ctx.cfg.handshake_timeout, ctx.acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                ctx.log_handshake_failure(peer, &e);
                return Some(CloseReason::HandshakeFailed);
            }
            Err(_) => {
                tracing::debug!(%peer, timeout = ?ctx.cfg.handshake_timeout, "TLS handshake timed out");
                return Some(CloseReason::HandshakeTimeout);
            }
        },
        // Shed or stopped during the handshake: a connection that never served anything closes.
        _ = entry.close_token().cancelled() => return None,
        _ = ctx.stopping.cancelled() => return Some(CloseReason::Stopping),
    };
    if let Some(identify) = &ctx.identify
        && let Some(identity) = tls.get_ref().1.peer_certificates().and_then(|c| identify(c))
    {
        let admitted = ctx.registry().identify(entry.id, identity.clone());
        match admitted {
            Admit::Yes { shed, .. } => {
                for _ in &shed {
                    ctx.metrics.closed(CloseReason::Shed);
                }
                ctx.count_shed(&shed, "at the per-identity connection cap");
            }
            Admit::No { cap } => {
                tracing::warn!(%peer, %identity, cap, "connection refused: at the {cap} connection cap and every connection there has a call in flight");
                return Some(CloseReason::Refused);
            }
        }
    }
    let info: TlsConnectInfo<TcpConnectInfo> = tls.connect_info();
    let preface = Arc::new(AtomicBool::new(false));
    let io = Watched { inner: tls, read: 0, preface: preface.clone() };
    let svc = ConnService { routes: ctx.routes.clone(), info, entry: entry.clone() };
    let mut builder = hyper::server::conn::http2::Builder::new(ctx.exec.clone());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(ctx.cfg.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(ctx.cfg.keepalive_interval)
        .keep_alive_timeout(ctx.cfg.keepalive_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let preface_deadline = Instant::now() + ctx.cfg.preface_timeout;
    // Once a GOAWAY is sent: why, and when the connection is closed outright if it lingers.
    let mut closing: Option<(CloseReason, Instant)> = None;
    loop {
        let idle_deadline = if entry.is_idle() {
            entry.idle_since() + ctx.cfg.idle_timeout
        } else {
            Instant::now() + ctx.cfg.idle_timeout
        };
        let hard_deadline = closing.map(|(_, at)| at);
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return counted_here(closing);
            }
            // (The guard is read when the loop goes round; the preface may have come since.)
            _ = tokio::time::sleep_until(preface_deadline), if closing.is_none() && !preface.load(Ordering::Acquire) => {
                if !preface.load(Ordering::Acquire) {
                    tracing::debug!(%peer, timeout = ?ctx.cfg.preface_timeout, "no HTTP/2 preface in time; closing");
                    return Some(CloseReason::PrefaceTimeout);
                }
            }
            _ = tokio::time::sleep_until(idle_deadline), if closing.is_none() => {
                if entry.is_idle() && entry.idle_since() + ctx.cfg.idle_timeout <= Instant::now() {
                    tracing::debug!(%peer, timeout = ?ctx.cfg.idle_timeout, "idle connection; sending GOAWAY");
                    conn.as_mut().graceful_shutdown();
                    closing = Some((CloseReason::Idle, Instant::now() + SHED_GRACE));
                }
            }
            _ = entry.close_token().cancelled(), if closing.is_none() => {
                // Shed to free its descriptor: it was idle when chosen, so it is closed at once
                // (already counted by whoever shed it) — unless a call raced in since, which
                // then gets a GOAWAY and a moment to finish.
                if entry.is_idle() {
                    return None;
                }
                conn.as_mut().graceful_shutdown();
                closing = Some((CloseReason::Shed, Instant::now() + SHED_GRACE));
            }
            _ = ctx.stopping.cancelled(), if closing.is_none() => {
                // Nothing can be in flight before the preface: close it now rather than wait for
                // a preface that may never come.
                if !preface.load(Ordering::Acquire) {
                    return Some(CloseReason::Stopping);
                }
                conn.as_mut().graceful_shutdown();
                // The server's own drain deadline ends this one (and says so); this is a backstop.
                closing = Some((CloseReason::Stopping, Instant::now() + ctx.cfg.drain_timeout + SHED_GRACE));
            }
            _ = tokio::time::sleep_until(hard_deadline.unwrap_or_else(Instant::now)), if hard_deadline.is_some() => {
                return counted_here(closing);
            }
        }
    }
}

/// The reason to count for a connection closed after a GOAWAY: a shed one was already counted by
/// whoever shed it.
fn counted_here(closing: Option<(CloseReason, Instant)>) -> Option<CloseReason> {
    closing.map(|(why, _)| why).filter(|w| *w != CloseReason::Shed)
}

/// The TLS stream, noting when the client's HTTP/2 preface has arrived.
struct Watched {
    inner: TlsStream<TcpStream>,
    read: u64,
    preface: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.read < PREFACE_LEN {
            self.read += (buf.filled().len() - before) as u64;
            if self.read >= PREFACE_LEN {
                self.preface.store(true, Ordering::Release);
            }
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One connection's view of the routes: each call carries the connection's TLS information (for
/// `Request::peer_certs` and `remote_addr`) and counts as in flight until its response body ends.
#[derive(Clone)]
struct ConnService {
    routes: tonic::service::Routes,
    info: TlsConnectInfo<TcpConnectInfo>,
    entry: Arc<Entry>,
}

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<Tracked<tonic::body::Body>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        let guard = self.entry.call();
        let call = self.routes.clone().oneshot(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| Tracked { body, _guard: guard }))
        })
    }
}

/// A response body that keeps its call counted as in flight until it is finished (a stream's
/// body lives as long as the stream).
struct Tracked<B> {
    body: B,
    _guard: crate::conn::CallGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
