//! SPIFFE federation with a **real SPIRE server** (built from the Go module proxy by
//! `scripts/peers/spire.sh`, found through `$MESHCA_SPIRE_BIN`), both ways:
//!
//! - SPIRE federates with `meshca up`'s bundle endpoint over `https_spiffe` (a federation
//!   relationship bootstrapped with meshca's own bundle document, then refreshed by SPIRE from
//!   the endpoint, authenticating meshca's serving SVID): the bundle SPIRE holds for meshca's
//!   trust domain is meshca's root set with meshca's refresh hint, and a leaf from a meshca
//!   workload CA verifies (OpenSSL) against the roots SPIRE fetched.
//! - meshca reads SPIRE's bundle endpoint (`federation::fetch`, `https_spiffe` with SPIRE's
//!   `spiffe://<td>/spire/server` and its first bundle): a SPIRE-minted X.509-SVID passes meshca's
//!   SPIFFE verifier built on those roots for SPIRE's trust domain, and is refused by one for the
//!   mesh's own trust domain (a foreign root vouches for its trust domain only).
//!
//! Not shown (not built): the federated roots reaching meshca's clusters and workloads.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::rotation::Leaf;
use common::*;
use meshca_mgmt::federation::fetch::{EndpointAuth, Source, fetch};
use meshca_pki::{Cert, RootSet, SpiffeId, TrustDomain};
use meshca_spiffe_bundle::Bundle;
use meshca_testsupport::ports::Ports;
use meshca_testsupport::process::Proc;
use rustls::client::danger::ServerCertVerifier;

const SPIRE_TD: &str = "spire.example";

fn spire_bin() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_SPIRE_BIN", "scripts/peers/spire.sh")
}

/// A SPIRE server for trust domain [`SPIRE_TD`] with its bundle endpoint on `bundle_port`.
struct Spire {
    bin: PathBuf,
    socket: PathBuf,
    _proc: Proc,
}

impl Spire {
    fn start(d: &Path, api_port: u16, bundle_port: u16) -> Spire {
        let bin = spire_bin();
        let data = d.join("spire");
        std::fs::create_dir_all(&data).unwrap();
        let socket = data.join("api.sock");
        let conf = format!(
            r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{api_port}"
  socket_path = "{socket}"
  trust_domain = "{SPIRE_TD}"
  data_dir = "{data}"
  log_level = "DEBUG"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  federation {{
    bundle_endpoint {{
      address = "127.0.0.1"
      port = {bundle_port}
    }}
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
}}
"#,
            socket = socket.display(),
            data = data.display(),
        );
        let conf_file = write_file(d, "spire-server.conf", &conf);
        let mut cmd = Command::new(&bin);
        cmd.args(["run", "-config", conf_file.to_str().unwrap()]);
        let proc = Proc::spawn(cmd, "spire-server", d);
        let s = Spire { bin, socket, _proc: proc };
        wait_for(Duration::from_secs(60), "SPIRE to be healthy", || s.cli(&["healthcheck"]).ok());
        s
    }

    /// `spire-server ARGS -socketPath …`; its stdout, or the failure.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out =
            Command::new(&self.bin).args(args).args(["-socketPath", self.socket.to_str().unwrap()]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() { Ok(stdout) } else { Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))) }
    }
}

