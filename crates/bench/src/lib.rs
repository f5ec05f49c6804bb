//! Load generators for meshca's benchmarks (docs/benchmarks.md). The binaries live in
//! `src/bin/`; this library holds the small statistics and `/proc` helpers they share.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use meshca_agent::identity::{AgentIdentity, client_config};
use meshca_pki::{KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::mgmt::RegisterRequest;
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::registration_client::RegistrationClient;
use meshca_tls::{SwappableCert, grpc};
use tonic::transport::Channel;

/// A failed step of a simulated agent: which step, and why.
#[derive(Debug)]
pub struct StepError {
    /// The step (`register`, `tls`, ...).
    pub step: &'static str,
    /// What went wrong.
    pub error: String,
}

/// Labels an error with the step it failed.
pub fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> StepError {
    move |e| StepError { step, error: e.to_string() }
}

/// Labels a gRPC status with the step it failed.
pub fn step_status(step: &'static str) -> impl FnOnce(tonic::Status) -> StepError {
    move |s| StepError { step, error: format!("{:?}: {}", s.code(), s.message()) }
}

/// What `meshca agent` does first: a fresh P-256 identity key and CSR, then `Register` with the
/// bootstrap `token` over server-authenticated TLS pinned to `relay`. Returns the identity and how
/// long the call took (TCP + TLS handshake + RPC).
pub async fn register(
    server: &str,
    server_name: &str,
    relay: &RootSet,
    cluster: &str,
    token: String,
) -> Result<(AgentIdentity, Duration), StepError> {
    let id_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(step("identity key"))?;
    let id_csr = build_csr(&id_key, &[]).map_err(step("identity CSR"))?;
    let channel = grpc::channel(server, client_config(relay, None).map_err(step("tls"))?, server_name)
        .map_err(step("channel"))?;
    let t = Instant::now();
    let resp = RegistrationClient::new(channel)
        .register(RegisterRequest { bootstrap_token: token, identity_csr: id_csr, cluster: cluster.to_string() })
        .await
        .map_err(step_status("register"))?
        .into_inner();
    let took = t.elapsed();
    let ident = AgentIdentity::from_response(resp, id_key).map_err(step("register"))?;
    if ident.cluster != cluster {
        return Err(StepError {
            step: "register",
            error: format!("registered as {} instead of {cluster}", ident.cluster),
        });
    }
    Ok((ident, took))
}

/// The certificate issuer on the agent's own mutual-TLS channel, built as the agent builds it.
pub fn issuer_client(
    server: &str,
    server_name: &str,
    ident: &AgentIdentity,
) -> Result<CertificateIssuerClient<Channel>, StepError> {
    let client_cert = SwappableCert::new(ident.tls().certified_key().map_err(step("identity"))?);
    let config = client_config(&ident.relay, Some(client_cert)).map_err(step("tls"))?;
    Ok(CertificateIssuerClient::new(grpc::channel(server, config, server_name).map_err(step("channel"))?))
}

/// Latency samples of one kind, summarised by nearest-rank percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    /// Adds a sample.
    pub fn push(&mut self, d: Duration) {
        self.samples.push(d);
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The nearest-rank `p`-th percentile (`0 < p <= 100`); zero without samples.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort_unstable();
        percentile_sorted(&s, p)
    }

    /// Mean; zero without samples.
    pub fn mean(&self) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        self.samples.iter().sum::<Duration>() / self.samples.len() as u32
    }

    /// `p50 … p90 … p99 … max` in milliseconds, one line.
    pub fn summary(&self) -> String {
        let mut s = self.samples.clone();
        s.sort_unstable();
        format!(
            "p50 {:>8} ms  p90 {:>8} ms  p99 {:>8} ms  max {:>8} ms  mean {:>8} ms  (n={})",
            ms(percentile_sorted(&s, 50.0)),
            ms(percentile_sorted(&s, 90.0)),
            ms(percentile_sorted(&s, 99.0)),
            ms(s.last().copied().unwrap_or_default()),
            ms(self.mean()),
            s.len()
        )
    }
}

fn percentile_sorted(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// CPU time a process has used so far, user and system apart, from `/proc/<pid>/stat` (`self`
/// for this process). Linux reports it in USER_HZ ticks, which is 100 on every architecture Linux
/// exposes to user space through `/proc`.
pub fn cpu_times(pid: &str) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) overall are 12 and 13 here (state is field 3 → index 0).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(CpuTimes { user: Duration::from_millis(utime * 10), system: Duration::from_millis(stime * 10) })
}

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// In user space.
    pub user: Duration,
    /// In the kernel.
    pub system: Duration,
}

impl CpuTimes {
    /// Both together.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// What was used since `earlier`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user.saturating_sub(earlier.user), system: self.system.saturating_sub(earlier.system) }
    }
}

/// A `VmHWM`/`VmRSS`-style line of `/proc/<pid>/status`, in kB.
pub fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `/proc/<pid>/io` counters (`syscr`, `syscw`, `write_bytes`, ...).
pub fn io_counter(pid: &str, field: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::default();
        for i in 1..=100u64 {
            l.push(Duration::from_millis(i));
        }
        assert_eq!(l.percentile(50.0), Duration::from_millis(50));
        assert_eq!(l.percentile(99.0), Duration::from_millis(99));
        assert_eq!(l.percentile(100.0), Duration::from_millis(100));
        assert_eq!(Latencies::default().percentile(50.0), Duration::ZERO);
        let mut one = Latencies::default();
        one.push(Duration::from_millis(7));
        assert_eq!(one.percentile(1.0), Duration::from_millis(7));
        assert_eq!(one.percentile(99.0), Duration::from_millis(7));
    }

    #[test]
    fn reads_its_own_proc_entries() {
        assert!(cpu_times("self").is_some());
        assert!(status_kb("self", "VmHWM").is_some_and(|kb| kb > 0));
    }
}
