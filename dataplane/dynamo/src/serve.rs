//! `dynamo serve <manifest>`: runs a graph as local processes, the way the operator runs it as
//! pods. Each worker replica is a `dynamo sidecar` child process (its engine inside), reachable only
//! through its gRPC port; the frontend is a `dynamo frontend` child pointed at those ports.
//!
//! Children run in their own process group (a terminal Ctrl-C reaches only `serve`, which then stops
//! them in order: frontend first, so in-flight streams drain, then the workers). Each child's stdin
//! is a pipe that `serve` closes to stop it; a child whose parent dies therefore exits too.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};

use crate::{
    cli::ServeArgs,
    manifest::{LocalService, Manifest},
};

/// How long a child may take to report readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// A started child process.
struct Proc {
    name: String,
    child: Child,
    /// Held apart from `child`: tokio's `Child::wait` closes a stdin it still owns, and closing it
    /// is how we ask the child to stop.
    stdin: Option<tokio::process::ChildStdin>,
    addr: String,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = args.manifest.display().to_string();
    let manifest = Manifest::load(&args.manifest)?;
    let graph = manifest.local_graph(&path)?;
    // Load the model once here so a bad --model-path fails before anything starts.
    let model = args.model.load()?;
    let exe = std::env::current_exe().context("cannot find the dynamo executable")?;

    let mut workers: Vec<Proc> = Vec::new();
    let start = Instant::now();
    let result = async {
        for svc in &graph.workers {
            let replicas = args.workers.unwrap_or(svc.replicas);
            for i in 0..replicas {
                let name = format!("{}-{i}", svc.name);
                let mut extra = vec![
                    "--listen".to_string(),
                    "127.0.0.1:0".into(),
                    "--worker-id".into(),
                    name.clone(),
                ];
                if let Some(s) = args.speedup_ratio {
                    extra.extend(["--speedup-ratio".into(), s.to_string()]);
                }
                extra.extend(args.model.to_args());
                workers.push(spawn(&exe, "sidecar", svc, &name, &extra).await?);
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        stop_all(&mut workers).await;
        return Err(e);
    }

    let fe = &graph.frontend;
    let mut extra = vec![
        "--listen".to_string(),
        format!("{}:{}", args.host, args.port),
    ];
    for w in &workers {
        extra.extend(["--worker".into(), format!("http://{}", w.addr)]);
    }
    if let Some(mode) = args.router_mode {
        extra.extend(["--router-mode".into(), mode.as_str().into()]);
    }
    extra.extend(args.model.to_args());
    let mut frontend = match spawn(&exe, "frontend", fe, &fe.name, &extra).await {
        Ok(p) => p,
        Err(e) => {
            stop_all(&mut workers).await;
            return Err(e);
        }
    };

    let name = &model.card().name;
    let port = args.port;
    eprintln!();
    eprintln!(
        "dynamo serve: graph {:?} ready in {:.1}s: frontend on http://{} with {} worker(s) serving model {name:?}",
        graph.name,
        start.elapsed().as_secs_f64(),
        frontend.addr,
        workers.len(),
    );
    for w in &workers {
        eprintln!("  worker {} on grpc://{}", w.name, w.addr);
    }
    eprintln!("Try it:");
    eprintln!(
        "  curl -s http://localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":32}}'"
    );
    eprintln!("Press Ctrl-C to stop.");
    eprintln!();

    // Run until Ctrl-C / SIGTERM, or until the frontend dies.
    let outcome = tokio::select! {
        why = crate::net::shutdown_signal(false) => {
            eprintln!("dynamo serve: {why}: draining the frontend, then stopping workers");
            Ok(())
        }
        status = frontend.child.wait() => Err(anyhow::anyhow!("the frontend exited unexpectedly ({})", describe(status))),
        () = watch_workers(&mut workers) => Ok(()),
    };
    stop(&mut frontend).await;
    stop_all(&mut workers).await;
    eprintln!("dynamo serve: stopped");
    outcome
}

/// Reports workers that exit on their own; the frontend routes around them. Never returns.
async fn watch_workers(workers: &mut [Proc]) {
    let mut gone = vec![false; workers.len()];
    loop {
        let waits = workers
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !gone[*i])
            .map(|(i, w)| Box::pin(async move { (i, w.child.wait().await) }));
        let waits: Vec<_> = waits.collect();
        if waits.is_empty() {
            std::future::pending::<()>().await;
        }
        let ((i, status), _, _) = futures::future::select_all(waits).await;
        gone[i] = true;
        eprintln!(
            "dynamo serve: worker {} exited ({}); the frontend routes around it",
            workers[i].name,
            describe(status)
        );
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Starts `dynamo <sub> <manifest args> <extra>` and waits for its ready line.
async fn spawn(
    exe: &Path,
    sub: &str,
    svc: &LocalService,
    name: &str,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(exe);
    cmd.arg(sub)
        .args(&svc.args)
        .args(extra)
        .args(["--ready-stdout", "--exit-on-stdin-eof"])
        .envs(svc.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {name} ({} {sub})", exe.display()))?;
    forward_logs(name, child.stderr.take());
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = parse_ready(&line) {
                return Some(addr);
            }
        }
        None
    })
    .await;
    let addr = match ready {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            let status = child.wait().await;
            bail!(
                "{name} exited before it was ready ({}); see its log lines above",
                describe(status)
            );
        }
        Err(_) => {
            let _ = child.start_kill();
            bail!("{name} did not become ready within {READY_TIMEOUT:?}");
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc {
        name: name.to_owned(),
        child,
        stdin,
        addr,
    })
}

/// `{"ready":{"addr":"127.0.0.1:41234"}}` → the address.
fn parse_ready(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("ready")?.get("addr")?.as_str().map(str::to_owned)
}

fn forward_logs(name: &str, stderr: Option<tokio::process::ChildStderr>) {
    let Some(stderr) = stderr else { return };
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
}

/// Asks a child to stop (closes its stdin) and waits, killing it after the deadline.
async fn stop(p: &mut Proc) {
    drop(p.stdin.take());
    match tokio::time::timeout(STOP_TIMEOUT, p.child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!(
                "dynamo serve: {} did not stop within {STOP_TIMEOUT:?}; killing it",
                p.name
            );
            let _ = p.child.kill().await;
        }
    }
}

async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        drop(p.stdin.take());
    }
    futures::future::join_all(procs.iter_mut().map(stop)).await;
}

#[cfg(test)]
mod tests {
    use super::parse_ready;

    #[test]
    fn ready_line_is_parsed_and_other_output_ignored() {
        assert_eq!(
            parse_ready(r#"{"ready":{"addr":"127.0.0.1:4000"}}"#).as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(parse_ready("hello"), None);
        assert_eq!(parse_ready(r#"{"ready":{}}"#), None);
    }
}
