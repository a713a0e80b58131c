//! The one KV-cache event type, from engine to index: what the built-in engine emits, what the
//! sidecar numbers and publishes (the gRPC event plane carries it field for field), what the vLLM
//! ingest decodes into, and what the [`crate::KvIndexer`] applies.

/// A change to the set of KV blocks one worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Newly cached full blocks of one sequence, in sequence order.
    Stored {
        /// Sequence hash of the block just before the first stored one (`None`: the chain starts
        /// at the root).
        parent_hash: Option<u64>,
        blocks: Vec<StoredBlock>,
    },
    /// Blocks (by sequence hash) evicted from the cache.
    Removed { block_hashes: Vec<u64> },
    /// Every cached block was dropped.
    Cleared,
    /// The worker may hold blocks no event reported (its publisher's events were lost beyond
    /// replay): its cache is unknown until the next [`KvEvent::Cleared`]. The index drops the
    /// blocks it had for the worker; the router assumes no overlap there and learns from its own
    /// decisions meanwhile.
    Unknown,
}

/// One block of a [`KvEvent::Stored`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    /// Sequence hash (chained over all blocks up to this one).
    pub block_hash: u64,
    /// Local hash of this block's tokens alone.
    pub tokens_hash: u64,
}

impl KvEvent {
    /// A `Stored` event for a chain of `(local hash, sequence hash)` pairs.
    pub fn stored(parent_hash: Option<u64>, blocks: impl IntoIterator<Item = (u64, u64)>) -> Self {
        KvEvent::Stored {
            parent_hash,
            blocks: blocks
                .into_iter()
                .map(|(tokens_hash, block_hash)| StoredBlock {
                    block_hash,
                    tokens_hash,
                })
                .collect(),
        }
    }
}
