//! KV radix indexer: which worker holds which prefix of KV blocks.
//!
//! Owns a prefix tree over chained block hashes, with each node's set of workers, and answers "how many
//! leading blocks of this request does each worker hold" ([`KvIndexer::find_matches`]). It applies the
//! crate's [`KvEvent`]s; decoding wire formats (gRPC, vLLM msgpack), ordering, replay and transport are the
//! caller's business. Pure logic: no I/O, no async.
//!
//! # Semantics (as Dynamo's radix tree)
//! - The tree is navigated from the root by **local** block hash: a node's children are keyed by local hash.
//!   Each node also records its **sequence** hash.
//! - Per worker, a map sequence hash → node finds the parent of a `Stored` event and the blocks of a
//!   `Removed` event in O(1). A `Stored` event whose parent the worker does not hold is dropped, counted and
//!   reported as [`ApplyError::UnknownParent`]; removing a hash the worker does not hold is a counted no-op.
//! - A node holds the set of workers that have that block. A worker matches depth `d` of a request only if
//!   it holds all blocks `0..d` (so removing a middle block stops that worker's match there), so
//!   `find_matches` intersects the sets along the path and stops early once the intersection is empty.
//! - A node with no workers and no children is pruned (and then, maybe, its parent).
//! - The indexer trusts that a worker's sequence hash names one path (it is a hash of the whole prefix).
//!   Contradicting events (the same sequence hash stored under two different paths by one worker) are
//!   applied last-writer-wins and do not corrupt the tree, but may leave the worker's view approximate.
//!
//! # Design choices
//! - **Arena**: nodes live in a `Vec` indexed by `u32`, with a free list, so there are no per-node
//!   allocations, no reference counting and no pointer chasing through `Arc`s. Children are inline when there
//!   is one (most nodes: chains), then a small vector (linear scan) that turns into a hash map past [`FEW_CHILDREN`] entries (the
//!   root and popular branch points).
//! - **Worker sets are bitsets keyed by a dense worker index.** Workers get a dense `u32` index on first
//!   sight (reused after [`KvIndexer::remove_worker`]). All nodes' bitsets live in one `Vec<u64>` with a
//!   stride of `words` u64 words per node; the stride doubles (re-laying out the slab, rare) when a new dense
//!   index does not fit. With 256 workers a node's set is 4 words (32 bytes) and the per-depth intersection
//!   of `find_matches` is 4 ANDs, which is what makes a 256-deep walk over 256 workers cost a few µs.
//!   Sorted `Vec<WorkerId>`s would be smaller for very sparse sets but cost an allocation per node and a merge
//!   per depth.
//! - **Hashing**: keys are u64 hashes that are already uniformly random (or worker ids), so maps use a
//!   one-multiply Fx-style hasher ([`U64Hasher`]) instead of SipHash.
//! - **Concurrency**: one `parking_lot::RwLock` around the whole tree. `find_matches` and `stats` take the
//!   read lock, so readers never block each other; `apply` and `remove_worker` take the write lock for the
//!   duration of one event. A first version: sharding or an epoch-based tree can come if writers starve
//!   readers under real event rates.
//!
//! # Memory accounting
//! [`IndexStats::approx_bytes`] adds up the capacities of: the node arena (`size_of::<Node>()` per slot),
//! the bitset slab (8 bytes × words per slot), children vectors/maps, and the per-worker sequence-hash maps
//! (hashbrown: buckets ≈ capacity × 8/7, each an entry plus one control byte). Small fixed overheads (the
//! worker table) are ignored. Memory per indexed block is `approx_bytes / worker_block_refs`, where a
//! "worker block ref" is one (worker, block) pair. Computing it walks every node: call it occasionally.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::size_of;

use parking_lot::RwLock;

use crate::event::{KvEvent, StoredBlock};

/// Identity of a worker as the router knows it.
pub type WorkerId = u64;

