//! Engine containers under `dynamo serve`: a worker service whose pod has a container named
//! `engine` beside the sidecar (a vLLM server, `manifests/vllm-agg.yaml`) runs that container's
//! command as a process per replica, next to the replica's sidecar, the way the pod would.
//!
//! A pod has its own network namespace and volumes; local processes do not. So each replica's
//! engine is *localized*, and every change is printed:
//! - `python`/`python3` is the Python `hack/vllm.sh` installed
//!   (`$DYNAMO_CACHE/vllm/current/bin/python`, or `DYN_VLLM_PYTHON`);
//! - the ports the engine listens on (`--port`, the `endpoint`/`replay_endpoint` of
//!   `--kv-events-config`, `VLLM_NIXL_SIDE_CHANNEL_PORT`) become free local ports, and the
//!   sidecar's `127.0.0.1:PORT` arguments follow them;
//! - paths under a volume mount become local directories: the volume named `models` is
//!   `$DYNAMO_CACHE/vllm/models` (or `DYN_MODELS_DIR`), a `hostPath` volume is its path;
//! - `VLLM_CPU_OMP_THREADS_BIND` unset or `auto` becomes a core range of the replica's own, so
//!   engines do not fight over cores.
//!
//! Each engine runs in its own process group and is stopped as a group (SIGTERM, then SIGKILL):
//! vLLM's EngineCore is a child process holding gigabytes, and must not outlive it. Its output
//! goes to a log file; warnings and errors are also forwarded.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::mpsc,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::Msg;

/// How long an engine may take to answer `/health` at start.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long an engine's process group has after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `engine` container of a worker service, as the manifest gives it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSpec {
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(volume name, mount path)`.
    pub mounts: Vec<(String, String)>,
    /// Volume name → its `hostPath.path`, for hostPath volumes.
    pub host_paths: BTreeMap<String, String>,
}

impl EngineSpec {
    /// The `engine` container of a pod spec's pass-through fields, if it has one.
    pub fn from_pod_spec(pod_spec: &BTreeMap<String, Value>) -> Option<EngineSpec> {
        let containers = pod_spec.get("containers")?.as_array()?;
        let c = containers
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some("engine"))?;
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| match x {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let pairs = |v: Option<&Value>, k: &str, val: &str| -> Vec<(String, String)> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|e| {
                            Some((
                                e.get(k)?.as_str()?.to_owned(),
                                e.get(val).and_then(Value::as_str).unwrap_or("").to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let host_paths = pod_spec
            .get("volumes")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| {
                        let path = v.get("hostPath")?.get("path")?.as_str()?;
                        Some((v.get("name")?.as_str()?.to_owned(), path.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(EngineSpec {
            command: strings(c.get("command")),
            args: strings(c.get("args")),
            env: pairs(c.get("env"), "name", "value"),
            mounts: pairs(c.get("volumeMounts"), "name", "mountPath"),
            host_paths,
        })
    }
}

/// Where `dynamo serve` finds what `hack/vllm.sh` installed.
#[derive(Debug, Clone)]
pub struct LocalPaths {
    pub python: PathBuf,
    pub models: PathBuf,
}

impl LocalPaths {
    /// From `DYN_VLLM_PYTHON`, `DYN_MODELS_DIR` and `DYNAMO_CACHE` (default
    /// `${XDG_CACHE_HOME:-~/.cache}/dynamo-rs`, as `hack/vllm.sh` uses).
    pub fn from_env() -> LocalPaths {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let cache = var("DYNAMO_CACHE").unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .or_else(|| var("HOME").map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join("dynamo-rs")
        });
        LocalPaths {
            python: var("DYN_VLLM_PYTHON").unwrap_or_else(|| cache.join("vllm/current/bin/python")),
            models: var("DYN_MODELS_DIR").unwrap_or_else(|| cache.join("vllm/models")),
        }
    }
}

/// One replica's engine, ready to run locally.
#[derive(Debug, Clone)]
pub struct LocalEngine {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Pod port → local port.
    pub ports: BTreeMap<u16, u16>,
    /// `http://127.0.0.1:PORT/health` of its server.
    pub health: String,
}

