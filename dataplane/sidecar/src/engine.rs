//! The engine behind a sidecar, as the sidecar sees it: submit a tokenized request and read its
//! output (first a `Scheduled` with the prefix-cache hit, then tokens, then a finish reason), report
//! load, and emit KV events. The built-in simulator ([`dynamo_mocker`]) and a vLLM server
//! ([`crate::vllm::VllmEngine`]) implement it; the request and output types are the simulator's,
//! and every engine adapter speaks them.

use std::sync::Arc;

use dynamo_kv::KvEvent;
use dynamo_mocker::MockerConfig;
pub use dynamo_mocker::{FinishReason, LoadSnapshot, Output, Request, SubmitError};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    event_log::EventLog,
    vllm::{VllmConfig, VllmEngine},
};

/// Which engine a sidecar runs (`dynamo sidecar --engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The built-in simulated vLLM-style engine.
    Mocker,
    /// A vLLM OpenAI server beside the sidecar (`--vllm-url`), its KV events from its ZMQ
    /// publisher (`--vllm-kv-events`).
    Vllm,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Mocker => "mocker",
            EngineKind::Vllm => "vllm",
        }
    }
}

/// An engine serving requests for one sidecar.
pub trait Engine: Send + Sync + 'static {
    /// The engine's kind, reported in the worker's `Info`.
    fn kind(&self) -> EngineKind;
    /// Whether it serves now (an external engine is not while it loads or after it died).
    fn ready(&self) -> bool {
        true
    }
    /// The engine's own context length, when it reports one.
    fn context_length(&self) -> Option<u32> {
        None
    }
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
    /// The longest sequence its KV cache holds.
    fn context_length(&self) -> Option<u32> {
        let c = self.config();
        u32::try_from(c.num_gpu_blocks.saturating_mul(c.block_size)).ok()
    }
    fn block_size(&self) -> u32 {
        u32::try_from(self.config().block_size).unwrap_or(u32::MAX)
    }
    fn kv_blocks_total(&self) -> u64 {
        self.config().num_gpu_blocks as u64
    }
}

/// A started engine: the handle to submit to, and its own KV events (the built-in engine's; an
/// external engine's come through its event ingest instead).
pub struct Started {
    pub engine: Arc<dyn Engine>,
    pub events: Option<UnboundedReceiver<KvEvent>>,
    /// Changes each time an external engine (re)starts.
    pub epochs: Option<tokio::sync::watch::Receiver<u64>>,
    /// The built-in engine's own handle (for its KV block store).
    pub mocker: Option<dynamo_mocker::Engine>,
}

/// Starts an engine of `kind`; its tasks run on `tasks` until `stop`.
pub fn start(
    kind: EngineKind,
    mocker: &MockerConfig,
    vllm: Option<&VllmConfig>,
    log: &EventLog,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<Started> {
    match kind {
        EngineKind::Mocker => {
            let (tx, events) = unbounded_channel();
            let (engine, task) = dynamo_mocker::Engine::start(mocker.clone(), tx, stop)?;
            tasks.spawn(async move {
                if let Err(error) = task.await {
                    tracing::warn!(%error, "engine task failed");
                }
            });
            Ok(Started {
                engine: Arc::new(engine.clone()),
                events: Some(events),
                epochs: None,
                mocker: Some(engine),
            })
        }
        EngineKind::Vllm => {
            let config = vllm.ok_or_else(|| {
                anyhow::anyhow!("--engine vllm needs --vllm-url (the vLLM server's base URL)")
            })?;
            let engine = VllmEngine::start(config.clone(), log.clone(), tasks, stop)?;
            let epochs = Some(engine.epochs());
            Ok(Started {
                engine: Arc::new(engine),
                events: None,
                epochs,
                mocker: None,
            })
        }
    }
}
