//! vLLM behind the sidecar: the engine adapter ([`engine`]: requests over its OpenAI server, health
//! and load from its `/health` and `/metrics`), and the ingest of its KV events (below).
//!
//! Ingest of vLLM's KV events: the engine's ZMQ publisher sends multipart messages
//! `[topic, seq (8 bytes, big-endian), payload]`, the payload a msgpack `KVEventBatch`
//! `(ts, events, data_parallel_rank)` whose events are `BlockStored`, `BlockRemoved` and
//! `AllBlocksCleared` (msgspec structs tagged with their class name).
//!
//! Both encodings vLLM has shipped are accepted: array-like (`["BlockStored", block_hashes,
//! parent_block_hash, token_ids, block_size, lora_id, medium, ...]`, vLLM ≤ 0.11) and map-like
//! (`{"type": "BlockStored", "block_hashes": ...}`, later versions). Block hashes may be integers or
//! bytes (vLLM's sha256 hashing); bytes are folded to 64 bits with xxh3.
//!
//! vLLM's block hashes become the events' sequence hashes (they chain within one worker, which is
//! all the index needs); the local hash of each block is computed here from its token ids with
//! Dynamo's hashing, so requests routed by token ids match them. Events for blocks in another
//! medium than the GPU (offload tiers) and for LoRA adapters are skipped and counted: the router
//! hashes prompts without adapter identity.
//!
//! A malformed frame is counted, logged and skipped; a gap in sequence numbers is repaired from
//! the publisher's replay socket when one is configured, and otherwise answered by clearing the
//! worker's blocks (a stale index would route to blocks that are gone).

pub mod decode;
pub mod engine;
pub mod metrics;
pub mod zmq;

pub use decode::{DecodeError, VllmEvent, decode_batch, to_events};
pub use engine::{VllmConfig, VllmEngine};
pub use zmq::{IngestStats, ZmqSource, run};
