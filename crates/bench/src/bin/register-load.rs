//! `register-load`: registers N simulated clusters against one `meshca server` and issues their
//! intermediates, the way `meshca agent` does on its first start, and reports the rates and
//! latencies (docs/architecture.md, "Data flows"; docs/benchmarks.md; `scripts/bench-register.sh` runs it).
//!
//! Phase 1 (timed on its own): N bootstrap tokens through the operator API, as
//! `meshca cluster add` makes them.
//!
//! Phase 2 (the benchmark): N agents, at most C at a time, each with its own identity key and
//! mutual-TLS identity: a fresh P-256 identity key and CSR → `Register` (server-authenticated TLS
//! with the relay CA pinned) → its own mTLS channel with the issued client certificate → a fresh
//! intermediate key and CSR (`O=meshca, CN=meshca intermediate, L=<cluster>`) →
//! `IssueIntermediate` → the bundle validated exactly as the agent validates it before writing
//! `cacerts` (`CaBundle::validate`). Any failure counts as an error and fails the run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use meshca_bench::{
    Latencies, StepError as Failure, cpu_times, io_counter, ms, status_kb, step as fail, step_status as status_fail,
};
use meshca_mgmt::server::creds;
use meshca_pki::{CaBundle, Cert, KeyAlgorithm, PrivateKey, RootSet};
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_proto::mgmt::{CreateBootstrapTokenRequest, IssueIntermediateRequest, WatchTrustRequest};
use meshca_tls::grpc;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

/// Registers N simulated clusters with one management plane and issues their intermediates.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Management plane `host:port`.
    #[arg(long)]
    server: String,
    /// Operator credentials directory (`<data-dir>/operator` of `meshca server`).
    #[arg(long)]
    credentials: PathBuf,
    /// Number of clusters to register.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Agents in flight at once (also the concurrency of token creation).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Key algorithm of the cluster intermediates; must be the one the server's policy allows.
    #[arg(long, default_value = "ecdsa-p256", value_parser = parse_alg)]
    key_algorithm: KeyAlgorithm,
    /// Cluster names are `<prefix>-<index>`.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// TLS server name of the management plane (a `--hostname` of `meshca server`).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Like the real agent, open WatchTrust on the new mTLS channel and read the first trust
    /// state before issuing; its latency (TCP + mTLS handshake + one store read) is then reported
    /// apart and the issue latency is of a warm connection. Without it the issue latency includes
    /// the mTLS handshake.
    #[arg(long)]
    watch_trust: bool,
    /// The server's pid, to report the CPU time and write syscalls it spent during phase 2.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse().map_err(|e: meshca_pki::KeyError| e.to_string())
}

