//! The TCP transport, the default: works between any two hosts.
//!
//! [`TcpServer`] serves reads of the blocks of its registered pools to peers that pass the shared-secret
//! handshake ([`crate::SharedSecret`]). [`TcpTransport`] is the reading side: one request lists every
//! block of a transfer, the answer streams back as one contiguous run of bytes, and the client reads
//! it straight into the destination slots (no intermediate buffer, no per-block allocation). The
//! server writes straight from pool memory with vectored writes; both ends set `TCP_NODELAY`, and
//! connections are kept and reused per peer, so a transfer after the first costs one round trip.
//!
//! Every wait has a deadline: connect and handshake, each request/response step, each block (a
//! peer that goes silent mid-stream fails the transfer with [`Error::Receive`] naming the block), and
//! the server's drain on shutdown.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{self, HandshakeError, SharedSecret};
use crate::descriptor::{BlockSetDescriptor, Endpoint, PoolRegistry, TransportKind};
use crate::error::{Error, RemoteError, Result};
use crate::pool::{BlockMut, BlockPool, BlockRef, check_shape};
use crate::wire::{self, HEADER_LEN, Op, Request, Response};
use crate::{BoxFuture, Completion, KvTransport};

/// Vectored writes carry at most this many blocks per call.
const IOV_BATCH: usize = 64;

// === impl TcpServer ===

/// Server settings.
#[derive(Clone, Debug)]
pub struct TcpServerConfig {
    /// Deadline for a new connection to complete the handshake.
    pub handshake_timeout: Duration,
    /// Deadline for each read of a request and each write of a response.
    pub io_timeout: Duration,
    /// An authenticated connection idle this long is closed (the client reconnects transparently).
    pub idle_timeout: Duration,
    /// On shutdown, how long in-flight responses may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// `SO_SNDBUF`/`SO_RCVBUF` for accepted connections; `None` keeps the kernel's autotuning.
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for TcpServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(5),
            socket_buffer_bytes: None,
        }
    }
}

/// Serves reads of registered pools' blocks over TCP; see the module docs.
pub struct TcpServer {
    listener: TcpListener,
    ctx: Arc<ServerCtx>,
}

struct ServerCtx {
    registry: PoolRegistry,
    secret: SharedSecret,
    config: TcpServerConfig,
}

impl TcpServer {
    /// Binds `addr` (`127.0.0.1:0` picks a free port; see [`Self::local_addr`]).
    pub async fn bind(
        addr: SocketAddr,
        secret: SharedSecret,
        config: TcpServerConfig,
    ) -> Result<Self> {
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            listener,
            ctx: Arc::new(ServerCtx {
                registry: PoolRegistry::new(Endpoint::Tcp { addr: local }, false),
                secret,
                config,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        match self.ctx.registry.endpoint() {
            Endpoint::Tcp { addr } => *addr,
            Endpoint::Shm { .. } => unreachable!("a TCP server's registry has a TCP endpoint"),
        }
    }

    /// The registry of served pools; register pools before or while serving.
    pub fn pools(&self) -> PoolRegistry {
        self.ctx.registry.clone()
    }

    /// Accepts and serves connections until `shutdown` is cancelled, then stops accepting, lets
    /// in-flight responses finish within the drain deadline, and cuts the rest.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        info!(addr = %self.local_addr(), "kv transfer: tcp server listening");
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Per-connection failures (reset before accept, fd exhaustion): back off briefly.
                    warn!(error = %e, "kv transfer: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let ctx = self.ctx.clone();
            let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
            tracker.spawn(async move {
                tokio::select! {
                    () = hard_stop.cancelled() => debug!(%peer, "kv transfer: connection cut at drain deadline"),
                    () = serve_connection(stream, peer, &ctx, &shutdown) => {}
                }
            });
        }
        drop(self.listener);
        tracker.close();
        if timeout(self.ctx.config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!("kv transfer: drain deadline passed, cutting in-flight transfers");
            hard_stop.cancel();
            tracker.wait().await;
        }
        Ok(())
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: &ServerCtx,
    shutdown: &CancellationToken,
) {
    tune(&stream, ctx.config.socket_buffer_bytes);
    match timeout(
        ctx.config.handshake_timeout,
        auth::server_handshake(&mut stream, &ctx.secret),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(HandshakeError::Rejected)) => {
            warn!(%peer, "kv transfer: rejected a peer that does not know the shared secret");
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = ?e, "kv transfer: handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "kv transfer: handshake timed out");
            return;
        }
    }
    let mut ids = Vec::new();
    let mut id_bytes = Vec::new();
    loop {
        let mut header = [0u8; HEADER_LEN];
        let read = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            read = timeout(ctx.config.idle_timeout, stream.read_exact(&mut header)) => read,
        };
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return, // closed by the peer, or idle too long
        }
        if let Err(e) = serve_request(&mut stream, &header, ctx, &mut ids, &mut id_bytes).await {
            debug!(%peer, error = %e, "kv transfer: connection closed");
            return;
        }
    }
}

