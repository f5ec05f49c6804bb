//! The page's files, embedded in the binary: the dashboard needs no network and no CDN, and what
//! runs in the browser is exactly what was built and tested.
//!
//! No HTML file holds an inline script or style (the Content-Security-Policy forbids them), and
//! the script never writes HTML as text: it builds elements, so a value from the status document
//! (a cluster name, an error message) can only ever be text.

/// A static file.
#[derive(Debug)]
pub struct Asset {
    /// Its URL path.
    pub path: &'static str,
    /// Its media type.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The dashboard page, for an authenticated viewer.
pub const INDEX: &str = include_str!("../assets/index.html");

/// The login page, for everyone else.
pub const LOGIN: &str = include_str!("../assets/login.html");

/// The files the pages load. Public: they are the same for everyone and hold no data.
pub const FILES: &[Asset] = &[
    Asset { path: "/app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../assets/app.js") },
    Asset {
        path: "/login.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/login.js"),
    },
    Asset { path: "/app.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../assets/app.css") },
    Asset {
        path: "/d3.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/vendor/d3.min.js"),
    },
    Asset { path: "/favicon.svg", content_type: "image/svg+xml", body: include_bytes!("../assets/favicon.svg") },
];

/// The file at `path`.
pub fn find(path: &str) -> Option<&'static Asset> {
    FILES.iter().find(|a| a.path == path)
}
