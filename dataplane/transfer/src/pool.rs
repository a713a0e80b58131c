//! Host memory holding fixed-size KV blocks, with a per-block reader/writer lock.
//!
//! A [`BlockPool`] is one page-aligned mapping of `num_blocks * block_bytes` bytes: anonymous memory
//! ([`BlockPool::new`]) or a sealed memfd that the shared-memory transport can hand to a peer on the
//! same host ([`BlockPool::new_shared`]). Blocks are reached through guards: any number of
//! [`BlockRef`]s or one [`BlockMut`] per block at a time, taken without waiting (a conflict is
//! [`Error::BlockBusy`]). That lets one `Arc<BlockPool>` be served to peers, written by the engine and
//! filled by incoming transfers at once, each touching different blocks.
//!
//! It does not own what the bytes mean (layer/head layout is the engine's) nor which blocks are free
//! (the engine's block allocator).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapMut, MmapOptions};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

// === impl KvGeometry ===

/// The shape of a model's KV cache, from which one block's size follows.
///
/// One block holds keys and values (`2`) for `block_tokens` tokens in every layer:
/// `2 * layers * kv_heads * head_dim * dtype_bytes * block_tokens` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGeometry {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Bytes per element: 2 for bf16/fp16, 1 for fp8.
    pub dtype_bytes: u32,
    /// Tokens per block.
    pub block_tokens: u32,
}

impl Default for KvGeometry {
    /// An 8B-class Llama (32 layers, 8 KV heads, head_dim 128), bf16, 64-token blocks: 8 MiB a block.
    fn default() -> Self {
        Self {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            block_tokens: 64,
        }
    }
}

impl KvGeometry {
    /// Bytes in one block: `2 * layers * kv_heads * head_dim * dtype_bytes * block_tokens`.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers as usize
            * self.kv_heads as usize
            * self.head_dim as usize
            * self.dtype_bytes as usize
            * self.block_tokens as usize
    }

    /// Bytes of KV cache per token.
    pub fn bytes_per_token(&self) -> usize {
        self.block_bytes() / (self.block_tokens.max(1) as usize)
    }
}

// === impl BlockPool ===

/// `num_blocks` blocks of `block_bytes` each in one mapping; see the module docs.
pub struct BlockPool {
    base: NonNull<u8>,
    block_bytes: usize,
    num_blocks: usize,
    /// Per block: 0 free, `WRITER` write-locked, otherwise the number of readers.
    locks: Box<[AtomicU32]>,
    /// Keeps the mapping (and the memfd) alive; never dereferenced after construction, all access
    /// goes through `base` under the block locks.
    backing: Backing,
}

enum Backing {
    Anon(#[allow(dead_code)] MmapMut),
    Memfd {
        #[allow(dead_code)]
        map: MmapMut,
        fd: OwnedFd,
    },
}

const WRITER: u32 = u32::MAX;

// SAFETY: the pool owns its mapping; every access to block memory goes through a guard that holds the
// block's lock (shared for `BlockRef`, exclusive for `BlockMut`), so sharing the pool across threads
// cannot create a data race between two users of this pool.
unsafe impl Send for BlockPool {}
// SAFETY: as above.
unsafe impl Sync for BlockPool {}

impl fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockPool")
            .field("block_bytes", &self.block_bytes)
            .field("num_blocks", &self.num_blocks)
            .field("shared", &self.is_shared())
            .finish()
    }
}

impl BlockPool {
    /// A pool in anonymous, pre-faulted memory.
    pub fn new(block_bytes: usize, num_blocks: usize) -> Result<Self> {
        let len = checked_len(block_bytes, num_blocks)?;
        let mut map = MmapOptions::new()
            .len(len)
            .populate()
            .map_anon()
            .map_err(|source| Error::AllocPool {
                bytes: len,
                what: "mmap anonymous",
                source,
            })?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(Error::InvalidPool {
            block_bytes,
            num_blocks,
        })?;
        Ok(Self::from_parts(
            base,
            block_bytes,
            num_blocks,
            Backing::Anon(map),
        ))
    }

    /// A pool sized for `num_blocks` blocks of `geometry`.
    pub fn for_geometry(geometry: &KvGeometry, num_blocks: usize) -> Result<Self> {
        Self::new(geometry.block_bytes(), num_blocks)
    }

