//! A simulated vLLM-style GPU engine ("mocker") for testing routing and serving without GPUs.
//!
//! It models what matters to the layers above an engine: a paged KV cache of `num_gpu_blocks` blocks with
//! prefix caching, LRU eviction and real KV events (hashed like Dynamo, via [`dynamo_kv`]); continuous
//! batching with `max_num_seqs`, `max_num_batched_tokens`, chunked prefill and preemption; and step times from
//! a timing model (Dynamo's mocker coefficients by default) divided by a `speedup` factor. Output tokens are
//! random ids from the vocabulary.
//!
//! - [`config`]: [`MockerConfig`] and its validation.
//! - [`timing`]: [`TimingModel`], the step-duration formula.
//! - [`kv_cache`]: the block pool and [`KvEvent`]s.
//! - [`scheduler`]: [`Scheduler`], the pure, synchronous, clock-free core.
//! - [`engine`]: [`Engine`], the async tokio driver with per-request output channels.
//!
//! It does not model model quality, tokenization or real memory; the transport (gRPC) lives in the sidecar.

pub mod config;
pub mod engine;
pub mod kv_cache;
pub mod scheduler;
pub mod timing;

pub use config::{ConfigError, MockerConfig};
pub use engine::Engine;
pub use kv_cache::{KvEvent, StoredBlock};
pub use scheduler::{
    FinishReason, LoadSnapshot, Output, Request, RequestId, Scheduler, StepOutput, SubmitError,
};
pub use timing::TimingModel;
pub use tokio_util::sync::CancellationToken;