/// Why an event was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A `Stored` event's parent is not a block this worker holds (missed or reordered events); the event
    /// was dropped.
    #[error(
        "stored event from worker {worker} follows block {parent:#018x}, which the worker does not hold; \
         {blocks} blocks dropped"
    )]
    UnknownParent {
        worker: WorkerId,
        parent: u64,
        blocks: usize,
    },
    /// The worker is not a member of the router (it left): its events are dropped.
    #[error("event from worker {worker:#018x}, which is not a member (it left); dropped")]
    NotMember { worker: WorkerId },
}

/// How much of one request a worker holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerScore {
    pub worker: WorkerId,
    /// Number of leading blocks of the request the worker holds (≥ 1 for every listed worker).
    pub matched_blocks: u32,
    /// Number of blocks the worker holds in total (its share of the tree), e.g. for tie-breaking.
    pub cached_blocks: usize,
}

/// Result of [`KvIndexer::find_matches`]: the workers that hold at least the first block of the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// One entry per worker with `matched_blocks ≥ 1`, in no particular order.
    pub scores: Vec<WorkerScore>,
}

impl OverlapScores {
    /// Leading blocks of the request that `worker` holds (0 when it is not listed).
    pub fn matched_blocks(&self, worker: WorkerId) -> u32 {
        self.scores
            .iter()
            .find(|s| s.worker == worker)
            .map_or(0, |s| s.matched_blocks)
    }
}

/// Size of the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Nodes in the tree, root excluded (distinct indexed blocks, plus emptied inner nodes kept for their
    /// children).
    pub blocks: usize,
    /// (worker, block) pairs indexed.
    pub worker_block_refs: usize,
    /// Workers known to the indexer.
    pub workers: usize,
    /// Approximate heap bytes held (see the module doc for what is counted).
    pub approx_bytes: usize,
    /// `Stored` events dropped because their parent was unknown.
    pub dropped_stored_events: u64,
    /// Removals of blocks the worker did not hold.
    pub unknown_removes: u64,
    /// Stored blocks whose sequence hash differed from the one already recorded at the same path
    /// (a worker hashing differently from the others); the block is indexed at the path anyway.
    pub sequence_mismatches: u64,
}

/// Prefix index of KV blocks across workers. `Send + Sync`; see the module doc.
#[derive(Default)]
pub struct KvIndexer {
    tree: RwLock<Tree>,
}

impl std::fmt::Debug for KvIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvIndexer")
            .field("stats", &self.stats())
            .finish()
    }
}

// === impl KvIndexer ===

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event of `worker`. On error the event was not applied (and was counted).
    pub fn apply(&self, worker: WorkerId, event: KvEvent) -> Result<(), ApplyError> {
        let mut tree = self.tree.write();
        match event {
            KvEvent::Stored {
                parent_hash,
                blocks,
            } => tree.store(worker, parent_hash, &blocks),
            KvEvent::Removed { block_hashes } => {
                tree.remove(worker, &block_hashes);
                Ok(())
            }
            KvEvent::Cleared | KvEvent::Unknown => {
                if let Some(&d) = tree.dense.get(&worker) {
                    tree.clear_worker(d);
                }
                Ok(())
            }
        }
    }

    /// Forgets `worker` entirely (it left); other workers are untouched.
    pub fn remove_worker(&self, worker: WorkerId) {
        self.tree.write().remove_worker(worker);
    }

    /// For a request's local block hashes (in order), how many leading blocks each worker holds.
    pub fn find_matches(&self, local_hashes: &[u64]) -> OverlapScores {
        self.tree.read().find_matches(local_hashes)
    }

    /// Size of the index. Walks every node (O(blocks)): call it occasionally.
    pub fn stats(&self) -> IndexStats {
        self.tree.read().stats()
    }
}

// === tree ===

/// Children stay a vector (linear scan) up to this many entries, then become a map.
const FEW_CHILDREN: usize = 8;

const ROOT: u32 = 0;
/// `Node::parent` of a slot on the free list.
const FREE: u32 = u32::MAX;

/// Fx-style hasher for keys that are single u64s (block hashes, worker ids).
#[derive(Clone, Copy, Default)]
pub struct U64Hasher(u64);

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(FX_K);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<U64Hasher>>;

