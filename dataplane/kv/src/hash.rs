//! Dynamo-compatible KV-block hashing.
//!
//! A prompt is cut into blocks of `block_size` tokens; only full blocks are hashed.
//!
//! - The **local hash** of a block is xxh3-64 with seed [`KV_HASH_SEED`] over the block's token ids,
//!   each encoded as a `u32` little-endian.
//! - The **sequence hash** chains: the first block's sequence hash is its local hash; every later block's is
//!   xxh3-64 (same seed) over `parent_sequence_hash.to_le_bytes() ++ local_hash.to_le_bytes()`.
//!
//! Two sequences therefore share the sequence hash of block `k` exactly when they share the first `k + 1`
//! full blocks of tokens, which is what the prefix cache and the router's indexer rely on.

use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// Seed of every xxh3 hash in Dynamo's KV-block hashing.
pub const KV_HASH_SEED: u64 = 1337;

/// Bytes hashed in one shot from a stack buffer; longer blocks are streamed in chunks of this size.
const STACK_BYTES: usize = 1024;
const STACK_TOKENS: usize = STACK_BYTES / 4;

/// Hashes of one full KV block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash {
    /// Hash of this block's tokens alone ([`local_block_hash`]).
    pub local: u64,
    /// Hash of this block chained with all blocks before it ([`sequence_hash`]).
    pub sequence: u64,
}

/// xxh3-64 (seed [`KV_HASH_SEED`]) over `tokens` as `u32` little-endian bytes. Does not allocate.
pub fn local_block_hash(tokens: &[u32]) -> u64 {
    let mut buf = [0u8; STACK_BYTES];
    if tokens.len() <= STACK_TOKENS {
        let n = fill(&mut buf, tokens);
        return xxh3_64_with_seed(&buf[..n], KV_HASH_SEED);
    }
    // Streaming gives the same digest as the one-shot function over the concatenated bytes.
    let mut hasher = Xxh3::with_seed(KV_HASH_SEED);
    for chunk in tokens.chunks(STACK_TOKENS) {
        let n = fill(&mut buf, chunk);
        hasher.update(&buf[..n]);
    }
    hasher.digest()
}

/// Writes `tokens` as little-endian bytes into `buf` (which must be large enough); returns the byte count.
fn fill(buf: &mut [u8], tokens: &[u32]) -> usize {
    for (dst, t) in buf.chunks_exact_mut(4).zip(tokens) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
    tokens.len() * 4
}

/// Sequence hash of a block whose local hash is `local`, following the block whose sequence hash is
/// `parent` (`None` for the first block, whose sequence hash is its local hash).
pub fn sequence_hash(parent: Option<u64>, local: u64) -> u64 {
    match parent {
        None => local,
        Some(p) => {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&p.to_le_bytes());
            buf[8..].copy_from_slice(&local.to_le_bytes());
            xxh3_64_with_seed(&buf, KV_HASH_SEED)
        }
    }
}

/// Chained hashes of every full block of `tokens`; a trailing partial block is not hashed.
///
/// # Panics
/// If `block_size` is 0.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    assert!(block_size > 0, "block_size must be >= 1");
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    extend_block_hashes(&mut out, tokens, block_size);
    out
}

/// Appends to `out` the hashes of the full blocks of `tokens` that `out` does not hold yet.
///
/// `out` must hold the hashes of a prefix of `tokens` (as produced by an earlier call on a prefix of the same
/// sequence), so a growing sequence hashes each block exactly once.
///
/// # Panics
/// If `block_size` is 0.
pub fn extend_block_hashes(out: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
    assert!(block_size > 0, "block_size must be >= 1");
    let full = tokens.len() / block_size;
    if out.len() >= full {
        return;
    }
    out.reserve(full - out.len());
    let mut parent = out.last().map(|b| b.sequence);
    for block in tokens[out.len() * block_size..full * block_size].chunks_exact(block_size) {
        let local = local_block_hash(block);
        let sequence = sequence_hash(parent, local);
        out.push(BlockHash { local, sequence });
        parent = Some(sequence);
    }
}

#[cfg(test)]
mod tests {
    /// Values computed by NVIDIA Dynamo 1.6.1 itself (`dynamo._core.compute_block_hash_for_seq` from the
    /// `ai-dynamo-runtime` wheel), so our local block hashes are interchangeable with Dynamo's.
    #[test]
    fn local_hashes_match_dynamo_1_6_1() {
        let tokens: Vec<u32> = (1..=128).collect();
        let ours: Vec<u64> = block_hashes(&tokens, 64).iter().map(|b| b.local).collect();
        assert_eq!(ours, [17732852320395450624, 16977986247603081716]);
        let ours: Vec<u64> = block_hashes(&[1, 2, 3, 4], 2)
            .iter()
            .map(|b| b.local)
            .collect();
        assert_eq!(ours, [10773075109927122010, 2662118915037317746]);
    }

