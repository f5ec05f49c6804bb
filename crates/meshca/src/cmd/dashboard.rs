//! The web dashboard's listener and login token, for `meshca server --dashboard-addr` and
//! `meshca up`: bound here so the address is known (and printed) before the server starts; the
//! token is shown to the operator once and only its digest goes to the server.

use std::net::SocketAddr;

use anyhow::Context;
use meshca_dashboard::LoginToken;
use meshca_mgmt::DashboardListener;

/// How to reach the dashboard.
pub struct Access {
    /// `https://<host>:<port>/`.
    pub url: String,
    /// The login token.
    pub token: LoginToken,
}

impl Access {
    /// The address with the login token in its fragment: opening it logs in (a fragment never
    /// reaches a server, a proxy or a Referer header).
    pub fn login_url(&self) -> String {
        format!("{}#token={}", self.url, self.token.secret())
    }
}

/// Binds `addr` and makes a login token. The URL names the serving certificate's first host name
/// (`hostnames`), so a browser that trusts the relay CA accepts it.
pub async fn open(addr: SocketAddr, hostnames: &[String]) -> anyhow::Result<(DashboardListener, Access)> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the dashboard to {addr}"))?;
    let port = listener.local_addr().context("the dashboard's address")?.port();
    let host = hostnames.first().map(String::as_str).unwrap_or("localhost");
    let token = LoginToken::generate()?;
    let access = Access { url: format!("https://{host}:{port}/"), token };
    Ok((DashboardListener { listener, login: access.token.digest() }, access))
}