    /// A pool in a memfd sealed against shrinking and growing, so the shared-memory transport can pass
    /// it to a peer process that maps it read-only.
    pub fn new_shared(block_bytes: usize, num_blocks: usize) -> Result<Self> {
        use rustix::fs::{MemfdFlags, SealFlags};

        let len = checked_len(block_bytes, num_blocks)?;
        let alloc_err = |what: &'static str| {
            move |source: rustix::io::Errno| Error::AllocPool {
                bytes: len,
                what,
                source: source.into(),
            }
        };
        let fd = rustix::fs::memfd_create(
            "dynamo-kv-blocks",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(alloc_err("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(alloc_err("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(alloc_err("seal"))?;
        // SAFETY: the file is a memfd this function just created, sized to `len` and sealed against
        // shrinking, so the mapping can never be truncated under us (no SIGBUS). Other processes that
        // receive the fd get a read-only reopened descriptor and cannot write through it; this
        // process only reaches the memory through the block guards.
        let mut map =
            unsafe { MmapOptions::new().len(len).populate().map_mut(&fd) }.map_err(|source| {
                Error::AllocPool {
                    bytes: len,
                    what: "mmap memfd",
                    source,
                }
            })?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(Error::InvalidPool {
            block_bytes,
            num_blocks,
        })?;
        Ok(Self::from_parts(
            base,
            block_bytes,
            num_blocks,
            Backing::Memfd { map, fd },
        ))
    }

    fn from_parts(
        base: NonNull<u8>,
        block_bytes: usize,
        num_blocks: usize,
        backing: Backing,
    ) -> Self {
        let locks = (0..num_blocks).map(|_| AtomicU32::new(0)).collect();
        Self {
            base,
            block_bytes,
            num_blocks,
            locks,
            backing,
        }
    }

    /// Bytes in one block.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Total bytes: `block_bytes * num_blocks`.
    pub fn len_bytes(&self) -> usize {
        self.block_bytes * self.num_blocks
    }

    /// Whether the pool is memfd-backed and can be served by the shared-memory transport.
    pub fn is_shared(&self) -> bool {
        matches!(self.backing, Backing::Memfd { .. })
    }

    pub(crate) fn memfd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd { fd, .. } => Some(fd.as_fd()),
            Backing::Anon(_) => None,
        }
    }

    /// Start of the mapping, for registering it with a device driver (page-locking).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn lock(&self, block: u32) -> Result<&AtomicU32> {
        self.locks
            .get(block as usize)
            .ok_or(Error::BlockOutOfRange {
                block,
                num_blocks: self.num_blocks,
            })
    }

    /// Shared access to `block`; fails with [`Error::BlockBusy`] while it is being written.
    pub fn read(&self, block: u32) -> Result<BlockRef<'_>> {
        let lock = self.lock(block)?;
        let mut state = lock.load(Ordering::Relaxed);
        loop {
            if state >= WRITER - 1 {
                return Err(Error::BlockBusy { block });
            }
            match lock.compare_exchange_weak(state, state + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Ok(BlockRef { pool: self, block }),
                Err(now) => state = now,
            }
        }
    }

    /// Exclusive access to `block`; fails with [`Error::BlockBusy`] while anyone else holds it.
    pub fn write(&self, block: u32) -> Result<BlockMut<'_>> {
        let lock = self.lock(block)?;
        lock.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| Error::BlockBusy { block })?;
        Ok(BlockMut { pool: self, block })
    }

    /// Shared access to every block in `blocks`, all or none.
    pub fn read_many(&self, blocks: &[u32]) -> Result<Vec<BlockRef<'_>>> {
        blocks.iter().map(|&b| self.read(b)).collect()
    }

    /// Exclusive access to every block in `blocks`, all or none (a repeated block is busy).
    pub fn write_many(&self, blocks: &[u32]) -> Result<Vec<BlockMut<'_>>> {
        blocks.iter().map(|&b| self.write(b)).collect()
    }

    fn block_ptr(&self, block: u32) -> *mut u8 {
        // SAFETY: guards exist only for `block < num_blocks` (checked by `lock`), so the offset stays
        // inside the `num_blocks * block_bytes` mapping.
        unsafe { self.base.as_ptr().add(block as usize * self.block_bytes) }
    }
}

fn checked_len(block_bytes: usize, num_blocks: usize) -> Result<usize> {
    let invalid = Error::InvalidPool {
        block_bytes,
        num_blocks,
    };
    if block_bytes == 0 || num_blocks == 0 || u32::try_from(num_blocks).is_err() {
        return Err(invalid);
    }
    match block_bytes.checked_mul(num_blocks) {
        Some(len) if len <= isize::MAX as usize => Ok(len),
        _ => Err(invalid),
    }
}

// === impl BlockRef / BlockMut ===

/// Shared access to one block; derefs to its bytes.
pub struct BlockRef<'a> {
    pool: &'a BlockPool,
    block: u32,
}

impl BlockRef<'_> {
    /// The block's index in its pool.
    pub fn index(&self) -> u32 {
        self.block
    }
}