#[test]
fn spire_and_meshca_federate_through_their_bundle_endpoints() {
    meshca_tls::provider::install();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_up, up) = start_up(d, &["--clusters", "1"]);
    let endpoint = &up["management_plane"]["bundle_endpoint"];
    assert_eq!(endpoint["profile"], "https_spiffe");
    let url = endpoint["url"].as_str().unwrap().to_string();
    let endpoint_id = endpoint["spiffe_id"].as_str().unwrap().to_string();
    let mesh_td = TrustDomain::new(up["clusters"][0]["trust_domain"].as_str().unwrap()).unwrap();
    let cacerts = PathBuf::from(up["clusters"][0]["cacerts_dir"].as_str().unwrap());
    let root_pem = wait_for(Duration::from_secs(30), "cluster-1's root-cert.pem", || {
        std::fs::read(cacerts.join("root-cert.pem")).ok().filter(|b| !b.is_empty())
    });
    let mesh_roots = RootSet::from_pem(&root_pem).unwrap();

    // meshca's document, fetched the way a federating peer does (the offline first exchange).
    let meshca_source = Source {
        trust_domain: mesh_td.clone(),
        url: url.clone(),
        auth: EndpointAuth::Spiffe(endpoint_id.parse().unwrap()),
        timeout: Duration::from_secs(10),
    };
    let held = Bundle {
        trust_domain: mesh_td.clone(),
        sequence: 0,
        refresh_hint: None,
        authorities: mesh_roots.iter().cloned().collect(),
    };
    let first = rt.block_on(fetch(&meshca_source, Some(&held), SystemTime::now())).unwrap();
    let first_doc = write_file(d, "meshca-bundle.json", &first.to_document().unwrap());

    let ports = Ports::reserve(2);
    let spire = Spire::start(d, ports.port(0), ports.port(1));

    // ---- SPIRE reads meshca ----
    let out = spire
        .cli(&[
            "federation",
            "create",
            "-trustDomain",
            mesh_td.as_str(),
            "-bundleEndpointURL",
            &url,
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            &endpoint_id,
            "-trustDomainBundlePath",
            first_doc.to_str().unwrap(),
            "-trustDomainBundleFormat",
            "spiffe",
        ])
        .unwrap_or_else(|e| panic!("SPIRE refused the federation relationship (and meshca's document): {e}"));
    assert!(out.contains(mesh_td.as_str()), "{out}");
    let id = format!("spiffe://{mesh_td}");
    // SPIRE refreshes at once over https_spiffe (authenticating meshca's serving SVID with the
    // bundle it was given); its log says so.
    wait_until(Duration::from_secs(60), "SPIRE to refresh meshca's bundle from the endpoint", || {
        std::fs::read_to_string(d.join("spire-server.log")).unwrap_or_default().contains("Bundle refreshed")
    });
    let held_by_spire = spire.cli(&["bundle", "list", "-id", &id, "-format", "pem"]).unwrap();
    let spire_roots: Vec<String> =
        Cert::parse_pem_bundle(held_by_spire.as_bytes()).unwrap().iter().map(Cert::fingerprint).collect();
    let ours: Vec<String> = mesh_roots.iter().map(Cert::fingerprint).collect();
    assert_eq!(spire_roots, ours, "SPIRE holds meshca's root set");
    let spire_doc = spire.cli(&["bundle", "list", "-id", &id, "-format", "spiffe"]).unwrap();
    let spire_view = Bundle::parse(spire_doc.as_bytes(), &mesh_td, SystemTime::now()).unwrap();
    assert_eq!(spire_view.authorities, first.authorities);
    // SPIRE keeps the publisher's refresh hint (not its sequence number: it numbers what it stores).
    assert_eq!(spire_view.refresh_hint, first.refresh_hint);
    // A meshca workload's leaf verifies against the roots SPIRE fetched (OpenSSL).
    let leaf = Leaf::get(&up, d, "cluster-1", "for-spire");
    let spire_roots_file = write_file(d, "spire-held-meshca.pem", &held_by_spire);
    let (ok, out) = openssl_verify_leaf(d, &leaf.files, &spire_roots_file);
    assert!(ok, "a meshca leaf against the bundle SPIRE fetched: {out}");

    // ---- meshca reads SPIRE ----
    let spire_td = TrustDomain::new(SPIRE_TD).unwrap();
    let spire_first = spire.cli(&["bundle", "show", "-format", "spiffe"]).unwrap();
    let spire_first = Bundle::parse(spire_first.as_bytes(), &spire_td, SystemTime::now())
        .unwrap_or_else(|e| panic!("meshca refused SPIRE's own bundle document: {e}"));
    let source = Source {
        trust_domain: spire_td.clone(),
        url: format!("https://127.0.0.1:{}/", ports.port(1)),
        auth: EndpointAuth::Spiffe(SpiffeId::new(spire_td.clone(), "spire/server").unwrap()),
        timeout: Duration::from_secs(10),
    };
    let fetched = rt.block_on(fetch(&source, Some(&spire_first), SystemTime::now())).unwrap();
    assert_eq!(fetched.authorities, spire_first.authorities);
    // A SPIRE-minted X.509-SVID: accepted for SPIRE's trust domain by meshca's verifier on the
    // fetched roots, refused for the mesh's own trust domain.
    let svid_dir = d.join("svid");
    std::fs::create_dir_all(&svid_dir).unwrap();
    spire
        .cli(&[
            "x509",
            "mint",
            "-spiffeID",
            &format!("spiffe://{SPIRE_TD}/workload"),
            "-write",
            svid_dir.to_str().unwrap(),
        ])
        .unwrap();
    let chain = Cert::parse_pem_bundle(&std::fs::read(svid_dir.join("svid.pem")).unwrap()).unwrap();
    let roots = RootSet::from_certs(fetched.authorities.clone()).unwrap();
    let verify = |policy| {
        let v = meshca_tls::SpiffeVerifier::new(&roots, policy, false).unwrap();
        let ders: Vec<rustls::pki_types::CertificateDer<'static>> =
            chain.iter().map(|c| rustls::pki_types::CertificateDer::from(c.der().to_vec())).collect();
        v.verify_server_cert(
            &ders[0],
            &ders[1..],
            &rustls::pki_types::ServerName::try_from("workload").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
    };
    verify(meshca_tls::PeerPolicy::TrustDomain(spire_td)).unwrap();
    assert!(verify(meshca_tls::PeerPolicy::TrustDomain(mesh_td)).is_err(), "SPIRE's roots do not vouch for the mesh");
}
