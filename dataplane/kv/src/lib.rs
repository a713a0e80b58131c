//! KV-cache block hashing shared by engines, sidecars and the router.
//!
//! This crate owns how a token sequence is cut into KV blocks and hashed, so that every component agrees on
//! block identity. Hashing is Dynamo-compatible: see [`hash`]. It is pure logic with no I/O.
//!
//! It also owns the KV radix indexer ([`indexer`]): which worker holds which prefix of blocks. It also owns
//! the routing [`policy`]: which worker a request should go to, given the index and each worker's load.
//! Connections, membership and event transport are the frontend's.

pub mod event;
pub mod hash;
pub mod indexer;
pub mod policy;

pub use event::{KvEvent, StoredBlock};
pub use hash::{
    BlockHash, KV_HASH_SEED, block_hashes, extend_block_hashes, local_block_hash, sequence_hash,
};
pub use indexer::{ApplyError, IndexStats, KvIndexer, OverlapScores, WorkerId, WorkerScore};
