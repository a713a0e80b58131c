//! CUDA device memory (feature `cuda`): device block pools, device-to-device copies of block sets
//! (same device, or between two devices with peer access when the hardware allows it), and the
//! host-staged path across nodes: device → pinned host pool → a host transport (TCP) → pinned host
//! pool → device.
//!
//! Built on `cudarc` with the driver loaded at run time, so building needs no CUDA toolkit. Without a
//! driver library `cudarc` panics on first use; every entry point here checks [`device_count`] (which
//! probes for the library first) and returns [`Error::CudaUnavailable`] instead.
//!
//! Copies are issued on each pool's stream and waited for before the call returns, so these
//! functions block the calling thread for the duration of the copy; from async code, call them
//! from `spawn_blocking` or accept the stall (a block of the default geometry takes tens of
//! microseconds device-to-device). It does not own CUDA IPC (sharing device memory with another
//! process), nor overlapping the network and the host-to-device copy of a staged transfer.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError, sys};

use crate::error::{Error, Result};
use crate::pool::{BlockPool, check_shape};
use crate::{BlockSetDescriptor, Completion, KvTransport};

/// The number of CUDA devices, or why CUDA cannot be used here (no `libcuda`, the driver failed to
/// initialise, no device). Never panics.
pub fn device_count() -> Result<usize> {
    // SAFETY: `is_culib_present` only tries to `dlopen` the driver library's candidate names and
    // closes what it opened; it calls into no CUDA function.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::CudaUnavailable {
            reason: "the CUDA driver library (libcuda.so) was not found",
        });
    }
    let count = CudaContext::device_count().map_err(cuda("initialising the driver"))?;
    match usize::try_from(count) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::CudaUnavailable {
            reason: "the driver reports no CUDA device",
        }),
    }
}

/// The primary context of device `ordinal`, after checking that CUDA is usable.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::CudaUnavailable {
            reason: "no CUDA device with that ordinal",
        });
    }
    CudaContext::new(ordinal).map_err(cuda("creating a context"))
}

/// The device's name, e.g. "NVIDIA H200".
pub fn device_name(ctx: &CudaContext) -> Result<String> {
    ctx.name().map_err(cuda("reading the device name"))
}

fn cuda(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |source| Error::Cuda { op, source }
}

// === impl CudaBlockPool ===

/// `num_blocks` blocks of `block_bytes` in one device allocation.
pub struct CudaBlockPool {
    stream: Arc<CudaStream>,
    mem: CudaSlice<u8>,
    block_bytes: usize,
    num_blocks: usize,
}

impl std::fmt::Debug for CudaBlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBlockPool")
            .field("device", &self.device())
            .field("block_bytes", &self.block_bytes)
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

impl CudaBlockPool {
    /// Allocates a zeroed pool on `ctx`'s device.
    pub fn new(ctx: &Arc<CudaContext>, block_bytes: usize, num_blocks: usize) -> Result<Self> {
        let len = block_bytes
            .checked_mul(num_blocks)
            .filter(|&len| len > 0 && u32::try_from(num_blocks).is_ok())
            .ok_or(Error::InvalidPool {
                block_bytes,
                num_blocks,
            })?;
        let stream = ctx.default_stream();
        let mem = stream
            .alloc_zeros::<u8>(len)
            .map_err(cuda("allocating device memory"))?;
        Ok(Self {
            stream,
            mem,
            block_bytes,
            num_blocks,
        })
    }

