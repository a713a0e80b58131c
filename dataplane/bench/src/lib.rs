//! `dynamo bench`: an open-loop load generator for any OpenAI-compatible endpoint (ours,
//! Dynamo's, vLLM's). It replays a Mooncake trace, an Azure LLM inference trace, or a synthetic
//! multi-turn workload, firing each request at its (scaled) arrival time, and records per request
//! the schedule lag, TTFT, inter-token latencies, end-to-end latency and the server's token usage.
//! The result is a table on stdout, `OUT/LABEL.json` and a TTFT CDF in `OUT/LABEL.png`.
//!
//! With `--sla-ttft-ms` and `--sla-itl-ms` (in trace time) each request is judged against the
//! targets, and while it runs bench reads the server's `/metrics` for the GPUs of its live workers
//! (`dynamo_frontend_worker_gpus`), so the run reports SLA attainment, GPU-seconds and scaling
//! actions, and draws load, GPUs and attainment over time in `OUT/LABEL-timeline.png`.
//!
//! Prompts are built from the trace's `hash_ids` ([`workload::PromptTokens`]): with
//! `--endpoint completions` the prompt is sent as token ids, so requests share exactly the prefix
//! the trace says. With `--endpoint chat` each block is decoded to text and the texts joined; the
//! server's re-tokenization of that text may move block boundaries slightly, so the measured hit
//! rate is then approximate.
//!
//! It does not judge the server: it only measures. Server errors are counted, never fatal.

pub mod gpus;
pub mod png;
pub mod profile;
pub mod report;
pub mod sse;
pub mod workload;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, ValueEnum};
use dynamo_model::Model;
use futures::StreamExt;
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use report::{Report, RequestRecord, Summary};
use workload::{PromptTokens, TraceLine};

/// Load-test flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the OpenAI endpoint (without `/v1`).
    #[arg(long, env = "DYN_BENCH_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to request (default: the tokenizer's served name).
    #[arg(long, env = "DYN_BENCH_MODEL")]
    pub model: Option<String>,
    /// Hugging Face model directory whose tokenizer builds the prompts (default: built-in tiny).
    #[arg(long, env = "DYN_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
    /// Trace to replay: Mooncake JSONL, or Azure LLM inference CSV
    /// (`TIMESTAMP,ContextTokens,GeneratedTokens`, recognised by its header).
    #[arg(
        long,
        env = "DYN_BENCH_TRACE",
        conflicts_with = "synthetic",
        required_unless_present_any = ["synthetic", "report_only"]
    )]
    pub trace: Option<PathBuf>,
    /// Replay only the first N trace lines.
    #[arg(long, env = "DYN_BENCH_LIMIT")]
    pub limit: Option<usize>,
    /// Divide the trace's arrival timestamps by this (3 = three times faster).
    #[arg(long, env = "DYN_BENCH_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Tokens per trace hash id, as the trace defines (Mooncake: 512).
    #[arg(long, env = "DYN_BENCH_BLOCK_TOKENS", default_value_t = 512)]
    pub block_tokens: u32,
    /// Cap on each request's output tokens.
    #[arg(long, env = "DYN_BENCH_MAX_OUTPUT_TOKENS")]
    pub max_output_tokens: Option<u32>,
    /// Generate a synthetic workload instead of replaying a trace.
    #[arg(long)]
    pub synthetic: bool,
    /// Synthetic: number of requests.
    #[arg(long, env = "DYN_BENCH_REQUESTS", default_value_t = 100)]
    pub requests: usize,
    /// Synthetic: mean arrival rate, requests per second (Poisson arrivals).
    #[arg(long, env = "DYN_BENCH_RATE", default_value_t = 10.0)]
    pub rate: f64,
    /// Synthetic: new prompt tokens per turn.
    #[arg(long, env = "DYN_BENCH_ISL", default_value_t = 1024)]
    pub isl: u32,
    /// Synthetic: output tokens per request.
    #[arg(long, env = "DYN_BENCH_OSL", default_value_t = 128)]
    pub osl: u32,
    /// Synthetic: turns per conversation; each turn's prompt extends the previous turn's prompt
    /// and answer, so conversations share prefixes.
    #[arg(long, env = "DYN_BENCH_TURNS", default_value_t = 1)]
    pub turns: u32,
    /// Synthetic: random seed.
    #[arg(long, env = "DYN_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Which OpenAI endpoint to load.
    #[arg(long, env = "DYN_BENCH_ENDPOINT", value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Name of this run: the result files are OUT/LABEL.json and OUT/LABEL.png.
    #[arg(long, env = "DYN_BENCH_LABEL", default_value = "bench")]
    pub label: String,
    /// Directory for the result files.
    #[arg(long, env = "DYN_BENCH_OUT", default_value = "bench-results")]
    pub out: PathBuf,
    /// Longest time one request may take, response stream included.
    #[arg(long, env = "DYN_BENCH_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Most requests in flight; later ones wait (and count as schedule lag).
    #[arg(long, env = "DYN_BENCH_CONCURRENCY_LIMIT")]
    pub concurrency_limit: Option<usize>,
    /// Earlier result files to put beside this run in the table and the chart.
    #[arg(long, num_args = 1..)]
    pub compare: Vec<PathBuf>,
    /// Send nothing: draw the table and the chart (OUT/LABEL.png) of the `--compare` files only.
    #[arg(long, requires = "compare")]
    pub report_only: bool,
    /// TTFT target in trace-time milliseconds; compared with wall-clock TTFT x `--time-scale`
    /// (a server started with `--speedup-ratio` equal to the time scale runs that much faster).
    #[arg(long, env = "DYN_BENCH_SLA_TTFT_MS", requires = "sla_itl_ms")]
    pub sla_ttft_ms: Option<f64>,
    /// Inter-token latency target in trace-time milliseconds, met by a request whose mean gap
    /// between tokens is at most this (requests with fewer than two output tokens are judged on
    /// TTFT alone).
    #[arg(long, env = "DYN_BENCH_SLA_ITL_MS", requires = "sla_ttft_ms")]
    pub sla_itl_ms: Option<f64>,
    /// How often to read the server's `/metrics` for its live workers' GPUs (wall time).
    #[arg(long, env = "DYN_BENCH_METRICS_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub metrics_interval: Duration,
    /// Width of one point of the timeline chart, in trace time.
    #[arg(long, env = "DYN_BENCH_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