impl LocalEngine {
    /// Localizes `spec` for one replica; `cores` is its `VLLM_CPU_OMP_THREADS_BIND` when the
    /// manifest leaves binding to vLLM (`auto` or unset).
    pub fn new(
        spec: &EngineSpec,
        paths: &LocalPaths,
        cores: Option<String>,
    ) -> anyhow::Result<LocalEngine> {
        let Some((program, rest)) = spec.command.split_first() else {
            bail!(
                "the engine container has no command; give it one (e.g. [python3, -m, vllm.entrypoints.openai.api_server])"
            );
        };
        let program = if matches!(program.as_str(), "python" | "python3") {
            if !paths.python.exists() {
                bail!(
                    "the engine runs {program}, which locally is {}, and it does not exist: run hack/vllm.sh to install vLLM there, or set DYN_VLLM_PYTHON to a Python that has vllm",
                    paths.python.display()
                );
            }
            paths.python.clone()
        } else {
            PathBuf::from(program)
        };
        let mut args: Vec<String> = rest.iter().chain(&spec.args).cloned().collect();
        let mut env = spec.env.clone();
        let mut ports = BTreeMap::new();
        let mut remap = |port: u16| -> anyhow::Result<u16> {
            if let Some(&p) = ports.get(&port) {
                return Ok(p);
            }
            let p = free_port()?;
            ports.insert(port, p);
            Ok(p)
        };
        // vLLM serves on 8000 unless told otherwise.
        let mut http = None;
        let mut i = 0;
        while i < args.len() {
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (args[i].clone(), None),
            };
            let value_at = if inline.is_some() { i } else { i + 1 };
            let value = inline.or_else(|| args.get(i + 1).cloned());
            match (flag.as_str(), value) {
                ("--port", Some(v)) => {
                    let pod: u16 = v
                        .parse()
                        .with_context(|| format!("engine --port {v:?} is not a port"))?;
                    let local = remap(pod)?;
                    http = Some(local);
                    set_value(&mut args, i, value_at, &flag, &local.to_string());
                }
                ("--kv-events-config" | "--kv-transfer-config", Some(v)) => {
                    let mut json: Value = serde_json::from_str(&v)
                        .with_context(|| format!("engine {flag} is not JSON: {v}"))?;
                    for key in ["endpoint", "replay_endpoint"] {
                        if let Some(ep) = json.get(key).and_then(Value::as_str)
                            && let Some((head, port)) = ep.rsplit_once(':')
                            && let Ok(pod) = port.parse::<u16>()
                        {
                            json[key] = Value::String(format!("{head}:{}", remap(pod)?));
                        }
                    }
                    set_value(&mut args, i, value_at, &flag, &json.to_string());
                }
                _ => {
                    // Another flag, or a flag without a value: look at the next word too.
                    i += 1;
                    continue;
                }
            }
            i = value_at + 1;
        }
        let http = match http {
            Some(p) => p,
            None => {
                let local = remap(8000)?;
                args.extend(["--port".into(), local.to_string()]);
                local
            }
        };
        for (k, v) in &mut env {
            if k == "VLLM_NIXL_SIDE_CHANNEL_PORT"
                && let Ok(pod) = v.parse::<u16>()
            {
                *v = remap(pod)?.to_string();
            }
        }
        // Paths under a mount point are the volume's local directory.
        for (volume, mount) in &spec.mounts {
            let local = if volume == "models" {
                paths.models.display().to_string()
            } else if let Some(host) = spec.host_paths.get(volume) {
                host.clone()
            } else {
                continue;
            };
            let rewrite = |s: &mut String| {
                if s == mount || s.starts_with(&format!("{mount}/")) {
                    *s = format!("{local}{}", &s[mount.len()..]);
                }
            };
            args.iter_mut().for_each(rewrite);
            env.iter_mut().for_each(|(_, v)| rewrite(v));
        }
        if let Some(cores) = cores {
            let bind = env
                .iter_mut()
                .find(|(k, _)| k == "VLLM_CPU_OMP_THREADS_BIND");
            match bind {
                Some((_, v)) if v == "auto" || v.is_empty() => *v = cores,
                Some(_) => {}
                None => env.push(("VLLM_CPU_OMP_THREADS_BIND".into(), cores)),
            }
        }
        Ok(LocalEngine {
            program,
            args,
            env,
            ports,
            health: format!("http://127.0.0.1:{http}/health"),
        })
    }

    /// The sidecar's arguments with the pod's engine ports replaced by this replica's.
    pub fn sidecar_args(&self, args: &[String]) -> Vec<String> {
        args.iter()
            .map(|a| {
                let mut a = a.clone();
                for (pod, local) in &self.ports {
                    for host in ["127.0.0.1", "localhost"] {
                        let from = format!("{host}:{pod}");
                        if let Some(at) = a.find(&from) {
                            let end = at + from.len();
                            if !a[end..].starts_with(|c: char| c.is_ascii_digit()) {
                                a.replace_range(at..end, &format!("127.0.0.1:{local}"));
                            }
                        }
                    }
                }
                a
            })
            .collect()
    }

    /// The command line, for logs.
    pub fn describe(&self) -> String {
        let env: Vec<String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("VLLM_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{} {} {}",
            env.join(" "),
            self.program.display(),
            self.args.join(" ")
        )
    }
}