    /// The device ordinal.
    pub fn device(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// The pool's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn check(&self, blocks: &[u32]) -> Result<()> {
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(&block) => Err(Error::BlockOutOfRange {
                block,
                num_blocks: self.num_blocks,
            }),
            None => Ok(()),
        }
    }

    fn range(&self, block: u32, blocks: u32) -> std::ops::Range<usize> {
        let start = block as usize * self.block_bytes;
        start..start + blocks as usize * self.block_bytes
    }

    /// Copies host slots `host_slots` of `host` into device blocks `blocks` (host → device).
    /// Fastest when `host` is page-locked ([`PinnedHostPool`]).
    pub fn upload(
        &mut self,
        host: &BlockPool,
        host_slots: &[u32],
        blocks: &[u32],
    ) -> Result<Completion> {
        let start = Instant::now();
        check_shape(
            host_slots.len(),
            blocks.len(),
            host.block_bytes() as u64,
            self.block_bytes as u64,
        )?;
        self.check(blocks)?;
        let sources = host.read_many(host_slots)?;
        for (src, &block) in sources.iter().zip(blocks) {
            let range = self.range(block, 1);
            let mut dst = self.mem.slice_mut(range);
            self.stream
                .memcpy_htod(&src[..], &mut dst)
                .map_err(cuda("copying host to device"))?;
        }
        // The host blocks stay locked (and alive) until the copies have finished.
        self.stream
            .synchronize()
            .map_err(cuda("waiting for host-to-device copies"))?;
        drop(sources);
        Ok(completion(blocks.len(), self.block_bytes, start))
    }

    /// Copies device blocks `blocks` into host slots `host_slots` of `host` (device → host).
    pub fn download(
        &self,
        blocks: &[u32],
        host: &BlockPool,
        host_slots: &[u32],
    ) -> Result<Completion> {
        let start = Instant::now();
        check_shape(
            blocks.len(),
            host_slots.len(),
            self.block_bytes as u64,
            host.block_bytes() as u64,
        )?;
        self.check(blocks)?;
        let mut targets = host.write_many(host_slots)?;
        for (dst, &block) in targets.iter_mut().zip(blocks) {
            let src = self.mem.slice(self.range(block, 1));
            self.stream
                .memcpy_dtoh(&src, &mut dst[..])
                .map_err(cuda("copying device to host"))?;
        }
        self.stream
            .synchronize()
            .map_err(cuda("waiting for device-to-host copies"))?;
        drop(targets);
        Ok(completion(blocks.len(), self.block_bytes, start))
    }
}

fn completion(blocks: usize, block_bytes: usize, start: Instant) -> Completion {
    Completion {
        blocks,
        bytes: (blocks * block_bytes) as u64,
        elapsed: start.elapsed(),
    }
}

/// Runs of consecutive `(src, dst)` pairs where both sides advance by one block: each run is one
/// copy. Yields `(src_start, dst_start, len)`.
fn runs<'a>(src: &'a [u32], dst: &'a [u32]) -> impl Iterator<Item = (u32, u32, u32)> + 'a {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= src.len() {
            return None;
        }
        let (s, d) = (src[i], dst[i]);
        let mut len = 1;
        while i + (len as usize) < src.len()
            && src[i + len as usize] == s.wrapping_add(len)
            && dst[i + len as usize] == d.wrapping_add(len)
        {
            len += 1;
        }
        i += len as usize;
        Some((s, d, len))
    })
}

/// Copies device blocks `src_blocks` of `src` into `dst_slots` of `dst`, on the same device or
/// between two devices (peer access is enabled both ways where the hardware supports it; otherwise
/// the driver stages through host memory). Runs of consecutive blocks go as one copy.
pub fn copy_blocks(
    src: &CudaBlockPool,
    src_blocks: &[u32],
    dst: &mut CudaBlockPool,
    dst_slots: &[u32],
) -> Result<Completion> {
    let start = Instant::now();
    check_shape(
        src_blocks.len(),
        dst_slots.len(),
        src.block_bytes as u64,
        dst.block_bytes as u64,
    )?;
    src.check(src_blocks)?;
    dst.check(dst_slots)?;
    if src.context() != dst.context() {
        enable_peer_access(src.context(), dst.context())?;
        enable_peer_access(dst.context(), src.context())?;
    }
    for (s, d, len) in runs(src_blocks, dst_slots) {
        let from = src.mem.slice(src.range(s, len));
        let range = dst.range(d, len);
        let mut to = dst.mem.slice_mut(range);
        dst.stream
            .memcpy_dtod(&from, &mut to)
            .map_err(cuda("copying device to device"))?;
    }
    dst.stream
        .synchronize()
        .map_err(cuda("waiting for device-to-device copies"))?;
    Ok(completion(src_blocks.len(), src.block_bytes, start))
}

