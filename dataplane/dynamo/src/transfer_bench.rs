//! `dynamo bench-transfer`: KV block transfer between two processes, as a prefill and a decode
//! worker move it, against a single-thread `memcpy` of the same blocks in the same run.
//!
//! The command starts a copy of itself as the *source* (a prefill worker's side: a shared block
//! pool filled with checkable content, served over TCP and shared memory with a per-run secret) and
//! reads from it as the *destination* (a decode worker's side: its own pool, one connection reused
//! as the sidecar does). Each transport moves `--blocks` blocks in shuffled order (the bulk figure)
//! and a single block (the per-transfer overhead); `memcpy` copies the same blocks between two pools
//! of this process. Every received block is checked byte for byte. Both sides run on one thread, as
//! the sidecar does.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dynamo_transfer::{
    BlockPool, BlockSetDescriptor, KvGeometry, SharedSecret, ShmServer, ShmServerConfig,
    ShmTransport, ShmTransportConfig, TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig,
    testing,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Environment variable that hands the per-run secret to the source process.
const SECRET_ENV: &str = "DYN_BENCH_TRANSFER_SECRET";
/// Seed of the blocks' content (both sides derive it).
const CONTENT_SEED: u64 = 7;

#[derive(Debug, Clone, Args)]
pub struct BenchTransferArgs {
    /// KV geometry of a block: a preset (llama-8b, llama-70b, llama-1b, qwen-0.5b, tiny) or
    /// layers=L,kv_heads=H,head_dim=D[,dtype_bytes=B].
    #[arg(long, default_value = "llama-8b")]
    pub kv_geometry: String,
    /// Tokens per block.
    #[arg(long, default_value_t = 64)]
    pub block_size: u32,
    /// Blocks per bulk transfer.
    #[arg(long, default_value_t = 16)]
    pub blocks: u32,
    /// Timed transfers per measurement (after 2 untimed ones); the median is reported.
    #[arg(long, default_value_t = 20)]
    pub iterations: u32,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Internal: run as the source process, serving a pool until stdin closes.
    #[arg(long, hide = true)]
    pub source: bool,
}

/// What the source process prints once it serves: where to read from.
#[derive(Debug, Serialize, Deserialize)]
struct SourceReady {
    tcp_bulk: BlockSetDescriptor,
    tcp_one: BlockSetDescriptor,
    shm_bulk: BlockSetDescriptor,
    shm_one: BlockSetDescriptor,
}

/// One measured row.
#[derive(Debug, Serialize)]
pub struct Row {
    pub method: &'static str,
    pub blocks: usize,
    pub bytes: u64,
    pub median_us: f64,
    pub gb_per_s: f64,
    /// This row's throughput over `memcpy`'s for the same blocks (bulk), or its median time minus
    /// `memcpy`'s (one block), in microseconds.
    pub vs_memcpy: f64,
}

pub async fn run(args: BenchTransferArgs) -> anyhow::Result<()> {
    let geometry = dynamo_sidecar::disagg::parse_geometry(&args.kv_geometry, args.block_size)?;
    if args.blocks == 0 || args.iterations == 0 {
        bail!("--blocks and --iterations must be at least 1");
    }
    if args.source {
        return source(&geometry, args.blocks).await;
    }
    destination(&args, &geometry).await
}

/// The bulk transfer's source blocks, shuffled (the same on both sides).
fn bulk_blocks(n: u32) -> Vec<u32> {
    let mut blocks: Vec<u32> = (0..n).collect();
    blocks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(CONTENT_SEED));
    blocks
}

fn secret_from_env() -> anyhow::Result<SharedSecret> {
    let hex = std::env::var(SECRET_ENV)
        .with_context(|| format!("the source process needs {SECRET_ENV}"))?;
    Ok(SharedSecret::new(hex.into_bytes())?)
}

async fn source(geometry: &KvGeometry, blocks: u32) -> anyhow::Result<()> {
    let secret = secret_from_env()?;
    let pool = Arc::new(BlockPool::new_shared(
        geometry.block_bytes(),
        blocks as usize,
    )?);
    testing::fill_pool(&pool, CONTENT_SEED)?;
    let shutdown = CancellationToken::new();
    let tcp = TcpServer::bind(
        "127.0.0.1:0".parse()?,
        secret.clone(),
        TcpServerConfig::default(),
    )
    .await?;
    let socket =
        std::env::temp_dir().join(format!("dynamo-bench-transfer-{}.sock", std::process::id()));
    let shm = ShmServer::bind(&socket, secret, ShmServerConfig::default())?;
    let (tcp_pools, shm_pools) = (tcp.pools(), shm.pools());
    let tcp_id = tcp_pools.register(pool.clone())?;
    let shm_id = shm_pools.register(pool.clone())?;
    let bulk = bulk_blocks(blocks);
    let ready = SourceReady {
        tcp_bulk: tcp_pools.describe(tcp_id, bulk.clone())?,
        tcp_one: tcp_pools.describe(tcp_id, vec![0])?,
        shm_bulk: shm_pools.describe(shm_id, bulk)?,
        shm_one: shm_pools.describe(shm_id, vec![0])?,
    };
    let servers = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { tokio::join!(tcp.serve(shutdown.clone()), shm.serve(shutdown)) }
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&ready)?)?;
    out.flush()?;
    drop(out);
    // Serve until the destination closes our stdin (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await?;
    shutdown.cancel();
    let _ = servers.await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The source process: asked to stop (stdin closed) when the benchmark ends, early or not, and
