//! KV-cache block hashing shared by engines, sidecars and the router.
//!
//! This crate owns how a token sequence is cut into KV blocks and hashed, so that every component agrees on
//! block identity. Hashing is Dynamo-compatible: see [`hash`]. It is pure logic with no I/O.
//!
//! It also owns the KV radix indexer ([`indexer`]): which worker holds which prefix of blocks. It does not
//! (yet) own the routing policy; that will live here as a `policy` module.

pub mod hash;
pub mod indexer;

pub use hash::{
    BlockHash, KV_HASH_SEED, block_hashes, extend_block_hashes, local_block_hash, sequence_hash,
};
pub use indexer::{
    ApplyError, IndexEvent, IndexStats, KvIndexer, OverlapScores, WorkerId, WorkerScore,
};
