//! The TCP transport against a real server on `127.0.0.1:0`: byte-exact delivery, authentication,
//! refusals, and failures part-way through a transfer (connection dropped, peer silent, server shut
//! down), each of which must end in an error naming the block, never a hang or a panic.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{DEADLINE, TestResult, assert_delivered, filled_pool, random_set, rng, secret};
use dynamo_transfer::{
    BlockPool, BlockSetDescriptor, Error, KvGeometry, KvTransport, PoolId, PoolRegistry,
    RemoteError, TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig, testing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

struct Served {
    addr: SocketAddr,
    pools: PoolRegistry,
    shutdown: CancellationToken,
    task: JoinHandle<dynamo_transfer::Result<()>>,
}

async fn serve(config: TcpServerConfig) -> Served {
    serve_at("127.0.0.1:0".parse().expect("addr"), config).await
}

async fn serve_at(addr: SocketAddr, config: TcpServerConfig) -> Served {
    let server = TcpServer::bind(addr, secret(), config).await.expect("bind");
    let (addr, pools) = (server.local_addr(), server.pools());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    Served {
        addr,
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
    }
}

fn client(io_timeout: Duration) -> TcpTransport {
    TcpTransport::new(
        secret(),
        TcpTransportConfig {
            io_timeout,
            connect_timeout: Duration::from_secs(5),
            ..TcpTransportConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_delivers_random_block_sets_byte_exact() -> TestResult {
    let (block_bytes, seed) = (64 * 1024 + 24, 0x5eed);
    let server = serve(TcpServerConfig::default()).await;
    // The sidecar serves memfd-backed pools; both kinds are served alike.
    for shared in [true, false] {
        let pool = server
            .pools
            .register(Arc::new(filled_pool(block_bytes, 48, seed, shared)))?;
        let dst = BlockPool::new(block_bytes, 64)?;
        let transport = client(Duration::from_secs(10));
        let mut rng = rng(1);
        let mut sets: Vec<_> = [1, 7, 48, 64, 3]
            .into_iter()
            .map(|n| random_set(&mut rng, 48, 64, n))
            .collect();
        // Runs of blocks adjacent in the pool, out of order.
        sets.push((vec![10, 11, 12, 13, 2, 3, 47], vec![0, 1, 2, 3, 4, 5, 6]));
        for (blocks, slots) in sets {
            let n = blocks.len();
            let desc = server.pools.describe(pool, blocks.clone())?;
            let done = timeout(DEADLINE, transport.read(&desc, &dst, &slots)).await??;
            assert_eq!(done.blocks, n);
            assert_eq!(done.bytes, (n * block_bytes) as u64);
            assert_delivered(&dst, seed, &blocks, &slots);
        }
    }
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_delivers_default_geometry_blocks_through_the_trait_object() -> TestResult {
    let geometry = KvGeometry::default();
    let seed = 77;
    let server = serve(TcpServerConfig::default()).await;
    let src = Arc::new(BlockPool::for_geometry(&geometry, 4)?);
    testing::fill_pool(&src, seed)?;
    let pool = server.pools.register(src)?;
    let dst = BlockPool::for_geometry(&geometry, 4)?;
    let transport: Arc<dyn KvTransport> = Arc::new(client(Duration::from_secs(10)));
    let (blocks, slots) = (vec![3, 0, 2], vec![1, 3, 0]);
    let desc = server.pools.describe(pool, blocks.clone())?;
    let done = timeout(DEADLINE, transport.read_blocks(&desc, &dst, &slots)).await??;
    assert_eq!(done.bytes, 3 * 8 * 1024 * 1024);
    assert_delivered(&dst, seed, &blocks, &slots);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn tcp_rejects_a_client_with_the_wrong_secret() -> TestResult {
    let server = serve(TcpServerConfig::default()).await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(4096, 4, 1, false)))?;
    let desc = server.pools.describe(pool, vec![0, 1])?;
    let dst = BlockPool::new(4096, 4)?;
    let intruder = TcpTransport::new(common::other_secret(), TcpTransportConfig::default());
    let got = timeout(DEADLINE, intruder.read(&desc, &dst, &[0, 1])).await?;
    assert!(
        matches!(got, Err(Error::AuthRejected { .. })),
        "wrong secret is rejected: {got:?}"
    );
    let msg = got.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("rejected our credentials"), "{msg}");
    // The server is unharmed and still serves the right secret.
    let done = timeout(DEADLINE, client(DEADLINE).read(&desc, &dst, &[0, 1])).await??;
    assert_eq!(done.blocks, 2);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn tcp_refuses_out_of_range_blocks_unknown_pools_and_size_mismatch() -> TestResult {
    let server = serve(TcpServerConfig::default()).await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(1024, 8, 3, false)))?;
    let dst = BlockPool::new(1024, 8)?;
    let transport = client(DEADLINE);

    let mut desc = server.pools.describe(pool, vec![1, 2, 3])?;
    desc.blocks[1] = 999;
    let got = timeout(DEADLINE, transport.read(&desc, &dst, &[0, 1, 2])).await?;
    assert!(
        matches!(
            got,
            Err(Error::Refused {
                reason: RemoteError::BlockOutOfRange,
                block: Some(999),
                ..
            })
        ),
        "{got:?}"
    );

    let unknown = BlockSetDescriptor {
        pool: PoolId(pool.0 ^ 1),
        ..server.pools.describe(pool, vec![1])?
    };
    let got = timeout(DEADLINE, transport.read(&unknown, &dst, &[0])).await?;
    assert!(
        matches!(
            got,
            Err(Error::Refused {
                reason: RemoteError::UnknownPool,
                ..
            })
        ),
        "{got:?}"
    );

    let wrong_size = BlockPool::new(2048, 2)?;
    let desc = server.pools.describe(pool, vec![1])?;
    let got = transport.read(&desc, &wrong_size, &[0]).await;
    assert!(
        matches!(got, Err(Error::BlockSizeMismatch { .. })),
        "{got:?}"
    );

    // A good read on the same transport still works.
    timeout(DEADLINE, transport.read(&desc, &dst, &[5])).await??;
    assert_delivered(&dst, 3, &[1], &[5]);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn tcp_busy_destination_slot_fails_before_any_io() -> TestResult {
    let server = serve(TcpServerConfig::default()).await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(512, 4, 3, false)))?;
    let dst = BlockPool::new(512, 4)?;
    let held = dst.write(2)?;
    let desc = server.pools.describe(pool, vec![0, 1])?;
    let got = client(DEADLINE).read(&desc, &dst, &[1, 2]).await;
    assert!(matches!(got, Err(Error::BlockBusy { block: 2 })), "{got:?}");
    drop(held);
    server.stop().await;
    Ok(())
}

// === failures part-way through a transfer ===

/// What a [`proxy`] does once it has forwarded `after` bytes from the server to the client.
enum Cut {
    /// Close both connections.
    Drop,
    /// Stop forwarding but keep both connections open.
    Stall,
    /// Stop forwarding, report, wait to be resumed, then forward the rest until the server closes.
    Pause {
        paused: oneshot::Sender<()>,
        resume: oneshot::Receiver<()>,
    },
}

/// A one-connection TCP proxy in front of `upstream` that interferes with the server-to-client
/// direction after `after` bytes. Returns the address to connect to.
async fn proxy(upstream: SocketAddr, after: usize, cut: Cut) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
    let addr = listener.local_addr().expect("proxy addr");
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("proxy accept");
        // A small fixed receive buffer (no autotuning) so a paused proxy stalls the server after a
        // few MiB whatever the host's TCP sysctls are.
        let socket = TcpSocket::new_v4().expect("proxy socket");
        socket
            .set_recv_buffer_size(64 * 1024)
            .expect("proxy rcvbuf");
        let server = socket.connect(upstream).await.expect("proxy connect");
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let upstream_copy =
            tokio::spawn(async move { tokio::io::copy(&mut client_rx, &mut server_tx).await });
        let mut buf = vec![0u8; 256 * 1024];
        let mut forwarded = 0;
        while forwarded < after {
            let want = buf.len().min(after - forwarded);
            let n = server_rx.read(&mut buf[..want]).await.expect("proxy read");
            if n == 0 {
                break;
            }
            client_tx.write_all(&buf[..n]).await.expect("proxy write");
            forwarded += n;
        }
        match cut {
            Cut::Drop => upstream_copy.abort(),
            Cut::Stall => {
                // Hold both connections open, forwarding nothing, until the test ends.
                std::future::pending::<()>().await;
            }
            Cut::Pause { paused, resume } => {
                let _ = paused.send(());
                let _ = resume.await;
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                upstream_copy.abort();
            }
        }
    });
    addr
}

