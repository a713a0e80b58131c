//! `dynamo profile`: measures an OpenAI endpoint (ours, Dynamo's, vLLM's) the way the SLA planner
//! needs it:
//!
//! - **TTFT vs ISL**: one streamed request at a time, per prompt length, on an otherwise idle
//!   endpoint; the median of a few runs.
//! - **ITL vs concurrency and context**: `k` requests of `context` prompt tokens started together,
//!   each generating `--osl` tokens; the mean gap between tokens once every stream has started.
//!
//! Prompts are fresh random token ids (completions endpoint), so no prefix cache helps. Latencies
//! are multiplied by `--speedup-ratio` so that a profile taken of a mocker running faster than
//! real time is in the engine's own time, like the trace and the SLA.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use dynamo_model::Model;
use dynamo_planner::{DecodePoint, PrefillPoint, Profile};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::time::Instant;

use crate::report::RequestRecord;

#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    /// Base URL of the OpenAI endpoint (without `/v1`).
    #[arg(long, env = "DYN_BENCH_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to request (default: the built-in tiny model's).
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt lengths for TTFT.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,512,1024,2048,4096,8192"
    )]
    pub isl: Vec<u32>,
    /// Concurrencies for ITL.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<u32>,
    /// Context lengths (prompt tokens) for ITL.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    pub context: Vec<u32>,
    /// Tokens each ITL request generates.
    #[arg(long, default_value_t = 64)]
    pub osl: u32,
    /// Runs per TTFT point (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// The endpoint's engines run this many times faster than real time (`--speedup-ratio` of
    /// the mocker); measured latencies are multiplied by it.
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// GPUs of one engine replica behind the endpoint.
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// Engines behind the endpoint: concurrency is spread over them, so this many times the
    /// concurrency is sent for each point.
    #[arg(long, default_value_t = 1)]
    pub engines: u32,
    /// Where to write the profile JSON.
    #[arg(long, default_value = "profile.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs the measurements and writes the profile.
pub async fn main(args: ProfileArgs) -> anyhow::Result<()> {
    let profile = measure(&args).await?;
    let json = serde_json::to_string_pretty(&profile)?;
    std::fs::write(&args.out, json)
        .map_err(|e| anyhow::anyhow!("could not write {}: {e}", args.out.display()))?;
    println!(
        "wrote {} ({} TTFT points, {} ITL points)",
        args.out.display(),
        profile.prefill.len(),
        profile.decode.len()
    );
    Ok(())
}

/// Measures `args.url` into a validated profile.
pub async fn measure(args: &ProfileArgs) -> anyhow::Result<Profile> {
    let model = Model::builtin();
    let card = model.card();
    let name = args.model.clone().unwrap_or_else(|| card.name.clone());
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .tcp_nodelay(true)
        .build()?;
    let url: Arc<str> = format!("{}/v1/completions", args.url.trim_end_matches('/')).into();
    let vocab: Vec<u32> = (0..card.vocab_size)
        .filter(|id| card.special_token_ids.binary_search(id).is_err())
        .collect();
    let mut rng = SmallRng::seed_from_u64(rand::random());
    let mut prompt = |len: u32| -> Vec<u32> {
        (0..len)
            .map(|_| vocab[rng.random_range(0..vocab.len())])
            .collect()
    };
    let scale = if args.speedup_ratio > 0.0 {
        args.speedup_ratio
    } else {
        1.0
    };
    let body = |tokens: Vec<u32>, max_tokens: u32| -> bytes::Bytes {
        serde_json::to_vec(&serde_json::json!({
            "model": name, "prompt": tokens, "max_tokens": max_tokens, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true},
        }))
        .unwrap_or_default()
        .into()
    };
    let one = |b: bytes::Bytes| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let start = Instant::now();
            let r = crate::send(&client, &url, b, start, RequestRecord::default()).await;
            match &r.error {
                Some(e) => Err(anyhow::anyhow!("a profiling request failed: {e}")),
                None => Ok(r),
            }
        }
    };

    let mut prefill = Vec::new();
    for &isl in &args.isl {
        let mut ttfts = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let r = one(body(prompt(isl), 2)).await?;
            ttfts.push(r.ttft_ms.unwrap_or(r.e2e_ms));
        }
        ttfts.sort_by(f64::total_cmp);
        let ttft_ms = ttfts[ttfts.len() / 2] * scale;
        eprintln!("profile: ISL {isl}: TTFT {ttft_ms:.1} ms");
        prefill.push(PrefillPoint {
            isl: f64::from(isl),
            ttft_ms,
        });
    }

    let mut decode = Vec::new();
    for &context in &args.context {
        for &k in &args.concurrency {
            let n = k.max(1) * args.engines.max(1);
            let tasks: Vec<_> = (0..n)
                .map(|_| tokio::spawn(one(body(prompt(context), args.osl.max(4)))))
                .collect();
            let mut gaps = Vec::new();
            for t in tasks {
                let r = t.await??;
                // Skip the first gaps, while other streams of the point were still prefilling.
                let skip = r.itl_ms.len() / 4;
                gaps.extend(r.itl_ms.into_iter().skip(skip));
            }
            if gaps.is_empty() {
                continue;
            }
            let itl_ms = gaps.iter().sum::<f64>() / gaps.len() as f64 * scale;
            eprintln!("profile: context {context}, concurrency {k}: ITL {itl_ms:.2} ms");
            decode.push(DecodePoint {
                concurrency: f64::from(k.max(1)),
                context: f64::from(context),
                itl_ms,
            });
        }
    }
    Ok(Profile {
        source: args.url.clone(),
        gpus: args.gpus.max(1),
        max_concurrency: args.concurrency.iter().max().map(|&k| f64::from(k)),
        prefill,
        decode,
    }
    .validated()?)
}
