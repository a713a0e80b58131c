//! Command-line interface of the `dynamo` binary: one `clap` parser, one subcommand per process
//! kind. Every flag also reads a `DYN_*` environment variable, so the same settings work from a
//! manifest's `envs` and from a shell. Validation into immutable configs happens here, once.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dynamo_mocker::{MockerConfig, TimingModel};
use dynamo_model::Model;

use dynamo_frontend::{DisaggPolicy, discovery::DiscoveryMode};
use dynamo_kv::policy::{RouterMode, kv as policy};
use dynamo_sidecar::{disagg::Role, engine::EngineKind};

#[derive(Debug, Parser)]
#[command(
    name = "dynamo",
    version,
    about = "dynamo-rs: distributed LLM inference (frontend, router, worker sidecar)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a DynamoGraphDeployment manifest as local processes on the built-in engine.
    Serve(ServeArgs),
    /// The OpenAI-compatible HTTP frontend with its router.
    Frontend(FrontendArgs),
    /// A worker sidecar with its engine (the built-in mocker, or a vLLM server beside it).
    Sidecar(SidecarArgs),
    /// Load-test any OpenAI endpoint with a trace or a synthetic workload.
    Bench(dynamo_bench::BenchArgs),
    /// Measure any OpenAI endpoint's TTFT vs prompt length and ITL vs concurrency and context,
    /// into a profile JSON the SLA planner interpolates (`spec.planner.profile`).
    Profile(dynamo_bench::profile::ProfileArgs),
    /// The ideal fleet for a trace: per planner interval, the fewest replicas the manifest's
    /// profile says meet `spec.sla` at that interval's actual load, and its GPU-seconds.
    Ideal(IdealArgs),
    /// KV block transfer between two processes over TCP and shared memory, against a
    /// single-thread memcpy of the same blocks in the same run.
    BenchTransfer(crate::transfer_bench::BenchTransferArgs),
}

#[derive(Debug, Clone, Args)]
pub struct IdealArgs {
    /// A manifest with `spec.sla` and `spec.planner` (e.g. manifests/planner.yaml).
    pub manifest: PathBuf,
    /// The trace (Azure CSV or Mooncake JSONL), in trace time.
    #[arg(long)]
    pub trace: PathBuf,
    /// Window of one decision (default: the manifest's `spec.planner.interval`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Fraction of the TTFT target the model's mean TTFT may reach (default: the planner's
    /// starting headroom).
    #[arg(long)]
    pub headroom_ttft: Option<f64>,
    /// Fraction of the ITL target the model's mean ITL may reach.
    #[arg(long)]
    pub headroom_itl: Option<f64>,
}

/// Which model to serve: a Hugging Face directory, or the built-in tiny model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (tokenizer.json, tokenizer_config.json, config.json).
    /// Without it, the built-in tiny byte-level BPE model is served.
    #[arg(long, env = "DYN_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
    /// Name the model is served under (default: the directory's name, or "tiny").
    #[arg(long, env = "DYN_MODEL_NAME")]
    pub model_name: Option<String>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Arc<Model>> {
        let model = match &self.model_path {
            Some(dir) => Model::from_dir(dir, self.model_name.as_deref())
                .with_context(|| format!("could not load the model in {}", dir.display()))?,
            None => {
                let m = Model::builtin();
                match &self.model_name {
                    Some(name) => m.with_name(name),
                    None => m,
                }
            }
        };
        Ok(Arc::new(model))
    }

    /// The flags that hand this choice on to a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.model_path {
            out.extend(["--model-path".into(), p.display().to_string()]);
        }
        if let Some(n) = &self.model_name {
            out.extend(["--model-name".into(), n.clone()]);
        }
        out
    }
}

