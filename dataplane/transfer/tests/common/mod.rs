//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use dynamo_transfer::{BlockPool, SharedSecret, testing};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Upper bound for any single wait in a test: a hang fails the test instead of the CI run.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn secret() -> SharedSecret {
    SharedSecret::new(b"graph-7f3a-shared-secret-for-tests".to_vec()).expect("valid secret")
}

pub fn other_secret() -> SharedSecret {
    SharedSecret::new(b"another-graph-entirely-9c1d".to_vec()).expect("valid secret")
}

/// A pool filled with the deterministic content of `seed`.
pub fn filled_pool(block_bytes: usize, num_blocks: usize, seed: u64, shared: bool) -> BlockPool {
    let pool = if shared {
        BlockPool::new_shared(block_bytes, num_blocks)
    } else {
        BlockPool::new(block_bytes, num_blocks)
    }
    .expect("pool");
    testing::fill_pool(&pool, seed).expect("fill");
    pool
}

/// A random transfer: `n` source blocks (repeats allowed) and `n` distinct destination slots.
pub fn random_set(
    rng: &mut SmallRng,
    src_blocks: u32,
    dst_slots: u32,
    n: usize,
) -> (Vec<u32>, Vec<u32>) {
    let blocks = (0..n).map(|_| rng.random_range(0..src_blocks)).collect();
    let mut slots: Vec<u32> = (0..dst_slots).collect();
    slots.shuffle(rng);
    slots.truncate(n);
    (blocks, slots)
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// A fresh socket path in the temp dir.
pub fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "dynamo-transfer-{tag}-{}-{:x}.sock",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Asserts that `slots` hold `blocks`' content, naming the first wrong byte.
pub fn assert_delivered(pool: &BlockPool, seed: u64, blocks: &[u32], slots: &[u32]) {
    let bad = testing::verify_slots(pool, seed, blocks, slots).expect("slots readable");
    assert_eq!(bad, None, "(slot, offset) of the first wrong byte");
}
