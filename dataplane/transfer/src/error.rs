//! The crate's one error type.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::descriptor::{Endpoint, TransportKind};

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong moving KV blocks. Variants are named for the operation that failed;
/// the ones raised during a transfer name the peer and, where one is involved, the block.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A pool needs at least one block of at least one byte, and must fit the address space.
    #[error("invalid block pool layout: {num_blocks} blocks of {block_bytes} bytes")]
    InvalidPool {
        block_bytes: usize,
        num_blocks: usize,
    },

    /// Mapping or creating the memory behind a pool failed.
    #[error("allocating a {bytes}-byte block pool ({what})")]
    AllocPool {
        bytes: usize,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// A block index past the end of its pool.
    #[error("block {block} is out of range: the pool has {num_blocks} blocks")]
    BlockOutOfRange { block: u32, num_blocks: usize },

    /// A block is being written (or, for a write, read or written) by someone else.
    #[error("block {block} is in use by another reader or writer")]
    BlockBusy { block: u32 },

    /// A transfer lists a different number of source blocks and destination slots.
    #[error("{blocks} source blocks but {slots} destination slots")]
    SlotCountMismatch { blocks: usize, slots: usize },

    /// Source and destination pools disagree on the block size.
    #[error(
        "block size mismatch: source blocks are {source_bytes} bytes, destination {dest_bytes}"
    )]
    BlockSizeMismatch { source_bytes: u64, dest_bytes: u64 },

    /// The descriptor names an endpoint this transport cannot read from.
    #[error("the descriptor names a {got} endpoint, this transport reads {expected}")]
    EndpointMismatch {
        expected: TransportKind,
        got: TransportKind,
    },

    /// The pool was not created shareable ([`crate::BlockPool::new_shared`]).
    #[error("the shared-memory transport can only serve pools created with BlockPool::new_shared")]
    PoolNotShareable,

    /// A shared secret shorter than [`crate::SharedSecret::MIN_LEN`].
    #[error("a shared secret needs at least {min} bytes, got {len}")]
    WeakSecret { len: usize, min: usize },

    /// Binding a listening socket.
    #[error("binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// Connecting to a peer.
    #[error("connecting to {peer}")]
    Connect {
        peer: Endpoint,
        #[source]
        source: io::Error,
    },

    /// An operation with a peer did not finish within its deadline.
    #[error("{op} with {peer} timed out after {after:?}")]
    Timeout {
        peer: Endpoint,
        op: &'static str,
        after: Duration,
    },

    /// The connection failed during the authentication handshake.
    #[error("authentication handshake with {peer}")]
    Handshake {
        peer: Endpoint,
        #[source]
        source: io::Error,
    },

    /// The peer did not accept our proof of the shared secret.
    #[error("{peer} rejected our credentials (different shared secret?)")]
    AuthRejected { peer: Endpoint },

    /// The peer could not prove that it knows the shared secret.
    #[error("{peer} failed to prove that it knows the shared secret")]
    PeerNotAuthenticated { peer: Endpoint },

    /// The peer spoke something other than this crate's protocol.
    #[error("protocol error from {peer}: {what}")]
    Protocol { peer: Endpoint, what: &'static str },

    /// Sending a request (or reading its response header) failed.
    #[error("requesting blocks from {peer}")]
    Request {
        peer: Endpoint,
        #[source]
        source: io::Error,
    },

    /// The peer refused the request before sending any block.
    #[error("{peer} refused the read: {reason} (block {block:?})")]
    Refused {
        peer: Endpoint,
        reason: RemoteError,
        block: Option<u32>,
    },

    /// The connection failed (closed, reset, or silent past the I/O deadline) part-way through a
    /// transfer. `received_blocks` blocks before `block` landed intact.
    #[error(
        "receiving block {block} (into slot {slot}) from {peer} failed after {received_blocks} of {total_blocks} blocks"
    )]
    Receive {
        peer: Endpoint,
        block: u32,
        slot: u32,
        received_blocks: usize,
        total_blocks: usize,
        #[source]
        source: io::Error,
    },

    /// A shared-memory step (memfd, seals, `mmap`, fd passing) failed.
    #[error("shared memory: {op}")]
    Shm {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// No usable CUDA driver or device.
    #[cfg(feature = "cuda")]
    #[error("CUDA is not available: {reason}")]
    CudaUnavailable { reason: &'static str },

    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA {op} failed")]
    Cuda {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
}

/// Why a serving peer refused a read; travels as one byte on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteError {
    /// The pool id is not (or no longer) registered with the server.
    UnknownPool,
    /// A requested block index is past the end of the pool.
    BlockOutOfRange,
    /// A requested block is being written.
    BlockBusy,
    /// The request's block size differs from the pool's.
    BlockSizeMismatch,
    /// The request lists more blocks than the server accepts at once.
    TooManyBlocks,
    /// The request could not be parsed.
    BadRequest,
    /// The server failed on its side (e.g. could not reopen the pool's memfd).
    ServerError,
    /// A code this version does not know.
    Unknown(u8),
}

impl RemoteError {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::UnknownPool => 1,
            Self::BlockOutOfRange => 2,
            Self::BlockBusy => 3,
            Self::BlockSizeMismatch => 4,
            Self::TooManyBlocks => 5,
            Self::BadRequest => 6,
            Self::ServerError => 7,
            Self::Unknown(code) => code,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 => Self::UnknownPool,
            2 => Self::BlockOutOfRange,
            3 => Self::BlockBusy,
            4 => Self::BlockSizeMismatch,
            5 => Self::TooManyBlocks,
            6 => Self::BadRequest,
            7 => Self::ServerError,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownPool => f.write_str("unknown pool"),
            Self::BlockOutOfRange => f.write_str("block out of range"),
            Self::BlockBusy => f.write_str("block busy"),
            Self::BlockSizeMismatch => f.write_str("block size mismatch"),
            Self::TooManyBlocks => f.write_str("too many blocks in one request"),
            Self::BadRequest => f.write_str("bad request"),
            Self::ServerError => f.write_str("server-side failure"),
            Self::Unknown(code) => write!(f, "unknown error code {code}"),
        }
    }
}