/// Process-lifecycle flags shared by the frontend and the sidecar.
#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Longest time to let in-flight streams finish on shutdown (a worker's streams still open
    /// then are migrated by the frontend). Keep settle + drain below the pod's
    /// terminationGracePeriodSeconds (30 s by default).
    #[arg(long, env = "DYN_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Readiness turns 503 this long before the process stops accepting on SIGTERM, so load
    /// balancers and routers stop sending first.
    #[arg(long, env = "DYN_SHUTDOWN_SETTLE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub shutdown_settle: Duration,
    /// Print one JSON line `{"ready": {"addr": ...}}` on stdout once serving (used by `dynamo serve`).
    #[arg(long, hide = true)]
    pub ready_stdout: bool,
    /// Shut down when stdin reaches end-of-file (used by `dynamo serve`, so children never outlive it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct FrontendArgs {
    /// Address for the HTTP API.
    #[arg(long, env = "DYN_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// How workers are discovered: `static` (the --worker list), `serve` (worker sets from
    /// `dynamo serve` on stdin), or `kubernetes` (the Ready endpoints of the graph's worker
    /// Services, watched in --namespace).
    #[arg(long, env = "DYN_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryMode,
    /// Static discovery: a worker sidecar's gRPC URL, e.g. http://10.0.0.7:9000 (repeat, or
    /// comma-separate).
    #[arg(long = "worker", env = "DYN_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Kubernetes discovery: the namespace of the graph (the operator sets it from the pod's own).
    #[arg(long, env = "DYN_K8S_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Kubernetes discovery: the DynamoGraphDeployment whose workers to watch.
    #[arg(long, env = "DYN_GRAPH")]
    pub graph: Option<String>,
    /// How many times a request may move to another worker when its worker fails before or
    /// during its stream (the client sees one unbroken stream); 0 disables migration.
    #[arg(long, env = "DYN_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: u32,
    /// How long a request (new, or moving off a failed worker) waits for a worker to join when no
    /// live worker is left, before it is refused with 503: a rolling update or a replaced pod
    /// empties the pool for a moment. 0 refuses at once.
    #[arg(long, env = "DYN_WORKER_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub worker_wait: Duration,
    /// Disaggregated graphs: when a prompt is prefilled by the prefill pool rather than by its
    /// decode worker (Dynamo's conditional disaggregation policies).
    #[arg(
        long,
        env = "DYN_DISAGG_POLICY",
        value_enum,
        default_value = "isl-bounding"
    )]
    pub disagg_policy: DisaggPolicy,
    /// isl-bounding: prefill on the decode worker when it has fewer than this many prompt tokens
    /// to compute...
    #[arg(long, env = "DYN_MAX_LOCAL_PREFILL_TOKENS", default_value_t = 2048)]
    pub max_local_prefill_tokens: u64,
    /// ...and those are less than this share of the prompt (it holds most of the prompt already)
    #[arg(long, env = "DYN_MAX_LOCAL_PREFILL_RATIO", default_value_t = 0.7)]
    pub max_local_prefill_ratio: f64,
    /// prefill-load: the prefill pool is busy when its least-loaded worker has this many prompt
    /// tokens queued.
    #[arg(long, env = "DYN_PREFILL_BUSY_TOKENS", default_value_t = 16384)]
    pub prefill_busy_tokens: u64,
    /// Never prefill on a decode worker that has this many prompt tokens queued (0: off).
    #[arg(long, env = "DYN_DECODE_BUSY_TOKENS", default_value_t = 0)]
    pub decode_busy_tokens: u64,
    /// Backpressure: while the prefill pool has this many prompt tokens queued in all, prompts are
    /// prefilled by their decode worker (0: off).
    #[arg(long, env = "DYN_MAX_PREFILL_QUEUE_TOKENS", default_value_t = 0)]
    pub max_prefill_queue_tokens: u64,
    /// How requests are spread over workers.
    #[arg(long, env = "DYN_ROUTER_MODE", value_enum, default_value = "kv")]
    pub router_mode: RouterMode,
    /// kv mode: weight of the prompt's uncached blocks (the prefill it would add to a worker) against
    /// decode load (active KV blocks). Prefill blocks cost far more time than decode blocks: 16
    /// measured best on the Mooncake conversation trace (docs/kv-routing.md); 1 is Dynamo's default.
    #[arg(long, env = "DYN_KV_OVERLAP_WEIGHT", default_value_t = policy::DEFAULT_OVERLAP_WEIGHT)]
    pub kv_overlap_weight: f64,
    /// kv mode: 0 picks the cheapest worker; > 0 samples workers by softmax over cost (in blocks).
    #[arg(long, env = "DYN_KV_TEMPERATURE", default_value_t = 0.0)]
    pub kv_temperature: f64,
    /// kv mode: skip a worker whose booked KV blocks exceed this fraction of its capacity while a
    /// less busy one exists (1 disables).
    #[arg(long, env = "DYN_KV_BUSY_THRESHOLD", default_value_t = policy::DEFAULT_BUSY_THRESHOLD)]
    pub kv_busy_threshold: f64,
    /// kv mode: weight of each worker's recent cache churn (uncached blocks routed to it, 30 s
    /// half-life), which spreads new prompts so cached prefixes live about as long everywhere
    /// (0: off; its effect on the Mooncake trace was within run-to-run noise).
    #[arg(long, env = "DYN_KV_CHURN_WEIGHT", default_value_t = 0.0)]
    pub kv_churn_weight: f64,
    /// kv mode: weight of prefill work already queued on a worker, per block. Lighter than the
    /// prompt's own uncached blocks, which are new work for the fleet: a worker holding the prefix
    /// is not given up for a short queue (docs/kv-routing.md).
    #[arg(long, env = "DYN_KV_QUEUE_WEIGHT", default_value_t = policy::DEFAULT_QUEUE_WEIGHT)]
    pub kv_queue_weight: f64,
    /// kv mode without KV events (approximate): learn what each worker caches from the router's own
    /// decisions, for engines that publish no events.
    #[arg(long, env = "DYN_KV_NO_EVENTS")]
    pub no_kv_events: bool,
    /// Approximate kv mode: how long a routed prompt counts as cached on its worker.
    #[arg(long, env = "DYN_KV_APPROX_TTL", default_value = "120s", value_parser = humantime::parse_duration)]
    pub kv_approx_ttl: Duration,
    /// Per-request TTFT target in milliseconds: each finished request is counted as meeting the
    /// targets or not (`dynamo_frontend_sla_requests_total{met}`), for the SLA planner.
    #[arg(long, env = "DYN_SLA_TTFT_MS", requires = "sla_itl_ms", value_parser = positive_ms)]
    pub sla_ttft_ms: Option<f64>,
    /// Per-request mean inter-token latency target in milliseconds.
    #[arg(long, env = "DYN_SLA_ITL_MS", requires = "sla_ttft_ms", value_parser = positive_ms)]
    pub sla_itl_ms: Option<f64>,
    /// Largest accepted request body; larger ones get 413.
    #[arg(long, env = "DYN_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// How often workers are probed for liveness.
    #[arg(long, env = "DYN_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// Runtime threads serving HTTP and gRPC (0: one per core; 1: a single-threaded runtime, which
    /// avoids cross-thread wake-ups per streamed token). Long prompts are tokenized off these threads.
    #[arg(long, env = "DYN_FRONTEND_THREADS", default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// The mocker engine's settings (names follow vLLM's and Dynamo's mocker flags).
