//! `issue-load`: cluster intermediates per second from one `meshca server` (`IssueIntermediate`)
//! and from a real Vault (`<mount>/root/sign-intermediate`), for the same CSRs, same key type,
//! in the same run (docs/benchmarks.md, "IssueIntermediate vs Vault"; `scripts/bench-issue.sh`).
//!
//! Set-up (not measured): `--clusters` clusters register as `meshca agent` does (bootstrap token,
//! `Register`, a mutual-TLS channel with the issued identity), and `--csrs` intermediate CSRs are
//! made, each for a fresh P-256 key, shaped like the agent's (`O=meshca, CN=meshca intermediate,
//! L=<cluster>`), round-robin over the clusters.
//!
//! Then, per round, each target signs every CSR once, `--concurrency` requests in flight:
//! - meshca: `IssueIntermediate` on the CSR's cluster's warm mTLS channel (the server checks the
//!   caller, the CSR and the key's novelty, signs, and records the serial durably before it
//!   answers);
//! - Vault: `POST /v1/<path>` with the body meshca's Vault mode sends (`meshca_vault::pki::sign`),
//!   over keep-alive HTTP/1.1 connections, one per caller, with the root token.
//!
//! Every answer is parsed as a certificate and checked to certify the CSR's key.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshca_bench::{Latencies, cpu_times};
use meshca_mgmt::server::creds;
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet};
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_proto::mgmt::{CreateBootstrapTokenRequest, IssueIntermediateRequest};
use meshca_tls::grpc;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    /// Management plane `host:port`.
    #[arg(long)]
    server: String,
    /// Operator credentials directory (`<data-dir>/operator` of `meshca server`).
    #[arg(long)]
    credentials: std::path::PathBuf,
    /// TLS server name of the management plane.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Vault's address (`http://127.0.0.1:8200`); without it only meshca is measured.
    #[arg(long)]
    vault_addr: Option<String>,
    /// File with a Vault token allowed to sign.
    #[arg(long)]
    vault_token_file: Option<std::path::PathBuf>,
    /// Vault's sign path.
    #[arg(long, default_value = "pki/root/sign-intermediate")]
    vault_path: String,
    /// Registered clusters the CSRs are spread over.
    #[arg(long, default_value_t = 64)]
    clusters: usize,
    /// CSRs signed by each target per round.
    #[arg(long, default_value_t = 2000)]
    csrs: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Rounds (each target once per round, alternating which goes first).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The management plane's pid, for its CPU time per issuance.
    #[arg(long)]
    server_pid: Option<String>,
    /// Vault's pid, for its CPU time per issuance.
    #[arg(long)]
    vault_pid: Option<String>,
}

/// One target's run.
struct Outcome {
    rate: f64,
    latency: Latencies,
    cpu_per_op: Option<Duration>,
}

fn summary(name: &str, o: &Outcome) -> String {
    format!(
        "{name:<7} {:>8.1} intermediates/s   p50 {} ms  p99 {} ms   CPU per issuance {}",
        o.rate,
        meshca_bench::ms(o.latency.percentile(50.0)),
        meshca_bench::ms(o.latency.percentile(99.0)),
        o.cpu_per_op.map(|d| format!("{:.3} ms", d.as_secs_f64() * 1e3)).unwrap_or_else(|| "?".into())
    )
}

/// Runs `one(i)` for every CSR index, `concurrency` at a time; fails on the first error.
async fn drive<F, Fut>(n: usize, concurrency: usize, pid: Option<&str>, one: F) -> anyhow::Result<Outcome>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let cpu0 = pid.and_then(cpu_times);
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let mut latency = Latencies::default();
    let workers = futures::stream::iter(0..concurrency)
        .map(|w| {
            let (next, one) = (&next, &one);
            async move {
                let mut lat = Latencies::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    lat.push(one(w, i).await?);
                }
            }
        })
        .buffer_unordered(concurrency);
    futures::pin_mut!(workers);
    while let Some(r) = workers.next().await {
        latency.extend(r?);
    }
    let elapsed = t0.elapsed();
    let cpu = pid.and_then(cpu_times).zip(cpu0).map(|(b, a)| b.since(&a).total() / n.max(1) as u32);
    Ok(Outcome { rate: n as f64 / elapsed.as_secs_f64(), latency, cpu_per_op: cpu })
}

/// Checks that `pem` is a certificate for the key `spki`.
fn check(pem: &str, spki: &[u8], who: &str) -> anyhow::Result<()> {
    let cert = Cert::from_pem(pem.as_bytes()).with_context(|| format!("{who}: the answer is not a certificate"))?;
    if cert.spki_der() != spki {
        bail!("{who}: the certificate is for another key");
    }
    Ok(())
}

