//! The shared-memory transport: same host, one `memcpy` per block.
//!
//! The serving process keeps its pool in a sealed memfd ([`BlockPool::new_shared`]) and registers it
//! with a [`ShmServer`] listening on a Unix socket. A reader ([`ShmTransport`]) connects once per pool,
//! passes the shared-secret handshake, and receives a **read-only** reopened descriptor of the memfd
//! over `SCM_RIGHTS`; it maps it read-only and from then on a transfer is a plain copy from that
//! mapping into its own pool slots, with no socket traffic at all. The mapping is cached per
//! (socket, pool), and outlives the connection and even the serving process.
//!
//! Block lifetime is the caller's contract, as with RDMA or NIXL: a serving process must not rewrite
//! blocks named in a descriptor until the reader has finished with them (the per-block locks of
//! [`BlockPool`] only order users inside one process). Unregistering a pool does not revoke mappings
//! peers already hold.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapOptions};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{self, HandshakeError, SharedSecret};
use crate::descriptor::{BlockSetDescriptor, Endpoint, PoolId, PoolRegistry, TransportKind};
use crate::error::{Error, RemoteError, Result};
use crate::pool::{BlockPool, check_shape};
use crate::wire::{HEADER_LEN, Op, Request, Response};
use crate::{BoxFuture, Completion, KvTransport};

/// Copies yield to the runtime after about this many bytes, so a large transfer does not starve
/// other tasks on the same worker thread.
const YIELD_EVERY_BYTES: usize = 32 << 20;

// === impl ShmServer ===

/// Server settings.
#[derive(Clone, Debug)]
pub struct ShmServerConfig {
    /// Deadline for a new connection to complete the handshake.
    pub handshake_timeout: Duration,
    /// Deadline for each request read and response write.
    pub io_timeout: Duration,
    /// An idle authenticated connection is closed after this long.
    pub idle_timeout: Duration,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
}

impl Default for ShmServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(2),
        }
    }
}

/// Hands read-only descriptors of registered shared pools to authenticated local peers.
pub struct ShmServer {
    listener: UnixListener,
    socket: SocketFile,
    ctx: Arc<ServerCtx>,
}

struct ServerCtx {
    registry: PoolRegistry,
    secret: SharedSecret,
    config: ShmServerConfig,
}

/// Removes the socket file when the server goes away.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ShmServer {
    /// Listens on the Unix socket `path`. A stale socket file left by a dead server is replaced; a
    /// live one is an error. Must be called inside a tokio runtime.
    pub fn bind(
        path: impl Into<PathBuf>,
        secret: SharedSecret,
        config: ShmServerConfig,
    ) -> Result<Self> {
        let path = path.into();
        let bind_err = |source| Error::Bind {
            addr: path.display().to_string(),
            source,
        };
        let listener = match UnixListener::bind(&path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale(&path) => {
                std::fs::remove_file(&path).map_err(bind_err)?;
                UnixListener::bind(&path)
            }
            other => other,
        }
        .map_err(bind_err)?;
        Ok(Self {
            listener,
            socket: SocketFile(path.clone()),
            ctx: Arc::new(ServerCtx {
                registry: PoolRegistry::new(Endpoint::Shm { socket: path }, true),
                secret,
                config,
            }),
        })
    }

    /// The socket path peers connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket.0
    }

    /// The registry of served pools (only [`BlockPool::new_shared`] pools are accepted).
    pub fn pools(&self) -> PoolRegistry {
        self.ctx.registry.clone()
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, gives open connections the drain
    /// deadline, and removes the socket file. Mappings peers already hold stay valid.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        info!(socket = %self.socket.0.display(), "kv transfer: shm server listening");
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "kv transfer: shm accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let ctx = self.ctx.clone();
            let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
            tracker.spawn(async move {
                tokio::select! {
                    () = hard_stop.cancelled() => {}
                    () = serve_connection(stream, &ctx, &shutdown) => {}
                }
            });
        }
        drop(self.listener);
        tracker.close();
        if timeout(self.ctx.config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            hard_stop.cancel();
            tracker.wait().await;
        }
        drop(self.socket);
        Ok(())
    }
}

