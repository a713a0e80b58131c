//! Deterministic block contents for tests, benches and hardware checks: every byte of a block is a
//! function of `(seed, block index, offset)`, so a receiver can verify each byte it got without the
//! sender's memory. Not a mock: real transfers move these bytes.

use crate::error::Result;
use crate::pool::BlockPool;

/// SplitMix64: a fast, well-mixed step from one word to the next.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn words(seed: u64, block: u32) -> impl Iterator<Item = [u8; 8]> {
    let mut state = mix(seed ^ mix(u64::from(block)));
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        (z ^ (z >> 29)).to_le_bytes()
    })
}

/// Fills `buf` with the content of `block` under `seed`.
pub fn fill_block(buf: &mut [u8], seed: u64, block: u32) {
    let mut words = words(seed, block);
    let mut chunks = buf.chunks_exact_mut(8);
    for (chunk, word) in (&mut chunks).zip(&mut words) {
        chunk.copy_from_slice(&word);
    }
    let tail = chunks.into_remainder();
    if let Some(word) = words.next() {
        let n = tail.len();
        tail.copy_from_slice(&word[..n]);
    }
}

/// The offset of the first byte of `buf` that differs from `block`'s content under `seed`.
pub fn first_mismatch(buf: &[u8], seed: u64, block: u32) -> Option<usize> {
    let mut words = words(seed, block);
    let mut chunks = buf.chunks_exact(8);
    for (i, (chunk, word)) in (&mut chunks).zip(&mut words).enumerate() {
        if chunk != word {
            let within = chunk.iter().zip(word).position(|(a, b)| *a != b)?;
            return Some(i * 8 + within);
        }
    }
    let tail = chunks.remainder();
    let word = words.next()?;
    let base = buf.len() - tail.len();
    tail.iter()
        .zip(word)
        .position(|(a, b)| *a != b)
        .map(|p| base + p)
}

/// Fills every block of `pool` with its own content under `seed`.
pub fn fill_pool(pool: &BlockPool, seed: u64) -> Result<()> {
    for block in 0..pool.num_blocks() as u32 {
        fill_block(&mut pool.write(block)?, seed, block);
    }
    Ok(())
}

/// Copies source block `src_blocks[i]` of `src` into slot `dst_slots[i]` of `dst` with one
/// thread's `memcpy`: the baseline the transports are measured against.
pub fn copy_blocks(
    src: &BlockPool,
    src_blocks: &[u32],
    dst: &BlockPool,
    dst_slots: &[u32],
) -> Result<()> {
    for (&block, &slot) in src_blocks.iter().zip(dst_slots) {
        dst.write(slot)?.copy_from_slice(&src.read(block)?);
    }
    Ok(())
}

/// Checks that slot `dst_slots[i]` of `pool` holds source block `src_blocks[i]`'s content; returns
/// the first `(slot, offset)` that does not.
pub fn verify_slots(
    pool: &BlockPool,
    seed: u64,
    src_blocks: &[u32],
    dst_slots: &[u32],
) -> Result<Option<(u32, usize)>> {
    for (&block, &slot) in src_blocks.iter().zip(dst_slots) {
        if let Some(offset) = first_mismatch(&pool.read(slot)?, seed, block) {
            return Ok(Some((slot, offset)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_depends_on_seed_block_and_offset_and_verifies() {
        let mut a = vec![0u8; 1003];
        fill_block(&mut a, 1, 5);
        assert_eq!(first_mismatch(&a, 1, 5), None);
        assert!(first_mismatch(&a, 2, 5).is_some());
        assert!(first_mismatch(&a, 1, 6).is_some());
        a[1001] ^= 1;
        assert_eq!(first_mismatch(&a, 1, 5), Some(1001));
        a[1001] ^= 1;
        a[17] ^= 0x80;
        assert_eq!(first_mismatch(&a, 1, 5), Some(17));
    }
}