/// The operator client, connected the way `meshca cluster add` connects.
fn operator(args: &Args) -> anyhow::Result<OperatorClient<Channel>> {
    let config = creds::client_config(&args.credentials)?;
    Ok(OperatorClient::new(grpc::channel(&args.server, config, &args.server_name)?))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// What the agents share.
struct Ctx {
    server: String,
    server_name: String,
    relay: RootSet,
    alg: KeyAlgorithm,
    watch_trust: bool,
}

/// One agent's timings and what it got.
struct Sample {
    register: Duration,
    trust: Option<Duration>,
    issue: Duration,
    total: Duration,
    roots_fingerprint: String,
}

/// One agent's first start: register, then issue and validate the cluster intermediate.
async fn agent(ctx: &Ctx, cluster: &str, token: String) -> Result<Sample, Failure> {
    let start = Instant::now();

    let (ident, register) = meshca_bench::register(&ctx.server, &ctx.server_name, &ctx.relay, cluster, token).await?;
    let mut issuer = meshca_bench::issuer_client(&ctx.server, &ctx.server_name, &ident)?;

    let mut trust = None;
    let mut _trust_stream = None;
    if ctx.watch_trust {
        let t = Instant::now();
        let mut stream =
            issuer.watch_trust(WatchTrustRequest {}).await.map_err(status_fail("watch-trust"))?.into_inner();
        let state = stream
            .message()
            .await
            .map_err(status_fail("watch-trust"))?
            .ok_or_else(|| Failure { step: "watch-trust", error: "the stream ended at once".into() })?;
        trust = Some(t.elapsed());
        if !state.enrolled {
            return Err(Failure { step: "watch-trust", error: format!("{cluster} is not enrolled") });
        }
        let wanted = meshca_policy::key_algorithm_from_wire(state.key_algorithm)
            .map_err(|e| Failure { step: "watch-trust", error: e.to_string() })?;
        if wanted != ctx.alg {
            return Err(Failure {
                step: "watch-trust",
                error: format!("the policy wants {wanted} intermediates, not {}", ctx.alg.as_str()),
            });
        }
        // Kept open until the intermediate is in hand, as the agent keeps it open.
        _trust_stream = Some(stream);
    }

    // The cluster intermediate: a fresh key and a CSR shaped like the agent's.
    let key = PrivateKey::generate(ctx.alg).map_err(fail("intermediate key"))?;
    let csr = meshca_agent::source::csr_for(&key, meshca_policy::defaults::ORGANIZATION, cluster)
        .map_err(fail("intermediate CSR"))?;
    let t = Instant::now();
    let resp = issuer
        .issue_intermediate(IssueIntermediateRequest { csr, reason: meshca_proto::IssueReason::Initial as i32 })
        .await
        .map_err(status_fail("issue"))?
        .into_inner();
    let issue = t.elapsed();

    // Exactly the checks the agent makes before writing cacerts.
    let cert = Cert::from_pem(resp.certificate.as_bytes()).map_err(fail("certificate"))?;
    let chain: Vec<Cert> =
        resp.chain.iter().map(|p| Cert::from_pem(p.as_bytes())).collect::<Result<_, _>>().map_err(fail("chain"))?;
    let roots = RootSet::from_pem(resp.root_set.as_bytes()).map_err(fail("root set"))?;
    let files = CaBundle::assemble(&key, &cert, &chain, &roots);
    let bundle = CaBundle::validate(&files, SystemTime::now()).map_err(fail("validate"))?;
    let ca = bundle.ca_cert();
    if ca.serial_hex() != resp.serial {
        return Err(Failure {
            step: "validate",
            error: format!("serial {} but the response says {}", ca.serial_hex(), resp.serial),
        });
    }
    if !ca.subject().split(',').any(|rdn| rdn.trim() == format!("L={cluster}")) {
        return Err(Failure { step: "validate", error: format!("subject {:?} does not name {cluster}", ca.subject()) });
    }
    Ok(Sample { register, trust, issue, total: start.elapsed(), roots_fingerprint: bundle.roots().fingerprint() })
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshca_tls::provider::install();
    if args.clusters == 0 || args.concurrency == 0 {
        bail!("--clusters and --concurrency must be at least 1");
    }
    let n = args.clusters;
    let c = args.concurrency;
    let names: Vec<String> = (0..n).map(|i| format!("{}-{i:05}", args.prefix)).collect();
    println!(
        "register-load: {n} clusters, concurrency {c}, intermediate key {}, server {}{}",
        args.key_algorithm.as_str(),
        args.server,
        if args.watch_trust { ", with WatchTrust" } else { "" }
    );

    // ---- phase 1: bootstrap tokens ----
    let op = operator(&args)?;
    let t1 = Instant::now();
    let mut token_lat = Latencies::default();
    let mut tokens: BTreeMap<usize, String> = BTreeMap::new();
    let mut relay_pem = None;
    let mut results = futures::stream::iter(names.iter().cloned().enumerate())
        .map(|(i, cluster)| {
            let mut op = op.clone();
            async move {
                let t = Instant::now();
                let r = op
                    .create_bootstrap_token(CreateBootstrapTokenRequest {
                        cluster,
                        ttl_seconds: 24 * 3600,
                        ..Default::default()
                    })
                    .await
                    .map_err(status_err);
                (i, t.elapsed(), r)
            }
        })
        .buffer_unordered(c);
    while let Some((i, d, r)) = results.next().await {
        let t = r.with_context(|| format!("creating the bootstrap token for {}", names[i]))?.into_inner();
        token_lat.push(d);
        relay_pem.get_or_insert(t.relay_ca);
        tokens.insert(i, t.token);
    }
    drop(results);
    let phase1 = t1.elapsed();
    println!(
        "phase 1: {n} bootstrap tokens in {:.2} s = {:.1} tokens/s; latency {}",
        phase1.as_secs_f64(),
        rate(n, phase1),
        token_lat.summary()
    );
    let relay_pem = relay_pem.unwrap_or_default();
    let relay = RootSet::from_pem(relay_pem.as_bytes()).context("the relay CA from CreateBootstrapToken")?;

    // ---- phase 2: registration + issuance ----
    let ctx = Arc::new(Ctx {
        server: args.server.clone(),
        server_name: args.server_name.clone(),
        relay,
        alg: args.key_algorithm,
        watch_trust: args.watch_trust,
    });
    let server_pid = args.server_pid.map(|p| p.to_string());
    let server_before = server_pid.as_deref().map(|p| (cpu_times(p), io_counter(p, "write_bytes")));
    let self_cpu_before = cpu_times("self");
    let sem = Arc::new(Semaphore::new(c));
    let t2 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens {
        let ctx = ctx.clone();
        let sem = sem.clone();
        let cluster = names[i].clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(fail("semaphore"))?;
            agent(&ctx, &cluster, token).await.map_err(|f| Failure { error: format!("{cluster}: {}", f.error), ..f })
        });
    }
    let (mut reg, mut trust, mut issue, mut total) =
        (Latencies::default(), Latencies::default(), Latencies::default(), Latencies::default());
    let mut errors: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut fingerprints: BTreeMap<String, usize> = BTreeMap::new();
    let mut done = 0usize;
    while let Some(joined) = tasks.join_next().await {
        done += 1;
        match joined {
            Ok(Ok(s)) => {
                reg.push(s.register);
                if let Some(t) = s.trust {
                    trust.push(t);
                }
                issue.push(s.issue);
                total.push(s.total);
                *fingerprints.entry(s.roots_fingerprint).or_default() += 1;
            }
            Ok(Err(f)) => errors.entry(f.step).or_default().push(f.error),
            Err(e) => errors.entry("task").or_default().push(e.to_string()),
        }
        if n >= 10 && done.is_multiple_of(n / 10) {
            eprintln!("  {done}/{n} done after {:.1} s", t2.elapsed().as_secs_f64());
        }
    }
    let phase2 = t2.elapsed();
    let self_cpu = cpu_times("self").zip(self_cpu_before).map(|(a, b)| a.since(&b));
    let server_after = server_pid.as_deref().map(|p| (cpu_times(p), io_counter(p, "write_bytes")));

    let ok = total.len();
    let n_err: usize = errors.values().map(Vec::len).sum();
    println!(
        "phase 2: {ok} clusters registered and issued in {:.2} s = {:.1} clusters/s (concurrency {c})",
        phase2.as_secs_f64(),
        rate(ok, phase2)
    );
    println!("  register    {}", reg.summary());
    if !trust.is_empty() {
        println!("  watch-trust {}", trust.summary());
    }
    println!("  issue       {}", issue.summary());
    println!("  end-to-end  {}", total.summary());
    println!("  errors      {n_err}");
    for (step, errs) in &errors {
        println!("    {step}: {} (first: {})", errs.len(), errs[0]);
    }
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / phase2.as_secs_f64();
    if let Some(cpu) = self_cpu {
        println!(
            "  load generator CPU {:.2} s ({:.0}% of one core: user {:.2} s, system {:.2} s), peak RSS {} kB",
            cpu.total().as_secs_f64(),
            pct(cpu.total()),
            cpu.user.as_secs_f64(),
            cpu.system.as_secs_f64(),
            status_kb("self", "VmHWM").unwrap_or(0)
        );
    }
    if let (Some((Some(c0), b0)), Some((Some(c1), b1))) = (server_before, server_after) {
        let cpu = c1.since(&c0);
        let per_cluster = |d: Duration| ms(d / ok.max(1) as u32);
        let disk = match (b0, b1) {
            (Some(a), Some(b)) => format!("{:.1} kB", b.saturating_sub(a) as f64 / 1024.0 / ok.max(1) as f64),
            _ => "?".into(),
        };
        println!(
            "  server CPU {:.2} s ({:.0}% of one core) = {} ms per cluster (user {} ms, system {} ms); written to disk {disk} per cluster",
            cpu.total().as_secs_f64(),
            pct(cpu.total()),
            per_cluster(cpu.total()),
            per_cluster(cpu.user),
            per_cluster(cpu.system),
        );
    }
    if fingerprints.len() > 1 {
        println!("  ERROR: the clusters got {} different root sets: {fingerprints:?}", fingerprints.len());
        bail!("inconsistent root sets");
    }
    if n_err > 0 || ok != n {
        bail!("{n_err} of {n} clusters failed");
    }
    Ok(())
}