enum Children {
    /// The common case in a chain: no allocation.
    One(u64, u32),
    Few(Vec<(u64, u32)>),
    Many(Box<FastMap<u64, u32>>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    #[inline]
    fn get(&self, local: u64) -> Option<u32> {
        match self {
            Children::One(l, c) => (*l == local).then_some(*c),
            Children::Few(v) => v.iter().find(|c| c.0 == local).map(|c| c.1),
            Children::Many(m) => m.get(&local).copied(),
        }
    }

    fn insert(&mut self, local: u64, child: u32) {
        match self {
            Children::Few(v) if v.is_empty() => *self = Children::One(local, child),
            Children::One(l, c) => *self = Children::Few(vec![(*l, *c), (local, child)]),
            Children::Few(v) if v.len() < FEW_CHILDREN => v.push((local, child)),
            Children::Few(v) => {
                let mut m: FastMap<u64, u32> = v.drain(..).collect();
                m.insert(local, child);
                *self = Children::Many(Box::new(m));
            }
            Children::Many(m) => {
                m.insert(local, child);
            }
        }
    }

    fn remove(&mut self, local: u64) {
        match self {
            Children::One(l, _) => {
                if *l == local {
                    *self = Children::default();
                }
            }
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|c| c.0 == local) {
                    v.swap_remove(i);
                }
            }
            Children::Many(m) => {
                m.remove(&local);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::One(..) => false,
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Children::One(..) => 0,
            Children::Few(v) => v.capacity() * size_of::<(u64, u32)>(),
            Children::Many(m) => {
                size_of::<FastMap<u64, u32>>() + map_bytes(m.capacity(), size_of::<(u64, u32)>())
            }
        }
    }
}

/// Approximate heap bytes of a hashbrown map with `capacity` and entries of `entry` bytes.
fn map_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    buckets * (entry + 1)
}

struct Node {
    local: u64,
    sequence: u64,
    /// Parent slot; [`FREE`] for a slot on the free list. The root's parent is itself.
    parent: u32,
    children: Children,
}

struct WorkerSlot {
    id: WorkerId,
    /// Sequence hash → node, for every block this worker holds.
    blocks: FastMap<u64, u32>,
}

struct Tree {
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    /// u64 words per node in `bits`.
    words: usize,
    /// Worker bitsets: node `n`'s set is `bits[n * words..(n + 1) * words]`, bit = dense worker index.
    bits: Vec<u64>,
    dense: FastMap<WorkerId, u32>,
    workers: Vec<Option<WorkerSlot>>,
    free_dense: Vec<u32>,
    live_blocks: usize,
    refs: usize,
    dropped_stored_events: u64,
    unknown_removes: u64,
    sequence_mismatches: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: vec![Node {
                local: 0,
                sequence: 0,
                parent: ROOT,
                children: Children::default(),
            }],
            free_nodes: Vec::new(),
            words: 1,
            bits: vec![0],
            dense: FastMap::default(),
            workers: Vec::new(),
            free_dense: Vec::new(),
            live_blocks: 0,
            refs: 0,
            dropped_stored_events: 0,
            unknown_removes: 0,
            sequence_mismatches: 0,
        }
    }
}

impl Tree {
    fn store(
        &mut self,
        worker: WorkerId,
        parent: Option<u64>,
        blocks: &[StoredBlock],
    ) -> Result<(), ApplyError> {
        let (d, mut cur) = match parent {
            None => (self.worker_index(worker), ROOT),
            Some(p) => {
                let found = self
                    .dense
                    .get(&worker)
                    .and_then(|&d| self.slot(d).and_then(|s| s.blocks.get(&p)).map(|&n| (d, n)));
                match found {
                    Some(found) => found,
                    None => {
                        self.dropped_stored_events += 1;
                        return Err(ApplyError::UnknownParent {
                            worker,
                            parent: p,
                            blocks: blocks.len(),
                        });
                    }
                }
            }
        };
        for &StoredBlock {
            block_hash: sequence,
            tokens_hash: local,
        } in blocks
        {
            let child = match self.nodes[cur as usize].children.get(local) {
                Some(c) => {
                    if self.nodes[c as usize].sequence != sequence {
                        self.sequence_mismatches += 1;
                    }
                    c
                }
                None => {
                    let c = self.alloc(cur, local, sequence);
                    self.nodes[cur as usize].children.insert(local, c);
                    c
                }
            };
            self.set_bit(child, d);
            let prev = match self.workers[d as usize].as_mut() {
                Some(slot) => slot.blocks.insert(sequence, child),
                None => unreachable!("dense index {d} has a slot"),
            };
            match prev {
                None => self.refs += 1,
                Some(old) if old != child => {
                    // Same sequence hash under another path: last writer wins.
                    self.clear_bit(old, d);
                    self.prune(old);
                }
                Some(_) => {}
            }
            cur = child;
        }
        Ok(())
    }

