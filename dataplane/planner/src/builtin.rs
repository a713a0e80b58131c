//! The built-in engine (the mocker) describes itself: its profile follows from its timing model
//! and the cache its flags give it, so a graph on it needs no profiling run.

use dynamo_mocker::{MockerConfig, TimingModel};

use crate::profile::{DecodePoint, PrefillPoint, Profile};

/// The mocker flags that shape its speed, with the sidecar's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineShape {
    pub timing_scale: f64,
    pub num_gpu_blocks: f64,
    pub block_size: f64,
    pub max_num_seqs: f64,
    pub max_num_batched_tokens: f64,
    pub gpus: u32,
    /// How much faster than real time the engine runs (`--speedup-ratio`): the planner divides
    /// its interval and the observed latencies by it, so it thinks in the engine's own time.
    pub speedup: f64,
}

impl Default for EngineShape {
    fn default() -> EngineShape {
        EngineShape {
            timing_scale: 1.0,
            num_gpu_blocks: 16384.0,
            block_size: 64.0,
            max_num_seqs: 256.0,
            max_num_batched_tokens: 8192.0,
            gpus: 1,
            speedup: 1.0,
        }
    }
}

impl EngineShape {
    /// Reads the shape from a sidecar's arguments (`--flag value` or `--flag=value`) and its
    /// `DYN_*` environment; arguments win, as they do for the sidecar itself.
    pub fn from_flags(args: &[String], env: &[(String, String)]) -> Result<EngineShape, String> {
        let mut shape = EngineShape::default();
        let fields: [(&str, &str, &mut f64); 6] = [
            ("--speedup-ratio", "DYN_SPEEDUP_RATIO", &mut shape.speedup),
            (
                "--timing-scale",
                "DYN_TIMING_SCALE",
                &mut shape.timing_scale,
            ),
            (
                "--num-gpu-blocks",
                "DYN_NUM_GPU_BLOCKS",
                &mut shape.num_gpu_blocks,
            ),
            ("--block-size", "DYN_BLOCK_SIZE", &mut shape.block_size),
            (
                "--max-num-seqs",
                "DYN_MAX_NUM_SEQS",
                &mut shape.max_num_seqs,
            ),
            (
                "--max-num-batched-tokens",
                "DYN_MAX_NUM_BATCHED_TOKENS",
                &mut shape.max_num_batched_tokens,
            ),
        ];
        for (flag, var, slot) in fields {
            let alias = (flag == "--speedup-ratio").then(|| flag_value(args, "--speedup"));
            if let Some(v) = flag_value(args, flag)
                .or(alias.flatten())
                .or_else(|| env_value(env, var))
            {
                *slot = parse_positive(flag, &v)?;
            }
        }
        if let Some(v) = flag_value(args, "--gpus").or_else(|| env_value(env, "DYN_GPUS")) {
            shape.gpus = parse_positive("--gpus", &v)? as u32;
        }
        Ok(shape)
    }

    /// The engine's profile at speedup 1: idle TTFT per prompt length (chunked at
    /// `max_num_batched_tokens`, plus the pass that emits the first token), and ITL per
    /// concurrency and context from the KV fill they make.
    pub fn profile(&self) -> Profile {
        describe(
            &TimingModel::default().scaled(self.timing_scale),
            self,
            format!(
                "built-in engine timing model (timing scale {}, {} blocks of {} tokens, chunk {})",
                self.timing_scale,
                self.num_gpu_blocks,
                self.block_size,
                self.max_num_batched_tokens
            ),
        )
    }
}

/// What a running built-in engine says of itself (its `Info`): the profile of its own timing
/// model and cache, which its flags alone may not tell (`--kv-memory` sets the block count).
pub fn self_described(config: &MockerConfig, gpus: u32) -> Profile {
    let shape = EngineShape {
        timing_scale: 1.0,
        num_gpu_blocks: config.num_gpu_blocks as f64,
        block_size: config.block_size as f64,
        max_num_seqs: config.max_num_seqs as f64,
        max_num_batched_tokens: config.max_num_batched_tokens as f64,
        gpus,
        speedup: config.speedup,
    };
    describe(
        &config.timing,
        &shape,
        format!(
            "described by the built-in engine ({} blocks of {} tokens, chunk {})",
            config.num_gpu_blocks, config.block_size, config.max_num_batched_tokens
        ),
    )
}