/// killed if it does not within 2 s.
struct SourceProcess(std::process::Child);

impl Drop for SourceProcess {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn destination(args: &BenchTransferArgs, geometry: &KvGeometry) -> anyhow::Result<()> {
    let secret_hex = format!("{:032x}", rand::random::<u128>());
    let secret = SharedSecret::new(secret_hex.clone().into_bytes())?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "bench-transfer",
            "--source",
            "--kv-geometry",
            &args.kv_geometry,
            "--block-size",
            &args.block_size.to_string(),
            "--blocks",
            &args.blocks.to_string(),
        ])
        .env(SECRET_ENV, &secret_hex)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start the source process")?;
    let stdout = child.stdout.take().context("source stdout")?;
    let child = SourceProcess(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let ready: SourceReady = serde_json::from_str(line.trim())
        .with_context(|| format!("the source process did not say where it serves: {line:?}"))?;

    let n = args.blocks as usize;
    let local_src = BlockPool::new(geometry.block_bytes(), n)?;
    testing::fill_pool(&local_src, CONTENT_SEED)?;
    let dst = BlockPool::new(geometry.block_bytes(), n)?;
    let slots: Vec<u32> = (0..args.blocks).collect();
    let tcp = TcpTransport::new(secret.clone(), TcpTransportConfig::default());
    let shm = ShmTransport::new(secret, ShmTransportConfig::default());
    let bulk = bulk_blocks(args.blocks);
    let iterations = args.iterations as usize;

    let check = |what: &str, blocks: &[u32]| -> anyhow::Result<()> {
        if let Some((slot, offset)) = testing::verify_slots(&dst, CONTENT_SEED, blocks, &slots)? {
            bail!("{what}: slot {slot} differs from its source block at byte {offset}");
        }
        Ok(())
    };

    let mut rows = Vec::new();
    for (label, blocks, tcp_desc, shm_desc) in [
        ("bulk", &bulk[..], &ready.tcp_bulk, &ready.shm_bulk),
        ("one block", &[0u32][..], &ready.tcp_one, &ready.shm_one),
    ] {
        let k = blocks.len();
        let slots = &slots[..k];
        let mc = time(iterations, || async {
            Ok(testing::copy_blocks(&local_src, blocks, &dst, slots)?)
        })
        .await?;
        check("memcpy", blocks)?;
        let t = time(iterations, || async {
            tcp.read(tcp_desc, &dst, slots).await?;
            Ok(())
        })
        .await?;
        check("tcp", blocks)?;
        let s = time(iterations, || async {
            shm.read(shm_desc, &dst, slots).await?;
            Ok(())
        })
        .await?;
        check("shm", blocks)?;
        let bytes = geometry.block_bytes() as u64 * k as u64;
        for (method, median) in [("memcpy", mc), ("tcp", t), ("shm", s)] {
            let us = median.as_secs_f64() * 1e6;
            let vs = if label == "bulk" {
                mc.as_secs_f64() / median.as_secs_f64()
            } else {
                us - mc.as_secs_f64() * 1e6
            };
            rows.push((
                label,
                Row {
                    method,
                    blocks: k,
                    bytes,
                    median_us: us,
                    gb_per_s: bytes as f64 / median.as_secs_f64() / 1e9,
                    vs_memcpy: vs,
                },
            ));
        }
    }
    drop(child);

    println!(
        "KV block transfer, {} ({} KiB a block), source in another process, median of {}:",
        args.kv_geometry,
        geometry.block_bytes() / 1024,
        args.iterations
    );
    println!(
        "{:<10} {:<7} {:>7} {:>11} {:>9} {:>16}",
        "transfer", "method", "blocks", "median us", "GB/s", "vs memcpy"
    );
    for (label, r) in &rows {
        let vs = if *label == "bulk" {
            format!("{:.2}x", r.vs_memcpy)
        } else {
            format!("{:+.1} us", r.vs_memcpy)
        };
        println!(
            "{:<10} {:<7} {:>7} {:>11.1} {:>9.2} {:>16}",
            label, r.method, r.blocks, r.median_us, r.gb_per_s, vs
        );
    }
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|(label, r)| serde_json::json!({"transfer": label, "row": r}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

/// Median wall time of `iterations` runs of `f`, after 2 untimed ones.
async fn time<F, Fut>(iterations: usize, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..2 {
        f().await?;
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f().await?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}