/// Lets `from`'s context access `to`'s memory directly, when the devices can (NVLink or PCIe P2P).
fn enable_peer_access(from: &Arc<CudaContext>, to: &Arc<CudaContext>) -> Result<()> {
    let mut can = 0;
    // SAFETY: both devices come from live contexts and `can` is a valid out-pointer.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, from.cu_device(), to.cu_device()) }
        .result()
        .map_err(cuda("querying peer access"))?;
    if can == 0 {
        return Ok(());
    }
    from.bind_to_thread().map_err(cuda("binding a context"))?;
    // SAFETY: `from` is bound to this thread and `to.cu_ctx()` is a live context.
    match unsafe { sys::cuCtxEnablePeerAccess(to.cu_ctx(), 0) }.result() {
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        other => other.map_err(cuda("enabling peer access")),
    }
}

// === impl PinnedHostPool ===

/// A host [`BlockPool`] page-locked for the driver (`cuMemHostRegister`), so device↔host copies run
/// at full speed and without an extra bounce. The pool stays usable as an ordinary pool: register it
/// with a [`crate::TcpServer`] to serve staged blocks, or read into it with any transport.
pub struct PinnedHostPool {
    ctx: Arc<CudaContext>,
    pool: Arc<BlockPool>,
}

impl std::fmt::Debug for PinnedHostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedHostPool")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl PinnedHostPool {
    /// Page-locks `pool`'s memory for `ctx`'s driver (portable: usable by every context).
    pub fn register(ctx: &Arc<CudaContext>, pool: Arc<BlockPool>) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda("binding a context"))?;
        // SAFETY: the pointer and length describe the pool's whole live mapping; `Self` keeps the pool
        // alive until `drop` unregisters it, so the driver never holds a registration of freed memory.
        unsafe {
            sys::cuMemHostRegister_v2(
                pool.base_ptr().cast(),
                pool.len_bytes(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(cuda("page-locking a host pool"))?;
        Ok(Self {
            ctx: ctx.clone(),
            pool,
        })
    }

    /// The page-locked pool.
    pub fn pool(&self) -> &Arc<BlockPool> {
        &self.pool
    }
}

impl Drop for PinnedHostPool {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the pointer was registered in `register` and the pool is still alive (we hold an
            // `Arc` to it); after this call the driver no longer references the memory.
            let _ = unsafe { sys::cuMemHostUnregister(self.pool.base_ptr().cast()) };
        }
    }
}

// === host-staged transfers ===

/// The receiving half of a cross-node transfer into device memory: reads `src` through `transport`
/// into `staging` slots (a [`PinnedHostPool`]'s pool, ideally), then uploads them into `dst_blocks`
/// of `dst`. The sending half is [`CudaBlockPool::download`] into a host pool served by a
/// [`crate::TcpServer`].
pub async fn read_into_device(
    transport: &dyn KvTransport,
    src: &BlockSetDescriptor,
    staging: &BlockPool,
    staging_slots: &[u32],
    dst: &mut CudaBlockPool,
    dst_blocks: &[u32],
) -> Result<Completion> {
    let start = Instant::now();
    dst.check(dst_blocks)?;
    transport.read_blocks(src, staging, staging_slots).await?;
    dst.upload(staging, staging_slots, dst_blocks)?;
    Ok(completion(dst_blocks.len(), dst.block_bytes, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pairs_coalesce_into_runs() {
        let got: Vec<_> = runs(&[4, 5, 6, 9, 1, 2], &[0, 1, 2, 3, 7, 9]).collect();
        assert_eq!(got, vec![(4, 0, 3), (9, 3, 1), (1, 7, 1), (2, 9, 1)]);
        assert_eq!(runs(&[], &[]).count(), 0);
    }

    #[test]
    fn missing_driver_is_an_error_not_a_panic() {
        match device_count() {
            Ok(n) => println!("cuda: {n} device(s) present"),
            Err(e) => println!("cuda: not available here ({e})"),
        }
    }
}
