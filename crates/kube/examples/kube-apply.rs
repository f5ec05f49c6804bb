//! `kube-apply URL CA_FILE TOKEN_FILE MANIFEST...`: server-side applies meshca's `deploy/`
//! manifests to an API server. `scripts/kube-up.sh` uses it where no `kubectl` is installed
//! (with `kubectl`, `kubectl apply --server-side -f deploy/...` does the same).
#![allow(clippy::unwrap_used)]

use meshca_kube::Connection;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: kube-apply URL CA_FILE TOKEN_FILE MANIFEST...".into());
    }
    let conn = Connection::Direct {
        url: args[0].clone(),
        ca_file: Some(args[1].clone().into()),
        token_file: Some(args[2].clone().into()),
    };
    let client = meshca_kube::connect(&conn).await.map_err(|e| e.to_string())?;
    for file in &args[3..] {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        meshca_kube::testing::apply_yaml(&client, &text).await.map_err(|e| format!("{file}: {e}"))?;
        eprintln!("applied {file}");
    }
    Ok(())
}