/// The OpenAI endpoint to send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/chat/completions`, prompt decoded to text.
    Chat,
    /// `/v1/completions`, prompt as token ids (exact prefix sharing).
    Completions,
}

/// Everything that can stop a bench run (server errors never do).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("could not read the trace {path}")]
    ReadTrace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "trace line {line} is not a Mooncake request (timestamp, input_length, output_length, hash_ids)"
    )]
    ParseTraceLine {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("trace line {line}: {reason}")]
    InvalidTraceLine { line: usize, reason: String },
    #[error("the workload has no requests")]
    EmptyWorkload,
    #[error("could not build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("could not decode prompt tokens to text")]
    Decode(#[source] dynamo_model::ModelError),
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the result file {path}")]
    ReadCompare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a `dynamo bench` result file")]
    ParseCompare {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The files and table a finished run produced.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub json_path: PathBuf,
    pub png_path: PathBuf,
    pub table: String,
}

/// The `dynamo bench` command: load the tokenizer, run, write the files, print the table.
pub async fn main(args: BenchArgs) -> anyhow::Result<()> {
    if args.report_only {
        let runs = read_compared(&args.compare)?;
        let refs: Vec<&Report> = runs.iter().collect();
        let (table, png, _) = render(&refs);
        std::fs::create_dir_all(&args.out)?;
        let path = args.out.join(format!("{}.png", args.label));
        std::fs::write(&path, png)?;
        println!("{table}");
        println!("wrote {}", path.display());
        return Ok(());
    }
    let model = match &args.model_path {
        Some(dir) => Model::from_dir(dir, None)?,
        None => Model::builtin(),
    };
    let outcome = run(&args, &model).await?;
    println!("{}", outcome.table);
    println!(
        "wrote {} and {}",
        outcome.json_path.display(),
        outcome.png_path.display()
    );
    Ok(())
}

/// Builds the workload, replays it, and writes `OUT/LABEL.json` and `OUT/LABEL.png`.
pub async fn run(args: &BenchArgs, model: &Model) -> Result<Outcome, BenchError> {
    let lines = match &args.trace {
        Some(path) if !args.synthetic => workload::read_trace(path, args.limit, args.block_tokens)?,
        _ => workload::synthetic(
            args.requests,
            args.rate,
            args.isl,
            args.osl,
            args.turns,
            args.block_tokens,
            args.seed,
        ),
    };
    if lines.is_empty() {
        return Err(BenchError::EmptyWorkload);
    }
    let compared = read_compared(&args.compare)?;

    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .map_err(BenchError::Client)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    let sampler = tokio::spawn(gpus::sample(
        client.clone(),
        format!("{}/metrics", args.url.trim_end_matches('/')),
        args.metrics_interval,
        start,
        stop.clone(),
    ));
    let records = replay(args, &client, model, &lines, start).await;
    stop.cancel();
    let samples = sampler.await.unwrap_or_default();
    let mut records = records?;
    let oracle = workload::oracle_hit_rate(&lines);
    let mut summary = Summary::new(&records, oracle);
    let scale = if args.time_scale > 0.0 {
        args.time_scale
    } else {
        1.0
    };
    if let (Some(ttft), Some(itl)) = (args.sla_ttft_ms, args.sla_itl_ms) {
        let wall = report::WallSla {
            ttft_ms: ttft / scale,
            itl_ms: itl / scale,
        };
        let a = report::judge_all(&mut records, &wall);
        summary.sla_attainment = Some(a.both);
        summary.sla_ttft_attainment = Some(a.ttft);
        summary.sla_itl_attainment = Some(a.itl);
    }
    let end_ms = summary.duration_s * 1000.0;
    summary.gpu_seconds = gpus::integrate(&samples, end_ms).map(|s| s * scale);
    summary.scaling_actions = gpus::changes(&samples);
    let mut report = Report {
        label: args.label.clone(),
        config: config_json(args, model),
        summary,
        records,
        gpu_samples: samples,
    };

    let (table, png, legend) = {
        let mut runs: Vec<&Report> = vec![&report];
        runs.extend(&compared);
        render(&runs)
    };
    if let serde_json::Value::Object(map) = &mut report.config {
        map.insert(
            "chart".into(),
            serde_json::to_value(&legend).unwrap_or_default(),
        );
    }

    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes)
            .map(|()| path.clone())
            .map_err(|source| BenchError::Write { path, source })
    };
    std::fs::create_dir_all(&args.out).map_err(|source| BenchError::Write {
        path: args.out.clone(),
        source,
    })?;
    if report.summary.gpu_seconds.is_some() || report.summary.sla_attainment.is_some() {
        let (png, legend) = gpus::timeline(&report, scale, args.window.as_secs_f64());
        write(args.out.join(format!("{}-timeline.png", args.label)), &png)?;
        if let serde_json::Value::Object(map) = &mut report.config {
            map.insert(
                "timeline_chart".into(),
                serde_json::to_value(&legend).unwrap_or_default(),
            );
        }
    }
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    let json_path = write(args.out.join(format!("{}.json", args.label)), &json)?;
    let png_path = write(args.out.join(format!("{}.png", args.label)), &png)?;
    Ok(Outcome {
        report,
        json_path,
        png_path,
        table,
    })
}