impl Deref for BlockRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: in range (see `block_ptr`); this guard holds a shared lock on the block, so no
        // `BlockMut` to the same bytes exists while the slice is alive.
        unsafe {
            std::slice::from_raw_parts(self.pool.block_ptr(self.block), self.pool.block_bytes)
        }
    }
}

impl Drop for BlockRef<'_> {
    fn drop(&mut self) {
        self.pool.locks[self.block as usize].fetch_sub(1, Ordering::Release);
    }
}

impl fmt::Debug for BlockRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockRef({})", self.block)
    }
}

/// Exclusive access to one block; derefs mutably to its bytes.
pub struct BlockMut<'a> {
    pool: &'a BlockPool,
    block: u32,
}

impl BlockMut<'_> {
    /// The block's index in its pool.
    pub fn index(&self) -> u32 {
        self.block
    }
}

impl Deref for BlockMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: in range; this guard holds the block's exclusive lock.
        unsafe {
            std::slice::from_raw_parts(self.pool.block_ptr(self.block), self.pool.block_bytes)
        }
    }
}

impl DerefMut for BlockMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: in range; this guard holds the block's exclusive lock and `&mut self` makes this the
        // only live slice derived from it.
        unsafe {
            std::slice::from_raw_parts_mut(self.pool.block_ptr(self.block), self.pool.block_bytes)
        }
    }
}

impl Drop for BlockMut<'_> {
    fn drop(&mut self) {
        self.pool.locks[self.block as usize].store(0, Ordering::Release);
    }
}

impl fmt::Debug for BlockMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockMut({})", self.block)
    }
}

/// Checks a transfer's shape: as many slots as blocks, equal block sizes.
pub(crate) fn check_shape(
    blocks: usize,
    slots: usize,
    source_bytes: u64,
    dest_bytes: u64,
) -> Result<()> {
    if blocks != slots {
        return Err(Error::SlotCountMismatch { blocks, slots });
    }
    if source_bytes != dest_bytes {
        return Err(Error::BlockSizeMismatch {
            source_bytes,
            dest_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_block_is_8_mib() {
        let g = KvGeometry::default();
        assert_eq!(g.block_bytes(), 8 * 1024 * 1024);
        assert_eq!(g.bytes_per_token(), 128 * 1024);
    }

    #[test]
    fn readers_share_and_writer_excludes() -> Result<()> {
        let pool = BlockPool::new(64, 4)?;
        let r1 = pool.read(1)?;
        let r2 = pool.read(1)?;
        assert!(matches!(pool.write(1), Err(Error::BlockBusy { block: 1 })));
        drop((r1, r2));
        let mut w = pool.write(1)?;
        w.fill(7);
        assert!(matches!(pool.read(1), Err(Error::BlockBusy { block: 1 })));
        assert!(matches!(pool.write(1), Err(Error::BlockBusy { block: 1 })));
        drop(w);
        assert!(pool.read(1)?.iter().all(|&b| b == 7));
        assert!(pool.read(0)?.iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn write_many_rejects_a_repeated_slot_and_releases_the_rest() -> Result<()> {
        let pool = BlockPool::new(16, 4)?;
        assert!(matches!(
            pool.write_many(&[0, 2, 0]),
            Err(Error::BlockBusy { block: 0 })
        ));
        assert_eq!(pool.write_many(&[0, 2])?.len(), 2);
        Ok(())
    }

    #[test]
    fn out_of_range_and_empty_layouts_are_errors() -> Result<()> {
        let pool = BlockPool::new(16, 4)?;
        assert!(matches!(
            pool.read(4),
            Err(Error::BlockOutOfRange {
                block: 4,
                num_blocks: 4
            })
        ));
        assert!(matches!(
            BlockPool::new(0, 4),
            Err(Error::InvalidPool { .. })
        ));
        assert!(matches!(
            BlockPool::new(16, 0),
            Err(Error::InvalidPool { .. })
        ));
        assert!(matches!(
            BlockPool::new(usize::MAX, 2),
            Err(Error::InvalidPool { .. })
        ));
        Ok(())
    }

    #[test]
    fn shared_pool_is_sealed_memfd() -> Result<()> {
        let pool = BlockPool::new_shared(4096, 3)?;
        assert!(pool.is_shared());
        let fd = pool.memfd().ok_or(Error::PoolNotShareable)?;
        let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| Error::Shm {
            op: "get seals",
            source: e.into(),
        })?;
        assert!(seals.contains(rustix::fs::SealFlags::SHRINK));
        pool.write(2)?.fill(9);
        assert!(pool.read(2)?.iter().all(|&b| b == 9));
        Ok(())
    }
}