/// Replaces the value of `flag` (at `value_at`, or inline in `args[i]`).
fn set_value(args: &mut [String], i: usize, value_at: usize, flag: &str, value: &str) {
    if value_at == i {
        args[i] = format!("{flag}={value}");
    } else if let Some(slot) = args.get_mut(value_at) {
        *slot = value.to_owned();
    }
}

/// A port for an engine to listen on, taken from below the kernel's ephemeral range
/// (`ip_local_port_range`): between the moment it is picked here and the moment the engine binds
/// it, no socket bound to port 0 (vLLM's own internal sockets, an outgoing connection) can take it,
/// as one picked from the ephemeral range could (seen: vLLM's replay socket failing with "Address
/// already in use"). Ports this process handed out are not handed out again until the range wraps.
fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral > LOW + 1_000 {
        let span = ephemeral - LOW;
        // Processes started together begin at different places.
        let start = std::process::id().wrapping_mul(2_654_435_761) % span;
        for _ in 0..span.min(2_000) {
            let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if std::net::TcpListener::bind(("0.0.0.0", port as u16)).is_ok() {
                return Ok(port as u16);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("could not find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Core range `k` of `n` engines on this machine (`VLLM_CPU_OMP_THREADS_BIND` syntax).
pub fn cores_for(k: usize, n: usize) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let n = n.max(1);
    if n >= cores {
        return (k % cores).to_string();
    }
    let (lo, hi) = (k * cores / n, (k + 1) * cores / n - 1);
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

// === processes ===

/// A running engine process (the leader of its own process group).
pub struct EngineProc {
    pub pid: u32,
    pub log: PathBuf,
    /// Cancelled once the process exited.
    pub exited: CancellationToken,
    status: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
}

impl EngineProc {
    /// How it exited, once it did.
    pub fn status(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the whole process group: SIGTERM, then SIGKILL after a grace period. Returns once
    /// the leader exited.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.exited.cancelled().await;
    }
}

/// Starts `engine` for replica `name`; its exit is reported on `tx` as `EngineExited`.
pub(super) fn spawn(
    name: &str,
    engine: &LocalEngine,
    generation: u64,
    log_dir: &Path,
    tx: &mpsc::UnboundedSender<Msg>,
    tasks: &TaskTracker,
) -> anyhow::Result<EngineProc> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("could not create {}", log_dir.display()))?;
    let log = log_dir.join(format!("{name}-engine.log"));
    let file = std::fs::File::create(&log)
        .with_context(|| format!("could not create {}", log.display()))?;
    let mut cmd = Command::new(&engine.program);
    cmd.args(&engine.args)
        .envs(engine.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "could not start {name}'s engine ({})",
            engine.program.display()
        )
    })?;
    let pid = child.id().context("engine pid")?;
    // stderr (vLLM logs there) goes to the file; warnings and errors are also shown.
    if let Some(stderr) = child.stderr.take() {
        let (name, mut file) = (name.to_owned(), tokio::fs::File::from_std(file));
        tasks.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
                if line.contains("ERROR") || line.contains("Error") || line.contains("Traceback") {
                    eprintln!("[{name}/engine] {line}");
                }
            }
        });
    }
    let exited = CancellationToken::new();
    let stop = CancellationToken::new();
    let status = Arc::new(Mutex::new(None));
    {
        let (exited, stop, status, tx, name) = (
            exited.clone(),
            stop.clone(),
            status.clone(),
            tx.clone(),
            name.to_owned(),
        );
        tasks.spawn(async move {
            let group = rustix::process::Pid::from_raw(pid as i32);
            let result = tokio::select! {
                s = child.wait() => s,
                () = stop.cancelled() => {
                    if let Some(g) = group {
                        let _ = rustix::process::kill_process_group(g, rustix::process::Signal::TERM);
                    }
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(s) => s,
                        Err(_) => {
                            eprintln!("dynamo serve: {name}'s engine did not stop within {STOP_GRACE:?}; killing its process group");
                            if let Some(g) = group {
                                let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
                            }
                            child.wait().await
                        }
                    }
                }
            };
            // Whatever the leader left behind in its group goes with it.
            if let Some(g) = group {
                let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
            }
            let described = match result {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(described.clone());
            exited.cancel();
            let _ = tx.send(Msg::EngineExited {
                name,
                generation,
                status: described,
            });
        });
    }
    Ok(EngineProc {
        pid,
        log,
        exited,
        status,
        stop,
    })
}

