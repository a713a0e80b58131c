//! Engine configuration: sizes of the KV cache and the batch, sampling behaviour, and the timing model.
//!
//! [`MockerConfig::validate`] checks a configuration once, before an engine or scheduler is built; nothing in
//! this module reads the environment or the command line (the binary's flags map onto these fields).

use crate::timing::TimingModel;

/// Configuration of one simulated engine. Defaults follow vLLM's and Dynamo's mocker.
#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    /// KV-cache blocks on the simulated GPU.
    pub num_gpu_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Token budget of one step: prefill-chunk tokens plus one per decoding sequence.
    pub max_num_batched_tokens: usize,
    /// Reuse KV blocks of earlier requests that share a prompt prefix (and publish KV events).
    pub enable_prefix_caching: bool,
    /// Split long prompts across steps. When off, a prompt is prefilled whole in one step; one longer than
    /// `max_num_batched_tokens` still runs, alone.
    pub enable_chunked_prefill: bool,
    /// Admit a new request only while the free blocks left after its allocation stay at or above
    /// `watermark * num_gpu_blocks` (ignored when nothing runs, so a lone request always makes progress).
    pub watermark: f64,
    /// Every simulated duration is divided by this.
    pub speedup: f64,
    /// Output tokens are drawn from `[0, vocab_size)`.
    pub vocab_size: u32,
    /// End-of-sequence ids; the first one is what the engine emits to end a request early.
    pub eos_token_ids: Vec<u32>,
    /// Ids never emitted as random output tokens.
    pub special_token_ids: Vec<u32>,
    /// When a request does not set `ignore_eos`, each generated token is EOS with probability
    /// `1 / mean_output_tokens` (0: never).
    pub mean_output_tokens: u32,
    /// Seed of the per-request RNGs of requests that bring no seed of their own.
    pub seed: u64,
    /// Step-duration model.
    pub timing: TimingModel,
    /// How long a prefill-only request's blocks stay held for a decode worker that does not
    /// release them (it died, or gave up).
    pub prefill_hold: std::time::Duration,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            watermark: 0.01,
            speedup: 1.0,
            vocab_size: 32000,
            eos_token_ids: Vec::new(),
            special_token_ids: Vec::new(),
            mean_output_tokens: 128,
            seed: 0,
            timing: TimingModel::default(),
            prefill_hold: std::time::Duration::from_secs(30),
        }
    }
}

/// Why a [`MockerConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("block_size must be >= 1")]
    ZeroBlockSize,
    #[error("num_gpu_blocks must be >= 1")]
    ZeroGpuBlocks,
    #[error("max_num_seqs must be >= 1")]
    ZeroMaxNumSeqs,
    #[error(
        "max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs}) so every running sequence can decode each step"
    )]
    BatchedTokensBelowMaxNumSeqs {
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    },
    #[error("watermark must be in [0, 1) (got {0})")]
    InvalidWatermark(f64),
    #[error("speedup must be > 0 (got {0})")]
    InvalidSpeedup(f64),
    #[error("vocab_size must be >= 1")]
    ZeroVocabSize,
    #[error(
        "every token id in [0, {vocab_size}) is special or EOS: no output token can be sampled"
    )]
    NoSampleableTokens { vocab_size: u32 },
    #[error("timing coefficients must be finite (got prefill {prefill:?}, decode {decode:?})")]
    InvalidTiming { prefill: [f64; 3], decode: [f64; 3] },
}

// === impl MockerConfig ===

impl MockerConfig {
    /// Checks that the configuration can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.block_size == 0 {
            return Err(ConfigError::ZeroBlockSize);
        }
        if self.num_gpu_blocks == 0 {
            return Err(ConfigError::ZeroGpuBlocks);
        }
        if self.max_num_seqs == 0 {
            return Err(ConfigError::ZeroMaxNumSeqs);
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(ConfigError::BatchedTokensBelowMaxNumSeqs {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            });
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return Err(ConfigError::InvalidWatermark(self.watermark));
        }
        if !(self.speedup > 0.0 && self.speedup.is_finite()) {
            return Err(ConfigError::InvalidSpeedup(self.speedup));
        }
        if self.vocab_size == 0 {
            return Err(ConfigError::ZeroVocabSize);
        }
        if self.excluded_token_ids().len() >= self.vocab_size as usize {
            return Err(ConfigError::NoSampleableTokens {
                vocab_size: self.vocab_size,
            });
        }
        let t = &self.timing;
        if !t.prefill.iter().chain(&t.decode).all(|c| c.is_finite()) {
            return Err(ConfigError::InvalidTiming {
                prefill: t.prefill,
                decode: t.decode,
            });
        }
        Ok(())
    }

    /// Sorted, deduplicated ids inside the vocabulary that random sampling must skip (special and EOS ids).
    pub(crate) fn excluded_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .special_token_ids
            .iter()
            .chain(&self.eos_token_ids)
            .copied()
            .filter(|&t| t < self.vocab_size)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Free blocks that admission keeps in reserve.
    pub(crate) fn watermark_blocks(&self) -> usize {
        (self.watermark * self.num_gpu_blocks as f64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(MockerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn invalid_configs_are_rejected_with_clear_messages() {
        let bad = |f: fn(&mut MockerConfig)| {
            let mut c = MockerConfig::default();
            f(&mut c);
            c.validate()
                .expect_err("config should be rejected")
                .to_string()
        };
        assert_eq!(bad(|c| c.block_size = 0), "block_size must be >= 1");
        assert_eq!(bad(|c| c.speedup = -1.0), "speedup must be > 0 (got -1)");
        assert_eq!(
            bad(|c| c.max_num_batched_tokens = 8),
            "max_num_batched_tokens (8) must be >= max_num_seqs (256) so every running sequence can decode each step"
        );
        assert_eq!(
            bad(|c| c.watermark = 1.5),
            "watermark must be in [0, 1) (got 1.5)"
        );
        assert_eq!(
            bad(|c| {
                c.vocab_size = 2;
                c.eos_token_ids = vec![0];
                c.special_token_ids = vec![1, 7];
            }),
            "every token id in [0, 2) is special or EOS: no output token can be sampled"
        );
        assert!(bad(|c| c.timing.decode[0] = f64::NAN).starts_with("timing coefficients"));
    }
}
