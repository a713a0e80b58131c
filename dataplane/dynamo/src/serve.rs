//! `dynamo serve <manifest>`: runs a graph as local processes, the way the operator runs it as
//! pods. Each worker replica is a `dynamo sidecar` child process (its engine inside), reachable only
//! through its gRPC port; the frontend is a `dynamo frontend --discovery serve` child that learns
//! the worker set from `serve` on its stdin (one JSON line per change).
//!
//! `serve` keeps the graph whole: a worker that dies is reported, dropped from the frontend's set
//! and restarted with backoff (1 s doubling to 30 s; reset after a minute of good health). A small
//! control API on 127.0.0.1 adds and removes workers at run time (`GET /workers`,
//! `POST /workers?service=NAME`, `DELETE /workers/NAME`): a removed worker first leaves the
//! frontend's set, then drains its in-flight streams and exits.
//!
//! Children run in their own process group (a terminal Ctrl-C reaches only `serve`, which then stops
//! them in order: frontend first, so in-flight streams drain, then the workers). Each child's stdin
//! is a pipe that `serve` closes to stop it; a child whose parent dies therefore exits too.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, get},
};
use dynamo_frontend::discovery::WorkerSet;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{ChildStdin, Command},
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    cli::ServeArgs,
    manifest::{LocalService, Manifest},
};

pub mod engine;
pub mod planner;

use engine::{EngineProc, LocalEngine, LocalPaths};

/// How long a child may take to report readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// First restart delay of a worker that died; doubles per quick death up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before dying is restarted after [`FIRST_BACKOFF`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// How `serve` starts children.
struct Launcher {
    exe: PathBuf,
    /// Flags every worker gets (speedup, model).
    worker_extra: Vec<String>,
}

/// A started child process. The child itself is owned by its waiter task, which reports the exit.
struct Proc {
    name: String,
    /// Held apart from the child: closing it is how we ask the child to stop.
    stdin: Option<ChildStdin>,
    addr: String,
    pid: Option<u32>,
    /// Cancelled to kill the child (after a stop deadline).
    kill: CancellationToken,
    started: Instant,
}

/// One worker replica's place in the graph: its service and its current process, if any.
struct Slot {
    service: usize,
    proc: Option<Proc>,
    /// Incremented per start of this slot, so a late exit of an earlier incarnation is ignored.
    generation: u64,
    backoff: Backoff,
    /// Removed through the control API: not restarted.
    removed: bool,
    restarts: u32,
}

/// Restart delays of a worker or an engine: [`FIRST_BACKOFF`] doubling up to [`MAX_BACKOFF`],
/// back to the first after a run of [`HEALTHY_RUN`].
#[derive(Debug, Clone, Copy)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(FIRST_BACKOFF)
    }
}

impl Backoff {
    /// The delay before restarting something that ran for `ran`; the next one is doubled.
    fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RUN {
            self.0 = FIRST_BACKOFF;
        }
        self.next()
    }

    /// The delay now; the next one is doubled.
    fn next(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        delay
    }

    fn current(&self) -> Duration {
        self.0
    }
}

/// A worker replica's engine process (for services with an `engine` container).
struct EngineSlot {
    local: LocalEngine,
    proc: Option<EngineProc>,
    generation: u64,
    backoff: Backoff,
    started: Instant,
}

/// What the supervisor is told: child exits, scheduled restarts, control API requests.
enum Msg {
    /// A worker's engine process exited.
    EngineExited {
        name: String,
        generation: u64,
        status: String,
    },
    RestartEngine {
        name: String,
    },
    Exited {
        name: String,
        generation: u64,
        status: String,
    },
    Restart {
        name: String,
    },
    Add {
        service: Option<String>,
        reply: oneshot::Sender<Result<WorkerView, String>>,
    },
    Remove {
        name: String,
        reply: oneshot::Sender<Result<WorkerView, String>>,
    },
    List {
        reply: oneshot::Sender<Vec<WorkerView>>,
    },
    /// A removed worker is out of the frontend's set: stop it now.
    StopRemoved {
        name: String,
        generation: u64,
    },
}