    fn remove(&mut self, worker: WorkerId, sequence_hashes: &[u64]) {
        let Some(&d) = self.dense.get(&worker) else {
            self.unknown_removes += sequence_hashes.len() as u64;
            return;
        };
        for h in sequence_hashes {
            let removed = self.workers[d as usize]
                .as_mut()
                .and_then(|s| s.blocks.remove(h));
            match removed {
                Some(n) => {
                    self.refs -= 1;
                    self.clear_bit(n, d);
                    self.prune(n);
                }
                None => self.unknown_removes += 1,
            }
        }
    }

    /// Drops every block of dense worker `d`, keeping the worker known.
    fn clear_worker(&mut self, d: u32) {
        let Some(slot) = self.workers[d as usize].as_mut() else {
            return;
        };
        let blocks = std::mem::take(&mut slot.blocks);
        self.refs -= blocks.len();
        for (_, n) in blocks {
            self.clear_bit(n, d);
            self.prune(n);
        }
    }

    fn remove_worker(&mut self, worker: WorkerId) {
        let Some(d) = self.dense.remove(&worker) else {
            return;
        };
        self.clear_worker(d);
        self.workers[d as usize] = None;
        self.free_dense.push(d);
    }

    fn slot(&self, d: u32) -> Option<&WorkerSlot> {
        self.workers.get(d as usize).and_then(Option::as_ref)
    }

    /// Dense index of `worker`, registering it (and widening the bitsets) on first sight.
    fn worker_index(&mut self, worker: WorkerId) -> u32 {
        if let Some(&d) = self.dense.get(&worker) {
            return d;
        }
        let d = match self.free_dense.pop() {
            Some(d) => d,
            None => {
                self.workers.push(None);
                u32::try_from(self.workers.len() - 1).expect("fewer than 2^32 workers")
            }
        };
        self.workers[d as usize] = Some(WorkerSlot {
            id: worker,
            blocks: FastMap::default(),
        });
        self.dense.insert(worker, d);
        let needed = d as usize / 64 + 1;
        if needed > self.words {
            self.widen(needed.next_power_of_two());
        }
        d
    }

    /// Re-lays out the bitset slab with `words` words per node.
    fn widen(&mut self, words: usize) {
        let mut bits = vec![0u64; self.nodes.len() * words];
        for (new, old) in bits
            .chunks_exact_mut(words)
            .zip(self.bits.chunks_exact(self.words))
        {
            new[..self.words].copy_from_slice(old);
        }
        self.bits = bits;
        self.words = words;
    }

    fn alloc(&mut self, parent: u32, local: u64, sequence: u64) -> u32 {
        self.live_blocks += 1;
        let node = Node {
            local,
            sequence,
            parent,
            children: Children::default(),
        };
        match self.free_nodes.pop() {
            Some(n) => {
                self.nodes[n as usize] = node;
                n
            }
            None => {
                self.nodes.push(node);
                self.bits.resize(self.bits.len() + self.words, 0);
                u32::try_from(self.nodes.len() - 1).expect("fewer than 2^32 nodes")
            }
        }
    }

    #[inline]
    fn set_bit(&mut self, n: u32, d: u32) {
        self.bits[n as usize * self.words + d as usize / 64] |= 1 << (d % 64);
    }

