//! Paged KV-block pool with a prefix cache, LRU eviction and KV events.
//!
//! The pool owns `num_gpu_blocks` physical blocks. A block is either referenced by running sequences
//! (`ref_count > 0`) or sits in the free list. Full blocks can be registered under their sequence hash (the
//! prefix cache); a registered block keeps its hash after it is freed, so a later request with the same prefix
//! takes it back out of the free list instead of recomputing it.
//!
//! The free list is an intrusive doubly-linked list over block indices: every operation is O(1) and nothing
//! allocates after construction. Freed blocks that carry a hash go to the back (most recently used); freed
//! blocks without one go to the front, since reusing them loses nothing. Allocation takes the front block and,
//! if it still carries a hash, evicts it from the cache and records a [`KvEvent::Removed`].
//!
//! The pool does not know about sequences, scheduling or time: the scheduler decides what to allocate.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use dynamo_kv::BlockHash;
pub use dynamo_kv::{KvEvent, StoredBlock};

/// Hasher for keys that are already well mixed (block hashes) or small counters (request ids): one multiply.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Index of a physical block.
pub(crate) type BlockId = u32;

const NIL: BlockId = BlockId::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_count: u32,
    /// Sequence hash under which the block is registered in the prefix cache.
    hash: Option<u64>,
    prev: BlockId,
    next: BlockId,
}

/// The paged KV cache of one engine.
#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    head: BlockId,
    tail: BlockId,
    num_free: usize,
    cached: IdMap<u64, BlockId>,
    events: Vec<KvEvent>,
}

// === impl BlockPool ===

impl BlockPool {
    /// A pool of `num_blocks` free, unregistered blocks.
    ///
    /// # Panics
    /// If `num_blocks` does not fit in a block index.
    pub(crate) fn new(num_blocks: usize) -> Self {
        let n = BlockId::try_from(num_blocks)
            .ok()
            .filter(|&n| n < NIL)
            .expect("num_gpu_blocks must be < u32::MAX");
        let blocks = (0..n)
            .map(|i| Block {
                ref_count: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        Self {
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            cached: IdMap::default(),
            events: Vec::new(),
        }
    }

    pub(crate) fn num_total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks in the free list, cached ones included (they can be evicted).
    pub(crate) fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks referenced by at least one sequence.
    pub(crate) fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    /// The block registered under sequence hash `hash`, if any.
    pub(crate) fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Whether `block` sits in the free list (taking it would use up a free block).
    pub(crate) fn is_free(&self, block: BlockId) -> bool {
        self.blocks[block as usize].ref_count == 0
    }

    /// Takes one more reference on a cached block, taking it out of the free list if it was there.
    pub(crate) fn acquire(&mut self, block: BlockId) {
        if self.blocks[block as usize].ref_count == 0 {
            self.unlink(block);
        }
        self.blocks[block as usize].ref_count += 1;
    }

    /// Takes the least recently used free block, evicting its cached hash if it has one.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let block = self.head;
        if block == NIL {
            return None;
        }
        self.unlink(block);
        let b = &mut self.blocks[block as usize];
        b.ref_count = 1;
        if let Some(hash) = b.hash.take() {
            self.cached.remove(&hash);
            match self.events.last_mut() {
                Some(KvEvent::Removed { block_hashes }) => block_hashes.push(hash),
                _ => self.events.push(KvEvent::Removed {
                    block_hashes: vec![hash],
                }),
            }
        }
        Some(block)
    }

    /// Drops one reference; at zero the block joins the free list (keeping its hash).
    pub(crate) fn release(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        debug_assert!(b.ref_count > 0, "release of a free block");
        b.ref_count -= 1;
        if b.ref_count == 0 {
            if b.hash.is_some() {
                self.push_back(block);
            } else {
                self.push_front(block);
            }
        }
    }

    /// Registers the full `blocks` of one sequence under `hashes` (aligned with `blocks`), `parent` being the
    /// sequence hash of the block before `blocks[0]`. Blocks whose hash is already cached (another sequence
    /// computed the same prefix concurrently) stay unregistered. Each run of newly registered blocks becomes
    /// one [`KvEvent::Stored`].
    pub(crate) fn register(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        parent: Option<u64>,
    ) {
        debug_assert_eq!(blocks.len(), hashes.len());
        let mut prev = parent;
        let mut run_parent = parent;
        let mut run: Vec<StoredBlock> = Vec::new();
        for (&block, h) in blocks.iter().zip(hashes) {
            let b = &mut self.blocks[block as usize];
            if b.hash.is_none() && !self.cached.contains_key(&h.sequence) {
                b.hash = Some(h.sequence);
                self.cached.insert(h.sequence, block);
                if run.is_empty() {
                    run_parent = prev;
                }
                run.push(StoredBlock {
                    block_hash: h.sequence,
                    tokens_hash: h.local,
                });
            } else if !run.is_empty() {
                self.events.push(KvEvent::Stored {
                    parent_hash: run_parent,
                    blocks: std::mem::take(&mut run),
                });
            }
            prev = Some(h.sequence);
        }
        if !run.is_empty() {
            self.events.push(KvEvent::Stored {
                parent_hash: run_parent,
                blocks: run,
            });
        }
    }

    /// Moves the events recorded since the last call into `out`.
    pub(crate) fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        out.append(&mut self.events);
    }