/// A worker as the control API shows it.
#[derive(Debug, Clone, serde::Serialize)]
struct WorkerView {
    name: String,
    service: String,
    /// `http://127.0.0.1:PORT`, when running.
    url: Option<String>,
    pid: Option<u32>,
    state: &'static str,
    restarts: u32,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = args.manifest.display().to_string();
    let manifest = Manifest::load(&args.manifest)?;
    let mut graph = manifest.local_graph(&path)?;
    // The graph's KV transfer secret: prefill and decode workers only serve blocks to each other.
    let secret = format!("{:032x}", rand::random::<u128>());
    for svc in &mut graph.workers {
        if !svc.env.iter().any(|(k, _)| k == "DYN_KV_TRANSFER_SECRET") {
            svc.env
                .push(("DYN_KV_TRANSFER_SECRET".into(), secret.clone()));
        }
    }
    // Load the model once here so a bad --model-path fails before anything starts.
    let model = args.model.load()?;
    let exe = std::env::current_exe().context("cannot find the dynamo executable")?;
    let mut worker_extra = Vec::new();
    if let Some(s) = args.speedup_ratio {
        worker_extra.extend(["--speedup-ratio".into(), s.to_string()]);
    }
    worker_extra.extend(args.model.to_args());
    let launcher = Arc::new(Launcher { exe, worker_extra });
    let tasks = TaskTracker::new();
    let (tx, rx) = mpsc::unbounded_channel();