/// Server-to-client bytes before the first block: the handshake (greeting 40, verdict 33) and the
/// response header (24).
const PREAMBLE: usize = 40 + 33 + 24;

fn via(desc: &BlockSetDescriptor, addr: SocketAddr) -> BlockSetDescriptor {
    BlockSetDescriptor {
        endpoint: dynamo_transfer::Endpoint::Tcp { addr },
        ..desc.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_dropped_mid_stream_fails_naming_the_block() -> TestResult {
    let (block_bytes, seed) = (256 * 1024, 11);
    let server = serve(TcpServerConfig::default()).await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(block_bytes, 8, seed, true)))?;
    let desc = server.pools.describe(pool, vec![7, 6, 5, 4, 3])?;
    let slots = [0, 1, 2, 3, 4];
    let cut_at = PREAMBLE + 2 * block_bytes + block_bytes / 2;
    let addr = proxy(server.addr, cut_at, Cut::Drop).await;
    let dst = BlockPool::new(block_bytes, 8)?;

    let got = timeout(
        DEADLINE,
        client(DEADLINE).read(&via(&desc, addr), &dst, &slots),
    )
    .await?;
    match got {
        Err(Error::Receive {
            block: 5,
            slot: 2,
            received_blocks: 2,
            total_blocks: 5,
            ref source,
            ..
        }) => assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected a receive error at block 5: {other:?}"),
    }
    // The blocks that landed before the cut are intact.
    assert_delivered(&dst, seed, &[7, 6], &[0, 1]);
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peer_silent_mid_stream_times_out_naming_the_block() -> TestResult {
    let block_bytes = 128 * 1024;
    let server = serve(TcpServerConfig::default()).await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(block_bytes, 4, 5, true)))?;
    let desc = server.pools.describe(pool, vec![0, 1, 2, 3])?;
    let addr = proxy(server.addr, PREAMBLE + block_bytes + 100, Cut::Stall).await;
    let dst = BlockPool::new(block_bytes, 4)?;

    let transport = client(Duration::from_millis(300));
    let got = timeout(
        DEADLINE,
        transport.read(&via(&desc, addr), &dst, &[3, 2, 1, 0]),
    )
    .await?;
    match got {
        Err(Error::Receive {
            block: 1,
            slot: 2,
            received_blocks: 1,
            ref source,
            ..
        }) => assert_eq!(source.kind(), std::io::ErrorKind::TimedOut),
        other => panic!("expected a timed-out receive at block 1: {other:?}"),
    }
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_server_shut_down_mid_stream_fails_the_transfer() -> TestResult {
    let (block_bytes, seed) = (4 * 1024 * 1024, 21);
    let server = serve(TcpServerConfig {
        drain_timeout: Duration::ZERO,
        ..TcpServerConfig::default()
    })
    .await;
    let pool = server
        .pools
        .register(Arc::new(filled_pool(block_bytes, 16, seed, true)))?;
    let blocks: Vec<u32> = (0..16).rev().collect();
    let slots: Vec<u32> = (0..16).collect();
    let desc = server.pools.describe(pool, blocks.clone())?;
    let (paused_tx, paused_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel();
    let addr = proxy(
        server.addr,
        PREAMBLE + block_bytes + block_bytes / 2,
        Cut::Pause {
            paused: paused_tx,
            resume: resume_rx,
        },
    )
    .await;
    let dst = Arc::new(BlockPool::new(block_bytes, 16)?);

    let reader = {
        let (dst, desc, slots) = (dst.clone(), via(&desc, addr), slots.clone());
        tokio::spawn(async move { client(DEADLINE).read(&desc, &dst, &slots).await })
    };
    timeout(DEADLINE, paused_rx).await??;
    // The server is blocked writing a 64 MiB response into full socket buffers: kill it.
    server.stop().await;
    let _ = resume_tx.send(());

    let got = timeout(DEADLINE, reader).await??;
    let received = match got {
        Err(Error::Receive {
            received_blocks,
            total_blocks: 16,
            ..
        }) => received_blocks,
        other => panic!("expected a receive error: {other:?}"),
    };
    assert!((1..16).contains(&received), "received {received}");
    assert_delivered(&dst, seed, &blocks[..received], &slots[..received]);
    Ok(())
}

#[tokio::test]
async fn tcp_reconnects_when_a_pooled_connection_went_stale() -> TestResult {
    let seed = 9;
    let first = serve(TcpServerConfig::default()).await;
    let addr = first.addr;
    let pool = first
        .pools
        .register(Arc::new(filled_pool(2048, 4, seed, false)))?;
    let dst = BlockPool::new(2048, 4)?;
    let transport = client(DEADLINE);
    let desc = first.pools.describe(pool, vec![1])?;
    timeout(DEADLINE, transport.read(&desc, &dst, &[0])).await??;
    first.stop().await; // closes the connection the transport keeps pooled

    // A new server on the same address: the transport notices the stale connection and reconnects.
    let second = serve_at(addr, TcpServerConfig::default()).await;
    let pool = second
        .pools
        .register(Arc::new(filled_pool(2048, 4, seed, false)))?;
    let desc = second.pools.describe(pool, vec![3, 2])?;
    timeout(DEADLINE, transport.read(&desc, &dst, &[0, 1])).await??;
    timeout(DEADLINE, transport.read(&desc, &dst, &[2, 3])).await??;
    assert_delivered(&dst, seed, &[3, 2, 3, 2], &[0, 1, 2, 3]);
    second.stop().await;

    // With no server at all, a read fails to connect, promptly.
    let got = timeout(DEADLINE, transport.read(&desc, &dst, &[1, 0])).await?;
    assert!(matches!(got, Err(Error::Connect { .. })), "{got:?}");
    Ok(())
}
