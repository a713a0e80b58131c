//! CUDA transport checks (feature `cuda`). Without a driver or GPU each test prints a skip line and
//! passes; with `DYNAMO_REQUIRE_CUDA=1` a missing GPU fails instead (for the GPU check, so a skip
//! there cannot pass for a run). When they run they print `cuda: device N <name> ... verified`.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::{DEADLINE, TestResult, assert_delivered, filled_pool, random_set, rng, secret};
use cudarc::driver::CudaContext;
use dynamo_transfer::cuda::{self, CudaBlockPool, PinnedHostPool};
use dynamo_transfer::{BlockPool, TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const BLOCK: usize = 1024 * 1024 + 512;

/// Device 0 and the device count, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<(Arc<CudaContext>, usize)> {
    let opened = cuda::device_count().and_then(|n| Ok((cuda::open(0)?, n)));
    match opened {
        Ok(found) => Some(found),
        Err(e) if std::env::var_os("DYNAMO_REQUIRE_CUDA").is_some() => {
            panic!("{test}: DYNAMO_REQUIRE_CUDA is set but CUDA is unavailable: {e}")
        }
        Err(e) => {
            println!("skip {test}: {e}");
            None
        }
    }
}

fn describe(ctx: &CudaContext) -> String {
    format!(
        "device {} {}",
        ctx.ordinal(),
        cuda::device_name(ctx).unwrap_or_else(|e| format!("(name unavailable: {e})"))
    )
}

/// A device pool holding the content of `seed` in every block, uploaded from a host pool.
fn filled_device_pool(ctx: &Arc<CudaContext>, blocks: usize, seed: u64) -> CudaBlockPool {
    let host = filled_pool(BLOCK, blocks, seed, false);
    let mut dev = CudaBlockPool::new(ctx, BLOCK, blocks).expect("device pool");
    let all: Vec<u32> = (0..blocks as u32).collect();
    dev.upload(&host, &all, &all).expect("upload");
    dev
}

/// Downloads `slots` of `dev` into a host pool (at the same indices) and checks them.
fn assert_device_holds(dev: &CudaBlockPool, seed: u64, blocks: &[u32], slots: &[u32]) {
    let host = BlockPool::new(BLOCK, dev.num_blocks()).expect("host pool");
    dev.download(slots, &host, slots).expect("download");
    assert_delivered(&host, seed, blocks, slots);
}

#[test]
fn cuda_d2d_copy_delivers_random_block_sets_byte_exact() {
    let Some((ctx, _)) = gpu("cuda_d2d_copy_delivers_random_block_sets_byte_exact") else {
        return;
    };
    let seed = 0xc0da;
    let src = filled_device_pool(&ctx, 24, seed);
    let mut dst = CudaBlockPool::new(&ctx, BLOCK, 32).expect("device pool");
    let mut rng = rng(3);
    let mut copied = 0;
    for n in [1, 9, 24] {
        let (blocks, slots) = random_set(&mut rng, 24, 32, n);
        cuda::copy_blocks(&src, &blocks, &mut dst, &slots).expect("d2d copy");
        assert_device_holds(&dst, seed, &blocks, &slots);
        copied += n;
    }
    // Consecutive runs go as single copies.
    let (blocks, slots): (Vec<u32>, Vec<u32>) = ((4..20).collect(), (10..26).collect());
    cuda::copy_blocks(&src, &blocks, &mut dst, &slots).expect("d2d run copy");
    assert_device_holds(&dst, seed, &blocks, &slots);
    copied += blocks.len();
    println!(
        "cuda: {}, copied {copied} blocks device-to-device ({BLOCK} bytes each), verified",
        describe(&ctx)
    );
}

#[test]
fn cuda_peer_copy_between_two_devices_is_byte_exact() {
    let Some((ctx, count)) = gpu("cuda_peer_copy_between_two_devices_is_byte_exact") else {
        return;
    };
    if count < 2 {
        println!(
            "skip cuda_peer_copy_between_two_devices_is_byte_exact: {} is the only device",
            describe(&ctx)
        );
        return;
    }
    let seed = 0x9ee2;
    let peer = cuda::open(1).expect("device 1");
    let src = filled_device_pool(&ctx, 8, seed);
    let mut dst = CudaBlockPool::new(&peer, BLOCK, 8).expect("peer pool");
    let (blocks, slots) = ([7, 0, 3, 4], [0, 1, 2, 3]);
    cuda::copy_blocks(&src, &blocks, &mut dst, &slots).expect("peer copy");
    assert_device_holds(&dst, seed, &blocks, &slots);
    println!(
        "cuda: {} -> {}, copied {} blocks peer-to-peer, verified",
        describe(&ctx),
        describe(&peer),
        blocks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_host_staged_tcp_path_is_byte_exact() -> TestResult {
    let Some((ctx, _)) = gpu("cuda_host_staged_tcp_path_is_byte_exact") else {
        return Ok(());
    };
    let seed = 0x57a6;
    // Sending node: device blocks staged into a pinned host pool that a TCP server serves.
    let device_src = filled_device_pool(&ctx, 16, seed);
    let outbox = PinnedHostPool::register(&ctx, Arc::new(BlockPool::new(BLOCK, 16)?))?;
    let (blocks, staged) = (vec![15, 2, 9, 3, 4, 5], vec![0, 1, 2, 3, 4, 5]);
    device_src.download(&blocks, outbox.pool(), &staged)?;
    let server =
        TcpServer::bind("127.0.0.1:0".parse()?, secret(), TcpServerConfig::default()).await?;
    let pools = server.pools();
    let pool = pools.register(outbox.pool().clone())?;
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));

    // Receiving node: TCP into a pinned staging pool, then up to its device.
    let inbox = PinnedHostPool::register(&ctx, Arc::new(BlockPool::new(BLOCK, 8)?))?;
    let mut device_dst = CudaBlockPool::new(&ctx, BLOCK, 16)?;
    let transport = TcpTransport::new(secret(), TcpTransportConfig::default());
    let desc = pools.describe(pool, staged.clone())?;
    let slots = [10, 11, 0, 1, 2, 7];
    let done = timeout(
        DEADLINE,
        cuda::read_into_device(
            &transport,
            &desc,
            inbox.pool(),
            &[7, 6, 5, 4, 3, 2],
            &mut device_dst,
            &slots,
        ),
    )
    .await??;
    assert_eq!(done.blocks, blocks.len());
    assert_device_holds(&device_dst, seed, &blocks, &slots);

    shutdown.cancel();
    timeout(DEADLINE, serving).await???;
    println!(
        "cuda: {}, moved {} blocks device -> pinned host -> tcp -> pinned host -> device, verified",
        describe(&ctx),
        blocks.len()
    );
    Ok(())
}

#[test]
fn cuda_unavailable_is_reported_not_panicked() {
    match cuda::device_count() {
        Ok(n) => println!("cuda: {n} device(s)"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("CUDA"), "{msg}");
            println!("cuda: unavailable as expected here: {msg}");
        }
    }
}