    #[inline]
    fn clear_bit(&mut self, n: u32, d: u32) {
        self.bits[n as usize * self.words + d as usize / 64] &= !(1 << (d % 64));
    }

    fn node_bits(&self, n: u32) -> &[u64] {
        let start = n as usize * self.words;
        &self.bits[start..start + self.words]
    }

    /// Frees `n` if it has no workers and no children, then its parent likewise, up to the root.
    fn prune(&mut self, mut n: u32) {
        while n != ROOT {
            let node = &self.nodes[n as usize];
            if node.parent == FREE
                || !node.children.is_empty()
                || self.node_bits(n).iter().any(|&w| w != 0)
            {
                return;
            }
            let (parent, local) = (node.parent, node.local);
            self.nodes[parent as usize].children.remove(local);
            let node = &mut self.nodes[n as usize];
            node.parent = FREE;
            node.children = Children::default();
            self.free_nodes.push(n);
            self.live_blocks -= 1;
            n = parent;
        }
    }

    fn find_matches(&self, local_hashes: &[u64]) -> OverlapScores {
        let mut out = OverlapScores::default();
        let words = self.words;
        let mut stack = [0u64; 16];
        let mut heap = Vec::new();
        let cur: &mut [u64] = if words <= stack.len() {
            &mut stack[..words]
        } else {
            heap.resize(words, 0);
            &mut heap
        };
        let mut node = ROOT;
        let mut depth = 0u32;
        for &local in local_hashes {
            let Some(child) = self.nodes[node as usize].children.get(local) else {
                break;
            };
            let bits = self.node_bits(child);
            let mut any = 0;
            if depth == 0 {
                cur.copy_from_slice(bits);
                any = cur.iter().fold(0, |a, &w| a | w);
            } else {
                for (k, (c, &b)) in cur.iter_mut().zip(bits).enumerate() {
                    let kept = *c & b;
                    let dropped = *c & !kept;
                    if dropped != 0 {
                        self.emit(&mut out, k, dropped, depth);
                    }
                    *c = kept;
                    any |= kept;
                }
            }
            if any == 0 {
                return out;
            }
            node = child;
            depth += 1;
        }
        for (k, &w) in cur.iter().enumerate() {
            if w != 0 {
                self.emit(&mut out, k, w, depth);
            }
        }
        out
    }

    /// Records `matched` blocks for every worker whose dense index is set in `word` (word number `k`).
    fn emit(&self, out: &mut OverlapScores, k: usize, mut word: u64, matched: u32) {
        while word != 0 {
            let d = k * 64 + word.trailing_zeros() as usize;
            word &= word - 1;
            if let Some(Some(slot)) = self.workers.get(d) {
                out.scores.push(WorkerScore {
                    worker: slot.id,
                    matched_blocks: matched,
                    cached_blocks: slot.blocks.len(),
                });
            }
        }
    }

    fn stats(&self) -> IndexStats {
        let children: usize = self.nodes.iter().map(|n| n.children.heap_bytes()).sum();
        let worker_maps: usize = self
            .workers
            .iter()
            .flatten()
            .map(|s| map_bytes(s.blocks.capacity(), size_of::<(u64, u32)>()))
            .sum();
        let approx_bytes = self.nodes.capacity() * size_of::<Node>()
            + self.bits.capacity() * size_of::<u64>()
            + self.free_nodes.capacity() * size_of::<u32>()
            + children
            + worker_maps
            + self.workers.capacity() * size_of::<Option<WorkerSlot>>()
            + map_bytes(self.dense.capacity(), size_of::<(WorkerId, u32)>());
        IndexStats {
            blocks: self.live_blocks,
            worker_block_refs: self.refs,
            workers: self.dense.len(),
            approx_bytes,
            dropped_stored_events: self.dropped_stored_events,
            unknown_removes: self.unknown_removes,
            sequence_mismatches: self.sequence_mismatches,
        }
    }
}

#[cfg(test)]
#[path = "indexer/tests.rs"]
mod tests;