type VaultConn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn vault_connect(addr: &str) -> anyhow::Result<VaultConn> {
    let hostport = addr.trim_start_matches("http://").trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(hostport).await.with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    meshca_tls::provider::install();
    if a.clusters == 0 || a.concurrency == 0 || a.csrs == 0 {
        bail!("--clusters, --csrs and --concurrency must be at least 1");
    }

    // ---- set-up: clusters and CSRs ----
    let op = OperatorClient::new(grpc::channel(&a.server, creds::client_config(&a.credentials)?, &a.server_name)?);
    let mut issuers: Vec<(String, CertificateIssuerClient<Channel>)> = Vec::new();
    for i in 0..a.clusters {
        let cluster = format!("issue-{i:04}");
        let t = op
            .clone()
            .create_bootstrap_token(CreateBootstrapTokenRequest {
                cluster: cluster.clone(),
                ttl_seconds: 3600,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("token for {cluster}: {}", s.message()))?
            .into_inner();
        let relay = RootSet::from_pem(t.relay_ca.as_bytes())?;
        let (ident, _) = meshca_bench::register(&a.server, &a.server_name, &relay, &cluster, t.token)
            .await
            .map_err(|e| anyhow::anyhow!("{cluster}: {}: {}", e.step, e.error))?;
        let client = meshca_bench::issuer_client(&a.server, &a.server_name, &ident)
            .map_err(|e| anyhow::anyhow!("{cluster}: {}: {}", e.step, e.error))?;
        issuers.push((cluster, client));
    }
    let make_csrs = |round: usize| -> anyhow::Result<Vec<(usize, String, Vec<u8>)>> {
        (0..a.csrs)
            .map(|i| {
                let c = (i + round) % a.clusters;
                let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
                let csr = meshca_agent::source::csr_for(&key, meshca_policy::defaults::ORGANIZATION, &issuers[c].0)?;
                Ok((c, csr, key.public_key_spki().to_vec()))
            })
            .collect()
    };
    let vault_token = match &a.vault_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    println!(
        "issue-load: {} CSRs (P-256) per target per round over {} clusters, {} in flight, {} round(s){}",
        a.csrs,
        a.clusters,
        a.concurrency,
        a.rounds,
        if a.vault_addr.is_some() { ", meshca vs Vault" } else { "" }
    );

    for round in 0..a.rounds {
        // Fresh keys every round: the management plane certifies a key once.
        let csrs = Arc::new(make_csrs(round)?);
        let meshca = || async {
            let csrs = csrs.clone();
            let issuers = &issuers;
            drive(a.csrs, a.concurrency, a.server_pid.as_deref(), move |_, i| {
                let csrs = csrs.clone();
                async move {
                    let (c, csr, spki) = &csrs[i];
                    let mut client = issuers[*c].1.clone();
                    let t = Instant::now();
                    let r = client
                        .issue_intermediate(IssueIntermediateRequest {
                            csr: csr.clone(),
                            reason: meshca_proto::IssueReason::Initial as i32,
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("meshca: {:?}: {}", s.code(), s.message()))?
                        .into_inner();
                    let took = t.elapsed();
                    check(&r.certificate, spki, "meshca")?;
                    Ok(took)
                }
            })
            .await
        };
        let vault = || async {
            let (Some(addr), Some(token)) = (a.vault_addr.as_deref(), vault_token.as_deref()) else {
                return Ok(None);
            };
            let mut conns = Vec::new();
            for _ in 0..a.concurrency {
                conns.push(tokio::sync::Mutex::new(vault_connect(addr).await?));
            }
            let conns = Arc::new(conns);
            let csrs = csrs.clone();
            let path = format!("/v1/{}", a.vault_path.trim_matches('/'));
            let out = drive(a.csrs, a.concurrency, a.vault_pid.as_deref(), move |w, i| {
                let (conns, csrs, path) = (conns.clone(), csrs.clone(), path.clone());
                async move {
                    let (c, csr, spki) = &csrs[i];
                    // The body meshca's Vault mode sends (meshca_vault::pki::sign).
                    let body = json!({
                        "csr": csr,
                        "common_name": meshca_pki::profile::INTERMEDIATE_COMMON_NAME,
                        "organization": meshca_policy::defaults::ORGANIZATION,
                        "locality": format!("issue-{c:04}"),
                        "uri_sans": "spiffe://cluster.local",
                        "ttl": "720h",
                        "format": "pem",
                        "max_path_length": 0,
                        "use_csr_values": false,
                        "key_usage": ["DigitalSignature", "CertSign", "CRLSign"],
                    });
                    let req = hyper::Request::post(&path)
                        .header("host", "vault")
                        .header("x-vault-token", token)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))?;
                    let mut conn = conns[w].lock().await;
                    let t = Instant::now();
                    // Keep-alive: the connection takes the next request once the last one is done.
                    conn.ready().await.context("vault: the connection closed")?;
                    let resp = conn.send_request(req).await.context("vault: sending")?;
                    let status = resp.status();
                    let bytes = resp.into_body().collect().await.context("vault body")?.to_bytes();
                    let took = t.elapsed();
                    if !status.is_success() {
                        bail!("vault: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                    let pem = v["data"]["certificate"].as_str().context("vault: no data.certificate")?;
                    check(pem, spki, "vault")?;
                    Ok(took)
                }
            })
            .await?;
            Ok::<_, anyhow::Error>(Some(out))
        };
        // Alternate which goes first, so warm-up and drift do not favour one.
        let (m, v) = if round % 2 == 0 {
            let m = meshca().await?;
            (m, vault().await?)
        } else {
            let v = vault().await?;
            (meshca().await?, v)
        };
        println!("-- round {}", round + 1);
        println!("  {}", summary("meshca", &m));
        if let Some(v) = v {
            println!("  {}", summary("vault", &v));
            println!("  meshca / vault = {:.2}x", m.rate / v.rate);
        }
    }
    Ok(())
}