#[derive(Debug, Clone, Args)]
pub struct MockerArgs {
    #[arg(long, env = "DYN_NUM_GPU_BLOCKS", default_value_t = 16384)]
    pub num_gpu_blocks: usize,
    #[arg(long, env = "DYN_BLOCK_SIZE", default_value_t = 64)]
    pub block_size: usize,
    #[arg(long, env = "DYN_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, env = "DYN_MAX_NUM_BATCHED_TOKENS", default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[arg(long, env = "DYN_ENABLE_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
    #[arg(long, env = "DYN_ENABLE_CHUNKED_PREFILL", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_chunked_prefill: bool,
    /// Admit a request only if this fraction of KV blocks stays free.
    #[arg(long, env = "DYN_WATERMARK", default_value_t = 0.01)]
    pub watermark: f64,
    /// Simulated time runs this many times faster than real time.
    #[arg(
        long,
        alias = "speedup",
        env = "DYN_SPEEDUP_RATIO",
        default_value_t = 1.0
    )]
    pub speedup_ratio: f64,
    /// Multiplies every step time of the engine's timing model (Dynamo's mocker coefficients, an
    /// 8B-class model on one H100): 8 models an engine eight times slower, such as a much larger
    /// model. Unlike `--speedup-ratio`, this is the engine's own speed, not a time compression.
    #[arg(long, env = "DYN_TIMING_SCALE", default_value_t = 1.0)]
    pub timing_scale: f64,
    /// Without ignore_eos, a request ends after this many tokens on average (0: only at max_tokens).
    #[arg(long, env = "DYN_MEAN_OUTPUT_TOKENS", default_value_t = 128)]
    pub mean_output_tokens: u32,
    #[arg(long, env = "DYN_MOCKER_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Prefill workers: how long a prompt's computed blocks stay held for a decode worker that
    /// does not release them.
    #[arg(long, env = "DYN_PREFILL_HOLD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub prefill_hold: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct SidecarArgs {
    /// Address for the worker's gRPC request/event plane and /metrics.
    #[arg(long, env = "DYN_SIDECAR_ADDR", default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,
    /// This worker's id (default: hostname-port).
    #[arg(long, env = "DYN_WORKER_ID")]
    pub worker_id: Option<String>,
    /// The engine behind the sidecar: the built-in simulator, or a vLLM server (--vllm-url).
    #[arg(long, env = "DYN_ENGINE", value_enum, default_value = "mocker")]
    pub engine: EngineKind,
    /// `--engine vllm`: base URL of the vLLM OpenAI server (`python -m
    /// vllm.entrypoints.openai.api_server --port N`), e.g. http://127.0.0.1:8001.
    #[arg(long, env = "DYN_VLLM_URL", default_value = "http://127.0.0.1:8001")]
    pub vllm_url: String,
    /// `--engine vllm`: how often the server's /health and /metrics are read.
    #[arg(long, env = "DYN_VLLM_POLL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub vllm_poll: Duration,
    /// Publish the KV events of this vLLM ZMQ publisher (`--kv-events-config`'s `endpoint`, e.g.
    /// tcp://127.0.0.1:5557) instead of the built-in engine's.
    #[arg(long, env = "DYN_VLLM_KV_EVENTS")]
    pub vllm_kv_events: Option<String>,
    /// The vLLM publisher's replay endpoint (`replay_endpoint`), used to fill sequence gaps.
    #[arg(long, env = "DYN_VLLM_KV_EVENTS_REPLAY", requires = "vllm_kv_events")]
    pub vllm_kv_events_replay: Option<String>,
    /// Topic of the vLLM KV event stream.
    #[arg(long, env = "DYN_VLLM_KV_EVENTS_TOPIC", default_value = "")]
    pub vllm_kv_events_topic: String,
    /// GPUs this worker occupies, reported to the frontend (its `dynamo_frontend_worker_gpus`
    /// gauge, which planners and `dynamo bench` count). The operator sets it from the pod's
    /// `nvidia.com/gpu` limit.
    #[arg(long, env = "DYN_GPUS", default_value_t = 1)]
    pub gpus: u32,
    /// What this worker does in a disaggregated graph: prefill workers compute prompts' KV and
    /// hold it, decode workers pull it and generate.
    #[arg(long, env = "DYN_ROLE", value_enum, default_value = "aggregated")]
    pub role: Role,
    /// Shape of the built-in engine's KV blocks (their bytes are real for prefill and decode
    /// workers): llama-8b, llama-70b, llama-1b, qwen-0.5b, tiny, or
    /// layers=L,kv_heads=H,head_dim=D[,dtype_bytes=B].
    #[arg(long, env = "DYN_KV_GEOMETRY", default_value = "llama-8b")]
    pub kv_geometry: String,
    /// Memory for the KV blocks of a prefill or decode worker, e.g. 1GiB; the engine gets the
    /// blocks that fit (at most --num-gpu-blocks).
    #[arg(long, env = "DYN_KV_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_memory: u64,
    /// TCP port of the KV transfer server (0: any free port).
    #[arg(long, env = "DYN_KV_TRANSFER_PORT", default_value_t = 0)]
    pub kv_transfer_port: u16,
    /// Offer KV blocks over shared memory to workers on the same host and IPC namespace.
    #[arg(long, env = "DYN_KV_TRANSFER_SHM", default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_transfer_shm: bool,
    /// Address other workers reach this one at (default: $POD_IP, else the --listen address, else
    /// 127.0.0.1).
    #[arg(long, env = "DYN_ADVERTISE_HOST")]
    pub advertise_host: Option<std::net::IpAddr>,
    #[command(flatten)]
    pub mocker: MockerArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `1GiB`, `512MiB`, `64KiB`, or a plain byte count.
