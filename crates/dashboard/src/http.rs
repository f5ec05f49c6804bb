//! The dashboard's routes.
//!
//! | route | unauthenticated | authenticated |
//! |---|---|---|
//! | `GET /` | the login page | the dashboard page |
//! | `POST /login` (`token=…`) | a session cookie and a redirect to `/`, or the login page again (401) | same |
//! | `POST /logout` | — | ends the session |
//! | `GET /api/status` | 401 | the status document (`meshca status -o json`) |
//! | `GET /app.js` … ([`crate::assets::FILES`]) | the static files: code, no data | same |
//!
//! Every response carries [`security_headers`]: a Content-Security-Policy that allows only the
//! dashboard's own files (no inline script or style, no other origin, no framing), and is never
//! cached unless it is a static file.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshca_clock::SharedClock;

use crate::auth::{self, LoginDigest, Sessions};
use crate::listener::Peer;
use crate::{Dashboard, StatusSource, assets};

/// The Content-Security-Policy of every response: only this origin's files; no inline script or
/// style, no `eval`, no plugins, no `<base>`, no framing by anyone; forms post only here; and
/// Trusted Types required, so no script can assign HTML as a string.
pub const CSP: &str = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
                       form-action 'self'; require-trusted-types-for 'script'; trusted-types 'none'";

/// The largest request body accepted (the login form).
const MAX_BODY: usize = 4096;

/// The handlers' shared state.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    source: Arc<dyn StatusSource>,
    login: LoginDigest,
    sessions: Sessions,
    ttl: Duration,
    clock: SharedClock,
}

impl AppState {
    /// State for `dashboard`, whose sessions last `ttl`.
    pub fn new(dashboard: Dashboard, ttl: Duration) -> Self {
        AppState(Arc::new(Inner {
            source: dashboard.source,
            login: dashboard.login,
            sessions: Sessions::new(ttl),
            ttl,
            clock: dashboard.clock,
        }))
    }

    /// Whether the request comes from someone allowed to see the mesh: an operator's client
    /// certificate, or an open session.
    fn authenticated(&self, peer: &Peer, headers: &HeaderMap) -> bool {
        peer.operator.is_some()
            || auth::session_cookie(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
                .is_some_and(|id| self.0.sessions.check(id, self.0.clock.now()))
    }
}

/// The dashboard's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/api/status", get(status))
        .fallback(file)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// The login page; with `failed`, it says the token was wrong.
fn login_page(failed: bool) -> String {
    if failed {
        assets::LOGIN.replace(r#"id="login-failed" hidden"#, r#"id="login-failed""#)
    } else {
        assets::LOGIN.to_string()
    }
}

async fn page(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<Peer>, headers: HeaderMap) -> Response {
    if s.authenticated(&peer, &headers) {
        html(StatusCode::OK, assets::INDEX.to_string())
    } else {
        html(StatusCode::OK, login_page(false))
    }
}

/// A form posted from another site carries its `Origin` (or `Sec-Fetch-Site: cross-site`):
/// refused, so no page elsewhere can log a browser in or out of the dashboard.
fn same_origin(headers: &HeaderMap) -> bool {
    if headers.get("sec-fetch-site").is_some_and(|v| v != "same-origin" && v != "none") {
        return false;
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            origin.to_str().ok().and_then(|o| o.strip_prefix("https://")) == host.to_str().ok()
        }
        (Some(_), None) => false,
    }
}

/// The login form.
#[derive(serde::Deserialize)]
pub struct LoginForm {
    token: String,
}

async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site request refused\n").into_response();
    }
    if !s.0.login.matches(&form.token) {
        tracing::info!(peer = %peer.addr, "dashboard login with a wrong token");
        return html(StatusCode::UNAUTHORIZED, login_page(true));
    }
    match s.0.sessions.open(s.0.clock.now()) {
        Ok(session) => {
            tracing::info!(peer = %peer.addr, "dashboard login");
            let cookie = auth::set_cookie(&session.id, s.0.ttl);
            (StatusCode::SEE_OTHER, [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, cookie)]).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site request refused\n").into_response();
    }
    if let Some(id) = auth::session_cookie(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok())) {
        s.0.sessions.close(id);
    }
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, auth::clear_cookie())])
        .into_response()
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn status(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<Peer>, headers: HeaderMap) -> Response {
    if !s.authenticated(&peer, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "log in first: the operator's client certificate or the login token",
        );
    }
    match s.0.source.document().await {
        Ok(doc) => axum::Json(doc).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "the dashboard could not collect the status");
            json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}

async fn file(method: Method, uri: Uri) -> Response {
    match assets::find(uri.path()) {
        Some(a) if method == Method::GET || method == Method::HEAD => {
            (StatusCode::OK, [(header::CONTENT_TYPE, a.content_type), (header::CACHE_CONTROL, "no-cache")], a.body)
                .into_response()
        }
        Some(_) => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// Adds the security headers to `response` (and `Cache-Control: no-store` unless it says
/// otherwise: pages and data must not stay in a browser's cache).
pub async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it browsers send `Origin: null` on the page's own form posts,
    // and the origin check of the login form needs the real one. No referrer leaves the origin.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_same_origin_forms_are_accepted() {
        assert!(same_origin(&headers(&[])), "curl sends no Origin");
        assert!(same_origin(&headers(&[("origin", "https://localhost:7444"), ("host", "localhost:7444")])));
        assert!(!same_origin(&headers(&[("origin", "https://evil.example"), ("host", "localhost:7444")])));
        assert!(!same_origin(&headers(&[("origin", "http://localhost:7444"), ("host", "localhost:7444")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
    }

    #[test]
    fn the_login_page_can_say_the_token_was_wrong() {
        assert!(assets::LOGIN.contains(r#"id="login-failed" hidden"#), "the page has the hidden message");
        assert!(!login_page(true).contains(r#"id="login-failed" hidden"#));
        assert_eq!(login_page(false), assets::LOGIN);
    }
}
