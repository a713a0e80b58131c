//! KV block transfer throughput against a single-thread `memcpy` of the same blocks.
//!
//! Run: `cargo bench -p dynamo-transfer --bench transfer -- --warm-up-time 1 --measurement-time 3`
//!
//! Default geometry (8B-class Llama, bf16, 64-token blocks: 8 MiB a block). Group `bulk_128MiB` moves
//! 16 blocks in shuffled order into 16 slots; group `one_block_8MiB` moves one block, so its time
//! minus the `memcpy` time is the per-transfer overhead of each transport. In both groups `memcpy` is
//! the baseline: the same source blocks copied into the same destination slots by one thread. TCP
//! runs over loopback with client and server in this process (one connection, reused); shared memory
//! maps the source pool's memfd once and then only copies.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dynamo_transfer::{
    BlockPool, BlockSetDescriptor, KvGeometry, SharedSecret, ShmServer, ShmServerConfig,
    ShmTransport, ShmTransportConfig, TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig,
    testing,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const BLOCKS: usize = 16;

struct Setup {
    rt: Runtime,
    src: Arc<BlockPool>,
    dst: BlockPool,
    tcp: TcpTransport,
    shm: ShmTransport,
    tcp_desc: BlockSetDescriptor,
    shm_desc: BlockSetDescriptor,
    shutdown: CancellationToken,
}

fn setup(blocks: Vec<u32>) -> Setup {
    let block_bytes = KvGeometry::default().block_bytes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let src = Arc::new(BlockPool::new_shared(block_bytes, BLOCKS).expect("source pool"));
    testing::fill_pool(&src, 1).expect("fill");
    let dst = BlockPool::new(block_bytes, BLOCKS).expect("destination pool");
    let secret = SharedSecret::new(b"bench-shared-secret-0123456789".to_vec()).expect("secret");
    let shutdown = CancellationToken::new();
    let socket =
        std::env::temp_dir().join(format!("dynamo-transfer-bench-{}.sock", std::process::id()));
    let (tcp_desc, shm_desc) = rt.block_on(async {
        let tcp = TcpServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            secret.clone(),
            TcpServerConfig::default(),
        )
        .await
        .expect("tcp bind");
        let shm =
            ShmServer::bind(socket, secret.clone(), ShmServerConfig::default()).expect("shm bind");
        let (tcp_pools, shm_pools) = (tcp.pools(), shm.pools());
        tokio::spawn(tcp.serve(shutdown.clone()));
        tokio::spawn(shm.serve(shutdown.clone()));
        let tcp_id = tcp_pools.register(src.clone()).expect("register");
        let shm_id = shm_pools.register(src.clone()).expect("register");
        (
            tcp_pools
                .describe(tcp_id, blocks.clone())
                .expect("describe"),
            shm_pools.describe(shm_id, blocks).expect("describe"),
        )
    });
    Setup {
        rt,
        src,
        dst,
        tcp: TcpTransport::new(secret.clone(), TcpTransportConfig::default()),
        shm: ShmTransport::new(secret, ShmTransportConfig::default()),
        tcp_desc,
        shm_desc,
        shutdown,
    }
}

fn group(c: &mut Criterion, name: &str, blocks: Vec<u32>) {
    let slots: Vec<u32> = (0..blocks.len() as u32).collect();
    let s = setup(blocks.clone());
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(s.tcp_desc.total_bytes()));
    g.sample_size(20);
    g.bench_function(BenchmarkId::from_parameter("memcpy"), |b| {
        b.iter(|| {
            testing::copy_blocks(&s.src, black_box(&blocks), &s.dst, &slots).expect("memcpy")
        });
    });
    g.bench_function(BenchmarkId::from_parameter("tcp_loopback"), |b| {
        b.iter(|| {
            s.rt.block_on(s.tcp.read(&s.tcp_desc, &s.dst, &slots))
                .expect("tcp read")
        });
    });
    g.bench_function(BenchmarkId::from_parameter("shm"), |b| {
        b.iter(|| {
            s.rt.block_on(s.shm.read(&s.shm_desc, &s.dst, &slots))
                .expect("shm read")
        });
    });
    g.finish();
    let bad = testing::verify_slots(&s.dst, 1, &blocks, &slots).expect("verify");
    assert_eq!(bad, None, "benchmarked transfers delivered the right bytes");
    s.shutdown.cancel();
}

fn transfer(c: &mut Criterion) {
    let mut blocks: Vec<u32> = (0..BLOCKS as u32).collect();
    blocks.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(7));
    group(c, "bulk_128MiB", blocks);
    group(c, "one_block_8MiB", vec![5]);
}

criterion_group!(benches, transfer);
criterion_main!(benches);
