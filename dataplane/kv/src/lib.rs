//! KV-cache block hashing shared by engines, sidecars and the router.
//!
//! This crate owns how a token sequence is cut into KV blocks and hashed, so that every component agrees on
//! block identity. Hashing is Dynamo-compatible: see [`hash`]. It is pure logic with no I/O.
//!
//! It does not (yet) own the radix-tree indexer or the routing policy; those will live here as
//! `indexer` and `policy` modules.

pub mod hash;

pub use hash::{
    BlockHash, KV_HASH_SEED, block_hashes, extend_block_hashes, local_block_hash, sequence_hash,
};
