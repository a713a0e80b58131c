//! `dynamo-operator`: wires flags, tracing, `/metrics`, leader election and the controller.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use dynamo_operator::{config::Args, controller, leader::LeaderElector, planner, telemetry};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("DYN_LOG")?)
        .init();
    let config = args.validate().map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default()
        .await
        .context("no usable kubeconfig or in-cluster config")?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = telemetry::Metrics::default();
    let healthy = Arc::new(AtomicBool::new(true));
    tracker.spawn(telemetry::serve(
        config.metrics_addr,
        metrics.clone(),
        healthy.clone(),
        cancel.child_token(),
    ));
    tracker.spawn({
        let cancel = cancel.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            cancel.cancel();
            // Shutdown is bounded: an operator that cannot finish it (its API server went away
            // mid-request) exits anyway rather than linger after its stop was asked.
            std::thread::spawn(|| {
                std::thread::sleep(SHUTDOWN_DEADLINE);
                eprintln!(
                    "dynamo-operator: still shutting down {SHUTDOWN_DEADLINE:?} after the signal; exiting"
                );
                std::process::exit(1);
            });
        }
    });

    let elector = config.leader_election.then(|| {
        let api = kube::Api::namespaced(client.clone(), &config.lease_namespace);
        LeaderElector::new(
            api,
            &config.lease_name,
            &config.identity,
            config.lease_duration,
        )
    });
    let lost = CancellationToken::new();
    if let Some(e) = &elector {
        if !e.acquire(&cancel).await {
            return Ok(());
        }
        let (e, cancel) = (e.clone(), cancel.clone());
        tracker.spawn({
            let lost = lost.clone();
            async move {
                if !e.keep(&cancel).await {
                    lost.cancel();
                    cancel.cancel();
                }
            }
        });
    }
    metrics.leader.set(1);
    let planners = tokio::spawn(planner::run(
        client.clone(),
        config.watch_namespace.clone(),
        metrics.clone(),
        config.identity.clone(),
        cancel.child_token(),
    ));
    controller::run(client, config, metrics.clone(), cancel.child_token()).await;
    cancel.cancel();
    let _ = planners.await;

    healthy.store(false, Ordering::Relaxed);
    cancel.cancel();
    if let Some(e) = &elector
        && !lost.is_cancelled()
    {
        e.release().await;
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 10s");
    }
    if lost.is_cancelled() {
        anyhow::bail!("lost leadership; exiting so that a restart waits for the lease");
    }
    Ok(())
}

/// How long shutdown may take after SIGTERM / Ctrl-C before the process exits regardless.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