    use super::*;
    use proptest::prelude::*;

    fn le_bytes(tokens: &[u32]) -> Vec<u8> {
        tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    #[test]
    fn local_hash_is_xxh3_seed_1337_over_u32_le() {
        assert_eq!(
            local_block_hash(&[1, 2, 3]),
            xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0], 1337)
        );
        assert_eq!(local_block_hash(&[]), xxh3_64_with_seed(&[], 1337));
        let big = [0xdead_beef_u32, 7, u32::MAX];
        assert_eq!(
            local_block_hash(&big),
            xxh3_64_with_seed(&le_bytes(&big), 1337)
        );
    }

    #[test]
    fn local_hash_of_long_block_streams_to_same_digest() {
        for len in [255, 256, 257, 512, 1000, 4096] {
            let tokens: Vec<u32> = (0..len)
                .map(|i: u32| i.wrapping_mul(2_654_435_761))
                .collect();
            assert_eq!(
                local_block_hash(&tokens),
                xxh3_64_with_seed(&le_bytes(&tokens), KV_HASH_SEED),
                "len {len}"
            );
        }
    }

    #[test]
    fn first_sequence_hash_is_local_hash_and_later_ones_chain() {
        let local = local_block_hash(&[5, 6]);
        assert_eq!(sequence_hash(None, local), local);
        let mut bytes = 42u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&local.to_le_bytes());
        assert_eq!(
            sequence_hash(Some(42), local),
            xxh3_64_with_seed(&bytes, 1337)
        );
    }

    #[test]
    fn block_hashes_chain_and_ignore_partial_block() {
        let tokens = [1, 2, 3, 4, 5, 6, 7];
        let hs = block_hashes(&tokens, 2);
        assert_eq!(hs.len(), 3);
        assert_eq!(hs[0].local, local_block_hash(&[1, 2]));
        assert_eq!(hs[0].sequence, hs[0].local);
        assert_eq!(hs[1].local, local_block_hash(&[3, 4]));
        assert_eq!(
            hs[1].sequence,
            sequence_hash(Some(hs[0].sequence), hs[1].local)
        );
        assert_eq!(
            hs[2].sequence,
            sequence_hash(Some(hs[1].sequence), hs[2].local)
        );
        assert!(block_hashes(&tokens[..1], 2).is_empty());
    }

    #[test]
    fn same_block_at_different_positions_has_same_local_but_different_sequence_hash() {
        let hs = block_hashes(&[9, 9, 9, 9], 2);
        assert_eq!(hs[0].local, hs[1].local);
        assert_ne!(hs[0].sequence, hs[1].sequence);
    }

    proptest! {
        #[test]
        fn extend_in_pieces_equals_hashing_at_once(
            tokens in proptest::collection::vec(any::<u32>(), 0..200),
            block_size in 1usize..9,
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(tokens.len())).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            for c in cuts {
                extend_block_hashes(&mut out, &tokens[..c], block_size);
            }
            extend_block_hashes(&mut out, &tokens, block_size);
            prop_assert_eq!(out, block_hashes(&tokens, block_size));
        }

        #[test]
        fn sequences_sharing_k_blocks_share_exactly_k_sequence_hashes(
            prefix in proptest::collection::vec(0u32..4, 0..40),
            a_tail in proptest::collection::vec(0u32..4, 0..40),
            b_tail in proptest::collection::vec(0u32..4, 0..40),
            block_size in 1usize..6,
        ) {
            let a: Vec<u32> = prefix.iter().chain(&a_tail).copied().collect();
            let b: Vec<u32> = prefix.iter().chain(&b_tail).copied().collect();
            let ha = block_hashes(&a, block_size);
            let hb = block_hashes(&b, block_size);
            // Number of leading full blocks with identical tokens.
            let k = a.chunks_exact(block_size)
                .zip(b.chunks_exact(block_size))
                .take_while(|(x, y)| x == y)
                .count();
            let shared = ha.iter().zip(&hb).take_while(|(x, y)| x.sequence == y.sequence).count();
            prop_assert_eq!(shared, k);
            // Once diverged, no later sequence hash matches at the same position either.
            for (x, y) in ha.iter().zip(&hb).skip(k) {
                prop_assert_ne!(x.sequence, y.sequence);
            }
        }
    }
}