/// A socket file nobody listens on any more.
fn is_stale(path: &Path) -> bool {
    matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

async fn serve_connection(mut stream: UnixStream, ctx: &ServerCtx, shutdown: &CancellationToken) {
    let config = &ctx.config;
    match timeout(
        config.handshake_timeout,
        auth::server_handshake(&mut stream, &ctx.secret),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(HandshakeError::Rejected)) => {
            warn!("kv transfer: rejected a local peer that does not know the shared secret");
            return;
        }
        Ok(Err(e)) => {
            debug!(error = ?e, "kv transfer: shm handshake failed");
            return;
        }
        Err(_) => return,
    }
    loop {
        let mut header = [0u8; HEADER_LEN];
        let read = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            read = timeout(config.idle_timeout, stream.read_exact(&mut header)) => read,
        };
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let refusal = match Request::decode(&header) {
            Ok(Request {
                op: Op::Map, pool, ..
            }) => match ctx.registry.get(pool) {
                Some(pool) => match send_pool(&stream, &pool, config.io_timeout).await {
                    Ok(()) => continue,
                    Err(SendPoolError::Io(e)) => {
                        debug!(error = %e, "kv transfer: sending a pool descriptor failed");
                        return;
                    }
                    Err(SendPoolError::Refuse(reason)) => reason,
                },
                None => RemoteError::UnknownPool,
            },
            Ok(_) => RemoteError::BadRequest,
            Err(reason) => reason,
        };
        let frame = Response::Refused {
            reason: refusal,
            block: None,
        }
        .encode();
        if !matches!(
            timeout(config.io_timeout, stream.write_all(&frame)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

enum SendPoolError {
    Io(io::Error),
    Refuse(RemoteError),
}

/// Sends the pool's geometry with a read-only descriptor of its memfd attached.
async fn send_pool(
    stream: &UnixStream,
    pool: &BlockPool,
    io_timeout: Duration,
) -> Result<(), SendPoolError> {
    let Some(fd) = pool.memfd() else {
        return Err(SendPoolError::Refuse(RemoteError::ServerError));
    };
    let read_only = reopen_read_only(fd).map_err(|e| {
        warn!(error = %e, "kv transfer: cannot reopen a pool memfd read-only");
        SendPoolError::Refuse(RemoteError::ServerError)
    })?;
    let frame = Response::Ok {
        a: pool.block_bytes() as u64,
        b: pool.num_blocks() as u64,
    }
    .encode();
    let send = stream.async_io(Interest::WRITABLE, || {
        let fds = [read_only.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("ancillary buffer too small"));
        }
        Ok(rustix::net::sendmsg(
            stream,
            &[IoSlice::new(&frame)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?)
    });
    let sent = timeout(io_timeout, send)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
        .map_err(SendPoolError::Io)?;
    if sent < frame.len() {
        // The descriptor went with the first byte; the rest of the frame follows plainly.
        let mut rest = &frame[sent..];
        while !rest.is_empty() {
            let n = timeout(io_timeout, async {
                stream.writable().await?;
                match stream.try_write(rest) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                }
            })
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            .map_err(SendPoolError::Io)?;
            rest = &rest[n..];
        }
    }
    Ok(())
}

/// A new open file description of the same memfd, read-only, so the peer cannot map it writable.
fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

// === impl ShmTransport ===

/// Client settings.
#[derive(Clone, Debug)]
pub struct ShmTransportConfig {
    /// Deadline for connecting and for the handshake, each.
    pub connect_timeout: Duration,
    /// Deadline for the pool request and its answer.
    pub io_timeout: Duration,
}

impl Default for ShmTransportConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// Reads blocks of same-host pools served by [`ShmServer`]s; see the module docs.
pub struct ShmTransport {
    secret: SharedSecret,
    config: ShmTransportConfig,
    maps: Mutex<HashMap<(PathBuf, PoolId), Arc<RemotePool>>>,
}

impl std::fmt::Debug for ShmTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A peer's pool, mapped read-only.
struct RemotePool {
    map: Mmap,
    block_bytes: usize,
    num_blocks: usize,
}

impl RemotePool {
    fn block(&self, block: u32) -> &[u8] {
        let start = block as usize * self.block_bytes;
        &self.map[start..start + self.block_bytes]
    }
}

impl ShmTransport {
    pub fn new(secret: SharedSecret, config: ShmTransportConfig) -> Self {
        Self {
            secret,
            config,
            maps: Mutex::default(),
        }
    }

    /// Reads `src`'s blocks into `dst_slots` of `dst`; see [`KvTransport::read_blocks`]. The first
    /// read of a pool connects and maps it; later reads only copy. Every source block is checked
    /// before the first byte is copied.
    pub async fn read(
        &self,
        src: &BlockSetDescriptor,
        dst: &BlockPool,
        dst_slots: &[u32],
    ) -> Result<Completion> {
        let start = Instant::now();
        let Endpoint::Shm { socket } = &src.endpoint else {
            return Err(Error::EndpointMismatch {
                expected: TransportKind::Shm,
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
        let remote = self.remote_pool(socket, src.pool, &src.endpoint).await?;
        check_shape(
            src.blocks.len(),
            slots.len(),
            remote.block_bytes as u64,
            dst.block_bytes() as u64,
        )?;
        if let Some(&block) = src
            .blocks
            .iter()
            .find(|&&b| b as usize >= remote.num_blocks)
        {
            return Err(Error::BlockOutOfRange {
                block,
                num_blocks: remote.num_blocks,
            });
        }
        let mut since_yield = 0;
        for (slot, &block) in slots.iter_mut().zip(&src.blocks) {
            slot.copy_from_slice(remote.block(block));
            since_yield += remote.block_bytes;
            if since_yield >= YIELD_EVERY_BYTES {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        Ok(Completion {
            blocks: src.blocks.len(),
            bytes: src.total_bytes(),
            elapsed: start.elapsed(),
        })
    }

    /// Drops cached mappings of pools served at `socket` (e.g. after that server went away).
    pub fn forget(&self, socket: &Path) {
        self.maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(path, _), _| path != socket);
    }

    async fn remote_pool(
        &self,
        socket: &Path,
        pool: PoolId,
        peer: &Endpoint,
    ) -> Result<Arc<RemotePool>> {
        let key = (socket.to_path_buf(), pool);
        if let Some(remote) = self
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(remote.clone());
        }
        let remote = Arc::new(self.map_pool(socket, pool, peer).await?);
        self.maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, remote.clone());
        Ok(remote)
    }

    /// Connects, authenticates, asks for the pool and maps the descriptor it gets.
    async fn map_pool(&self, socket: &Path, pool: PoolId, peer: &Endpoint) -> Result<RemotePool> {
        let connect_timeout = self.config.connect_timeout;
        let io_timeout = self.config.io_timeout;
        let timed_out = |op, after| Error::Timeout {
            peer: peer.clone(),
            op,
            after,
        };
        let mut stream = timeout(connect_timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| timed_out("connecting", connect_timeout))?
            .map_err(|source| Error::Connect {
                peer: peer.clone(),
                source,
            })?;
        timeout(
            connect_timeout,
            auth::client_handshake(&mut stream, &self.secret),
        )
        .await
        .map_err(|_| timed_out("authenticating", connect_timeout))?
        .map_err(|e| auth::client_error(peer, e))?;

        let request = Request {
            op: Op::Map,
            count: 0,
            pool,
            block_bytes: 0,
        }
        .encode();
        let request_err = |source| Error::Request {
            peer: peer.clone(),
            source,
        };
        timeout(io_timeout, stream.write_all(&request))
            .await
            .map_err(|_| timed_out("requesting a pool", io_timeout))?
            .map_err(request_err)?;
        let mut frame = [0u8; HEADER_LEN];
        let (got, fd) = timeout(io_timeout, recv_with_fd(&stream, &mut frame))
            .await
            .map_err(|_| timed_out("waiting for a pool descriptor", io_timeout))?
            .map_err(request_err)?;
        if got < HEADER_LEN {
            timeout(io_timeout, stream.read_exact(&mut frame[got..]))
                .await
                .map_err(|_| timed_out("waiting for a pool descriptor", io_timeout))?
                .map_err(request_err)?;
        }
        let (block_bytes, num_blocks) = match Response::decode(&frame) {
            Response::Refused { reason, block } => {
                return Err(Error::Refused {
                    peer: peer.clone(),
                    reason,
                    block,
                });
            }
            Response::Ok { a, b } => (a, b),
        };
        let protocol = |what| Error::Protocol {
            peer: peer.clone(),
            what,
        };
        let fd = fd.ok_or_else(|| protocol("no descriptor attached to the pool answer"))?;
        let (block_bytes, num_blocks) =
            match (usize::try_from(block_bytes), usize::try_from(num_blocks)) {
                (Ok(b), Ok(n)) if b > 0 && n > 0 && n <= u32::MAX as usize => (b, n),
                _ => return Err(protocol("invalid pool geometry")),
            };
        let len = block_bytes
            .checked_mul(num_blocks)
            .filter(|&len| len <= isize::MAX as usize)
            .ok_or_else(|| protocol("invalid pool geometry"))?;
        let shm_err = |op| {
            move |e: rustix::io::Errno| Error::Shm {
                op,
                source: e.into(),
            }
        };
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(shm_err("reading seals"))?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(protocol("pool memfd is not sealed against shrinking"));
        }
        let size = rustix::fs::fstat(&fd).map_err(shm_err("fstat"))?.st_size;
        if u64::try_from(size).map_or(true, |size| size < len as u64) {
            return Err(protocol("pool memfd is smaller than its geometry"));
        }
        // SAFETY: `fd` is a memfd sealed against shrinking whose size we just checked covers `len`,
        // so no access within the mapping can fault (SIGBUS). The mapping is read-only (and the fd
        // itself read-only). The serving process may write other blocks concurrently; the transfer
        // contract (module docs) is that blocks named in a descriptor do not change while they are
        // being read, so copies from them observe stable bytes.
        let map = unsafe { MmapOptions::new().len(len).map(&fd) }.map_err(|source| Error::Shm {
            op: "mapping a peer pool",
            source,
        })?;
        Ok(RemotePool {
            map,
            block_bytes,
            num_blocks,
        })
    }
}

/// Receives up to one frame and the descriptor attached to it, if any.
async fn recv_with_fd(
    stream: &UnixStream,
    frame: &mut [u8; HEADER_LEN],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let received = stream
        .async_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                stream,
                &mut [IoSliceMut::new(frame)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::other("ancillary data truncated"));
            }
            let mut fd = None;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    for received in fds {
                        // Keep the first; any extra descriptor is closed on drop.
                        fd.get_or_insert(received);
                    }
                }
            }
            Ok((msg.bytes, fd))
        })
        .await?;
    if received.0 == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(received)
}

impl KvTransport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
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
