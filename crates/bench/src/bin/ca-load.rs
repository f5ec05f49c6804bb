//! `ca-load`: CreateCertificate throughput of a workload CA (issue 4's benchmark), or the same
//! CSRs signed by a peer CA (`cfssl serve`, `/api/v1/cfssl/sign`), with C concurrent callers for a
//! fixed time. In the same run it measures aws-lc-rs's raw P-256 sign and verify rates, so the
//! result can be set against the crypto bound (one CSR verify + one sign per request, per core).
//!
//! Every caller has its own connection (as every istio-agent has), and cycles through a pool of
//! distinct P-256 CSRs made before the clock starts. With `--idp-key`, every caller also has a
//! token of its own (service account `bench/caller-<i>`), minted with the cluster's demo issuer.
//! Every answer is checked: a meshca chain must hold a leaf with a SPIFFE ID, a cfssl answer must
//! hold a certificate.
//!
//! `--herd N`: instead, N distinct workloads (service accounts `herd/w-<i>`, each with its own
//! token, CSR and connection) each ask once, their arrivals spread evenly over `--herd-seconds`
//! (0: all at once) — the re-request herd after a root-set change or a revocation. Reports how
//! many were served, the latency percentiles, the failures by status code and the CA's peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use clap::{Parser, ValueEnum};
use meshca_bench::{Latencies, cpu_times};
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Target {
    /// meshca's workload CA (gRPC over TLS, bearer token).
    Meshca,
    /// `cfssl serve` (HTTP JSON, no caller authentication).
    Cfssl,
}

/// CreateCertificate load generator.
#[derive(Parser)]
struct Args {
    /// What to load.
    #[arg(long, value_enum)]
    target: Target,
    /// `host:port` of the CA.
    #[arg(long)]
    address: String,
    /// meshca: the root the workload CA's serving certificate chains to.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// meshca: TLS server name.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    server_name: String,
    /// meshca: file with the bearer token every request carries.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured time.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Unmeasured warm-up.
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Distinct CSRs in the pool.
    #[arg(long, default_value_t = 512)]
    csrs: usize,
    /// PID of the CA process, for its CPU time per request.
    #[arg(long)]
    server_pid: Option<String>,
    /// Seconds spent measuring each raw crypto rate.
    #[arg(long, default_value_t = 2)]
    crypto_seconds: u64,
    /// meshca: the demo issuer's key (`<up dir>/idp/key.pem`), to mint a token per caller (and
    /// per herd workload) instead of sharing `--token-file`.
    #[arg(long, requires = "jwt_issuer")]
    idp_key: Option<std::path::PathBuf>,
    /// meshca: the issuer (`iss`) those tokens carry.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// meshca: run a herd of this many distinct workloads instead of the timed load.
    #[arg(long, requires = "idp_key")]
    herd: Option<usize>,
    /// The herd's arrivals are spread evenly over this many seconds.
    #[arg(long, default_value_t = 30)]
    herd_seconds: u64,
}

/// Raw single-core aws-lc-rs P-256 rates: (sign/s, verify/s).
fn raw_rates(secs: u64) -> anyhow::Result<(f64, f64)> {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)?;
    let kp = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref())?;
    let msg = [0x5au8; 400];
    let measure = |f: &dyn Fn()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            for _ in 0..64 {
                f();
            }
            n += 64;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let sign = measure(&|| {
        let _ = kp.sign(&rng, &msg);
    });
    let sig = kp.sign(&rng, &msg)?;
    let pk = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref().to_vec());
    let verify = measure(&|| {
        let _ = pk.verify(&msg, sig.as_ref());
    });
    Ok((sign, verify))
}

