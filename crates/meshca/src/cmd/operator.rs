//! The operator's commands: `cluster add`, `cluster remove`, `status`, `rotate`, `revoke`,
//! `audit`, `policy apply`, `operator issue`, `operator revoke`. They call the management plane's operator API over mutual
//! TLS with the credentials `meshca server` wrote (or `meshca operator issue` made).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use meshca_mgmt::server::creds;
use meshca_mgmt::status::{document, human};
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_proto::mgmt::{
    ApplyPolicyRequest, CreateBootstrapTokenRequest, GetAuditLogRequest, GetStatusRequest, IssueOperatorRequest,
    MeshStatus, RemoveClusterRequest, RevokeIntermediateRequest, RevokeOperatorRequest, RotateRequest,
    RotateRootRequest,
};
use meshca_proto::text::terminal_safe;
use meshca_store::fsutil;
use tonic::transport::Channel;

use super::DurationArg;

/// Where the operator credentials are.
#[derive(clap::Args, Clone)]
pub struct Creds {
    /// Operator credentials directory (written by `meshca server` as `<data-dir>/operator`).
    #[arg(long, env = "MESHCA_CREDENTIALS", default_value = "meshca-data/operator")]
    credentials: PathBuf,
    /// Management plane `host:port` (default: the address recorded in the credentials).
    #[arg(long)]
    server: Option<String>,
}

/// Connects to the operator API.
pub async fn connect(c: &Creds) -> anyhow::Result<OperatorClient<Channel>> {
    meshca_tls::provider::install();
    let config = creds::client_config(&c.credentials)?;
    let server = match &c.server {
        Some(s) => s.clone(),
        None => creds::recorded_server(&c.credentials)?,
    };
    Ok(OperatorClient::new(meshca_tls::grpc::channel(&server, config, "localhost")?))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), terminal_safe(s.message()))
}