    let start = Instant::now();
    let mut sup = Supervisor {
        launcher: launcher.clone(),
        services: graph.workers.clone(),
        slots: BTreeMap::new(),
        next_index: vec![0; graph.workers.len()],
        frontend_stdin: None,
        tx: tx.clone(),
        tasks: tasks.clone(),
        engines: BTreeMap::new(),
        paths: LocalPaths::from_env(),
        engine_index: 0,
        engine_count: graph
            .workers
            .iter()
            .filter(|w| w.engine.is_some())
            .map(|w| args.workers.unwrap_or(w.replicas) as usize)
            .sum(),
        log_dir: std::env::temp_dir().join(format!("dynamo-serve-{}", std::process::id())),
        frontend_addr: None,
    };
    let initial = async {
        for (s, svc) in graph.workers.iter().enumerate() {
            for _ in 0..args.workers.unwrap_or(svc.replicas) {
                sup.add(s).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let mut rx = rx;
    let initial = match initial {
        Ok(()) => {
            let waiting: Vec<(String, &EngineProc, String)> = sup
                .engines
                .iter()
                .filter_map(|(n, e)| Some((n.clone(), e.proc.as_ref()?, e.local.health.clone())))
                .collect();
            let ready = tokio::select! {
                r = engine::wait_ready(&waiting) => r,
                why = dynamo_protocol::net::shutdown_signal(false) => Err(anyhow::anyhow!("{why} while engines were loading")),
            };
            ready
        }
        Err(e) => Err(e),
    };
    if let Err(e) = initial {
        sup.stop_all(&mut rx).await;
        return Err(e);
    }

    let speedup = args
        .speedup_ratio
        .unwrap_or_else(|| graph.workers.first().map_or(1.0, planner::worker_speedup));
    let planner_on = match args.planner {
        Some(crate::cli::OnOff::On) => true,
        Some(crate::cli::OnOff::Off) => false,
        None => manifest.spec.sla.is_some(),
    };
    let local_planner = if planner_on {
        let dir = args
            .manifest
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .to_owned();
        match planner::setup(&manifest.spec, &dir, &graph.workers, speedup) {
            Ok(p) => Some(p),
            Err(e) => {
                sup.stop_all(&mut rx).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let fe = &graph.frontend;
    let mut extra = vec![
        "--listen".to_string(),
        format!("{}:{}", args.host, args.port),
        "--discovery".into(),
        "serve".into(),
    ];
    if let Some(mode) = args.router_mode {
        extra.extend(["--router-mode".into(), mode.as_str().into()]);
    }
    if let Some(sla) = &manifest.spec.sla
        && let (Some(t), Some(i)) = (sla.ttft_ms, sla.itl_ms)
    {
        // The frontend judges wall-clock latencies: the targets at the engines' speed.
        extra.extend([
            "--sla-ttft-ms".into(),
            (t / speedup).to_string(),
            "--sla-itl-ms".into(),
            (i / speedup).to_string(),
        ]);
    }
    extra.extend(args.model.to_args());
    let mut frontend = match spawn(
        &launcher.exe,
        "frontend",
        fe,
        &fe.name,
        &extra,
        0,
        &tx,
        &tasks,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            sup.stop_all(&mut rx).await;
            return Err(e);
        }
    };
    sup.frontend_stdin = frontend.stdin.take();
    sup.publish().await;
    let expected = sup.running().count();
    let frontend_addr: SocketAddr = frontend
        .addr
        .parse()
        .context("the frontend reported an invalid address")?;
    if let Err(e) = wait_routable(frontend_addr, expected).await {
        eprintln!("dynamo serve: {e:#}");
    }
    sup.frontend_addr = Some(frontend_addr);

    let planner_status = local_planner.as_ref().map(|p| p.status.clone());
    let control = bind_control(args.control_port, tx.clone(), planner_status, &tasks).await?;
    let planner_stop = CancellationToken::new();
    if let Some(lp) = local_planner {
        tasks.spawn(planner::run(
            lp,
            frontend_addr,
            tx.clone(),
            planner_stop.clone(),
        ));
    }

    let name = &model.card().name;
    let port = args.port;
    eprintln!();
    eprintln!(
        "dynamo serve: graph {:?} ready in {:.1}s: frontend on http://{} with {} worker(s) serving model {name:?}",
        graph.name,
        start.elapsed().as_secs_f64(),
        frontend.addr,
        expected,
    );
    for (n, slot) in &sup.slots {
        if let Some(p) = &slot.proc {
            eprintln!("  worker {n} on grpc://{}", p.addr);
        }
    }
    eprintln!(
        "  control API on http://{control} (GET/POST /workers, DELETE /workers/NAME, GET /planner)"
    );
    eprintln!("Try it:");
    eprintln!(
        "  curl -s http://localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":32}}'"
    );
    eprintln!("Press Ctrl-C to stop.");
    eprintln!();

    // Run until Ctrl-C / SIGTERM, or until the frontend dies.
    let outcome = loop {
        let cmd = tokio::select! {
            why = dynamo_protocol::net::shutdown_signal(false) => {
                eprintln!("dynamo serve: {why}: draining the frontend, then stopping workers");
                break Ok(());
            }
            cmd = rx.recv() => cmd,
        };
        let Some(cmd) = cmd else { break Ok(()) };
        if let Msg::Exited { name, status, .. } = &cmd
            && name == &frontend.name
        {
            break Err(anyhow::anyhow!(
                "the frontend exited unexpectedly ({status})"
            ));
        }
        sup.handle(cmd).await;
    };
    planner_stop.cancel();
    // The frontend's stdin is the supervisor's (it sends worker sets on it): closing it is what
    // asks the frontend to drain.
    frontend.stdin = sup.frontend_stdin.take();
    stop(&mut frontend, &mut rx).await;
    sup.stop_all(&mut rx).await;
    tasks.close();
    // Waiters and log forwarders end with their children.
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    eprintln!("dynamo serve: stopped");
    outcome
}

// === impl Supervisor ===

/// Owns the worker processes: starts, restarts, adds and removes them, and tells the frontend.
struct Supervisor {
    launcher: Arc<Launcher>,
    services: Vec<LocalService>,
    slots: BTreeMap<String, Slot>,
    /// Next replica index per service (names are never reused within a run).
    next_index: Vec<u32>,
    frontend_stdin: Option<ChildStdin>,
    tx: mpsc::UnboundedSender<Msg>,
    tasks: TaskTracker,
    /// Engines by worker name; an engine outlives restarts of its sidecar, as in a pod.
    engines: BTreeMap<String, EngineSlot>,
    paths: LocalPaths,
    /// Engines started so far (each gets the next core range) and how many the graph has.
    engine_index: usize,
    engine_count: usize,
    log_dir: PathBuf,
    /// The frontend, once started: a removed worker is stopped only after it left its set.
    frontend_addr: Option<SocketAddr>,
}

impl Supervisor {
    fn running(&self) -> impl Iterator<Item = &Proc> {
        self.slots.values().filter_map(|s| s.proc.as_ref())
    }

    /// Starts a new replica of service `s` and returns its name.
    async fn add(&mut self, s: usize) -> anyhow::Result<String> {
        let name = format!("{}-{}", self.services[s].name, self.next_index[s]);
        self.next_index[s] += 1;
        if let Some(spec) = &self.services[s].engine {
            let cores = engine::cores_for(self.engine_index, self.engine_count);
            self.engine_index += 1;
            let local = LocalEngine::new(spec, &self.paths, Some(cores)).with_context(|| {
                format!("spec.services.{}: engine container", self.services[s].name)
            })?;
            eprintln!("dynamo serve: {name}'s engine: {}", local.describe());
            let proc = engine::spawn(&name, &local, 1, &self.log_dir, &self.tx, &self.tasks)?;
            eprintln!(
                "dynamo serve: {name}'s engine started (pid {}, process group {}), log {}",
                proc.pid,
                proc.pid,
                proc.log.display()
            );
            self.engines.insert(
                name.clone(),
                EngineSlot {
                    local,
                    proc: Some(proc),
                    generation: 1,
                    backoff: Backoff::default(),
                    started: Instant::now(),
                },
            );
        }
        let proc = match self.start(s, &name, 1).await {
            Ok(p) => p,
            Err(e) => {
                self.stop_engine(&name).await;
                return Err(e);
            }
        };
        self.slots.insert(
            name.clone(),
            Slot {
                service: s,
                proc: Some(proc),
                generation: 1,
                backoff: Backoff::default(),
                removed: false,
                restarts: 0,
            },
        );
        Ok(name)
    }

    async fn start(&self, s: usize, name: &str, generation: u64) -> anyhow::Result<Proc> {
        let mut extra = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--worker-id".into(),
            name.to_owned(),
        ];
        extra.extend(self.launcher.worker_extra.iter().cloned());
        let mut svc = self.services[s].clone();
        if let Some(e) = self.engines.get(name) {
            // The sidecar reaches its engine at this replica's local ports.
            svc.args = e.local.sidecar_args(&svc.args);
        }
        spawn(
            &self.launcher.exe,
            "sidecar",
            &svc,
            name,
            &extra,
            generation,
            &self.tx,
            &self.tasks,
        )
        .await
    }

    /// Sends the current worker set to the frontend.
    async fn publish(&mut self) {
        let set = WorkerSet {
            workers: self
                .running()
                .map(|p| format!("http://{}", p.addr))
                .collect(),
        };
        let Some(stdin) = &mut self.frontend_stdin else {
            return;
        };
        let mut line = serde_json::to_string(&set).unwrap_or_default();
        line.push('\n');
        if let Err(error) = stdin.write_all(line.as_bytes()).await {
            eprintln!("dynamo serve: could not send the worker set to the frontend: {error}");
        }
    }

    fn view(&self, name: &str, slot: &Slot) -> WorkerView {
        WorkerView {
            name: name.to_owned(),
            service: self.services[slot.service].name.clone(),
            url: slot.proc.as_ref().map(|p| format!("http://{}", p.addr)),
            pid: slot.proc.as_ref().and_then(|p| p.pid),
            state: match (&slot.proc, slot.removed) {
                (_, true) => "removing",
                (Some(_), false) => "running",
                (None, false) => "restarting",
            },
            restarts: slot.restarts,
        }
    }

    async fn handle(&mut self, cmd: Msg) {
        match cmd {
            Msg::Exited {
                name,
                generation,
                status,
            } => {
                let Some(slot) = self.slots.get_mut(&name) else {
                    return;
                };
                if slot.generation != generation || slot.proc.is_none() {
                    return;
                }
                let proc = slot.proc.take();
                if slot.removed {
                    self.slots.remove(&name);
                    if let Some(e) = self.engines.remove(&name).and_then(|e| e.proc) {
                        self.tasks.spawn(async move { e.stop().await });
                    }
                    return;
                }
                let ran = proc.map_or(Duration::ZERO, |p| p.started.elapsed());
                let delay = slot.backoff.after_run(ran);
                eprintln!(
                    "dynamo serve: worker {name} exited ({status}); the frontend routes around it and its requests move to other workers; restarting in {delay:?}"
                );
                self.publish().await;
                self.send_after(delay, Msg::Restart { name });
            }
            Msg::Restart { name } => {
                let Some(slot) = self.slots.get(&name) else {
                    return;
                };
                if slot.removed || slot.proc.is_some() {
                    return;
                }
                let (s, generation) = (slot.service, slot.generation + 1);
                match self.start(s, &name, generation).await {
                    Ok(proc) => {
                        eprintln!(
                            "dynamo serve: worker {name} restarted on grpc://{}",
                            proc.addr
                        );
                        if let Some(slot) = self.slots.get_mut(&name) {
                            slot.proc = Some(proc);
                            slot.generation = generation;
                            slot.restarts += 1;
                        }
                        self.publish().await;
                    }
                    Err(e) => {
                        let slot = self.slots.get_mut(&name);
                        let delay = slot.map_or(MAX_BACKOFF, |slot| {
                            slot.generation = generation;
                            slot.backoff.next()
                        });
                        eprintln!(
                            "dynamo serve: worker {name} could not restart ({e:#}); trying again in {delay:?}"
                        );
                        self.send_after(delay, Msg::Restart { name });
                    }
                }
            }
            Msg::Add { service, reply } => {
                let s = match &service {
                    None if self.services.len() == 1 => Ok(0),
                    None => Err(format!(
                        "the graph has several worker services; name one with ?service= ({})",
                        self.service_names()
                    )),
                    Some(n) => self
                        .services
                        .iter()
                        .position(|x| &x.name == n)
                        .ok_or_else(|| {
                            format!(
                                "no worker service {n:?} in the graph ({})",
                                self.service_names()
                            )
                        }),
                };
                let result = match s {
                    Ok(s) => match self.add(s).await {
                        Ok(name) => {
                            self.publish().await;
                            eprintln!("dynamo serve: worker {name} added");
                            Ok(self.view(&name, &self.slots[&name]))
                        }
                        Err(e) => Err(format!("{e:#}")),
                    },
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Msg::Remove { name, reply } => {
                let Some(slot) = self.slots.get_mut(&name) else {
                    let _ = reply.send(Err(format!("no worker named {name:?}")));
                    return;
                };
                slot.removed = true;
                let view = self.view(&name, &self.slots[&name]);
                // Out of the frontend's set first, so it sends nothing new; once the frontend has
                // dropped it (at most 2 s), drain and exit.
                self.publish().await;
                if let Some(slot) = self.slots.get_mut(&name) {
                    match &slot.proc {
                        Some(p) => {
                            let url = format!("http://{}", p.addr);
                            let (tx, generation, frontend) =
                                (self.tx.clone(), slot.generation, self.frontend_addr);
                            let name = name.clone();
                            self.tasks.spawn(async move {
                                if let Some(fe) = frontend {
                                    wait_withdrawn(fe, &url).await;
                                }
                                let _ = tx.send(Msg::StopRemoved { name, generation });
                            });
                        }
                        None => {
                            self.slots.remove(&name);
                        }
                    }
                }
                eprintln!("dynamo serve: worker {name} removed; it drains its streams and exits");
                let _ = reply.send(Ok(view));
            }
            Msg::StopRemoved { name, generation } => {
                if let Some(slot) = self.slots.get_mut(&name)
                    && slot.removed
                    && slot.generation == generation
                    && let Some(p) = &mut slot.proc
                {
                    ask_to_stop(p);
                }
            }
            Msg::List { reply } => {
                let views = self.slots.iter().map(|(n, s)| self.view(n, s)).collect();
                let _ = reply.send(views);
            }
            Msg::EngineExited {
                name,
                generation,
                status,
            } => {
                let removed = self.slots.get(&name).is_none_or(|s| s.removed);
                let Some(e) = self.engines.get_mut(&name) else {
                    return;
                };
                if e.generation != generation || removed {
                    return;
                }
                let log = e.proc.take().map(|p| p.log);
                let delay = e.backoff.after_run(e.started.elapsed());
                eprintln!(
                    "dynamo serve: {name}'s engine exited ({status}); its sidecar turns unready and its requests move to other workers; restarting the engine in {delay:?}{}",
                    log.map(|l| format!(" (log: {})", l.display()))
                        .unwrap_or_default()
                );
                self.send_after(delay, Msg::RestartEngine { name });
            }
            Msg::RestartEngine { name } => {
                if self.slots.get(&name).is_none_or(|s| s.removed) {
                    return;
                }
                let Some(e) = self.engines.get_mut(&name) else {
                    return;
                };
                if e.proc.is_some() {
                    return;
                }
                e.generation += 1;
                match engine::spawn(
                    &name,
                    &e.local,
                    e.generation,
                    &self.log_dir,
                    &self.tx,
                    &self.tasks,
                ) {
                    Ok(p) => {
                        eprintln!(
                            "dynamo serve: {name}'s engine restarted (pid {}); the worker serves again once it has loaded",
                            p.pid
                        );
                        e.proc = Some(p);
                        e.started = Instant::now();
                    }
                    Err(err) => {
                        let delay = e.backoff.current();
                        eprintln!(
                            "dynamo serve: {name}'s engine could not restart: {err:#}; trying again in {delay:?}"
                        );
                        self.send_after(delay, Msg::RestartEngine { name });
                    }
                }
            }
        }
    }

    /// Sends `msg` to the supervisor after `delay` (a scheduled restart).
    fn send_after(&self, delay: Duration, msg: Msg) {
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(msg);
        });
    }

    /// Stops `name`'s engine, if it has one, and waits for its process group to end.
    async fn stop_engine(&mut self, name: &str) {
        if let Some(p) = self.engines.remove(name).and_then(|e| e.proc) {
            p.stop().await;
        }
    }

    /// Stops every engine (after their sidecars), concurrently.
    async fn stop_engines(&mut self) {
        let procs: Vec<EngineProc> = std::mem::take(&mut self.engines)
            .into_values()
            .filter_map(|e| e.proc)
            .collect();
        if !procs.is_empty() {
            eprintln!("dynamo serve: stopping {} engine(s)", procs.len());
        }
        futures::future::join_all(procs.iter().map(EngineProc::stop)).await;
    }

    fn service_names(&self) -> String {
        self.services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Stops every worker (closes their stdin, kills those that outlive the deadline), reading
    /// their exit reports from `rx`.
    async fn stop_all(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        for slot in self.slots.values_mut() {
            slot.removed = true;
            if let Some(p) = &mut slot.proc {
                ask_to_stop(p);
            }
        }
        self.slots.retain(|_, s| s.proc.is_some());
        let wait = async {
            while !self.slots.is_empty() {
                let Some(cmd) = rx.recv().await else { return };
                if let Msg::Exited {
                    name, generation, ..
                } = cmd
                    && self
                        .slots
                        .get(&name)
                        .is_some_and(|s| s.generation == generation)
                {
                    self.slots.remove(&name);
                }
            }
        };
        if tokio::time::timeout(STOP_TIMEOUT, wait).await.is_err() {
            for (n, slot) in &self.slots {
                if let Some(p) = &slot.proc {
                    eprintln!("dynamo serve: {n} did not stop within {STOP_TIMEOUT:?}; killing it");
                    p.kill.cancel();
                }
            }
        }
        self.stop_engines().await;
    }
}

fn ask_to_stop(p: &mut Proc) {
    drop(p.stdin.take());
}

/// Stops the frontend: closes its stdin and waits for its exit report, killing it after the
/// deadline. Other reports that arrive meanwhile are dropped (every worker stops next).
async fn stop(p: &mut Proc, rx: &mut mpsc::UnboundedReceiver<Msg>) {
    ask_to_stop(p);
    let wait = async {
        while let Some(cmd) = rx.recv().await {
            if let Msg::Exited { name, .. } = cmd
                && name == p.name
            {
                return;
            }
        }
    };
    if tokio::time::timeout(STOP_TIMEOUT, wait).await.is_err() {
        eprintln!(
            "dynamo serve: {} did not stop within {STOP_TIMEOUT:?}; killing it",
            p.name
        );
        p.kill.cancel();
    }
}

/// Starts `dynamo <sub> <manifest args> <extra>`, waits for its ready line, and leaves a task
/// that reports its exit on `tx`.
#[allow(clippy::too_many_arguments)]
async fn spawn(
    exe: &Path,
    sub: &str,
    svc: &LocalService,
    name: &str,
    extra: &[String],
    generation: u64,
    tx: &mpsc::UnboundedSender<Msg>,
    tasks: &TaskTracker,
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
    forward_logs(name, child.stderr.take(), tasks);
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
    tasks.spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let kill = CancellationToken::new();
    let pid = child.id();
    {
        let (kill, tx, name) = (kill.clone(), tx.clone(), name.to_owned());
        tasks.spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                () = kill.cancelled() => {
                    let _ = child.kill().await;
                    child.wait().await
                }
            };
            let _ = tx.send(Msg::Exited {
                name,
                generation,
                status: describe(status),
            });
        });
    }
    Ok(Proc {
        name: name.to_owned(),
        stdin,
        addr,
        pid,
        kill,
        started: Instant::now(),
    })
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// `{"ready":{"addr":"127.0.0.1:41234"}}` → the address.
fn parse_ready(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("ready")?.get("addr")?.as_str().map(str::to_owned)
}

fn forward_logs(name: &str, stderr: Option<tokio::process::ChildStderr>, tasks: &TaskTracker) {
    let Some(stderr) = stderr else { return };
    let name = name.to_owned();
    tasks.spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
}

/// Waits until the frontend's `/health` reports `live_workers` ≥ `expected` (it has probed the
/// workers `serve` sent it), for at most 10 s.
async fn wait_routable(frontend: SocketAddr, expected: usize) -> anyhow::Result<()> {
    let addr = SocketAddr::new(
        if frontend.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            frontend.ip()
        },
        frontend.port(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    while Instant::now() < deadline {
        if let Ok(Some(live)) = live_workers(addr).await {
            last = live;
            if live >= expected {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the frontend routes to {last} of {expected} workers after 10 s; serving anyway")
}

/// Waits (at most 2 s) until the frontend's `/health` no longer lists `url` among its workers.
async fn wait_withdrawn(frontend: SocketAddr, url: &str) {
    let addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), frontend.port());
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match health(addr).await {
            Ok(v)
                if !v["workers"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().any(|w| w["url"] == url)) =>
            {
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `live_workers` from one `GET /health`.
async fn live_workers(addr: SocketAddr) -> std::io::Result<Option<usize>> {
    Ok(health(addr)
        .await?
        .get("live_workers")
        .and_then(|v| v.as_u64())
        .map(|n| n as usize))
}

/// One `GET /health` (HTTP/1.0, so the body ends with the connection), as JSON.
async fn health(addr: SocketAddr) -> std::io::Result<serde_json::Value> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut body))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let text = String::from_utf8_lossy(&body);
    let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(json).map_err(std::io::Error::other)
}

// === control API ===

#[derive(serde::Deserialize)]
struct AddQuery {
    service: Option<String>,
}

/// Serves the control API on 127.0.0.1:`port` (0: any free port); returns its address.
async fn bind_control(
    port: u16,
    tx: mpsc::UnboundedSender<Msg>,
    planner: Option<Arc<std::sync::Mutex<serde_json::Value>>>,
    tasks: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/workers", get(list_workers).post(add_worker))
        .route("/workers/{name}", delete(remove_worker))
        .with_state(tx)
        .route(
            "/planner",
            get(move || {
                let status = planner
                    .as_ref()
                    .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
                async move {
                    match status {
                        Some(s) => Json(s).into_response(),
                        None => (
                            StatusCode::NOT_FOUND,
                            Json(serde_json::json!({"error": "the planner is off (no spec.sla, or --planner off)"})),
                        )
                            .into_response(),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("could not bind the control API on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("dynamo serve: control API stopped: {error}");
        }
    });
    Ok(addr)
}

type Tx = State<mpsc::UnboundedSender<Msg>>;

async fn list_workers(State(tx): Tx) -> Response {
    let (reply, rx) = oneshot::channel();
    let _ = tx.send(Msg::List { reply });
    match rx.await {
        Ok(v) => Json(serde_json::json!({ "workers": v })).into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn add_worker(State(tx): Tx, Query(q): Query<AddQuery>) -> Response {
    let (reply, rx) = oneshot::channel();
    let _ = tx.send(Msg::Add {
        service: q.service,
        reply,
    });
    answer(rx.await, StatusCode::CREATED)
}

async fn remove_worker(State(tx): Tx, UrlPath(name): UrlPath<String>) -> Response {
    let (reply, rx) = oneshot::channel();
    let _ = tx.send(Msg::Remove { name, reply });
    answer(rx.await, StatusCode::OK)
}

fn answer(
    result: Result<Result<WorkerView, String>, oneshot::error::RecvError>,
    ok: StatusCode,
) -> Response {
    match result {
        Ok(Ok(view)) => (ok, Json(view)).into_response(),
        Ok(Err(message)) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
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