struct Shared {
    csrs: Vec<String>,
    ok: AtomicU64,
    failed: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    /// Counts one answer (and its latency, if good) while the clock runs.
    fn record(&self, good: bool, took: Duration, lat: &mut Latencies) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        if good {
            self.ok.fetch_add(1, Ordering::Relaxed);
            lat.push(took);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The TLS client configuration istio-agent would use: the mesh root pinned.
fn meshca_tls_config(args: &Args) -> anyhow::Result<rustls::ClientConfig> {
    let ca_file = args.ca_file.as_ref().context("--ca-file is needed for meshca")?;
    let roots = RootSet::from_pem(&std::fs::read(ca_file)?)?;
    let mut store = rustls::RootCertStore::empty();
    for r in roots.iter() {
        store.add(rustls_pki_types::CertificateDer::from(r.der().to_vec()))?;
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth())
}

/// Mints a token for `namespace/service_account` with the demo issuer of `--idp-key`.
fn minter(args: &Args) -> anyhow::Result<Option<DemoIdp>> {
    let (Some(key), Some(issuer)) = (&args.idp_key, &args.jwt_issuer) else { return Ok(None) };
    let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    Ok(Some(DemoIdp::from_key(&pem, issuer)?))
}

async fn meshca_caller(
    shared: Arc<Shared>,
    args: Arc<Args>,
    token: Arc<String>,
    id: usize,
) -> anyhow::Result<Latencies> {
    let config = meshca_tls_config(&args)?;
    let mut client =
        IstioCertificateServiceClient::new(meshca_tls::grpc::channel(&args.address, config, &args.server_name)?);
    let mut lat = Latencies::default();
    let mut i = id;
    while !shared.stop.load(Ordering::Relaxed) {
        let csr = shared.csrs[i % shared.csrs.len()].clone();
        i += args.concurrency;
        let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: None });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let t = Instant::now();
        let result = client.create_certificate(req).await;
        let took = t.elapsed();
        let good = match result {
            Ok(r) => {
                let chain = r.into_inner().cert_chain;
                chain.len() >= 2 && Cert::from_pem(chain[0].as_bytes()).is_ok_and(|c| !c.uri_sans().is_empty())
            }
            Err(_) => false,
        };
        shared.record(good, took, &mut lat);
    }
    Ok(lat)
}

/// A minimal HTTP/1.1 keep-alive POST of cfssl's sign request (one connection per caller).
async fn cfssl_caller(shared: Arc<Shared>, args: Arc<Args>, id: usize) -> anyhow::Result<Latencies> {
    let tcp = TcpStream::connect(&args.address).await?;
    // One write per request and no Nagle: otherwise every call waits for a delayed ACK (~40 ms)
    // and cfssl would look slow for the load generator's sake.
    tcp.set_nodelay(true)?;
    let mut conn = BufReader::new(tcp);
    let mut lat = Latencies::default();
    let mut i = id;
    while !shared.stop.load(Ordering::Relaxed) {
        let csr = &shared.csrs[i % shared.csrs.len()];
        i += args.concurrency;
        let body = serde_json::json!({ "certificate_request": csr, "profile": "leaf" }).to_string();
        let request = format!(
            "POST /api/v1/cfssl/sign HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            args.address,
            body.len()
        );
        let t = Instant::now();
        conn.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        conn.read_line(&mut status).await?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0u8; len];
        conn.read_exact(&mut buf).await?;
        let took = t.elapsed();
        let good = status.contains(" 200 ")
            && serde_json::from_slice::<serde_json::Value>(&buf)
                .is_ok_and(|v| v["success"] == true && v["result"]["certificate"].is_string());
        shared.record(good, took, &mut lat);
    }
    Ok(lat)
}

