//! The async driver: runs a [`Scheduler`] on a tokio task in simulated real time.
//!
//! Each loop iteration takes every pending request without blocking, drops requests whose receiver is gone,
//! runs one scheduler step, waits out the step's simulated duration, then delivers the step's outputs and KV
//! events. Waits follow a virtual deadline (`next += duration`, restarted from now when the loop is idle or
//! has fallen more than 5 ms behind) so that timer granularity and wake-up latency do not add up over steps:
//! the loop only sleeps when the deadline is more than 1 ms away, and with a large `speedup` it runs steps
//! back to back (yielding to the runtime between them). When it has nothing to run it waits for the next
//! request.
//!
//! This module owns channels, time and shutdown; all scheduling decisions live in [`crate::scheduler`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender, error::TryRecvError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, MockerConfig};
use crate::kv_cache::{IdMap, KvEvent};
use crate::scheduler::{LoadSnapshot, Output, Request, RequestId, Scheduler, SubmitError};

/// Sleeps shorter than this are skipped (tokio timers have 1 ms granularity).
const MIN_SLEEP: Duration = Duration::from_millis(1);
/// How often a loop that could run nothing rechecks without a command.
const IDLE_RECHECK: Duration = Duration::from_millis(5);
/// When the loop falls further behind its virtual deadline than this, the deadline restarts from now.
const MAX_LAG: Duration = Duration::from_millis(5);

/// Handle to a running engine task; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: UnboundedSender<Command>,
    shared: Arc<Shared>,
}

struct Shared {
    config: MockerConfig,
    load: Mutex<LoadSnapshot>,
    shutdown: CancellationToken,
}

/// What the engine task is asked to do between steps.
enum Command {
    Submit {
        req: Request,
        outputs: UnboundedSender<Output>,
    },
    /// Free a held prefill's blocks.
    Release {
        lease: RequestId,
        reply: oneshot::Sender<bool>,
    },
    /// A pull announced by [`Output::PullKv`] ended ([`Scheduler::transfer_done`]).
    TransferDone { id: RequestId, ok: bool },
}

// === impl Engine ===