fn describe(timing: &TimingModel, shape: &EngineShape, source: String) -> Profile {
    let (chunk, blocks, bs) = (
        shape.max_num_batched_tokens.max(1.0),
        shape.num_gpu_blocks.max(1.0),
        shape.block_size.max(1.0),
    );
    let prefill = (6..=14)
        .map(|k| {
            let isl = f64::from(1u32 << k);
            let (mut left, mut ms) = (isl, 0.0);
            while left > 0.0 {
                let c = left.min(chunk);
                ms += timing.prefill_ms(c as usize);
                left -= c;
            }
            PrefillPoint {
                isl,
                ttft_ms: ms + timing.decode_ms((isl / bs).ceil() / blocks),
            }
        })
        .collect();
    let mut decode = Vec::new();
    for context in [256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0] {
        for concurrency in [1.0, 8.0, 32.0, 64.0, 128.0, 256.0, 512.0] {
            if concurrency <= shape.max_num_seqs.max(1.0) {
                decode.push(DecodePoint {
                    concurrency,
                    context,
                    itl_ms: timing.decode_ms(concurrency * (context / bs).ceil() / blocks),
                });
            }
        }
    }
    Profile {
        source,
        gpus: shape.gpus.max(1),
        max_concurrency: Some(shape.max_num_seqs.max(1.0)),
        prefill,
        decode,
    }
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    // The last occurrence wins, as with clap's overrides.
    let mut found = None;
    for (i, a) in args.iter().enumerate() {
        if a == flag {
            found = args.get(i + 1).cloned();
        } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            found = Some(v.to_owned());
        }
    }
    found
}

fn env_value(env: &[(String, String)], var: &str) -> Option<String> {
    env.iter()
        .rev()
        .find(|(k, _)| k == var)
        .map(|(_, v)| v.clone())
}

fn parse_positive(flag: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{flag} {v:?} is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_comes_from_flags_then_env_then_defaults() {
        let args: Vec<String> = [
            "sidecar",
            "--timing-scale",
            "8",
            "--block-size=32",
            "--speedup",
            "6",
        ]
        .map(String::from)
        .to_vec();
        let env = vec![
            ("DYN_TIMING_SCALE".to_owned(), "2".to_owned()),
            ("DYN_MAX_NUM_SEQS".to_owned(), "64".to_owned()),
        ];
        let s = EngineShape::from_flags(&args, &env).expect("valid");
        assert_eq!(
            (
                s.timing_scale,
                s.block_size,
                s.max_num_seqs,
                s.num_gpu_blocks
            ),
            (8.0, 32.0, 64.0, 16384.0)
        );
        assert_eq!(s.speedup, 6.0);
        let bad = EngineShape::from_flags(&["--max-num-seqs".into(), "x".into()], &[]);
        assert!(bad.expect_err("invalid").contains("--max-num-seqs"));
    }

    #[test]
    fn the_profile_follows_the_timing_model() {
        let shape = EngineShape {
            timing_scale: 2.0,
            ..EngineShape::default()
        };
        let p = shape.profile().validated().expect("valid");
        let t = TimingModel::default().scaled(2.0);
        let want = t.prefill_ms(1024) + t.decode_ms(16.0 / 16384.0);
        assert!((p.ttft_ms(1024.0) - want).abs() < 1e-9);
        assert!((p.itl_ms(1.0, 1024.0) - t.decode_ms(16.0 / 16384.0)).abs() < 1e-9);
        // 16,384 tokens: two chunks of 8,192.
        let two = 2.0 * t.prefill_ms(8192) + t.decode_ms(256.0 / 16384.0);
        assert!((p.ttft_ms(16384.0) - two).abs() < 1e-9);
        assert_eq!(p.max_concurrency, Some(256.0));
    }

    #[test]
    fn a_running_engine_describes_itself_as_its_flags_would_and_knows_its_cache() {
        let config = MockerConfig {
            timing: TimingModel::default().scaled(2.0),
            ..MockerConfig::default()
        };
        let flags = EngineShape {
            timing_scale: 2.0,
            ..EngineShape::default()
        };
        let (own, from_flags) = (self_described(&config, 1), flags.profile());
        assert_eq!(own.prefill, from_flags.prefill);
        assert_eq!(own.decode, from_flags.decode);
        // A cache of 256 blocks (what --kv-memory gives it) fills 64x faster than the default's.
        let small = self_described(
            &MockerConfig {
                num_gpu_blocks: 256,
                ..config
            },
            2,
        );
        assert!(small.itl_ms(32.0, 2048.0) > own.itl_ms(32.0, 2048.0));
        assert_eq!(small.gpus, 2);
        assert!(small.source.contains("256 blocks"), "{}", small.source);
    }
}
