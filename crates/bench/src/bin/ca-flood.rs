//! `ca-flood`: the rate real workloads keep getting certificates at while an anonymous client
//! floods the workload CA (issue 19's benchmark, docs/benchmarks.md).
//!
//! Real workloads: N callers, each from its own loopback address (127.0.1.x, as pods have their
//! own addresses) with its own service-account token, each asking for a certificate at a paced
//! rate on its own connection. The flood: M connections from one address (127.0.0.2), each
//! sending `CreateCertificate` as fast as the server answers, alternately with no token and with
//! a real token whose signature is corrupted (so that, unrefused, it costs a full signature check).
//! Two phases of the same length, one after the other: quiet (real workloads only), then flood
//! (both). Every answer is counted by its status.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meshca_bench::{Latencies, cpu_times};
use meshca_pki::{KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::Channel;

/// Real workloads beside an anonymous flood.
#[derive(Parser)]
struct Args {
    /// `host:port` of the workload CA.
    #[arg(long)]
    address: String,
    /// The root the workload CA's serving certificate chains to.
    #[arg(long)]
    ca_file: std::path::PathBuf,
    /// TLS server name.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    server_name: String,
    /// Files with one service-account token each: workload i uses file i (mod their number).
    #[arg(long, num_args = 1.., required = true)]
    token_files: Vec<std::path::PathBuf>,
    /// Real workloads, each from its own address 127.0.1.<i+1>.
    #[arg(long, default_value_t = 32)]
    workloads: usize,
    /// Certificates each real workload asks for per second.
    #[arg(long, default_value_t = 2.0)]
    per_workload_rate: f64,
    /// Flooding connections, all from one address.
    #[arg(long, default_value_t = 64)]
    flood_connections: usize,
    /// The flood's address.
    #[arg(long, default_value = "127.0.0.2")]
    flood_source: Ipv4Addr,
    /// Seconds of each phase (quiet, then flood).
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// PID of the CA process, for its CPU time.
    #[arg(long)]
    server_pid: Option<String>,
}

/// A channel to the CA whose connections come from `source`.
fn channel_from(source: Ipv4Addr, args: &Args) -> anyhow::Result<Channel> {
    let roots = RootSet::from_pem(&std::fs::read(&args.ca_file)?)?;
    let mut store = rustls::RootCertStore::empty();
    for r in roots.iter() {
        store.add(rustls_pki_types::CertificateDer::from(r.der().to_vec()))?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(args.server_name.clone())?;
    let target: SocketAddr = args.address.parse().context("--address must be ip:port")?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", args.address))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            let tcp = socket.connect(target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })))
}

fn request(csr: &str, token: Option<&str>) -> anyhow::Result<tonic::Request<IstioCertificateRequest>> {
    let mut req =
        tonic::Request::new(IstioCertificateRequest { csr: csr.into(), validity_duration: 3600, metadata: None });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse()?);
    }
    Ok(req)
}

/// What one phase's real workloads saw.
#[derive(Default)]
struct Real {
    ok: AtomicU64,
    /// RESOURCE_EXHAUSTED (their own budgets, or the queue).
    limited: AtomicU64,
    failed: AtomicU64,
    latencies: Mutex<Latencies>,
}

/// What the flood got back, by status.
#[derive(Default)]
struct Flood {
    exhausted: AtomicU64,
    unauthenticated: AtomicU64,
    other: AtomicU64,
}

async fn real_workload(
    args: Arc<Args>,
    i: usize,
    token: Arc<String>,
    csrs: Arc<Vec<String>>,
    real: Arc<Real>,
    until: Instant,
) -> anyhow::Result<()> {
    let source = Ipv4Addr::new(127, 0, 1, u8::try_from(i + 1).context("at most 254 workloads")?);
    let mut client = IstioCertificateServiceClient::new(channel_from(source, &args)?);
    let period = Duration::from_secs_f64(1.0 / args.per_workload_rate);
    // Spread the workloads' first requests over one period.
    let mut next = Instant::now() + period.mul_f64(i as f64 / args.workloads as f64);
    let mut k = i;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        next += period;
        k += 1;
        let t = Instant::now();
        let r = client.create_certificate(request(&csrs[k % csrs.len()], Some(&token))?).await;
        match r {
            Ok(_) => {
                real.ok.fetch_add(1, Ordering::Relaxed);
                real.latencies.lock().await.push(t.elapsed());
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                real.limited.fetch_add(1, Ordering::Relaxed);
            }
            Err(s) => {
                if real.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("a real request failed: {:?} {}", s.code(), s.message());
                }
            }
        }
    }
    Ok(())
}

