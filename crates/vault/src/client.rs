//! Vault's HTTP API: JSON in and out under `/v1/`, the token in `X-Vault-Token`, the namespace
//! (Vault Enterprise) in `X-Vault-Namespace`, and Vault's `{"errors": [...]}` turned into
//! [`VaultError::Api`] with the HTTP status.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::VaultError;
use crate::auth::Secret;
use crate::http::HttpClient;

/// How long one Vault call may take (connect, TLS, answer) before it counts as an outage.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A Vault server.
pub struct VaultClient {
    http: HttpClient,
    server: String,
    namespace: Option<String>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient").field("server", &self.server).field("namespace", &self.namespace).finish()
    }
}

impl VaultClient {
    /// A client for `server` (`https://host:8200`). `ca_file` verifies Vault's certificate (the
    /// system bundle when `None`); `namespace` is sent as `X-Vault-Namespace`.
    pub fn new(
        server: &str,
        ca_file: Option<&Path>,
        namespace: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, VaultError> {
        let http = crate::http::client(server, ca_file, timeout)
            .map_err(|message| VaultError::Config { field: "spec.config.vault.server".into(), message })?;
        Ok(VaultClient {
            http,
            server: server.trim_end_matches('/').to_string(),
            namespace: namespace.filter(|n| !n.is_empty()).map(str::to_string),
        })
    }

    /// Vault's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Calls `method /v1/<path>`; returns the JSON answer (`Null` for 204). Non-2xx answers are
    /// [`VaultError::Api`]; Vault's `warnings` are logged at debug level.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<&Value>,
    ) -> Result<Value, VaultError> {
        let path = path.trim_start_matches('/');
        let mut headers: Vec<(&str, &str, bool)> = Vec::new();
        if let Some(t) = token {
            headers.push(("x-vault-token", t.expose(), true));
        }
        if let Some(ns) = &self.namespace {
            headers.push(("x-vault-namespace", ns, false));
        }
        let body = body.map(|b| b.to_string().into_bytes());
        let resp = self
            .http
            .send(method.clone(), &format!("/v1/{path}"), &headers, body)
            .await
            .map_err(|e| VaultError::Unreachable { server: self.server.clone(), reason: e.to_string() })?;
        let json: Option<Value> = serde_json::from_slice(&resp.body).ok();
        if !(200..300).contains(&resp.status) {
            return Err(VaultError::Api {
                method: method.to_string(),
                path: path.to_string(),
                status: resp.status,
                message: error_message(json.as_ref(), &resp.body),
            });
        }
        if let Some(w) = json.as_ref().and_then(|j| j.get("warnings")).and_then(Value::as_array) {
            for warning in w.iter().filter_map(Value::as_str) {
                tracing::debug!(%path, warning, "Vault warning");
            }
        }
        match json {
            Some(v) => Ok(v),
            None if resp.body.is_empty() => Ok(Value::Null),
            None => Err(VaultError::BadResponse { path: path.to_string(), reason: "not JSON".into() }),
        }
    }
}

/// Vault's `errors` as one line: `["1 error occurred:\n\t* permission denied\n\n"]` becomes
/// `permission denied`.
pub(crate) fn error_message(json: Option<&Value>, raw: &[u8]) -> String {
    let errors: Vec<String> = json
        .and_then(|j| j.get("errors"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).flat_map(split_multierror).collect())
        .unwrap_or_default();
    if !errors.is_empty() {
        return errors.join("; ");
    }
    let text: String = String::from_utf8_lossy(raw).chars().filter(|c| !c.is_control()).take(200).collect();
    if text.trim().is_empty() { "no error message".into() } else { text.trim().to_string() }
}

/// Go's multierror text ("2 errors occurred:\n\t* a\n\t* b\n\n") as its items.
fn split_multierror(s: &str) -> Vec<String> {
    let items: Vec<String> =
        s.lines().filter_map(|l| l.trim().strip_prefix("* ")).map(|l| l.trim().to_string()).collect();
    if items.is_empty() { vec![s.trim().to_string()] } else { items }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_read_as_one_line() {
        let j: Value =
            serde_json::from_str(r#"{"errors":["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"]}"#)
                .unwrap_or_default();
        assert_eq!(error_message(Some(&j), b""), "permission denied; invalid token");
        let j: Value = serde_json::from_str(r#"{"errors":["invalid role or secret ID"]}"#).unwrap_or_default();
        assert_eq!(error_message(Some(&j), b""), "invalid role or secret ID");
        assert_eq!(error_message(None, b"<html>bad gateway</html>\n"), "<html>bad gateway</html>");
        assert_eq!(error_message(None, b""), "no error message");
    }
}