fn positive_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of milliseconds")),
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use e.g. 1GiB, 512MiB or a byte count"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A DynamoGraphDeployment manifest (the YAML you would `kubectl apply`).
    pub manifest: PathBuf,
    /// HTTP port of the frontend.
    #[arg(long, env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Interface the frontend binds.
    #[arg(long, env = "DYN_HTTP_HOST", default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,
    /// Override the router mode set in the manifest.
    #[arg(long, value_enum)]
    pub router_mode: Option<RouterMode>,
    /// Override the mocker's speedup ratio set in the manifest.
    #[arg(long, alias = "speedup")]
    pub speedup_ratio: Option<f64>,
    /// Override every worker service's replica count.
    #[arg(long)]
    pub workers: Option<u32>,
    /// The SLA planner: `on` (the default when the manifest has `spec.sla`) sizes the worker
    /// service to meet the targets, adding and removing workers; `off` runs a fixed fleet of the
    /// manifest's replicas (or `--workers`). Its interval is divided by the speedup ratio.
    #[arg(long, value_enum)]
    pub planner: Option<OnOff>,
    /// Port of the control API on 127.0.0.1 (GET/POST /workers, DELETE /workers/NAME), which adds
    /// and removes workers at run time; 0 picks a free port (printed at start).
    #[arg(long, env = "DYN_SERVE_CONTROL_PORT", default_value_t = 0)]
    pub control_port: u16,
    #[command(flatten)]
    pub model: ModelArgs,
}

impl MockerArgs {
    pub fn to_config(&self, model: &Model) -> anyhow::Result<MockerConfig> {
        let card = model.card();
        anyhow::ensure!(
            self.timing_scale > 0.0 && self.timing_scale.is_finite(),
            "--timing-scale must be a positive number (got {})",
            self.timing_scale
        );
        let config = MockerConfig {
            num_gpu_blocks: self.num_gpu_blocks,
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: self.enable_prefix_caching,
            enable_chunked_prefill: self.enable_chunked_prefill,
            watermark: self.watermark,
            speedup: self.speedup_ratio,
            vocab_size: card.vocab_size,
            eos_token_ids: card.eos_token_ids.clone(),
            special_token_ids: card.special_token_ids.clone(),
            mean_output_tokens: self.mean_output_tokens,
            seed: self.seed,
            timing: TimingModel::default().scaled(self.timing_scale),
            prefill_hold: self.prefill_hold,
        };
        config.validate().context("invalid mocker settings")?;
        Ok(config)
    }
}