async fn flooder(
    args: Arc<Args>,
    bad: Arc<String>,
    csr: String,
    flood: Arc<Flood>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut client = IstioCertificateServiceClient::new(channel_from(args.flood_source, &args)?);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = (n % 2 == 1).then_some(bad.as_str());
        match client.create_certificate(request(&csr, token)?).await {
            Err(s) if s.code() == Code::ResourceExhausted => flood.exhausted.fetch_add(1, Ordering::Relaxed),
            Err(s) if s.code() == Code::Unauthenticated => flood.unauthenticated.fetch_add(1, Ordering::Relaxed),
            _ => flood.other.fetch_add(1, Ordering::Relaxed),
        };
    }
    Ok(())
}

/// Runs the real workloads for one phase; returns what they saw and the server's CPU seconds.
async fn phase(
    args: &Arc<Args>,
    tokens: &[Arc<String>],
    csrs: &Arc<Vec<String>>,
) -> anyhow::Result<(Arc<Real>, Duration, Option<f64>)> {
    let real = Arc::new(Real::default());
    let cpu0 = args.server_pid.as_deref().and_then(cpu_times);
    let start = Instant::now();
    let until = start + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.workloads {
        let token = tokens[i % tokens.len()].clone();
        tasks.push(tokio::spawn(real_workload(args.clone(), i, token, csrs.clone(), real.clone(), until)));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let cpu = match (cpu0, args.server_pid.as_deref().and_then(cpu_times)) {
        (Some(a), Some(b)) => Some(b.since(&a).total().as_secs_f64()),
        _ => None,
    };
    Ok((real, elapsed, cpu))
}

async fn report(name: &str, real: &Real, elapsed: Duration, cpu: Option<f64>) -> f64 {
    let ok = real.ok.load(Ordering::Relaxed);
    let rate = ok as f64 / elapsed.as_secs_f64();
    println!(
        "{name}: real workloads got {ok} certificates in {:.1}s = {rate:.1}/s; refused RESOURCE_EXHAUSTED {}, failed {}",
        elapsed.as_secs_f64(),
        real.limited.load(Ordering::Relaxed),
        real.failed.load(Ordering::Relaxed),
    );
    println!("  real latency {}", real.latencies.lock().await.summary());
    if let Some(c) = cpu {
        println!("  server CPU {c:.2}s ({:.0}% of one core)", 100.0 * c / elapsed.as_secs_f64());
    }
    rate
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meshca_tls::provider::install();
    let args = Arc::new(Args::parse());
    let mut tokens = Vec::new();
    for f in &args.token_files {
        tokens.push(Arc::new(std::fs::read_to_string(f).with_context(|| f.display().to_string())?.trim().to_string()));
    }
    // A real token with its signature corrupted: it passes every cheap check and fails only the
    // signature verification, the most a bad token can cost the CA.
    let mut bad = tokens[0].to_string();
    let last = bad.pop().context("an empty token")?;
    bad.push(if last == 'A' { 'B' } else { 'A' });
    let bad = Arc::new(bad);
    let mut csrs = Vec::new();
    for _ in 0..256 {
        csrs.push(build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256)?, &[])?);
    }
    let csrs = Arc::new(csrs);
    println!(
        "{} real workloads at {}/s each ({}/s offered), {} flooding connections from {}, {} s per phase",
        args.workloads,
        args.per_workload_rate,
        args.workloads as f64 * args.per_workload_rate,
        args.flood_connections,
        args.flood_source,
        args.seconds
    );

    let (quiet, elapsed, cpu) = phase(&args, &tokens, &csrs).await?;
    let quiet_rate = report("quiet", &quiet, elapsed, cpu).await;

    let flood = Arc::new(Flood::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..args.flood_connections {
        flooders.push(tokio::spawn(flooder(args.clone(), bad.clone(), csrs[0].clone(), flood.clone(), stop.clone())));
    }
    // Let the flood spend its address's burst first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (flood.exhausted.load(Ordering::Relaxed), flood.unauthenticated.load(Ordering::Relaxed));
    let (under, elapsed, cpu) = phase(&args, &tokens, &csrs).await?;
    let after = (flood.exhausted.load(Ordering::Relaxed), flood.unauthenticated.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await??;
    }
    let flood_rate = report("under the flood", &under, elapsed, cpu).await;
    let secs = elapsed.as_secs_f64();
    println!(
        "  the flood was answered {:.0}/s: RESOURCE_EXHAUSTED {:.0}/s, UNAUTHENTICATED (tokens verified) {:.1}/s, other {}",
        ((after.0 - before.0) + (after.1 - before.1)) as f64 / secs,
        (after.0 - before.0) as f64 / secs,
        (after.1 - before.1) as f64 / secs,
        flood.other.load(Ordering::Relaxed)
    );
    println!(
        "  real workloads kept {:.1}% of their quiet rate",
        100.0 * flood_rate / quiet_rate.max(f64::MIN_POSITIVE)
    );
    if under.failed.load(Ordering::Relaxed) > 0 || quiet.failed.load(Ordering::Relaxed) > 0 {
        bail!("real requests failed");
    }
    Ok(())
}