/// The herd: `n` distinct workloads, each with its own token, CSR and connection, asking once,
/// arrivals spread over `--herd-seconds`.
async fn herd(args: Arc<Args>, n: usize) -> anyhow::Result<()> {
    let idp = minter(&args)?.context("--herd needs --idp-key and --jwt-issuer")?;
    let config = Arc::new(meshca_tls_config(&args)?);
    let now = std::time::SystemTime::now();
    let mut work = Vec::with_capacity(n);
    for i in 0..n {
        let token = idp.mint("herd", &format!("w-{i}"), ISTIO_CA_AUDIENCE, Duration::from_secs(7200), now)?;
        work.push((token, build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256)?, &[])?));
    }
    let pid = args.server_pid.clone();
    let cpu0 = pid.as_deref().and_then(cpu_times);
    let spread = Duration::from_secs(args.herd_seconds);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (token, csr)) in work.into_iter().enumerate() {
        let (args, config) = (args.clone(), config.clone());
        let at = start + spread.mul_f64(i as f64 / n as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            let t = Instant::now();
            let channel = meshca_tls::grpc::channel(&args.address, (*config).clone(), &args.server_name)
                .map_err(|e| (tonic::Code::Unknown, e.to_string()))?;
            let mut client = IstioCertificateServiceClient::new(channel);
            let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: None });
            let bearer = format!("Bearer {token}").parse().map_err(|_| (tonic::Code::Unknown, "token".to_string()))?;
            req.metadata_mut().insert("authorization", bearer);
            let chain = client
                .create_certificate(req)
                .await
                .map_err(|s| (s.code(), s.message().to_string()))?
                .into_inner()
                .cert_chain;
            let want = format!("spiffe://cluster.local/ns/herd/sa/w-{i}");
            match chain.first().map(|p| Cert::from_pem(p.as_bytes())) {
                Some(Ok(c)) if c.uri_sans() == [want] => Ok(t.elapsed()),
                _ => Err((tonic::Code::Unknown, "the answer is not a leaf for the caller".to_string())),
            }
        });
    }
    let mut lat = Latencies::default();
    let mut failures: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(took) => lat.push(took),
            Err((code, message)) => {
                let e = failures.entry(format!("{code:?}")).or_insert((0, message));
                e.0 += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    println!(
        "herd: {n} distinct workloads, arrivals over {} s: {} served, {} failed, all done in {:.1} s",
        args.herd_seconds,
        lat.len(),
        n - lat.len(),
        elapsed.as_secs_f64()
    );
    println!("  latency (connect + TLS + request) {}", lat.summary());
    for (code, (count, first)) in &failures {
        println!("  {code}: {count} (first: {first})");
    }
    if let Some(pid) = pid.as_deref() {
        let cpu = cpu_times(pid).zip(cpu0).map(|(b, a)| b.since(&a).total());
        println!(
            "  CA: peak RSS {} kB, RSS now {} kB, CPU {}",
            meshca_bench::status_kb(pid, "VmHWM").unwrap_or(0),
            meshca_bench::status_kb(pid, "VmRSS").unwrap_or(0),
            cpu.map(|c| format!("{:.2} s = {:.3} ms per workload", c.as_secs_f64(), c.as_secs_f64() * 1e3 / n as f64))
                .unwrap_or_default()
        );
    }
    if !failures.is_empty() {
        bail!("{} of {n} workloads were not served", n - lat.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meshca_tls::provider::install();
    let args = Arc::new(Args::parse());
    if let Some(n) = args.herd {
        return herd(args, n).await;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (sign, verify) = raw_rates(args.crypto_seconds)?;
    let per_core_bound = 1.0 / (1.0 / sign + 1.0 / verify);
    println!(
        "raw aws-lc-rs P-256 (one core): sign {sign:.0}/s, verify {verify:.0}/s -> verify+sign bound {per_core_bound:.0}/s per core"
    );

    let mut csrs = Vec::with_capacity(args.csrs);
    for _ in 0..args.csrs {
        csrs.push(build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256)?, &[])?);
    }
    let shared = Arc::new(Shared {
        csrs,
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let shared_token = match &args.token_file {
        Some(p) => Some(std::fs::read_to_string(p)?.trim().to_string()),
        None => None,
    };
    let idp = minter(&args)?;
    if args.target == Target::Meshca && shared_token.is_none() && idp.is_none() {
        bail!("meshca needs --token-file or --idp-key");
    }
    let mut tasks = Vec::new();
    for id in 0..args.concurrency {
        let token = match (&idp, &shared_token) {
            (Some(idp), _) => idp.mint(
                "bench",
                &format!("caller-{id}"),
                ISTIO_CA_AUDIENCE,
                Duration::from_secs(7200),
                std::time::SystemTime::now(),
            )?,
            (None, Some(t)) => t.clone(),
            (None, None) => String::new(),
        };
        let (s, a, t) = (shared.clone(), args.clone(), Arc::new(token));
        tasks.push(tokio::spawn(async move {
            match a.target {
                Target::Meshca => meshca_caller(s, a, t, id).await,
                Target::Cfssl => cfssl_caller(s, a, id).await,
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_seconds)).await;
    let cpu0 = args.server_pid.as_deref().and_then(cpu_times);
    let self0 = cpu_times("self");
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let cpu1 = args.server_pid.as_deref().and_then(cpu_times);
    let self1 = cpu_times("self");
    shared.stop.store(true, Ordering::Relaxed);
    let mut lat = Latencies::default();
    for t in tasks {
        match t.await? {
            Ok(l) => lat.extend(l),
            Err(e) => eprintln!("a caller stopped: {e:#}"),
        }
    }
    let ok = shared.ok.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let rps = ok as f64 / elapsed.as_secs_f64();
    println!(
        "target {:?} at {} with {} callers for {:.1}s",
        args.target,
        args.address,
        args.concurrency,
        elapsed.as_secs_f64()
    );
    println!("  requests ok {ok}, failed {failed}: {rps:.0}/s");
    println!("  latency {}", lat.summary());
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let used = b.since(&a).total();
        println!(
            "  server CPU {:.2}s ({:.0}% of one core): {:.3} ms per request",
            used.as_secs_f64(),
            100.0 * used.as_secs_f64() / elapsed.as_secs_f64(),
            1000.0 * used.as_secs_f64() / ok.max(1) as f64
        );
    }
    if let (Some(a), Some(b)) = (self0, self1) {
        println!("  load generator CPU {:.2}s", b.since(&a).total().as_secs_f64());
    }
    println!(
        "  crypto bound on {cores} cores: {:.0}/s -> this run reached {:.0}% of it",
        per_core_bound * cores as f64,
        100.0 * rps / (per_core_bound * cores as f64)
    );
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}
