//! The shared-memory transport against a real server on a Unix socket: the memfd travels over
//! `SCM_RIGHTS`, is mapped read-only, and blocks are copied byte-exact. Failure cases end in an
//! error, never a hang: a bad secret, a peer that hangs up or goes silent mid-handshake, a block out
//! of range in the middle of a set (caught before any byte is copied).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{DEADLINE, TestResult, assert_delivered, filled_pool, random_set, rng, secret};
use dynamo_transfer::{
    BlockPool, BlockSetDescriptor, Endpoint, Error, KvTransport, PoolId, PoolRegistry, ShmServer,
    ShmServerConfig, ShmTransport, ShmTransportConfig, TcpServer, TcpServerConfig, TcpTransport,
    TcpTransportConfig,
};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

struct Served {
    socket: PathBuf,
    pools: PoolRegistry,
    shutdown: CancellationToken,
    task: JoinHandle<dynamo_transfer::Result<()>>,
}

fn serve(tag: &str) -> Served {
    let server = ShmServer::bind(
        common::socket_path(tag),
        secret(),
        ShmServerConfig::default(),
    )
    .expect("bind");
    let (socket, pools) = (server.socket_path().to_path_buf(), server.pools());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    Served {
        socket,
        pools,
        shutdown,
        task,
    }
}

impl Served {
    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = timeout(DEADLINE, self.task).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "server stops cleanly: {stopped:?}"
        );
        assert!(!self.socket.exists(), "socket file removed");
    }
}