/// Answers one request. `Err` closes the connection; a refusal that leaves the stream in sync is `Ok`.
async fn serve_request(
    stream: &mut TcpStream,
    header: &[u8; HEADER_LEN],
    ctx: &ServerCtx,
    ids: &mut Vec<u32>,
    id_bytes: &mut Vec<u8>,
) -> io::Result<()> {
    let io_timeout = ctx.config.io_timeout;
    let request = match Request::decode(header) {
        Ok(r) if r.op == Op::Read => r,
        Ok(_) => return refuse_and_close(stream, RemoteError::BadRequest, io_timeout).await,
        Err(reason) => return refuse_and_close(stream, reason, io_timeout).await,
    };
    id_bytes.resize(request.count as usize * 4, 0);
    with_deadline(io_timeout, stream.read_exact(id_bytes)).await?;
    wire::decode_ids(id_bytes, ids);

    let Some(pool) = ctx.registry.get(request.pool) else {
        return refuse(stream, RemoteError::UnknownPool, None, io_timeout).await;
    };
    if request.block_bytes != pool.block_bytes() as u64 {
        return refuse(stream, RemoteError::BlockSizeMismatch, None, io_timeout).await;
    }
    let blocks = match pool.read_many(ids) {
        Ok(blocks) => blocks,
        Err(Error::BlockOutOfRange { block, .. }) => {
            return refuse(
                stream,
                RemoteError::BlockOutOfRange,
                Some(block),
                io_timeout,
            )
            .await;
        }
        Err(Error::BlockBusy { block }) => {
            return refuse(stream, RemoteError::BlockBusy, Some(block), io_timeout).await;
        }
        Err(_) => return refuse(stream, RemoteError::BadRequest, None, io_timeout).await,
    };
    let total = pool.block_bytes() as u64 * blocks.len() as u64;
    let header = Response::Ok { a: total, b: 0 }.encode();
    write_blocks(stream, &header, &blocks, io_timeout).await
}

/// Writes `header` then every block, back to back, in vectored batches.
async fn write_blocks(
    stream: &mut TcpStream,
    header: &[u8],
    blocks: &[BlockRef<'_>],
    io_timeout: Duration,
) -> io::Result<()> {
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_BATCH + 1);
    iov.push(IoSlice::new(header));
    let mut next = 0;
    loop {
        while iov.len() <= IOV_BATCH && next < blocks.len() {
            iov.push(IoSlice::new(&blocks[next]));
            next += 1;
        }
        if iov.is_empty() {
            return Ok(());
        }
        let written = with_deadline(io_timeout, stream.write_vectored(&iov)).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let len = iov.len();
        let consumed = {
            let mut rest = &mut iov[..];
            IoSlice::advance_slices(&mut rest, written);
            len - rest.len()
        };
        iov.drain(..consumed);
    }
}

async fn refuse(
    stream: &mut TcpStream,
    reason: RemoteError,
    block: Option<u32>,
    io_timeout: Duration,
) -> io::Result<()> {
    let frame = Response::Refused { reason, block }.encode();
    with_deadline(io_timeout, stream.write_all(&frame)).await
}