/// Arguments of `meshca cluster add`.
#[derive(clap::Args)]
pub struct ClusterAddArgs {
    /// The cluster's name (a DNS-1123 label).
    name: String,
    /// How long the token stays valid.
    #[arg(long, default_value = "1h")]
    ttl: DurationArg,
    /// Also write the relay CA the agent needs to this file.
    #[arg(long)]
    relay_ca_out: Option<PathBuf>,
    /// Write the token to this file (0600) instead of printing it.
    #[arg(long)]
    token_out: Option<PathBuf>,
    /// A label of the cluster, `key=value` (repeatable): RootTrustPolicies select clusters by
    /// their labels (`spec.clusterSelector.matchLabels`). Set when the cluster registers with
    /// this token, replacing any labels it had.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    creds: Creds,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

/// `meshca cluster add NAME`.
pub async fn cluster_add(a: ClusterAddArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.creds).await?;
    let t = client
        .create_bootstrap_token(CreateBootstrapTokenRequest {
            cluster: a.name.clone(),
            ttl_seconds: a.ttl.0.as_secs() as i64,
            labels: a.labels.iter().cloned().collect(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if let Some(p) = &a.relay_ca_out {
        fsutil::write_atomic(p, t.relay_ca.as_bytes(), 0o644).with_context(|| format!("writing {}", p.display()))?;
    }
    match &a.token_out {
        Some(p) => {
            fsutil::write_atomic(p, t.token.as_bytes(), 0o600).with_context(|| format!("writing {}", p.display()))?;
            eprintln!(
                "bootstrap token for {} written to {} (single use, expires in {})",
                t.cluster,
                p.display(),
                human(t.expires_at - now())
            );
        }
        None => {
            println!("{}", t.token);
            eprintln!("bootstrap token for {} (single use, expires in {})", t.cluster, human(t.expires_at - now()));
        }
    }
    Ok(())
}

/// The binary's wiring reads the wall clock; everything below takes it as a value.
fn now() -> i64 {
    meshca_clock::unix(SystemTime::now())
}

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Arguments of `meshca status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Exit with status 2 when there are alerts.
    #[arg(long)]
    check: bool,
    /// Only this RootTrustPolicy's mesh (its clusters, root, rotation and alerts).
    #[arg(long)]
    policy: Option<String>,
    #[command(flatten)]
    creds: Creds,
}

/// `s` made safe for the terminal (every string in the status came from the network: an agent's
/// report, a certificate's subject, a policy error) and cut to `n` characters.
fn short(s: &str, n: usize) -> String {
    let s = safe(s);
    if s.chars().count() <= n { s } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

/// `s` with control characters escaped, so a reported string can never drive the terminal.
fn safe(s: &str) -> String {
    terminal_safe(s).into_owned()
}

fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    meshca_pki::chain::rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(t as u64))
}

/// Renders the status table: with several meshes (the overview), each mesh's lines, then every
/// cluster with its policy.
pub fn render(st: &MeshStatus) -> String {
    let several = st.meshes.len() > 1;
    let mut out = String::new();
    if several {
        for m in &st.meshes {
            out.push_str(&format!("policy {}\n", safe(&m.policy)));
            out.push_str(&render_mesh(m));
            out.push('\n');
        }
    } else {
        out.push_str(&render_mesh(st));
    }
    out.push_str(&render_clusters(st, several));
    out
}

/// One mesh's lines: trust domain, CA mode, generation, root set, rotation, upstream.
fn render_mesh(st: &MeshStatus) -> String {
    let mut out = String::new();
    let n = st.now;
    out.push_str(&format!(
        "mesh        trust domain {} · CA mode {} · generation {}\n",
        safe(&st.trust_domain),
        safe(&st.ca_mode),
        if st.policy_generation.is_empty() { "-".into() } else { safe(&st.policy_generation) }
    ));
    if !st.root_set_fingerprint.is_empty() {
        out.push_str(&format!(
            "root set    {} · expires {} ({} left)\n",
            short(&st.root_set_fingerprint, 23),
            time(st.root_not_after),
            human(st.root_not_after.saturating_sub(n))
        ));
    }
    out.push_str(&render_rotation(st));
    if !st.upstream_intermediate_subject.is_empty() {
        out.push_str(&format!(
            "upstream    {} · expires {} ({} left)\n",
            safe(&st.upstream_intermediate_subject),
            time(st.upstream_intermediate_not_after),
            human(st.upstream_intermediate_not_after.saturating_sub(n))
        ));
    }
    if !st.policy_error.is_empty() {
        out.push_str(&format!("policy      {}\n", safe(&st.policy_error)));
    }
    out
}

/// The clusters table, the CRL notes and the alerts.
fn render_clusters(st: &MeshStatus, with_policy: bool) -> String {
    let mut out = String::new();
    let n = st.now;
    out.push('\n');
    let header = [
        "CLUSTER",
        "POLICY",
        "CONNECTED",
        "PHASE",
        "SERIAL",
        "NOT AFTER",
        "LEFT",
        "ROOT SET",
        "KEY",
        "LAST RENEWAL",
        "LAST ERROR",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for c in &st.clusters {
        let s = c.status.clone().unwrap_or_default();
        let phase = if !c.registered {
            "NotRegistered".to_string()
        } else if !c.enrolled {
            if c.placement.contains("selected by RootTrustPolicies") {
                "PolicyConflict".into()
            } else {
                "NotEnrolled".into()
            }
        } else if s.phase() == meshca_proto::Phase::Unspecified {
            "-".into()
        } else {
            s.phase().name().to_string()
        };
        rows.push(vec![
            safe(&c.name),
            if c.policy.is_empty() { "-".into() } else { safe(&c.policy) },
            if c.connected {
                "yes".into()
            } else if c.last_seen > 0 {
                format!("no ({} ago)", human(n.saturating_sub(c.last_seen)))
            } else {
                "no".into()
            },
            phase,
            if s.intermediate_serial.is_empty() { "-".into() } else { short(&s.intermediate_serial, 12) },
            time(s.intermediate_not_after),
            if s.intermediate_not_after > 0 { human(s.intermediate_not_after.saturating_sub(n)) } else { "-".into() },
            if s.root_set_fingerprint.is_empty() { "-".into() } else { short(&s.root_set_fingerprint, 15) },
            if s.key_location.is_empty() {
                "-".into()
            } else if s.key_location == "memory" {
                "in memory".into()
            } else {
                short(&s.key_location, 12)
            },
            if s.last_renewal > 0 { format!("{} ago", human(n.saturating_sub(s.last_renewal))) } else { "-".into() },
            if s.last_error.is_empty() { "-".into() } else { short(&s.last_error, 60) },
        ]);
    }
    // The policy column only when there is more than one policy to tell apart.
    if !with_policy {
        for r in &mut rows {
            r.remove(1);
        }
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for c in &st.clusters {
        if let Some(note) = c.status.as_ref().map(|s| &s.crl_note).filter(|n| !n.is_empty()) {
            out.push_str(&format!("\n{}: no ca-crl.pem: {}\n", safe(&c.name), short(note, 200)));
        }
    }
    if st.alerts.is_empty() {
        out.push_str("\nno alerts\n");
    } else {
        out.push_str("\nALERTS (need a person)\n");
        for a in &st.alerts {
            let policy =
                if with_policy && !a.policy.is_empty() { format!("[{}] ", safe(&a.policy)) } else { String::new() };
            out.push_str(&format!("  {:<38} {policy}{}\n", a.kind().name(), safe(&a.message)));
        }
    }
    out
}

/// The root rotation lines of the status table: the phase and since when, the two roots, what
/// it waits for, and each cluster's convergence in the current phase.
fn render_rotation(st: &MeshStatus) -> String {
    let Some(r) = &st.root_rotation else { return String::new() };
    let n = st.now;
    let mut out = String::new();
    let phase = r.phase();
    if matches!(phase, meshca_proto::RotationPhase::Idle | meshca_proto::RotationPhase::Unspecified) {
        if !r.note.is_empty() {
            out.push_str(&format!("rotation    Idle · {}\n", r.note));
        }
        return out;
    }
    out.push_str(&format!(
        "rotation    {}{} since {} ({} ago) · started {} ({}) · id {}\n",
        phase.name(),
        if r.aborted { " (aborted: returning to A)" } else { "" },
        time(r.phase_since),
        human(n - r.phase_since),
        time(r.started_at),
        r.trigger,
        r.id
    ));
    for (label, c) in [("A (old)", &r.from), ("B (new)", &r.to)] {
        if let Some(c) = c {
            out.push_str(&format!(
                "            {label}  {} · {} · expires {}\n",
                c.subject,
                short(&c.fingerprint, 16),
                time(c.not_after)
            ));
        }
    }
    for w in &r.waiting {
        if w.cluster.is_empty() {
            out.push_str(&format!("            waiting {}\n", w.reason));
        } else {
            out.push_str(&format!("            waiting for {}: {}\n", w.cluster, w.reason));
        }
    }
    let mut converged: Vec<(&String, &i64)> = r.converged.iter().collect();
    converged.sort();
    if !converged.is_empty() {
        let list: Vec<String> = converged.iter().map(|(c, at)| format!("{c} ({} ago)", human(n - **at))).collect();
        out.push_str(&format!("            converged {}\n", list.join(", ")));
    }
    out
}

/// `meshca status`.
pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.creds).await?;
    let st = client
        .get_status(GetStatusRequest { policy: a.policy.unwrap_or_default() })
        .await
        .map_err(status_err)?
        .into_inner();
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&document(&st))?),
        Output::Table => print!("{}", render(&st)),
    }
    if a.check && !st.alerts.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}

/// Arguments of `meshca rotate`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RotateArgs {
    #[command(subcommand)]
    what: Option<RotateWhat>,
    /// The cluster whose intermediate to re-issue now; every cluster when omitted. (A cluster
    /// literally named `root`: `meshca rotate -- root`.)
    cluster: Option<String>,
    #[command(flatten)]
    creds: Creds,
}

#[derive(clap::Subcommand)]
enum RotateWhat {
    /// Rotate the mesh's root: every cluster moves to a new generated root through the
    /// convergence-gated phases, without a failed handshake (docs/root-rotation.md).
    Root(RotateRootArgs),
}

/// Arguments of `meshca rotate root`.
#[derive(clap::Args)]
struct RotateRootArgs {
    /// Abort the rotation in progress instead: every cluster returns to the old root (any phase
    /// before Retiring).
    #[arg(long)]
    abort: bool,
    /// The RootTrustPolicy whose mesh's root to rotate (needed when there are several).
    #[arg(long)]
    policy: Option<String>,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca rotate [CLUSTER]`, `meshca rotate root [--abort]`.
pub async fn rotate(a: RotateArgs) -> anyhow::Result<()> {
    if let Some(RotateWhat::Root(r)) = a.what {
        let mut client = connect(&r.creds).await?;
        let resp = client
            .rotate_root(RotateRootRequest { abort: r.abort, policy: r.policy.unwrap_or_default() })
            .await
            .map_err(status_err)?
            .into_inner();
        println!("{}", resp.message);
        println!("follow it with `meshca status` (phase, what it waits for)");
        return Ok(());
    }
    let mut client = connect(&a.creds).await?;
    let r =
        client.rotate(RotateRequest { cluster: a.cluster.unwrap_or_default() }).await.map_err(status_err)?.into_inner();
    if r.clusters.is_empty() {
        bail!("no registered clusters");
    }
    println!("rotation requested for {}", r.clusters.join(", "));
    Ok(())
}

/// Arguments of `meshca revoke`.
#[derive(clap::Args)]
pub struct RevokeArgs {
    /// The cluster whose intermediate is compromised.
    #[arg(long)]
    cluster: String,
    /// Serial (hex) of the intermediate to revoke; default: the one the cluster has in service.
    #[arg(long)]
    serial: Option<String>,
    /// Why (RFC 5280): keyCompromise, cACompromise, affiliationChanged, superseded,
    /// cessationOfOperation, privilegeWithdrawn, unspecified.
    #[arg(long, default_value = "keyCompromise")]
    reason: String,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca revoke --cluster C [--serial S] [--reason R]`.
pub async fn revoke(a: RevokeArgs) -> anyhow::Result<()> {
    // Refused here with the list of names before anything is sent.
    let reason: meshca_pki::Reason = a.reason.parse()?;
    let mut client = connect(&a.creds).await?;
    let r = client
        .revoke_intermediate(RevokeIntermediateRequest {
            cluster: a.cluster,
            serial: a.serial.unwrap_or_default(),
            reason: reason.as_str().to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if r.already_revoked {
        println!(
            "intermediate {} of {} was already revoked ({}); nothing changed",
            r.serial,
            safe(&r.cluster),
            safe(&r.reason)
        );
        return Ok(());
    }
    println!(
        "intermediate {} of {} revoked ({}): {} re-issues with a new key now, and every cluster's ca-crl.pem lists it{}",
        r.serial,
        safe(&r.cluster),
        safe(&r.reason),
        safe(&r.cluster),
        if r.crl_number > 0 { format!(" (CRL number {})", r.crl_number) } else { String::new() }
    );
    Ok(())
}

/// Arguments of `meshca audit`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    what: Option<AuditWhat>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    creds: Creds,
}

#[derive(clap::Subcommand)]
enum AuditWhat {
    /// Check the hash chain; exit non-zero naming the first entry changed, removed or reordered, or
    /// the newest entries cut off.
    Verify(AuditVerifyArgs),
}

#[derive(clap::Args)]
struct AuditVerifyArgs {
    #[command(flatten)]
    creds: Creds,
}

/// Reads the audit log from the management plane, parsing each entry (and the head) as stored.
async fn audit_log(creds: &Creds) -> anyhow::Result<meshca_mgmt::audit::Log> {
    let mut client = connect(creds).await?;
    let log = client.get_audit_log(GetAuditLogRequest {}).await.map_err(status_err)?.into_inner();
    let entries = log
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::from_str(e).with_context(|| format!("audit entry at position {i} does not parse")))
        .collect::<anyhow::Result<_>>()?;
    let head = match log.head.as_str() {
        "" => None,
        h => Some(serde_json::from_str(h).context("the audit log's head record does not parse")?),
    };
    Ok(meshca_mgmt::audit::Log { entries, head })
}

/// `meshca audit [-o json]`, `meshca audit verify`. The chain, and that it reaches its head, are
/// checked here, by the caller.
pub async fn audit(a: AuditArgs) -> anyhow::Result<()> {
    if let Some(AuditWhat::Verify(v)) = a.what {
        let log = audit_log(&v.creds).await?;
        match meshca_mgmt::audit::verify_anchored(&log.entries, log.head.as_ref()) {
            Ok(head) => {
                println!("audit log intact: {} entries, head {head}", log.entries.len());
                return Ok(());
            }
            Err(e) => bail!("audit log broken: {e}"),
        }
    }
    let entries = audit_log(&a.creds).await?.entries;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!("{:<6} {:<20} {:<24} {:<28} {:<12} DETAILS", "SEQ", "TIME", "ACTION", "ACTOR", "CLUSTER");
    for e in &entries {
        let details: Vec<String> = e.details.iter().map(|(k, v)| format!("{k}={}", safe(v))).collect();
        println!(
            "{:<6} {:<20} {:<24} {:<28} {:<12} {}",
            e.seq,
            meshca_pki::chain::rfc3339(meshca_clock::from_unix(e.at)),
            safe(&e.action),
            short(&e.actor, 28),
            short(&e.cluster, 12),
            details.join(" ")
        );
    }
    Ok(())
}

/// Arguments of `meshca policy apply`.
#[derive(clap::Args)]
pub struct PolicyApplyArgs {
    /// The RootTrustPolicy (YAML), or several as YAML documents (`---` between them): the whole
    /// set, one mesh per policy.
    file: PathBuf,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca policy apply FILE`.
pub async fn policy_apply(a: PolicyApplyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    // Refused here, naming the field (and the policy, with several), before anything is sent.
    meshca_policy::PolicySet::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let mut client = connect(&a.creds).await?;
    let r = client.apply_policy(ApplyPolicyRequest { policy: text }).await.map_err(status_err)?.into_inner();
    if r.generations.len() > 1 {
        let mut each: Vec<String> = r.generations.iter().map(|(name, g)| format!("{name} {g}")).collect();
        each.sort();
        println!("policies applied; generations {}", each.join(", "));
    } else {
        println!("policy applied; generation {}", r.policy_generation);
    }
    Ok(())
}

/// Arguments of `meshca cluster remove`.
#[derive(clap::Args)]
pub struct ClusterRemoveArgs {
    /// The cluster's name.
    name: String,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca cluster remove NAME`.
pub async fn cluster_remove(a: ClusterRemoveArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.creds).await?;
    let r =
        client.remove_cluster(RemoveClusterRequest { cluster: a.name.clone() }).await.map_err(status_err)?.into_inner();
    println!(
        "cluster {} removed: its agent's identity is refused and nothing is issued to it from now on; its records are archived as meshca/{}{}",
        a.name,
        safe(&r.archive),
        if r.tokens_deleted > 0 {
            format!(" ({} unused bootstrap token(s) deleted)", r.tokens_deleted)
        } else {
            String::new()
        }
    );
    eprintln!(
        "the cacerts already in the cluster stay valid until they expire; to add the cluster back: meshca cluster add {}",
        a.name
    );
    Ok(())
}

/// Arguments of `meshca operator issue`.
#[derive(clap::Args)]
pub struct OperatorIssueArgs {
    /// The new operator's name (a DNS-1123 label).
    name: String,
    /// Folder to write the new credentials to (created 0700; the key 0600). It must not hold
    /// credentials already.
    #[arg(long)]
    out: PathBuf,
    /// How long the credentials stay valid (at most a year).
    #[arg(long, default_value = "8760h")]
    ttl: DurationArg,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca operator issue NAME --out DIR`: the key is made here and never leaves this machine.
pub async fn operator_issue(a: OperatorIssueArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.out.join(creds::KEY).exists(),
        "{} already holds operator credentials; choose another folder",
        a.out.display()
    );
    let key = meshca_pki::PrivateKey::generate(meshca_pki::KeyAlgorithm::EcdsaP256)?;
    let csr = meshca_pki::build_csr(&key, &[])?;
    let mut client = connect(&a.creds).await?;
    let server = match &a.creds.server {
        Some(s) => s.clone(),
        None => creds::recorded_server(&a.creds.credentials)?,
    };
    let r = client
        .issue_operator(IssueOperatorRequest { name: a.name.clone(), csr, ttl_seconds: a.ttl.0.as_secs() as i64 })
        .await
        .map_err(status_err)?
        .into_inner();
    let cert = meshca_pki::Cert::from_pem(r.certificate.as_bytes()).context("the issued certificate")?;
    anyhow::ensure!(cert.has_public_key(key.public_key_spki()), "the issued certificate is not for the key made here");
    fsutil::create_private_dir(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let w = |name: &str, data: &[u8], mode: u32| {
        let p = a.out.join(name);
        fsutil::write_atomic(&p, data, mode).with_context(|| format!("writing {}", p.display()))
    };
    w(creds::KEY, key.to_pkcs8_pem().as_bytes(), 0o600)?;
    w(creds::CERT, r.certificate.as_bytes(), 0o644)?;
    w(creds::RELAY_CA, r.relay_ca.as_bytes(), 0o644)?;
    w(creds::SERVER, server.as_bytes(), 0o644)?;
    println!(
        "operator credentials for {} written to {} (serial {}, valid until {}); revoke them with: meshca operator revoke {}",
        a.name,
        a.out.display(),
        r.serial,
        time(r.not_after),
        r.serial
    );
    Ok(())
}

/// Arguments of `meshca operator revoke`.
#[derive(clap::Args)]
pub struct OperatorRevokeArgs {
    /// Serial (hex) of the operator certificate to revoke; without it, the certificate in
    /// --credentials (the credentials this command uses: their last call).
    serial: Option<String>,
    #[command(flatten)]
    creds: Creds,
}

/// `meshca operator revoke [SERIAL]`.
pub async fn operator_revoke(a: OperatorRevokeArgs) -> anyhow::Result<()> {
    let serial = match &a.serial {
        Some(s) => s.clone(),
        None => {
            let path = a.creds.credentials.join(creds::CERT);
            let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            meshca_pki::Cert::from_pem(&pem).with_context(|| format!("{}", path.display()))?.serial_hex()
        }
    };
    let mut client = connect(&a.creds).await?;
    let r = client.revoke_operator(RevokeOperatorRequest { serial }).await.map_err(status_err)?.into_inner();
    let who = if r.name.is_empty() { String::new() } else { format!(" (operator {})", safe(&r.name)) };
    if r.already_revoked {
        println!("operator certificate {}{who} was already revoked", r.serial);
    } else {
        println!("operator certificate {}{who} revoked: every later call with it is refused", r.serial);
    }
    if r.replaced_local_credentials {
        println!("it was the server's own operator credentials: the server wrote new ones in their place");
    }
    Ok(())
}
