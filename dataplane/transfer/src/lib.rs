//! KV-cache block transfer for disaggregated prefill/decode.
//!
//! A prefill worker computes a request's KV cache into fixed-size blocks of a [`BlockPool`]; a decode
//! worker pulls exactly those blocks into slots of its own pool and carries on decoding. This crate
//! owns that move: the block memory ([`BlockPool`], sized by a model's [`KvGeometry`]), the serialisable
//! [`BlockSetDescriptor`] that names "these blocks of that pool at that endpoint", and the
//! [`KvTransport`] trait that reads a described block set into local slots, with one implementation
//! per way of moving bytes:
//!
//! | transport | where | module |
//! |---|---|---|
//! | TCP (default) | anywhere; authenticated with a per-graph shared secret | [`tcp`] |
//! | shared memory | same host: a sealed memfd passed over a Unix socket (`SCM_RIGHTS`) | [`shm`] |
//! | CUDA (feature `cuda`) | device pools; device-to-device (same device or peer), host-staged across nodes | `cuda` |
//!
//! It does **not** own: deciding which blocks to move (the router and sidecar do), the engine's block
//! table, or the sidecar/frontend wiring. **RDMA is not implemented**: the design names a verbs
//! transport behind a feature `rdma`, but there is no RDMA device on the machines this was built on, so
//! it was left out rather than shipped untested. CUDA IPC (device memory shared across processes) is not
//! implemented either; within a node the device path copies between pools owned by one process.
//!
//! This is the one crate of the workspace that contains `unsafe` code (raw block memory, `mmap` of a
//! peer's descriptor, the CUDA driver). The crate denies `unsafe_code`; only [`pool`], [`shm`] and
//! `cuda` allow it, and every `unsafe` block carries a `// SAFETY:` comment.
//!
//! # Measured (2026-11, again 2026-12-07)
//!
//! `cargo bench` on a 2-vCPU VM, default geometry: 16 shuffled 8 MiB blocks by shared memory at 1.0x
//! a single-thread `memcpy` of the same blocks, by TCP loopback (client and server in one process)
//! at 0.35-0.36x (2026-11) and 0.24x (2026-12-07: memcpy 13.2 ms, TCP 55 ms), below the 0.5x target;
//! one 8 MiB block costs its `memcpy` plus ~8 µs by shared memory and 2.6 ms against 0.25 ms by TCP.
//! Between two processes, as a prefill and a decode sidecar move blocks (`dynamo bench-transfer`,
//! one thread each): TCP 0.30-0.44x memcpy, shared memory 0.81-1.16x (docs/disagg.md).
//! Striping a block set over 2 connections and 4 MiB socket buffers were tried on 2026-12-07 and
//! gained nothing measurable on 2 cores (both kernel copies already fill them); not kept. On an NVIDIA H200 (`examples/cuda_bw.rs`,
//! 1 GiB): device-to-device 2,076 GB/s as one run and 1,214 GB/s as single 8 MiB blocks, pinned
//! host<->device 54 GB/s, and the host-staged path 2.6 GB/s end to end, bounded by TCP loopback.
//!
//! # Running
//!
//! ```text
//! cargo test -p dynamo-transfer                    # tcp, shm; cuda code not built
//! cargo test -p dynamo-transfer --features cuda    # cuda tests print a skip line without a driver/GPU
//! cargo bench -p dynamo-transfer --bench transfer -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! GPU check (on a machine with an NVIDIA driver; no toolkit is needed to build): build the test
//! binaries with `cargo test -p dynamo-transfer --features cuda --no-run`, copy them there and run them
//! with `DYNAMO_REQUIRE_CUDA=1` (a missing GPU then fails instead of skipping) and
//! `--test-threads=1 --nocapture`; the CUDA tests print `cuda: device N <name> ... verified` when
//! they ran. `cargo run -p dynamo-transfer --features cuda --release --example cuda_bw` prints GB/s for
//! device-to-device, device↔pinned-host and the host-staged TCP path.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

mod auth;
mod descriptor;
mod error;
#[allow(unsafe_code)]
pub mod pool;
#[allow(unsafe_code)]
pub mod shm;
pub mod tcp;
pub mod testing;
mod wire;

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;

pub use auth::SharedSecret;
pub use descriptor::{BlockSetDescriptor, Endpoint, PoolId, PoolRegistry, TransportKind};
pub use error::{Error, RemoteError, Result};
pub use pool::{BlockMut, BlockPool, BlockRef, KvGeometry};
pub use shm::{ShmServer, ShmServerConfig, ShmTransport, ShmTransportConfig};
pub use tcp::{TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig};

/// A boxed, `Send` future: what [`KvTransport`] returns so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a finished transfer moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Blocks written into the destination slots.
    pub blocks: usize,
    /// Bytes written into the destination slots.
    pub bytes: u64,
    /// Wall time from the call to the last byte landing.
    pub elapsed: Duration,
}

impl Completion {
    /// Throughput in GB/s (10^9 bytes per second).
    pub fn gb_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs == 0.0 {
            return f64::INFINITY;
        }
        self.bytes as f64 / secs / 1e9
    }
}

/// Reads a described set of remote blocks into local pool slots.
///
/// `src.blocks[i]` lands in `dst` slot `dst_slots[i]`. The destination slots are locked for writing
/// for the whole transfer (a slot already locked fails the call with [`Error::BlockBusy`] before any
/// byte moves). The returned future is the completion: it resolves once every byte has landed, or
/// to an error naming the block that failed. Every wait inside has a deadline, so it never hangs.
/// On error, destination slots may hold partial data and must not be used.
///
/// Object-safe, so a sidecar can hold `Arc<dyn KvTransport>` per endpoint kind.
pub trait KvTransport: Send + Sync {
    /// Which [`Endpoint`]s this transport can read from.
    fn kind(&self) -> TransportKind;

    /// Reads `src`'s blocks into `dst_slots` of `dst`.
    fn read_blocks<'a>(
        &'a self,
        src: &'a BlockSetDescriptor,
        dst: &'a BlockPool,
        dst_slots: &'a [u32],
    ) -> BoxFuture<'a, Result<Completion>>;
}
