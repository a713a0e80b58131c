//! Prints the worker candidate set Kubernetes discovery yields, one JSON line per change:
//! `{"candidates":["http://10.244.0.7:9000",...]}`, until killed. Used by the operator e2e
//! (`e2e/operator/run.sh`, case `kubernetes_discovery_follows_worker_readiness`) to watch what a
//! frontend pod would see, with the frontend ServiceAccount's credentials.
//!
//!   KUBECONFIG=... cargo run -p dynamo-frontend --example discover -- --namespace NS --graph NAME

use std::io::Write;

use dynamo_frontend::discovery::Discovery;
use dynamo_frontend::discovery::kube::Kubernetes;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (mut namespace, mut graph) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--namespace" => namespace = args.next(),
            "--graph" => graph = args.next(),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: discover --namespace NS --graph NAME"
            ),
        }
    }
    let (Some(namespace), Some(graph)) = (namespace, graph) else {
        anyhow::bail!("usage: discover --namespace NS --graph NAME");
    };
    let mut source = Kubernetes::connect(&namespace, &graph).await?;
    while let Some(set) = source.next().await? {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &serde_json::json!({ "candidates": set }))?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}
