//! GPU bandwidth of the CUDA paths, on 1 GiB of default-geometry blocks (128 x 8 MiB).
//!
//! Run: `cargo run -p dynamo-transfer --features cuda --release --example cuda_bw [GiB]`
//!
//! Prints GB/s (10^9 bytes/s, best of 5) for: host→device and device→host from a pinned pool,
//! device→device as one run and as shuffled single blocks, and the host-staged cross-node path
//! (device → pinned host → TCP loopback → pinned host → device), then verifies every byte that went
//! through the staged path. Exits non-zero without a GPU.

use std::sync::Arc;
use std::time::Instant;

use dynamo_transfer::cuda::{self, CudaBlockPool, PinnedHostPool};
use dynamo_transfer::{
    BlockPool, Completion, KvGeometry, SharedSecret, TcpServer, TcpServerConfig, TcpTransport,
    TcpTransportConfig, testing,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 5;

fn best(
    label: &str,
    mut run: impl FnMut() -> dynamo_transfer::Result<Completion>,
) -> dynamo_transfer::Result<f64> {
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        best = best.max(run()?.gb_per_s());
    }
    println!("{label:<48} {best:8.2} GB/s");
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: usize = std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?;
    let block = KvGeometry::default().block_bytes();
    let n = gib * 1024 * 1024 * 1024 / block;
    let ctx = cuda::open(0)?;
    println!(
        "cuda_bw: device 0 {} ({} device(s)), {n} blocks x {} MiB = {} MiB",
        cuda::device_name(&ctx)?,
        cuda::device_count()?,
        block >> 20,
        (n * block) >> 20
    );
    let seed = 0xb0;
    let all: Vec<u32> = (0..n as u32).collect();
    let mut shuffled = all.clone();
    shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(1));

    let host_src = Arc::new(BlockPool::new(block, n)?);
    testing::fill_pool(&host_src, seed)?;
    let host_src = PinnedHostPool::register(&ctx, host_src)?;
    let host_dst = PinnedHostPool::register(&ctx, Arc::new(BlockPool::new(block, n)?))?;
    let mut dev_a = CudaBlockPool::new(&ctx, block, n)?;
    let mut dev_b = CudaBlockPool::new(&ctx, block, n)?;

    best("host -> device (pinned, per block)", || {
        dev_a.upload(host_src.pool(), &all, &all)
    })?;
    best("device -> host (pinned, per block)", || {
        dev_a.download(&all, host_dst.pool(), &all)
    })?;
    best("device -> device (one run)", || {
        cuda::copy_blocks(&dev_a, &all, &mut dev_b, &all)
    })?;
    best("device -> device (shuffled single blocks)", || {
        cuda::copy_blocks(&dev_a, &shuffled, &mut dev_b, &all)
    })?;

    // Host-staged cross-node path over TCP loopback.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let secret = SharedSecret::new(b"cuda-bw-example-shared-secret".to_vec())?;
    let (outbox, inbox) = (host_src, host_dst);
    let addr = "127.0.0.1:0".parse()?;
    let (server, pools) = rt.block_on(async {
        let server = TcpServer::bind(addr, secret.clone(), TcpServerConfig::default()).await?;
        let pools = server.pools();
        Ok::<_, dynamo_transfer::Error>((server, pools))
    })?;
    let pool = pools.register(outbox.pool().clone())?;
    let shutdown = CancellationToken::new();
    let serving = rt.spawn(server.serve(shutdown.clone()));
    let transport = TcpTransport::new(secret, TcpTransportConfig::default());
    let desc = pools.describe(pool, all.clone())?;
    let mut dev_c = CudaBlockPool::new(&ctx, block, n)?;
    let mut stages = [0f64; 3];
    let mut total_best = 0f64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let out = dev_a.download(&shuffled, outbox.pool(), &all)?;
        let net = rt.block_on(transport.read(&desc, inbox.pool(), &all))?;
        let up = dev_c.upload(inbox.pool(), &all, &all)?;
        let total = (n * block) as f64 / start.elapsed().as_secs_f64() / 1e9;
        if total > total_best {
            total_best = total;
            stages = [out.gb_per_s(), net.gb_per_s(), up.gb_per_s()];
        }
    }
    println!(
        "{:<48} {total_best:8.2} GB/s  (d2h {:.2}, tcp {:.2}, h2d {:.2})",
        "staged: device -> pinned -> tcp -> pinned -> device", stages[0], stages[1], stages[2]
    );
    shutdown.cancel();
    rt.block_on(serving)??;

    // dev_c slot i holds source block shuffled[i].
    let check = BlockPool::new(block, n)?;
    dev_c.download(&all, &check, &all)?;
    match testing::verify_slots(&check, seed, &shuffled, &all)? {
        None => println!("cuda_bw: staged path verified {} bytes", n * block),
        Some((slot, offset)) => {
            return Err(format!("staged path corrupted slot {slot} at byte {offset}").into());
        }
    }
    Ok(())
}