async fn refuse_and_close(
    stream: &mut TcpStream,
    reason: RemoteError,
    io_timeout: Duration,
) -> io::Result<()> {
    refuse(stream, reason, None, io_timeout).await?;
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed request",
    ))
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

fn tune(stream: &TcpStream, buffer_bytes: Option<usize>) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "kv transfer: TCP_NODELAY not set");
    }
    if let Some(bytes) = buffer_bytes {
        let sock = socket2::SockRef::from(stream);
        if let Err(e) = sock
            .set_send_buffer_size(bytes)
            .and_then(|()| sock.set_recv_buffer_size(bytes))
        {
            debug!(error = %e, "kv transfer: socket buffer size not set");
        }
    }
}

// === impl TcpTransport ===

/// Client settings.
#[derive(Clone, Debug)]
pub struct TcpTransportConfig {
    /// Deadline for connecting and for the handshake, each.
    pub connect_timeout: Duration,
    /// Deadline for sending the request, for the response header, and for each block.
    pub io_timeout: Duration,
    /// Authenticated connections kept per peer for reuse.
    pub max_idle_per_peer: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF`; `None` keeps the kernel's autotuning.
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for TcpTransportConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            max_idle_per_peer: 8,
            socket_buffer_bytes: None,
        }
    }
}

/// Reads blocks from [`TcpServer`]s; see the module docs. Share one per process.
pub struct TcpTransport {
    secret: SharedSecret,
    config: TcpTransportConfig,
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How one attempt on one connection failed.
enum Attempt {
    /// Failed before any response byte arrived on a possibly stale pooled connection: retry fresh.
    Stale(Error),
    Failed(Error),
}

impl TcpTransport {
    pub fn new(secret: SharedSecret, config: TcpTransportConfig) -> Self {
        Self {
            secret,
            config,
            idle: Mutex::default(),
        }
    }

    /// Reads `src`'s blocks into `dst_slots` of `dst`; see [`KvTransport::read_blocks`].
    pub async fn read(
        &self,
        src: &BlockSetDescriptor,
        dst: &BlockPool,
        dst_slots: &[u32],
    ) -> Result<Completion> {
        let start = Instant::now();
        let Endpoint::Tcp { addr } = src.endpoint else {
            return Err(Error::EndpointMismatch {
                expected: TransportKind::Tcp,
                got: src.endpoint.kind(),
            });
        };
        check_shape(
            src.blocks.len(),
            dst_slots.len(),
            src.block_bytes,
            dst.block_bytes() as u64,
        )?;
        let mut slots = dst.write_many(dst_slots)?;
        if !src.blocks.is_empty() {
            let mut request = Vec::with_capacity(HEADER_LEN + 4 * src.blocks.len());
            request.extend_from_slice(
                &Request {
                    op: Op::Read,
                    count: u32::try_from(src.blocks.len()).map_err(|_| Error::Refused {
                        peer: src.endpoint.clone(),
                        reason: RemoteError::TooManyBlocks,
                        block: None,
                    })?,
                    pool: src.pool,
                    block_bytes: src.block_bytes,
                }
                .encode(),
            );
            wire::encode_ids(&src.blocks, &mut request);

            let pooled = self.take_idle(addr);
            let conn = match pooled {
                Some(conn) => match self.exchange(conn, src, &request, &mut slots).await {
                    Ok(conn) => Some(conn),
                    Err(Attempt::Stale(e)) => {
                        debug!(error = %e, "kv transfer: pooled connection was stale, reconnecting");
                        None
                    }
                    Err(Attempt::Failed(e)) => return Err(e),
                },
                None => None,
            };
            let conn = match conn {
                Some(conn) => conn,
                None => {
                    let fresh = self.connect(addr, &src.endpoint).await?;
                    match self.exchange(fresh, src, &request, &mut slots).await {
                        Ok(conn) => conn,
                        Err(Attempt::Stale(e) | Attempt::Failed(e)) => return Err(e),
                    }
                }
            };
            self.put_idle(addr, conn);
        }
        Ok(Completion {
            blocks: src.blocks.len(),
            bytes: src.total_bytes(),
            elapsed: start.elapsed(),
        })
    }

    /// One request/response on `conn`; gives the connection back when it is still in sync.
    async fn exchange(
        &self,
        mut conn: TcpStream,
        src: &BlockSetDescriptor,
        request: &[u8],
        slots: &mut [BlockMut<'_>],
    ) -> Result<TcpStream, Attempt> {
        let peer = &src.endpoint;
        let io_timeout = self.config.io_timeout;
        let timed_out = |op| Error::Timeout {
            peer: peer.clone(),
            op,
            after: io_timeout,
        };
        let request_failed = |source| {
            Attempt::Stale(Error::Request {
                peer: peer.clone(),
                source,
            })
        };

        match timeout(io_timeout, conn.write_all(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(request_failed(e)),
            Err(_) => return Err(Attempt::Failed(timed_out("sending a read request"))),
        }
        let mut header = [0u8; HEADER_LEN];
        match timeout(io_timeout, conn.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(request_failed(e)),
            Err(_) => return Err(Attempt::Failed(timed_out("waiting for a read response"))),
        }
        match Response::decode(&header) {
            Response::Refused { reason, block } => {
                return Err(Attempt::Failed(Error::Refused {
                    peer: peer.clone(),
                    reason,
                    block,
                }));
            }
            Response::Ok { a: total, .. } if total != src.total_bytes() => {
                return Err(Attempt::Failed(Error::Protocol {
                    peer: peer.clone(),
                    what: "response length differs from the request",
                }));
            }
            Response::Ok { .. } => {}
        }
        let total_blocks = slots.len();
        for (i, slot) in slots.iter_mut().enumerate() {
            let received = match timeout(io_timeout, conn.read_exact(&mut slot[..])).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(source)) => Err(source),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete block within the I/O deadline",
                )),
            };
            if let Err(source) = received {
                return Err(Attempt::Failed(Error::Receive {
                    peer: peer.clone(),
                    block: src.blocks[i],
                    slot: slot.index(),
                    received_blocks: i,
                    total_blocks,
                    source,
                }));
            }
        }
        Ok(conn)
    }

    async fn connect(&self, addr: SocketAddr, peer: &Endpoint) -> Result<TcpStream> {
        let connect_err = |source| Error::Connect {
            peer: peer.clone(),
            source,
        };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(connect_err)?;
        if let Some(bytes) = self.config.socket_buffer_bytes {
            let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
            if let Err(e) = socket
                .set_recv_buffer_size(bytes)
                .and_then(|()| socket.set_send_buffer_size(bytes))
            {
                debug!(error = %e, "kv transfer: socket buffer size not set");
            }
        }
        let after = self.config.connect_timeout;
        let mut stream = timeout(after, socket.connect(addr))
            .await
            .map_err(|_| Error::Timeout {
                peer: peer.clone(),
                op: "connecting",
                after,
            })?
            .map_err(connect_err)?;
        tune(&stream, None);
        timeout(after, auth::client_handshake(&mut stream, &self.secret))
            .await
            .map_err(|_| Error::Timeout {
                peer: peer.clone(),
                op: "authenticating",
                after,
            })?
            .map_err(|e| auth::client_error(peer, e))?;
        Ok(stream)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&addr)
            .and_then(Vec::pop)
    }

    fn put_idle(&self, addr: SocketAddr, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.entry(addr).or_default();
        if conns.len() < self.config.max_idle_per_peer {
            conns.push(conn);
        }
    }

    /// Closes every pooled connection.
    pub fn clear_idle(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl KvTransport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn read_blocks<'a>(
        &'a self,
        src: &'a BlockSetDescriptor,
        dst: &'a BlockPool,
        dst_slots: &'a [u32],
    ) -> BoxFuture<'a, Result<Completion>> {
        Box::pin(self.read(src, dst, dst_slots))
    }
}