/// Waits until every `(name, engine, health URL)` answers `/health`, printing a progress line
/// every 10 s; fails when one exits or [`LOAD_TIMEOUT`] passes.
pub async fn wait_ready(engines: &[(String, &EngineProc, String)]) -> anyhow::Result<()> {
    if engines.is_empty() {
        return Ok(());
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut ready = vec![false; engines.len()];
    eprintln!(
        "dynamo serve: starting {} engine(s); loading a model takes a while (vLLM on CPU: about a minute)",
        engines.len()
    );
    loop {
        for (i, (name, proc, health)) in engines.iter().enumerate() {
            if ready[i] {
                continue;
            }
            if proc.exited.is_cancelled() {
                bail!(
                    "{name}'s engine exited while loading ({}); last lines of {}:\n{}",
                    proc.status().unwrap_or_default(),
                    proc.log.display(),
                    tail(&proc.log, 20)
                );
            }
            if matches!(client.get(health).send().await, Ok(r) if r.status().is_success()) {
                ready[i] = true;
                eprintln!(
                    "dynamo serve: {name}'s engine is up after {:.0}s",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if ready.iter().all(|&r| r) {
            return Ok(());
        }
        if start.elapsed() > LOAD_TIMEOUT {
            bail!("engines not up after {LOAD_TIMEOUT:?}; see their logs");
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let waiting: Vec<&str> = engines
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|((n, ..), _)| n.as_str())
                .collect();
            eprintln!(
                "dynamo serve: waiting for engines to load ({:.0}s): {}",
                start.elapsed().as_secs_f64(),
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EngineSpec {
        let pod: BTreeMap<String, Value> = serde_json::from_value(serde_json::json!({
            "containers": [{
                "name": "engine",
                "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                "args": ["--model", "/models/tiny", "--enforce-eager", "--port", "8001",
                         "--kv-events-config", "{\"endpoint\":\"tcp://*:5557\",\"replay_endpoint\":\"tcp://*:5558\",\"topic\":\"kv-events\"}"],
                "env": [{"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "auto"},
                        {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": "5600"}],
                "volumeMounts": [{"name": "models", "mountPath": "/models"}]
            }],
            "volumes": [{"name": "models", "hostPath": {"path": "/var/lib/dynamo/models"}}]
        }))
        .expect("pod spec");
        EngineSpec::from_pod_spec(&pod).expect("an engine container")
    }

    #[test]
    fn an_engine_is_localized_with_its_own_ports_python_models_and_cores() {
        let dir = std::env::temp_dir().join(format!("dynamo-engine-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let python = dir.join("python");
        std::fs::write(&python, "").expect("file");
        let paths = LocalPaths {
            python: python.clone(),
            models: PathBuf::from("/cache/models"),
        };
        let e = LocalEngine::new(&spec(), &paths, Some("1".into())).expect("localized");
        assert_eq!(e.program, python);
        assert_eq!(
            &e.args[..3],
            ["-m", "vllm.entrypoints.openai.api_server", "--model"]
        );
        assert_eq!(e.args[3], "/cache/models/tiny");
        let port = e.ports[&8001];
        assert_eq!(e.args[6], port.to_string());
        assert_eq!(e.health, format!("http://127.0.0.1:{port}/health"));
        let events: Value = serde_json::from_str(&e.args[8]).expect("json");
        assert_eq!(events["endpoint"], format!("tcp://*:{}", e.ports[&5557]));
        assert_eq!(
            events["replay_endpoint"],
            format!("tcp://*:{}", e.ports[&5558])
        );
        assert_eq!(events["topic"], "kv-events");
        let env: BTreeMap<_, _> = e.env.iter().cloned().collect();
        assert_eq!(env["VLLM_CPU_OMP_THREADS_BIND"], "1");
        assert_eq!(
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"],
            e.ports[&5600].to_string()
        );
        let sidecar = e.sidecar_args(&[
            "--vllm-url".into(),
            "http://127.0.0.1:8001".into(),
            "--vllm-kv-events=tcp://localhost:5557".into(),
            "tcp://127.0.0.1:55570".into(),
        ]);
        assert_eq!(sidecar[1], format!("http://127.0.0.1:{port}"));
        assert_eq!(
            sidecar[2],
            format!("--vllm-kv-events=tcp://127.0.0.1:{}", e.ports[&5557])
        );
        assert_eq!(
            sidecar[3], "tcp://127.0.0.1:55570",
            "another port is left alone"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_python_says_to_run_the_install_script() {
        let paths = LocalPaths {
            python: PathBuf::from("/nonexistent/python"),
            models: PathBuf::from("/m"),
        };
        let e = LocalEngine::new(&spec(), &paths, None)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("hack/vllm.sh") && e.contains("DYN_VLLM_PYTHON"),
            "{e}"
        );
    }

    #[test]
    fn engines_get_disjoint_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let all: Vec<String> = (0..cores).map(|k| cores_for(k, cores)).collect();
        assert_eq!(all, (0..cores).map(|c| c.to_string()).collect::<Vec<_>>());
        if cores >= 2 {
            assert_eq!(cores_for(0, 1), format!("0-{}", cores - 1));
        }
    }
}