fn read_compared(paths: &[PathBuf]) -> Result<Vec<Report>, BenchError> {
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|source| BenchError::ReadCompare {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str::<Report>(&text).map_err(|source| BenchError::ParseCompare {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

fn series(runs: &[&Report]) -> Vec<(String, Vec<f64>)> {
    runs.iter().map(|r| (r.label.clone(), r.ttfts())).collect()
}

/// The side-by-side table (with the chart's legend), the TTFT CDF PNG of `runs` and its legend.
fn render(runs: &[&Report]) -> (String, Vec<u8>, png::Legend) {
    let (png, legend) = png::ttft_cdf(&series(runs));
    let mut table = report::table(runs);
    table.push_str(&format!("chart: {}; ", legend.title));
    let colours: Vec<String> = legend
        .series
        .iter()
        .map(|(l, c)| format!("{l}={c}"))
        .collect();
    table.push_str(&format!(
        "x 0..{:.1} ms; {}\n",
        legend.x_max_ms,
        colours.join(", ")
    ));
    (table, png, legend)
}

fn config_json(args: &BenchArgs, model: &Model) -> serde_json::Value {
    serde_json::json!({
        "url": args.url,
        "model": args.model.clone().unwrap_or_else(|| model.card().name.clone()),
        "tokenizer": args.model_path.as_ref().map_or_else(|| "builtin".to_owned(), |p| p.display().to_string()),
        "trace": args.trace.as_ref().filter(|_| !args.synthetic).map(|p| p.display().to_string()),
        "limit": args.limit,
        "time_scale": args.time_scale,
        "block_tokens": args.block_tokens,
        "max_output_tokens": args.max_output_tokens,
        "synthetic": args.synthetic.then(|| serde_json::json!({
            "requests": args.requests, "rate": args.rate, "isl": args.isl, "osl": args.osl,
            "turns": args.turns, "seed": args.seed,
        })),
        "endpoint": args.endpoint,
        "timeout_s": args.timeout.as_secs_f64(),
        "concurrency_limit": args.concurrency_limit,
        "sla_ttft_ms": args.sla_ttft_ms,
        "sla_itl_ms": args.sla_itl_ms,
    })
}

// === replay ===

/// Fires each line at its scheduled time and collects one record per line, in workload order.
/// The next request's body is built while waiting for its time; being late is recorded as lag.
async fn replay(
    args: &BenchArgs,
    client: &reqwest::Client,
    model: &Model,
    lines: &[TraceLine],
    start: Instant,
) -> Result<Vec<RequestRecord>, BenchError> {
    let card = model.card();
    let tokens = PromptTokens::new(card.vocab_size, &card.special_token_ids, args.block_tokens);
    let model_name = args.model.clone().unwrap_or_else(|| card.name.clone());
    let base = args.url.trim_end_matches('/');
    let url: Arc<str> = match args.endpoint {
        Endpoint::Chat => format!("{base}/v1/chat/completions"),
        Endpoint::Completions => format!("{base}/v1/completions"),
    }
    .into();
    let limit = args
        .concurrency_limit
        .map(|n| Arc::new(Semaphore::new(n.max(1))));
    let due = workload::schedule(lines, args.time_scale);

    let mut tasks = Vec::with_capacity(lines.len());
    for (index, (line, at)) in lines.iter().zip(due).enumerate() {
        let max_tokens = args
            .max_output_tokens
            .map_or(line.output_length, |cap| line.output_length.min(cap));
        let body = body(args.endpoint, &model_name, &tokens, model, line, max_tokens)?;
        tokio::time::sleep_until(start + at).await;
        let permit = match &limit {
            Some(s) => Some(s.clone().acquire_owned().await.ok()),
            None => None,
        };
        let record = RequestRecord {
            index,
            scheduled_ms: ms(at),
            input_length: line.input_length,
            output_length: max_tokens,
            ..RequestRecord::default()
        };
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = send(&client, &url, body, start, record).await;
            drop(permit);
            r
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for (index, t) in tasks.into_iter().enumerate() {
        records.push(t.await.unwrap_or_else(|e| RequestRecord {
            index,
            error: Some(format!("request task failed: {e}")),
            ..RequestRecord::default()
        }));
    }
    Ok(records)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The JSON body of one streamed request.
fn body(
    endpoint: Endpoint,
    model_name: &str,
    tokens: &PromptTokens,
    model: &Model,
    line: &TraceLine,
    max_tokens: u32,
) -> Result<bytes::Bytes, BenchError> {
    let mut body = serde_json::json!({
        "model": model_name,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match endpoint {
        Endpoint::Completions => body["prompt"] = serde_json::json!(tokens.prompt(line)),
        Endpoint::Chat => {
            let mut text = String::new();
            for block in tokens.blocks(line) {
                text.push_str(&model.decode(&block, true).map_err(BenchError::Decode)?);
            }
            body["messages"] = serde_json::json!([{"role": "user", "content": text}]);
        }
    }
    Ok(serde_json::to_vec(&body).unwrap_or_default().into())
}

/// Sends one request and reads its stream to the end, filling in `record`.
pub(crate) async fn send(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    start: Instant,
    mut record: RequestRecord,
) -> RequestRecord {
    let sent = Instant::now();
    record.start_ms = ms(sent - start);
    record.lag_ms = (record.start_ms - record.scheduled_ms).max(0.0);
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            record.error = Some(error_chain(&e));
            record.e2e_ms = ms(sent.elapsed());
            return record;
        }
    };
    let status = response.status();
    record.status = Some(status.as_u16());
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        record.error = Some(text.chars().take(300).collect());
        record.e2e_ms = ms(sent.elapsed());
        return record;
    }

    let mut lines = sse::LineSplitter::default();
    let mut gaps = Vec::new();
    let mut last_text: Option<Instant> = None;
    let mut done = false;
    let mut usage = None;
    let mut stream = response.bytes_stream();
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                record.error = Some(error_chain(&e));
                break;
            }
        };
        let now = Instant::now();
        lines.push(&bytes, |line| match sse::parse_line(line) {
            Some(sse::Event::Chunk { text, usage: u }) => {
                if text {
                    match last_text {
                        None => record.ttft_ms = Some(ms(now - sent)),
                        Some(prev) => gaps.push(ms(now - prev)),
                    }
                    last_text = Some(now);
                    record.text_chunks += 1;
                }
                if u.is_some() {
                    usage = u;
                }
            }
            Some(sse::Event::Error(e)) => {
                record.error.get_or_insert(e);
            }
            Some(sse::Event::Done) => done = true,
            None => {}
        });
    }
    record.e2e_ms = ms(sent.elapsed());
    if let Some(u) = usage {
        record.prompt_tokens = u.prompt_tokens;
        record.completion_tokens = u.completion_tokens;
        record.cached_tokens = u.cached_tokens;
    }
    if record.error.is_none() && !done && usage.is_none() {
        record.error = Some("stream ended without [DONE]".into());
    }
    // A chunk may carry several tokens; spread each gap over the chunk's share of the tokens.
    let per_chunk = if record.completion_tokens > record.text_chunks && record.text_chunks > 0 {
        f64::from(record.completion_tokens) / f64::from(record.text_chunks)
    } else {
        1.0
    };
    record.itl_ms = gaps.into_iter().map(|g| g / per_chunk).collect();
    record
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
