//! The engine behind a sidecar, as the sidecar sees it: submit a tokenized request and read its
//! output (first a `Scheduled` with the prefix-cache hit, then tokens, then a finish reason), report
//! load, and emit KV events. The built-in simulator ([`dynamo_mocker`]) is the first implementation;
//! the request and output types are its, and any engine adapter speaks them.

use std::sync::Arc;

use dynamo_kv::KvEvent;
use dynamo_mocker::MockerConfig;
pub use dynamo_mocker::{FinishReason, LoadSnapshot, Output, Request, SubmitError};
use tokio::{
    sync::mpsc::{UnboundedReceiver, unbounded_channel},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Which engine a sidecar runs (`dynamo sidecar --engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The built-in simulated vLLM-style engine.
    Mocker,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Mocker => "mocker",
        }
    }
}

/// An engine serving requests for one sidecar.
pub trait Engine: Send + Sync + 'static {
    /// The engine's kind, reported in the worker's `Info`.
    fn kind(&self) -> EngineKind;
    /// Queues a request; its outputs arrive on the returned channel. Dropping the receiver cancels
    /// the request and frees its slot and KV blocks.
    fn submit(&self, request: Request) -> Result<UnboundedReceiver<Output>, SubmitError>;
    /// Current load (batch, queue, KV blocks, prefix-cache totals).
    fn load(&self) -> LoadSnapshot;
    /// Tokens per KV block.
    fn block_size(&self) -> u32;
    /// KV blocks the engine has.
    fn kv_blocks_total(&self) -> u64;
}

impl Engine for dynamo_mocker::Engine {
    fn kind(&self) -> EngineKind {
        EngineKind::Mocker
    }
    fn submit(&self, request: Request) -> Result<UnboundedReceiver<Output>, SubmitError> {
        dynamo_mocker::Engine::submit(self, request)
    }
    fn load(&self) -> LoadSnapshot {
        dynamo_mocker::Engine::load(self)
    }
    fn block_size(&self) -> u32 {
        u32::try_from(self.config().block_size).unwrap_or(u32::MAX)
    }
    fn kv_blocks_total(&self) -> u64 {
        self.config().num_gpu_blocks as u64
    }
}

/// A started engine: the handle to submit to, its KV events, and its task (which ends once `stop`
/// is cancelled).
pub struct Started {
    pub engine: Arc<dyn Engine>,
    pub events: UnboundedReceiver<KvEvent>,
    pub task: JoinHandle<()>,
}

/// Starts an engine of `kind`.
pub fn start(
    kind: EngineKind,
    mocker: &MockerConfig,
    stop: CancellationToken,
) -> Result<Started, dynamo_mocker::ConfigError> {
    match kind {
        EngineKind::Mocker => {
            let (tx, events) = unbounded_channel();
            let (engine, task) = dynamo_mocker::Engine::start(mocker.clone(), tx, stop)?;
            Ok(Started {
                engine: Arc::new(engine),
                events,
                task,
            })
        }
    }
}