fn client() -> ShmTransport {
    ShmTransport::new(
        secret(),
        ShmTransportConfig {
            connect_timeout: Duration::from_millis(500),
            io_timeout: Duration::from_millis(500),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_delivers_random_block_sets_byte_exact() -> TestResult {
    let (block_bytes, seed) = (96 * 1024 + 8, 0xabc);
    let server = serve("exact");
    let pool = server
        .pools
        .register(Arc::new(filled_pool(block_bytes, 40, seed, true)))?;
    let dst = BlockPool::new(block_bytes, 64)?;
    let transport = client();
    let mut rng = rng(2);
    for n in [1, 40, 64, 9] {
        let (blocks, slots) = random_set(&mut rng, 40, 64, n);
        let desc = server.pools.describe(pool, blocks.clone())?;
        let done = timeout(DEADLINE, transport.read(&desc, &dst, &slots)).await??;
        assert_eq!(done.bytes, (n * block_bytes) as u64);
        assert_delivered(&dst, seed, &blocks, &slots);
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn shm_sees_blocks_written_after_mapping() -> TestResult {
    let server = serve("live");
    let src = Arc::new(filled_pool(4096, 4, 1, true));
    let pool = server.pools.register(src.clone())?;
    let dst = BlockPool::new(4096, 4)?;
    let transport = client();
    let desc = server.pools.describe(pool, vec![2])?;
    timeout(DEADLINE, transport.read(&desc, &dst, &[0])).await??;
    assert_delivered(&dst, 1, &[2], &[0]);
    // The owner writes new content into block 2 through the pool; the peer's mapping sees it.
    dynamo_transfer::testing::fill_block(&mut src.write(2)?, 99, 2);
    timeout(DEADLINE, transport.read(&desc, &dst, &[1])).await??;
    assert_delivered(&dst, 99, &[2], &[1]);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn shm_rejects_a_client_with_the_wrong_secret() -> TestResult {
    let server = serve("secret");
    let pool = server
        .pools
        .register(Arc::new(filled_pool(4096, 2, 1, true)))?;
    let desc = server.pools.describe(pool, vec![0])?;
    let dst = BlockPool::new(4096, 2)?;
    let intruder = ShmTransport::new(common::other_secret(), ShmTransportConfig::default());
    let got = timeout(DEADLINE, intruder.read(&desc, &dst, &[0])).await?;
    assert!(matches!(got, Err(Error::AuthRejected { .. })), "{got:?}");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn shm_out_of_range_block_mid_set_fails_before_copying() -> TestResult {
    let server = serve("range");
    let pool = server
        .pools
        .register(Arc::new(filled_pool(1024, 4, 1, true)))?;
    let mut desc = server.pools.describe(pool, vec![0, 1, 2])?;
    desc.blocks[1] = 4;
    let dst = BlockPool::new(1024, 4)?;
    let got = timeout(DEADLINE, client().read(&desc, &dst, &[0, 1, 2])).await?;
    assert!(
        matches!(
            got,
            Err(Error::BlockOutOfRange {
                block: 4,
                num_blocks: 4
            })
        ),
        "{got:?}"
    );
    assert!(dst.read(0)?.iter().all(|&b| b == 0), "nothing was copied");

    let unknown = BlockSetDescriptor {
        pool: PoolId(pool.0 ^ 1),
        ..server.pools.describe(pool, vec![0])?
    };
    let got = timeout(DEADLINE, client().read(&unknown, &dst, &[0])).await?;
    assert!(matches!(got, Err(Error::Refused { .. })), "{got:?}");
    server.stop().await;
    Ok(())
}

fn desc_at(socket: PathBuf) -> BlockSetDescriptor {
    BlockSetDescriptor {
        endpoint: Endpoint::Shm { socket },
        pool: PoolId(1),
        block_bytes: 1024,
        blocks: vec![0],
    }
}

#[tokio::test]
async fn shm_peer_that_hangs_up_mid_handshake_fails_without_hanging() -> TestResult {
    let socket = common::socket_path("hangup");
    let listener = UnixListener::bind(&socket)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let dst = BlockPool::new(1024, 1)?;
    let got = timeout(
        DEADLINE,
        client().read(&desc_at(socket.clone()), &dst, &[0]),
    )
    .await?;
    assert!(matches!(got, Err(Error::Handshake { .. })), "{got:?}");
    let _ = std::fs::remove_file(socket);
    Ok(())
}

#[tokio::test]
async fn shm_peer_silent_mid_handshake_times_out() -> TestResult {
    let socket = common::socket_path("silent");
    let listener = UnixListener::bind(&socket)?;
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = held_tx.send(stream); // keep it open, say nothing
        }
    });
    let dst = BlockPool::new(1024, 1)?;
    let got = timeout(
        DEADLINE,
        client().read(&desc_at(socket.clone()), &dst, &[0]),
    )
    .await?;
    assert!(
        matches!(
            got,
            Err(Error::Timeout {
                op: "authenticating",
                ..
            })
        ),
        "{got:?}"
    );
    held_rx.close();
    let _ = std::fs::remove_file(socket);
    Ok(())
}

#[tokio::test]
async fn shm_mapping_outlives_the_server_until_forgotten() -> TestResult {
    let seed = 4;
    let server = serve("outlive");
    let pool = server
        .pools
        .register(Arc::new(filled_pool(2048, 4, seed, true)))?;
    let desc = server.pools.describe(pool, vec![3, 1])?;
    let dst = BlockPool::new(2048, 4)?;
    let transport = client();
    timeout(DEADLINE, transport.read(&desc, &dst, &[0, 1])).await??;
    let socket = server.socket.clone();
    server.stop().await;

    timeout(DEADLINE, transport.read(&desc, &dst, &[2, 3])).await??;
    assert_delivered(&dst, seed, &[3, 1, 3, 1], &[0, 1, 2, 3]);

    transport.forget(&socket);
    let got = timeout(DEADLINE, transport.read(&desc, &dst, &[0, 1])).await?;
    assert!(matches!(got, Err(Error::Connect { .. })), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn transports_are_interchangeable_as_trait_objects() -> TestResult {
    let seed = 8;
    let src = Arc::new(filled_pool(8192, 8, seed, true));
    let shm = serve("dyn");
    let tcp = TcpServer::bind("127.0.0.1:0".parse()?, secret(), TcpServerConfig::default()).await?;
    let tcp_pools = tcp.pools();
    let shutdown = CancellationToken::new();
    let tcp_task = tokio::spawn(tcp.serve(shutdown.clone()));

    let descs = [
        shm.pools
            .describe(shm.pools.register(src.clone())?, vec![7, 0])?,
        tcp_pools.describe(tcp_pools.register(src.clone())?, vec![5, 6])?,
    ];
    let transports: Vec<Arc<dyn KvTransport>> = vec![
        Arc::new(client()),
        Arc::new(TcpTransport::new(secret(), TcpTransportConfig::default())),
    ];
    let dst = BlockPool::new(8192, 4)?;
    for (i, desc) in descs.iter().enumerate() {
        let transport = transports
            .iter()
            .find(|t| t.kind() == desc.endpoint.kind())
            .ok_or("no transport for the endpoint")?;
        let slots = [2 * i as u32, 2 * i as u32 + 1];
        timeout(DEADLINE, transport.read_blocks(desc, &dst, &slots)).await??;
    }
    assert_delivered(&dst, seed, &[7, 0, 5, 6], &[0, 1, 2, 3]);

    // A transport handed the other kind's descriptor says so.
    let got = transports[0].read_blocks(&descs[1], &dst, &[0, 1]).await;
    assert!(
        matches!(got, Err(Error::EndpointMismatch { .. })),
        "{got:?}"
    );

    shutdown.cancel();
    timeout(DEADLINE, tcp_task).await???;
    shm.stop().await;
    Ok(())
}