impl Engine {
    /// Validates `config` and spawns the engine loop on the current tokio runtime (panics outside one).
    ///
    /// KV events go to `events`; if its receiver is gone they are dropped. The loop ends when `shutdown` is
    /// cancelled or every `Engine` handle is dropped; unfinished requests then see their stream close.
    pub fn start(
        config: MockerConfig,
        events: UnboundedSender<KvEvent>,
        shutdown: CancellationToken,
    ) -> Result<(Engine, JoinHandle<()>), ConfigError> {
        let scheduler = Scheduler::new(config.clone())?;
        let (commands, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            load: Mutex::new(scheduler.load()),
            config,
            shutdown,
        });
        let driver = Driver {
            scheduler,
            commands: rx,
            streams: IdMap::default(),
            holds: VecDeque::new(),
            events,
            shared: Arc::clone(&shared),
        };
        let task = tokio::spawn(driver.run());
        Ok((Engine { commands, shared }, task))
    }

    /// Queues a request and returns the receiver of its outputs. Dropping the receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Output>, SubmitError> {
        req.validate(&self.shared.config)?;
        if self.shared.shutdown.is_cancelled() {
            return Err(SubmitError::Stopped);
        }
        let (outputs, rx) = mpsc::unbounded_channel();
        self.commands
            .send(Command::Submit { req, outputs })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(rx)
    }

    /// Frees the blocks a prefill-only request left held under `lease`. `false`: not held (already
    /// released or expired, or the engine stopped).
    pub async fn release(&self, lease: RequestId) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Release { lease, reply })
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The pull announced by [`Output::PullKv`] for request `id` ended (see
    /// [`Scheduler::transfer_done`]).
    pub fn transfer_done(&self, id: RequestId, ok: bool) {
        // A stopped engine has nothing left to resume.
        let _ = self.commands.send(Command::TransferDone { id, ok });
    }

    /// Load as of the last step.
    pub fn load(&self) -> LoadSnapshot {
        *self
            .shared
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn config(&self) -> &MockerConfig {
        &self.shared.config
    }
}

// === impl Driver ===

/// The engine task's state.
struct Driver {
    scheduler: Scheduler,
    commands: UnboundedReceiver<Command>,
    streams: IdMap<RequestId, UnboundedSender<Output>>,
    /// Held prefills by expiry (leases in the order they were taken).
    holds: VecDeque<(Instant, RequestId)>,
    events: UnboundedSender<KvEvent>,
    shared: Arc<Shared>,
}

impl Driver {
    async fn run(mut self) {
        let shutdown = self.shared.shutdown.clone();
        let mut next = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Take every pending request without blocking.
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.stop(),
                }
            }
            self.drop_closed_streams();
            self.expire_holds();

            if !self.scheduler.has_work() {
                self.publish_load();
                let expiry = self.holds.front().map(|&(at, _)| at);
                if !self.idle(&shutdown, expiry).await {
                    break;
                }
                next = Instant::now();
                continue;
            }

            let step = self.scheduler.step();
            self.publish_load();
            if step.outputs.is_empty() && step.events.is_empty() && step.duration.is_zero() {
                // Nothing could run (waiting requests need blocks that pulls hold): wait for a
                // command (a pull's end, a cancel) rather than spin; recheck now and then.
                if !self
                    .idle(&shutdown, Some(Instant::now() + IDLE_RECHECK))
                    .await
                {
                    break;
                }
                next = Instant::now();
                continue;
            }
            let now = Instant::now();
            if now.saturating_duration_since(next) > MAX_LAG {
                next = now;
            }
            next += step.duration;
            if next > now + MIN_SLEEP {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(next) => {}
                }
            } else {
                tokio::task::yield_now().await;
            }
            self.deliver(step.outputs);
            for event in step.events {
                // A gone receiver only means nobody listens to events.
                let _ = self.events.send(event);
            }
        }
        self.stop();
    }

    /// Waits for the next command (taking it), or until `wake`. `false`: the engine stops.
    async fn idle(&mut self, shutdown: &CancellationToken, wake: Option<Instant>) -> bool {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            cmd = self.commands.recv() => match cmd {
                Some(cmd) => {
                    self.accept(cmd);
                    true
                }
                None => false,
            },
            () = sleep_until_some(wake) => true,
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Submit { req, outputs } => match self.scheduler.add_request(req) {
                Ok(id) => {
                    self.streams.insert(id, outputs);
                }
                // Checked in `submit` against the same config; dropping `outputs` closes the stream.
                Err(error) => tracing::warn!(%error, "request refused by the scheduler"),
            },
            Command::Release { lease, reply } => {
                let _ = reply.send(self.scheduler.release_held(lease));
            }
            Command::TransferDone { id, ok } => self.scheduler.transfer_done(id, ok),
        }
    }

    /// Frees held prefills whose decode worker never released them.
    fn expire_holds(&mut self) {
        let now = Instant::now();
        while let Some(&(at, lease)) = self.holds.front() {
            if at > now {
                break;
            }
            self.holds.pop_front();
            if self.scheduler.release_held(lease) {
                tracing::warn!(
                    lease,
                    "a held prefill expired before a decode worker released it"
                );
            }
        }
    }

    /// Cancels requests whose receiver was dropped.
    fn drop_closed_streams(&mut self) {
        let scheduler = &mut self.scheduler;
        self.streams.retain(|&id, tx| {
            let open = !tx.is_closed();
            if !open {
                scheduler.cancel(id);
            }
            open
        });
    }

    fn deliver(&mut self, outputs: Vec<(RequestId, Output)>) {
        for (id, output) in outputs {
            let lease = match output {
                Output::Prefilled { lease, .. } => {
                    let hold = self.shared.config.prefill_hold;
                    self.holds.push_back((Instant::now() + hold, lease));
                    Some(lease)
                }
                _ => None,
            };
            let finished = matches!(output, Output::Finished(_));
            let Some(tx) = self.streams.get(&id) else {
                continue;
            };
            if tx.send(output).is_err() {
                // Nobody will pass the held blocks on.
                if let Some(lease) = lease {
                    self.scheduler.release_held(lease);
                }
                self.scheduler.cancel(id);
                self.streams.remove(&id);
            } else if finished {
                self.streams.remove(&id);
            }
        }
    }

    fn publish_load(&self) {
        *self
            .shared
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.scheduler.load();
    }

    fn stop(&mut self) {
        let requests = self.streams.len();
        self.streams.clear();
        self.commands.close();
        tracing::debug!(requests, "mocker engine stopped");
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinishReason, KvEvent};

    fn cfg() -> MockerConfig {
        MockerConfig {
            num_gpu_blocks: 64,
            block_size: 4,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            vocab_size: 1000,
            ..MockerConfig::default()
        }
    }

    fn req(len: u32, max_tokens: u32) -> Request {
        Request {
            ignore_eos: true,
            ..Request::new((0..len).collect(), max_tokens)
        }
    }

    fn start(
        config: MockerConfig,
    ) -> (
        Engine,
        JoinHandle<()>,
        UnboundedReceiver<KvEvent>,
        CancellationToken,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let (engine, task) = Engine::start(config, tx, shutdown.clone()).expect("valid config");
        (engine, task, rx, shutdown)
    }

    async fn collect(mut rx: UnboundedReceiver<Output>) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = rx.recv().await {
            out.push(o);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn request_streams_scheduled_then_tokens_then_finished() {
        let (engine, _task, _events, _shutdown) = start(cfg());
        let out = collect(engine.submit(req(10, 5)).expect("accepted")).await;
        assert_eq!(out.len(), 7);
        assert_eq!(out[0], Output::Scheduled { cached_tokens: 0 });
        assert!(out[1..6].iter().all(|o| matches!(o, Output::Token(_))));
        assert_eq!(out[6], Output::Finished(FinishReason::Length));
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_time_is_the_sum_of_step_durations() {
        let mut twin = Scheduler::new(cfg()).expect("valid config");
        twin.add_request(req(50, 20)).expect("accepted");
        let mut expected = Duration::ZERO;
        while twin.has_work() {
            expected += twin.step().duration;
        }
        let (engine, _task, _events, _shutdown) = start(cfg());
        let t0 = Instant::now();
        collect(engine.submit(req(50, 20)).expect("accepted")).await;
        let elapsed = t0.elapsed();
        let diff = elapsed.abs_diff(expected);
        assert!(
            diff <= Duration::from_millis(1),
            "elapsed {elapsed:?}, expected {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_receiver_cancels_the_request_and_frees_its_slot() {
        let (engine, _task, _events, _shutdown) = start(cfg());
        let mut rx = engine.submit(req(10, 200)).expect("accepted");
        assert_eq!(
            rx.recv().await,
            Some(Output::Scheduled { cached_tokens: 0 })
        );
        assert!(matches!(rx.recv().await, Some(Output::Token(_))));
        drop(rx);
        for _ in 0..100 {
            let load = engine.load();
            if load.running == 0 && load.kv_blocks_used == 0 {
                return;
            }
            // Paused clock: this advances simulated time only.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("request still running: {:?}", engine.load());
    }

    #[tokio::test(start_paused = true)]
    async fn kv_events_arrive_on_the_channel() {
        let (engine, _task, mut events, _shutdown) = start(cfg());
        collect(engine.submit(req(8, 1)).expect("accepted")).await;
        let hashes = dynamo_kv::block_hashes(&(0..8).collect::<Vec<_>>(), 4);
        match events.recv().await {
            Some(KvEvent::Stored {
                parent_hash: None,
                blocks,
            }) => assert_eq!(
                blocks.iter().map(|b| b.block_hash).collect::<Vec<_>>(),
                hashes.iter().map(|h| h.sequence).collect::<Vec<_>>()
            ),
            other => panic!("expected a Stored event, got {other:?}"),
        }
        let out = collect(engine.submit(req(8, 1)).expect("accepted")).await;
        assert_eq!(out[0], Output::Scheduled { cached_tokens: 4 });
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_open_streams_and_refuses_new_requests() {
        let (engine, task, _events, shutdown) = start(cfg());
        let mut rx = engine.submit(req(10, 200)).expect("accepted");
        assert!(rx.recv().await.is_some());
        shutdown.cancel();
        task.await.expect("engine task");
        while let Some(o) = rx.recv().await {
            assert!(matches!(o, Output::Token(_)));
        }
        assert!(matches!(
            engine.submit(req(10, 1)),
            Err(SubmitError::Stopped)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_every_handle_stops_the_engine() {
        let (engine, task, _events, _shutdown) = start(cfg());
        let other = engine.clone();
        drop(engine);
        drop(other);
        task.await.expect("engine task");
    }

    #[tokio::test]
    async fn submit_rejects_invalid_requests() {
        let (engine, _task, _events, _shutdown) = start(cfg());
        assert!(matches!(
            engine.submit(req(0, 1)),
            Err(SubmitError::EmptyPrompt)
        ));
        assert!(matches!(
            engine.submit(req(300, 1)),
            Err(SubmitError::TooLarge {
                needed: 76,
                total: 64
            })
        ));
    }

    /// Real time: with a huge speedup the loop must run steps back to back, not sleep 1 ms per step.
    #[tokio::test]
    async fn huge_speedup_serves_a_thousand_requests_quickly() {
        let config = MockerConfig {
            speedup: 100_000.0,
            vocab_size: 8192,
            ..MockerConfig::default()
        };
        let (engine, _task, _events, _shutdown) = start(config);
        let t0 = std::time::Instant::now();
        let streams: Vec<_> = (0..1000u32)
            .map(|i| {
                let prompt = (0..128)
                    .map(|t| if t < 64 { t } else { i * 128 + t })
                    .collect();
                engine
                    .submit(Request {
                        ignore_eos: true,
                        ..Request::new(prompt, 16)
                    })
                    .expect("accepted")
            })
            .collect();
        for rx in streams {
            let out = collect(rx).await;
            assert_eq!(out.len(), 18);
        }
        let elapsed = t0.elapsed();
        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
        // Requests admitted in the first step compute the shared prefix concurrently; later ones hit it.
        assert!(engine.load().cached_tokens_total >= 900 * 64);
    }
}
