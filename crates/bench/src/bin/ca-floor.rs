//! `ca-floor`: the transport floor under `CreateCertificate`. A server with the workload CA's
//! transport — meshca's `GrpcServer` with its default connection handling, TLS 1.3 with the same
//! P-256 serving certificate, HTTP/2 and tonic, the same message size limit — that answers every
//! request with one fixed certificate chain: no caller authentication, no CSR parse or
//! verification, no signature. Its CPU per request under `ca-load` is what Istio's CA API (gRPC over
//! TLS) costs per call on this machine before any CA work; set against the crypto bound measured
//! in the same run, it says how close to that bound any CA that speaks the API can come here
//! (`scripts/bench-ca.sh`, docs/benchmarks.md). A benchmark instrument, not a CA: the chain it
//! hands out is the same for every caller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meshca_pki::{KeyAlgorithm, LeafParams, PrivateKey, SpiffeId, TrustDomain};
use meshca_proto::istio::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use meshca_serve::{GrpcServer, ServeConfig};
use meshca_workload_ca::Metrics;
use meshca_workload_ca::ca::CaHolder;
use meshca_workload_ca::server::{MAX_REQUEST_BYTES, serving_identity, tls_config};
use tonic::{Request, Response, Status};

/// The transport floor: a workload CA's transport answering a fixed chain.
#[derive(Parser)]
struct Args {
    /// The `cacerts` directory the serving certificate and the fixed leaf are issued from.
    #[arg(long)]
    cacerts: PathBuf,
    /// The gRPC address.
    #[arg(long)]
    listen: SocketAddr,
    /// The trust domain of the serving certificate and the fixed leaf.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

/// Answers every call with the same chain.
struct Floor {
    answer: IstioCertificateResponse,
}

#[tonic::async_trait]
impl IstioCertificateService for Floor {
    async fn create_certificate(
        &self,
        _request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshca_tls::provider::install();
    let clock = meshca_clock::system();
    let now = clock.now();
    let td = TrustDomain::new(&args.trust_domain).context("trust domain")?;
    let holder = CaHolder::load(&args.cacerts, Metrics::new(), clock).context("cacerts")?;
    let state = holder.current();

    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let id = SpiffeId::workload(&td, "bench", "floor")?;
    let leaf = state.bundle.signer().sign_leaf(
        key.public_key_spki(),
        &LeafParams::workload(id, Duration::from_secs(3600)),
        now,
    )?;
    let mut cert_chain = vec![leaf.to_pem()];
    cert_chain.extend(state.chain_pems.iter().cloned());
    let answer = IstioCertificateResponse { cert_chain };

    let serving = meshca_tls::SwappableCert::new(serving_identity(&state, &td, now)?);
    let tls = tls_config(serving)?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let routes = tonic::service::Routes::new(
        IstioCertificateServiceServer::new(Floor { answer }).max_decoding_message_size(MAX_REQUEST_BYTES),
    );
    GrpcServer::new(tls, routes, ServeConfig::default(), meshca_serve::ServeMetrics::default())
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