    fn unlink(&mut self, block: BlockId) {
        let Block { prev, next, .. } = self.blocks[block as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[block as usize];
        b.prev = NIL;
        b.next = NIL;
        self.num_free -= 1;
    }

    fn push_back(&mut self, block: BlockId) {
        let tail = self.tail;
        let b = &mut self.blocks[block as usize];
        b.prev = tail;
        b.next = NIL;
        if tail == NIL {
            self.head = block;
        } else {
            self.blocks[tail as usize].next = block;
        }
        self.tail = block;
        self.num_free += 1;
    }

    fn push_front(&mut self, block: BlockId) {
        let head = self.head;
        let b = &mut self.blocks[block as usize];
        b.prev = NIL;
        b.next = head;
        if head == NIL {
            self.tail = block;
        } else {
            self.blocks[head as usize].prev = block;
        }
        self.head = block;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bh(sequence: u64) -> BlockHash {
        BlockHash {
            local: sequence + 1000,
            sequence,
        }
    }

    #[test]
    fn allocation_takes_least_recently_freed_cached_block_and_emits_removed() {
        let mut pool = BlockPool::new(3);
        let a: Vec<BlockId> = (0..3)
            .map(|_| pool.allocate().expect("free block"))
            .collect();
        assert_eq!(pool.allocate(), None);
        pool.register(&a, &[bh(10), bh(11), bh(12)], None);
        // Free in order 1, 0, 2: block 1 is the least recently used.
        for &b in &[a[1], a[0], a[2]] {
            pool.release(b);
        }
        assert_eq!(pool.num_free(), 3);
        assert_eq!(pool.allocate(), Some(a[1]));
        assert_eq!(pool.allocate(), Some(a[0]));
        assert_eq!(pool.lookup(11), None);
        assert_eq!(pool.lookup(12), Some(a[2]));
        let mut ev = Vec::new();
        pool.drain_events(&mut ev);
        assert_eq!(
            ev,
            vec![
                KvEvent::Stored {
                    parent_hash: None,
                    blocks: [10, 11, 12]
                        .map(|s| StoredBlock {
                            block_hash: s,
                            tokens_hash: s + 1000
                        })
                        .to_vec(),
                },
                KvEvent::Removed {
                    block_hashes: vec![11, 10]
                },
            ]
        );
    }

    #[test]
    fn block_in_use_is_never_evicted() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().expect("free block");
        pool.register(&[a], &[bh(7)], None);
        // A second sequence shares the block, then the first lets go.
        pool.acquire(a);
        pool.release(a);
        assert!(!pool.is_free(a));
        let b = pool.allocate().expect("free block");
        assert_ne!(a, b);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.lookup(7), Some(a));
        let mut ev = Vec::new();
        pool.drain_events(&mut ev);
        assert!(!ev.iter().any(|e| matches!(e, KvEvent::Removed { .. })));
    }

    #[test]
    fn cached_free_block_is_taken_back_out_of_the_free_list() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().expect("free block");
        pool.register(&[a], &[bh(7)], None);
        pool.release(a);
        assert_eq!(pool.num_free(), 2);
        pool.acquire(a);
        assert_eq!(pool.num_free(), 1);
        assert_ne!(pool.allocate(), Some(a));
    }

    #[test]
    fn unhashed_free_blocks_are_reused_before_cached_ones() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().expect("free block");
        let b = pool.allocate().expect("free block");
        pool.register(&[a], &[bh(1)], None);
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(1), Some(a));
    }

    #[test]
    fn already_cached_hash_splits_stored_runs_with_right_parents() {
        let mut pool = BlockPool::new(6);
        let x = pool.allocate().expect("free block");
        pool.register(&[x], &[bh(2)], Some(1));
        let mut ev = Vec::new();
        pool.drain_events(&mut ev);
        let blocks: Vec<BlockId> = (0..4)
            .map(|_| pool.allocate().expect("free block"))
            .collect();
        // Hash 2 is already cached under another block: runs [1] and [3, 4].
        pool.register(&blocks, &[bh(1), bh(2), bh(3), bh(4)], None);
        ev.clear();
        pool.drain_events(&mut ev);
        let stored = |parent_hash, hs: &[u64]| KvEvent::Stored {
            parent_hash,
            blocks: hs
                .iter()
                .map(|&s| StoredBlock {
                    block_hash: s,
                    tokens_hash: s + 1000,
                })
                .collect(),
        };
        assert_eq!(ev, vec![stored(None, &[1]), stored(Some(2), &[3, 4])]);
    }
}
