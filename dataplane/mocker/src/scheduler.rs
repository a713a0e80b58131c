//! The engine's pure core: a vLLM-v1-style continuous-batching scheduler over the paged KV cache.
//!
//! [`Scheduler`] is synchronous and takes no clock: each [`Scheduler::step`] models one forward pass and
//! returns what it produced (outputs per request, KV events) and how long it took in simulated time (see
//! [`crate::timing`]). The async [`crate::Engine`] drives it in real (or paused) time; tests drive it directly.
//!
//! A step:
//! 1. **Decoding sequences** each take 1 token of the `max_num_batched_tokens` budget and a new block when their
//!    last one is full. Without a free block, the most recently admitted running sequence is preempted: its
//!    blocks are freed and it goes back to the front of the waiting queue, to be recomputed later from its
//!    prompt plus the tokens generated so far (its client just sees a pause).
//! 2. **Sequences still prefilling** take a chunk of the remaining budget (with chunked prefill).
//! 3. **Waiting requests** are admitted FIFO while the batch has room (`max_num_seqs`), budget remains and the
//!    blocks they need leave `watermark` of the pool free (skipped in a step that preempted). Admission looks
//!    up the longest cached prefix of full blocks, but at least one prompt token is always computed.
//! 4. Every scheduled sequence advances; full blocks are hashed and registered in the prefix cache
//!    ([`KvEvent::Stored`]); a sequence whose prompt is complete emits one token; finished sequences free
//!    their blocks, which stay cached until evicted ([`KvEvent::Removed`]).
//!
//! A sequence's blocks cover the tokens whose KV has been computed: the newest sampled token is computed in the
//! next step, as in vLLM.

use std::collections::VecDeque;
use std::time::Duration;

use dynamo_kv::{BlockHash, extend_block_hashes};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::config::{ConfigError, MockerConfig};
use crate::kv_cache::{BlockId, BlockPool, IdMap, KvEvent};

/// Identifier of a request inside one [`Scheduler`].
pub type RequestId = u64;

/// A generation request: prompt token ids and sampling limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    pub token_ids: Vec<u32>,
    /// Tokens to generate at most (>= 1).
    pub max_tokens: u32,
    /// Never end early on EOS.
    pub ignore_eos: bool,
    /// Extra ids that end generation with [`FinishReason::Stop`] (always honoured).
    pub stop_token_ids: Vec<u32>,
    /// Seed of this request's output tokens; without one, derived from the config seed and a request counter.
    /// With a seed, output token `i` depends only on (seed, prompt, i): see [`Request::resumed_tokens`].
    pub seed: Option<u64>,
    /// The last `resumed_tokens` of `token_ids` are output an earlier attempt at this request already
    /// generated (a migration): the prompt is the ids before them, and the next token is output
    /// token number `resumed_tokens`, the same one an undisturbed run would draw.
    pub resumed_tokens: u32,
    /// Sampling temperature and nucleus for engines that sample from a model (the simulator
    /// draws its tokens from the seed and ignores them).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Disaggregation, prefill leg: compute the prompt's KV, then instead of generating, answer with
    /// [`Output::Prefilled`] and hold the prompt's full blocks until [`Scheduler::release_held`].
    pub prefill_only: bool,
    /// Disaggregation, decode leg: the prompt's first `remote_blocks` full blocks are computed
    /// elsewhere and pulled in. At admission the engine allocates them (keeping the leading ones it
    /// already caches), announces them with [`Output::PullKv`], and leaves the request aside until
    /// [`Scheduler::transfer_done`]; other requests run meanwhile.
    pub remote_blocks: u32,
    /// Disaggregation with an engine that moves KV itself (vLLM's connector): its parameters,
    /// passed through unread. The simulator ignores them.
    pub kv_transfer_params: Option<Vec<u8>>,
}

/// One message on a request's output stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// First message of every request, sent when it is first scheduled (its prefix-cache lookup is done).
    Scheduled {
        cached_tokens: u32,
    },
    Token(u32),
    /// A prefill-only request's KV is computed: `blocks` (the prompt's full blocks, in order, with
    /// the sequence hash of each in `hashes`) stay held under `lease` until released or expired.
    Prefilled {
        lease: RequestId,
        blocks: Vec<u32>,
        hashes: Vec<u64>,
    },
    /// A request with remote blocks was admitted: fill `slots` with the KV of its full blocks
    /// `first..first + slots.len()`, then call [`Scheduler::transfer_done`].
    PullKv {
        id: RequestId,
        first: u32,
        slots: Vec<u32>,
    },
    /// A prefill-only request's transfer parameters, as the decode worker needs them (what the
    /// sidecar makes of [`Output::Prefilled`], or an engine's own connector's).
    KvTransferParams(Vec<u8>),
    /// Last message.
    Finished(FinishReason),
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` tokens were generated.
    Length,
    /// EOS or a stop token id was generated (that token is sent before `Finished`).
    Stop,
}

/// Load of one engine, for metrics and routing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSnapshot {
    /// Blocks referenced by running sequences (cached-but-free blocks are not used).
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Requests queued, not yet admitted (preempted ones included).
    pub waiting: usize,
    /// Cumulative prompt tokens of admitted requests (counted at first admission).
    pub prompt_tokens_total: u64,
    /// Cumulative prefix-cache hits in tokens of admitted requests (counted at first admission).
    pub cached_tokens_total: u64,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error(
        "request needs {needed} KV blocks (prompt + max_tokens) but the engine has only {total}"
    )]
    TooLarge { needed: usize, total: usize },
    #[error(
        "resumed_tokens ({resumed}) must be smaller than the number of token ids ({tokens}): the prompt itself cannot be empty"
    )]
    ResumedPastPrompt { resumed: u32, tokens: usize },
    #[error(
        "prompt + max_tokens is {needed} tokens but the engine's context is {max_model_len} tokens"
    )]
    ContextTooLong { needed: usize, max_model_len: usize },
    #[error("engine has stopped")]
    Stopped,
}

/// What one step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Simulated duration of the step (already divided by `speedup`).
    pub duration: Duration,
    /// Outputs in order, per request.
    pub outputs: Vec<(RequestId, Output)>,
    /// KV events in the order they happened.
    pub events: Vec<KvEvent>,
}

/// One request's state inside the scheduler.
#[derive(Debug)]
struct Seq {
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    max_tokens: u32,
    generated: u32,
    ignore_eos: bool,
    stop_token_ids: Vec<u32>,
    /// Seed mixed with the prompt: output token `i` is drawn from an RNG seeded with (key, i).
    sampling_key: u64,
    /// Index of the next output token (counting output generated before a migration).
    output_index: u32,
    /// Physical blocks, in sequence order; they cover the first `computed` tokens.
    blocks: Vec<BlockId>,
    /// Hashes of full blocks of `tokens` (at least those of computed blocks when prefix caching is on).
    hashes: Vec<BlockHash>,
    /// Leading blocks already registered in (or taken from) the prefix cache.
    registered: usize,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Length of `tokens` at the last admission: below it the sequence is prefilling.
    prefill_target: usize,
    /// Tokens scheduled in the current step.
    step_tokens: usize,
    admitted_once: bool,
    finished: bool,
    prefill_only: bool,
    /// Full blocks to pull at admission (0: none, or already pulled).
    remote_blocks: usize,
    /// Its prompt's KV arrived by transfer: the few tokens left to compute ride in the decode pass.
    imported: bool,
}

/// The synchronous scheduler and KV cache of one simulated engine.
#[derive(Debug)]
pub struct Scheduler {
    config: MockerConfig,
    pool: BlockPool,
    seqs: IdMap<RequestId, Seq>,
    /// Running sequences in admission order (the last is preempted first).
    running: Vec<RequestId>,
    waiting: VecDeque<RequestId>,
    next_id: RequestId,
    /// Sorted ids that sampling skips.
    excluded: Vec<u32>,
    sampleable: u32,
    watermark_blocks: usize,
    prompt_tokens_total: u64,
    cached_tokens_total: u64,
    preemptions: u64,
    /// Full blocks of finished prefill-only requests, held for decode workers, by lease.
    held: IdMap<RequestId, Vec<BlockId>>,
    /// Admitted requests whose blocks are being pulled (not stepped, never preempted).
    pulling: Vec<RequestId>,
}

// === impl Request ===

impl Request {
    /// A request for `max_tokens` tokens after `token_ids`, with no stop ids and no seed.
    pub fn new(token_ids: Vec<u32>, max_tokens: u32) -> Self {
        Self {
            token_ids,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks that an engine with `config` can serve this request.
    pub fn validate(&self, config: &MockerConfig) -> Result<(), SubmitError> {
        if self.token_ids.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if self.max_tokens == 0 {
            return Err(SubmitError::ZeroMaxTokens);
        }
        if self.resumed_tokens as usize >= self.token_ids.len() {
            return Err(SubmitError::ResumedPastPrompt {
                resumed: self.resumed_tokens,
                tokens: self.token_ids.len(),
            });
        }
        let tokens = self.token_ids.len() + self.max_tokens as usize;
        let needed = tokens.div_ceil(config.block_size.max(1));
        if needed > config.num_gpu_blocks {
            return Err(SubmitError::TooLarge {
                needed,
                total: config.num_gpu_blocks,
            });
        }
        Ok(())
    }
}

// === impl Scheduler ===

impl Scheduler {
    /// A scheduler with an empty KV cache.
    pub fn new(config: MockerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let excluded = config.excluded_token_ids();
        // validate() guarantees fewer excluded ids than the vocabulary.
        let sampleable = config.vocab_size - excluded.len() as u32;
        Ok(Self {
            pool: BlockPool::new(config.num_gpu_blocks),
            seqs: IdMap::default(),
            running: Vec::with_capacity(config.max_num_seqs),
            waiting: VecDeque::new(),
            next_id: 0,
            excluded,
            sampleable,
            watermark_blocks: config.watermark_blocks(),
            prompt_tokens_total: 0,
            cached_tokens_total: 0,
            preemptions: 0,
            held: IdMap::default(),
            pulling: Vec::new(),
            config,
        })
    }

    pub fn config(&self) -> &MockerConfig {
        &self.config
    }

    /// Queues a request at the back of the waiting queue and returns its id.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId, SubmitError> {
        req.validate(&self.config)?;
        let id = self.next_id;
        self.next_id += 1;
        let seed = req
            .seed
            .unwrap_or_else(|| self.config.seed.wrapping_add(id));
        let Request {
            mut token_ids,
            max_tokens,
            ignore_eos,
            stop_token_ids,
            resumed_tokens,
            prefill_only,
            remote_blocks,
            ..
        } = req;
        let prompt_len = token_ids.len() - resumed_tokens as usize;
        let sampling_key = seed ^ prompt_key(&token_ids[..prompt_len]);
        token_ids.reserve(max_tokens as usize);
        self.seqs.insert(
            id,
            Seq {
                tokens: token_ids,
                max_tokens,
                generated: 0,
                ignore_eos,
                stop_token_ids,
                sampling_key,
                output_index: resumed_tokens,
                blocks: Vec::new(),
                hashes: Vec::new(),
                registered: 0,
                computed: 0,
                prefill_target: 0,
                step_tokens: 0,
                admitted_once: false,
                finished: false,
                prefill_only,
                remote_blocks: remote_blocks as usize,
                imported: false,
            },
        );
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Drops a request, freeing its blocks and batch slot. Returns whether it was live.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        if seq.blocks.is_empty() {
            if let Some(pos) = self.waiting.iter().position(|&w| w == id) {
                self.waiting.remove(pos);
            }
        } else {
            free_blocks(&mut self.pool, &mut seq);
        }
        if let Some(pos) = self.pulling.iter().position(|&r| r == id) {
            self.pulling.remove(pos);
        }
        if let Some(pos) = self.running.iter().position(|&r| r == id) {
            self.running.remove(pos);
        }
        true
    }

    /// Whether any request is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn load(&self) -> LoadSnapshot {
        LoadSnapshot {
            kv_blocks_used: self.pool.num_used(),
            kv_blocks_total: self.pool.num_total(),
            running: self.running.len() + self.pulling.len(),
            waiting: self.waiting.len(),
            prompt_tokens_total: self.prompt_tokens_total,
            cached_tokens_total: self.cached_tokens_total,
        }
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Frees the blocks a prefill-only request left held under `lease`. Returns whether it held any.
    pub fn release_held(&mut self, lease: RequestId) -> bool {
        let Some(blocks) = self.held.remove(&lease) else {
            return false;
        };
        for &block in blocks.iter().rev() {
            self.pool.release(block);
        }
        true
    }

    /// The pull announced by [`Output::PullKv`] for request `id` ended: with `ok`, its blocks hold
    /// the prompt's KV and are registered in the prefix cache (published as stored); otherwise
    /// they are given back and the request computes them itself. Either way it joins the batch.
    pub fn transfer_done(&mut self, id: RequestId, ok: bool) {
        let Some(pos) = self.pulling.iter().position(|&r| r == id) else {
            return; // Cancelled meanwhile.
        };
        self.pulling.remove(pos);
        let bs = self.config.block_size;
        let seq = self.seqs.get_mut(&id).expect("pulling ids are live");
        let from = seq.computed / bs;
        let to = std::mem::take(&mut seq.remote_blocks);
        if ok {
            extend_block_hashes(&mut seq.hashes, &seq.tokens[..to * bs], bs);
            let parent = from.checked_sub(1).map(|p| seq.hashes[p].sequence);
            self.pool
                .register(&seq.blocks[from..to], &seq.hashes[from..to], parent);
            seq.computed = to * bs;
            seq.registered = to;
            seq.imported = true;
        } else {
            for &block in seq.blocks[from..].iter().rev() {
                self.pool.release(block);
            }
            seq.blocks.truncate(from);
        }
        self.running.push(id);
    }

    /// Runs one forward pass of the batch.
    pub fn step(&mut self) -> StepOutput {
        let mut out = StepOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut preempted = false;

        // 1. Decoding sequences, then 2. sequences still prefilling.
        for decoding in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let seq = self.seq(self.running[i]);
                if (seq.computed >= seq.prefill_target) != decoding {
                    i += 1;
                    continue;
                }
                let remaining = seq.tokens.len() - seq.computed;
                let n = remaining.min(budget);
                if n < remaining && !self.config.enable_chunked_prefill {
                    i += 1;
                    continue;
                }
                let target = seq.computed + n;
                if self.reserve(i, target, &mut budget, &mut preempted) {
                    self.seq_mut(self.running[i]).step_tokens = n;
                    budget -= n;
                    i += 1;
                }
            }
        }

        // 3. Admit waiting requests.
        if !preempted {
            self.admit(budget, &mut out.outputs);
        }

        // 4. Advance every scheduled sequence.
        let fill = self.pool.num_used() as f64 / self.pool.num_total() as f64;
        let mut prefill_tokens = 0;
        let mut imported_tokens = 0;
        let mut emitted = false;
        let mut any_finished = false;
        for &id in &self.running {
            let seq = self.seqs.get_mut(&id).expect("running ids are live");
            let n = std::mem::take(&mut seq.step_tokens);
            if n == 0 {
                continue;
            }
            if seq.computed < seq.prefill_target {
                if seq.imported {
                    imported_tokens += n;
                } else {
                    prefill_tokens += n;
                }
            }
            seq.computed += n;
            if self.config.enable_prefix_caching {
                register_full_blocks(&mut self.pool, seq, self.config.block_size);
            }
            if seq.computed < seq.tokens.len() {
                continue;
            }
            if seq.prefill_only {
                let (lease, blocks, hashes) =
                    hold_prefill(&mut self.pool, id, seq, self.config.block_size);
                self.held.insert(lease, blocks.clone());
                out.outputs.push((
                    id,
                    Output::Prefilled {
                        lease,
                        blocks,
                        hashes,
                    },
                ));
                out.outputs
                    .push((id, Output::Finished(FinishReason::Length)));
                seq.finished = true;
                any_finished = true;
                continue;
            }
            emitted = true;
            let (token, reason) = sample(seq, &self.config, &self.excluded, self.sampleable);
            out.outputs.push((id, Output::Token(token)));
            if let Some(reason) = reason {
                out.outputs.push((id, Output::Finished(reason)));
                free_blocks(&mut self.pool, seq);
                seq.finished = true;
                any_finished = true;
            }
        }
        if any_finished {
            let seqs = &mut self.seqs;
            self.running.retain(|id| {
                let done = seqs.get(id).is_some_and(|s| s.finished);
                if done {
                    seqs.remove(id);
                }
                !done
            });
        }

        let mut ms = self.config.timing.prefill_ms(prefill_tokens);
        // A pulled prompt's last few tokens are computed in the same forward pass as the decode
        // batch: they cost their per-token share, not a prefill step of their own.
        ms += self.config.timing.prefill[1] * imported_tokens as f64;
        if emitted {
            ms += self.config.timing.decode_ms(fill);
        }
        out.duration = Duration::from_secs_f64(ms / 1000.0 / self.config.speedup);
        self.pool.drain_events(&mut out.events);
        out
    }

    /// Makes the blocks of `running[i]` cover `target` tokens, preempting from the back of the batch while the
    /// pool is short (budget of preempted sequences already scheduled this step is given back). Returns false
    /// when the sequence had to preempt itself.
    fn reserve(
        &mut self,
        i: usize,
        target: usize,
        budget: &mut usize,
        preempted: &mut bool,
    ) -> bool {
        let id = self.running[i];
        let bs = self.config.block_size;
        let need = target
            .div_ceil(bs)
            .saturating_sub(self.seq(id).blocks.len());
        while self.pool.num_free() < need {
            let Some(victim) = self.running.pop() else {
                break;
            };
            *budget += self.preempt(victim);
            *preempted = true;
            if victim == id {
                return false;
            }
        }
        let seq = self.seqs.get_mut(&id).expect("running ids are live");
        for _ in 0..need {
            let block = self.pool.allocate().expect("free blocks were counted");
            seq.blocks.push(block);
        }
        true
    }

    /// Frees a (just popped) running sequence's blocks and puts it at the front of the waiting queue. Returns
    /// the budget it had taken this step.
    fn preempt(&mut self, id: RequestId) -> usize {
        let seq = self.seqs.get_mut(&id).expect("running ids are live");
        free_blocks(&mut self.pool, seq);
        seq.computed = 0;
        seq.registered = 0;
        seq.imported = false;
        let refund = std::mem::take(&mut seq.step_tokens);
        self.waiting.push_front(id);
        self.preemptions += 1;
        tracing::debug!(id, "preempted sequence under KV-block pressure");
        refund
    }

    /// Admits waiting requests FIFO within the step's remaining `budget`.
    fn admit(&mut self, mut budget: usize, outputs: &mut Vec<(RequestId, Output)>) {
        let bs = self.config.block_size;
        while self.running.len() + self.pulling.len() < self.config.max_num_seqs && budget > 0 {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            let len = seq.tokens.len();

            // Longest cached prefix of full blocks, leaving at least one token to compute.
            let mut hits = 0;
            let mut hits_free = 0;
            if self.config.enable_prefix_caching {
                extend_block_hashes(&mut seq.hashes, &seq.tokens, bs);
                let max_hits = (len - 1) / bs;
                while hits < max_hits {
                    let Some(block) = self.pool.lookup(seq.hashes[hits].sequence) else {
                        break;
                    };
                    hits_free += usize::from(self.pool.is_free(block));
                    hits += 1;
                }
            }
            let cached = hits * bs;
            let remaining = len - cached;
            // Blocks to pull instead of computing (never the block of the last prompt token).
            let pull_to = seq.remote_blocks.min((len - 1) / bs);
            let n = if pull_to > hits {
                0
            } else if self.config.enable_chunked_prefill || remaining <= budget {
                remaining.min(budget)
            } else if self.running.is_empty() && budget == self.config.max_num_batched_tokens {
                remaining // Too long for one step: it runs alone.
            } else {
                break;
            };
            let new_blocks = if pull_to > hits {
                pull_to - hits
            } else {
                (cached + n).div_ceil(bs) - hits
            };
            let reserve = if self.running.is_empty() {
                0
            } else {
                self.watermark_blocks
            };
            if self.pool.num_free() < hits_free + new_blocks + reserve {
                break;
            }

            self.waiting.pop_front();
            // Take the cached blocks first so that allocation cannot evict them.
            for h in &seq.hashes[..hits] {
                let block = self.pool.lookup(h.sequence).expect("looked up above");
                self.pool.acquire(block);
                seq.blocks.push(block);
            }
            for _ in 0..new_blocks {
                let block = self.pool.allocate().expect("free blocks were counted");
                seq.blocks.push(block);
            }
            seq.registered = hits;
            seq.computed = cached;
            seq.prefill_target = len;
            seq.step_tokens = n;
            budget = budget.saturating_sub(n);
            if !seq.admitted_once {
                seq.admitted_once = true;
                self.prompt_tokens_total += len as u64;
                self.cached_tokens_total += cached as u64;
                let cached_tokens = u32::try_from(cached).unwrap_or(u32::MAX);
                outputs.push((id, Output::Scheduled { cached_tokens }));
            }
            if pull_to > hits {
                seq.remote_blocks = pull_to;
                let slots = seq.blocks[hits..].to_vec();
                let first = u32::try_from(hits).unwrap_or(u32::MAX);
                outputs.push((id, Output::PullKv { id, first, slots }));
                self.pulling.push(id);
            } else {
                seq.remote_blocks = 0;
                self.running.push(id);
            }
        }
    }

    fn seq(&self, id: RequestId) -> &Seq {
        self.seqs.get(&id).expect("scheduled ids are live")
    }

    fn seq_mut(&mut self, id: RequestId) -> &mut Seq {
        self.seqs.get_mut(&id).expect("scheduled ids are live")
    }
}

/// Hashes and registers the sequence's newly completed full blocks.
fn register_full_blocks(pool: &mut BlockPool, seq: &mut Seq, block_size: usize) {
    let full = seq.computed / block_size;
    if full <= seq.registered {
        return;
    }
    extend_block_hashes(&mut seq.hashes, &seq.tokens[..seq.computed], block_size);
    let from = seq.registered;
    let parent = from.checked_sub(1).map(|p| seq.hashes[p].sequence);
    pool.register(&seq.blocks[from..full], &seq.hashes[from..full], parent);
    seq.registered = full;
}

/// Takes a finished prefill-only sequence's full prompt blocks out of it, still referenced, and
/// releases the rest. Returns (lease, blocks, their sequence hashes).
fn hold_prefill(
    pool: &mut BlockPool,
    id: RequestId,
    seq: &mut Seq,
    block_size: usize,
) -> (RequestId, Vec<u32>, Vec<u64>) {
    let full = seq.tokens.len() / block_size;
    extend_block_hashes(
        &mut seq.hashes,
        &seq.tokens[..full * block_size],
        block_size,
    );
    let tail = seq.blocks.split_off(full.min(seq.blocks.len()));
    for &block in tail.iter().rev() {
        pool.release(block);
    }
    let blocks = std::mem::take(&mut seq.blocks);
    let hashes = seq.hashes[..blocks.len()]
        .iter()
        .map(|h| h.sequence)
        .collect();
    (id, blocks, hashes)
}

/// Releases all of a sequence's blocks, last block first so that a prompt's tail is evicted before its head.
fn free_blocks(pool: &mut BlockPool, seq: &mut Seq) {
    for &block in seq.blocks.iter().rev() {
        pool.release(block);
    }
    seq.blocks.clear();
}

/// A 64-bit key of a prompt's tokens (FNV-1a, finished with a mix): part of every sampling seed,
/// so that a seeded request's output depends on its prompt, as a real engine's does.
fn prompt_key(tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Draws the next output token of `seq`, appends it, and says whether the sequence is now finished.
fn sample(
    seq: &mut Seq,
    config: &MockerConfig,
    excluded: &[u32],
    sampleable: u32,
) -> (u32, Option<FinishReason>) {
    let eos = config.eos_token_ids.first().copied();
    let mut rng = SmallRng::seed_from_u64(splitmix64(
        seq.sampling_key ^ u64::from(seq.output_index).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ));
    seq.output_index += 1;
    let token = match eos {
        Some(eos)
            if !seq.ignore_eos
                && config.mean_output_tokens > 0
                && rng.random_range(0..config.mean_output_tokens) == 0 =>
        {
            eos
        }
        _ => {
            // The r-th id of the vocabulary that is not excluded.
            let mut t = rng.random_range(0..sampleable);
            for &e in excluded {
                if e > t {
                    break;
                }
                t += 1;
            }
            t
        }
    };
    seq.tokens.push(token);
    seq.generated += 1;
    let stop = (!seq.ignore_eos && config.eos_token_ids.contains(&token))
        || seq.stop_token_ids.contains(&token);
    let reason = if stop {
        Some(FinishReason::Stop)
    } else if seq.generated >= seq.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    (token, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg() -> MockerConfig {
        MockerConfig {
            num_gpu_blocks: 16,
            block_size: 4,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            watermark: 0.0,
            vocab_size: 100,
            ..MockerConfig::default()
        }
    }

    fn req(tokens: impl IntoIterator<Item = u32>, max_tokens: u32) -> Request {
        Request {
            ignore_eos: true,
            ..Request::new(tokens.into_iter().collect(), max_tokens)
        }
    }

    /// Steps until idle; returns each request's outputs, all events and the step count.
    fn run(s: &mut Scheduler) -> (HashMap<RequestId, Vec<Output>>, Vec<KvEvent>, usize) {
        let mut outputs: HashMap<RequestId, Vec<Output>> = HashMap::new();
        let mut events = Vec::new();
        let mut steps = 0;
        while s.has_work() {
            let out = s.step();
            steps += 1;
            assert!(steps < 100_000, "scheduler made no progress");
            for (id, o) in out.outputs {
                outputs.entry(id).or_default().push(o);
            }
            events.extend(out.events);
        }
        (outputs, events, steps)
    }

    fn stored_hashes(events: &[KvEvent]) -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| match e {
                KvEvent::Stored { blocks, .. } => blocks.iter().map(|b| b.block_hash).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn removed_hashes(events: &[KvEvent]) -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| match e {
                KvEvent::Removed { block_hashes } => block_hashes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn tokens(outputs: &[Output]) -> usize {
        outputs
            .iter()
            .filter(|o| matches!(o, Output::Token(_)))
            .count()
    }

    fn seq_hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
        dynamo_kv::block_hashes(tokens, bs)
            .iter()
            .map(|b| b.sequence)
            .collect()
    }

    #[test]
    fn second_request_reuses_cached_prefix() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let prompt: Vec<u32> = (0..10).collect();
        let a = s.add_request(req(prompt.clone(), 1)).expect("accepted");
        let (out_a, ev_a, _) = run(&mut s);
        assert_eq!(out_a[&a][0], Output::Scheduled { cached_tokens: 0 });
        assert_eq!(
            ev_a,
            vec![KvEvent::Stored {
                parent_hash: None,
                blocks: dynamo_kv::block_hashes(&prompt, 4)
                    .iter()
                    .map(|b| crate::StoredBlock {
                        block_hash: b.sequence,
                        tokens_hash: b.local
                    })
                    .collect(),
            }]
        );

        let b = s.add_request(req(prompt.clone(), 1)).expect("accepted");
        let (out_b, ev_b, _) = run(&mut s);
        assert_eq!(out_b[&b][0], Output::Scheduled { cached_tokens: 8 });
        assert!(ev_b.is_empty(), "blocks are stored only once: {ev_b:?}");
        assert_eq!(s.load().prompt_tokens_total, 20);
        assert_eq!(s.load().cached_tokens_total, 8);
    }

    #[test]
    fn fully_cached_prompt_still_computes_its_last_block() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let prompt: Vec<u32> = (0..8).collect();
        s.add_request(req(prompt.clone(), 1)).expect("accepted");
        run(&mut s);
        let b = s.add_request(req(prompt, 1)).expect("accepted");
        let (out, _, _) = run(&mut s);
        assert_eq!(out[&b][0], Output::Scheduled { cached_tokens: 4 });
    }

    #[test]
    fn eviction_emits_removed_in_lru_order_and_keeps_recent_blocks() {
        let mut s = Scheduler::new(MockerConfig {
            num_gpu_blocks: 8,
            ..cfg()
        })
        .expect("valid config");
        let pa: Vec<u32> = (0..8).collect();
        let pb: Vec<u32> = (100..108).collect();
        s.add_request(req(pa.clone(), 1)).expect("accepted");
        run(&mut s);
        s.add_request(req(pb.clone(), 1)).expect("accepted");
        run(&mut s);
        // Needs 6 of the 8 blocks: the 4 never-used ones, then A's (least recently used), tail first.
        s.add_request(req(200..224, 1)).expect("accepted");
        let (_, ev, _) = run(&mut s);
        let ha = seq_hashes(&pa, 4);
        assert_eq!(removed_hashes(&ev), vec![ha[1], ha[0]]);
        // B's blocks survived: its first block is a hit.
        let d = s.add_request(req(pb, 1)).expect("accepted");
        let (out, _, _) = run(&mut s);
        assert_eq!(out[&d][0], Output::Scheduled { cached_tokens: 4 });
    }

    #[test]
    fn shared_prefix_blocks_are_not_evicted_while_in_use() {
        let mut s = Scheduler::new(MockerConfig {
            num_gpu_blocks: 8,
            ..cfg()
        })
        .expect("valid config");
        let prompt: Vec<u32> = (0..8).collect();
        let a = s.add_request(req(prompt.clone(), 8)).expect("accepted");
        s.step();
        let b = s.add_request(req(prompt.clone(), 8)).expect("accepted");
        let out = s.step();
        assert!(
            out.outputs
                .contains(&(b, Output::Scheduled { cached_tokens: 4 }))
        );
        // Fill the rest of the pool while A and B run.
        s.add_request(req(300..312, 1)).expect("accepted");
        let (outputs, ev, _) = run(&mut s);
        assert!(!removed_hashes(&ev).contains(&seq_hashes(&prompt, 4)[0]));
        // Two of A's tokens and one of B's came out of the steps above.
        assert_eq!(tokens(&outputs[&a]), 6);
        assert_eq!(tokens(&outputs[&b]), 7);
    }

    #[test]
    fn chunked_prefill_splits_long_prompt_under_token_budget() {
        let mut s = Scheduler::new(MockerConfig {
            num_gpu_blocks: 64,
            max_num_batched_tokens: 16,
            ..cfg()
        })
        .expect("valid config");
        let id = s.add_request(req(0..40, 2)).expect("accepted");
        let t = s.config().timing;
        let s1 = s.step();
        assert_eq!(
            s1.outputs,
            vec![(id, Output::Scheduled { cached_tokens: 0 })]
        );
        assert_eq!(
            s1.duration,
            Duration::from_secs_f64(t.prefill_ms(16) / 1000.0)
        );
        assert_eq!(s.load().kv_blocks_used, 4);
        let s2 = s.step();
        assert!(s2.outputs.is_empty());
        let s3 = s.step();
        assert!(matches!(s3.outputs[..], [(_, Output::Token(_))]));
        assert_eq!(
            s3.duration,
            Duration::from_secs_f64((t.prefill_ms(8) + t.decode_ms(10.0 / 64.0)) / 1000.0)
        );
        let s4 = s.step();
        assert!(matches!(
            s4.outputs[..],
            [
                (_, Output::Token(_)),
                (_, Output::Finished(FinishReason::Length))
            ]
        ));
        assert!(!s.has_work());
    }

    #[test]
    fn without_chunked_prefill_a_long_prompt_runs_whole_and_alone() {
        let mut s = Scheduler::new(MockerConfig {
            num_gpu_blocks: 64,
            max_num_batched_tokens: 16,
            enable_chunked_prefill: false,
            ..cfg()
        })
        .expect("valid config");
        let short = s.add_request(req(0..4, 4)).expect("accepted");
        let long = s.add_request(req(100..140, 1)).expect("accepted");
        let s1 = s.step();
        assert!(
            s1.outputs
                .contains(&(short, Output::Scheduled { cached_tokens: 0 }))
        );
        assert!(
            !s1.outputs.iter().any(|(id, _)| *id == long),
            "waits: short is running"
        );
        let (outputs, _, _) = run(&mut s);
        assert_eq!(tokens(&outputs[&long]), 1);
        // Admitted once `short` finished, prefilled whole, first token in the same step.
        assert!(matches!(outputs[&long][1], Output::Token(_)));
    }

    #[test]
    fn max_num_seqs_caps_the_running_batch() {
        let mut s = Scheduler::new(MockerConfig {
            max_num_seqs: 2,
            ..cfg()
        })
        .expect("valid config");
        for i in 0..5 {
            s.add_request(req([i], 3)).expect("accepted");
        }
        s.step();
        assert_eq!((s.load().running, s.load().waiting), (2, 3));
        let (outputs, _, _) = run(&mut s);
        assert_eq!(outputs.len(), 5);
    }

    #[test]
    fn watermark_blocks_admission_until_blocks_free_up() {
        let mut s = Scheduler::new(MockerConfig {
            num_gpu_blocks: 100,
            watermark: 0.1,
            max_num_batched_tokens: 1024,
            ..cfg()
        })
        .expect("valid config");
        s.add_request(req(0..319, 2)).expect("accepted"); // 80 blocks, also after its first decode
        s.step();
        // 11 blocks would leave 9 < 10 free.
        let b = s.add_request(req(1000..1044, 1)).expect("accepted");
        let out = s.step();
        assert!(!out.outputs.iter().any(|(id, _)| *id == b));
        assert_eq!(s.load().waiting, 1);
        let (outputs, _, _) = run(&mut s);
        assert_eq!(tokens(&outputs[&b]), 1);
        // 10 blocks leave exactly 10: admitted right away.
        let mut s = Scheduler::new(s.config().clone()).expect("valid config");
        s.add_request(req(0..319, 2)).expect("accepted");
        s.step();
        let b = s.add_request(req(1000..1040, 1)).expect("accepted");
        let out = s.step();
        assert!(
            out.outputs
                .contains(&(b, Output::Scheduled { cached_tokens: 0 }))
        );
    }

    #[test]
    fn preemption_under_block_pressure_still_completes_every_request() {
        let mut s = Scheduler::new(MockerConfig {
            max_num_seqs: 8,
            ..cfg()
        })
        .expect("valid config");
        let ids: Vec<RequestId> = (0..8)
            .map(|i| {
                s.add_request(req(i * 10..i * 10 + 8, 20))
                    .expect("accepted")
            })
            .collect();
        let (outputs, _, _) = run(&mut s);
        assert!(s.preemptions() > 0, "the test must exercise preemption");
        for id in ids {
            let o = &outputs[&id];
            assert!(matches!(o[0], Output::Scheduled { .. }));
            assert_eq!(
                o.iter()
                    .filter(|x| matches!(x, Output::Scheduled { .. }))
                    .count(),
                1
            );
            assert_eq!(tokens(o), 20);
            assert_eq!(o.last(), Some(&Output::Finished(FinishReason::Length)));
        }
        assert_eq!(s.load().kv_blocks_used, 0);
    }

    #[test]
    fn ignore_eos_always_yields_max_tokens() {
        let mut s = Scheduler::new(MockerConfig {
            eos_token_ids: vec![2],
            mean_output_tokens: 1,
            ..cfg()
        })
        .expect("valid config");
        let id = s.add_request(req(0..5, 30)).expect("accepted");
        let (outputs, _, _) = run(&mut s);
        assert_eq!(tokens(&outputs[&id]), 30);
        assert!(!outputs[&id].contains(&Output::Token(2)));
    }

    #[test]
    fn eos_ends_with_stop_unless_ignored() {
        let mut s = Scheduler::new(MockerConfig {
            eos_token_ids: vec![2],
            mean_output_tokens: 1,
            ..cfg()
        })
        .expect("valid config");
        let id = s
            .add_request(Request::new((0..5).collect(), 30))
            .expect("accepted");
        let (outputs, _, _) = run(&mut s);
        assert_eq!(
            outputs[&id][1..],
            [Output::Token(2), Output::Finished(FinishReason::Stop)]
        );
    }

    #[test]
    fn stop_token_ends_with_stop() {
        let mut s = Scheduler::new(MockerConfig {
            vocab_size: 3,
            num_gpu_blocks: 1024,
            ..cfg()
        })
        .expect("valid config");
        let id = s
            .add_request(Request {
                stop_token_ids: vec![1],
                ..req(0..5, 1000)
            })
            .expect("accepted");
        let (outputs, _, _) = run(&mut s);
        let o = &outputs[&id];
        assert_eq!(
            o[o.len() - 2..],
            [Output::Token(1), Output::Finished(FinishReason::Stop)]
        );
        assert_eq!(o.iter().filter(|x| **x == Output::Token(1)).count(), 1);
    }

    #[test]
    fn special_and_eos_ids_are_never_sampled() {
        let mut s = Scheduler::new(MockerConfig {
            vocab_size: 6,
            special_token_ids: vec![0, 2, 3],
            eos_token_ids: vec![5],
            num_gpu_blocks: 1024,
            ..cfg()
        })
        .expect("valid config");
        let id = s.add_request(req(0..3, 200)).expect("accepted");
        let (outputs, _, _) = run(&mut s);
        let mut seen: Vec<u32> = outputs[&id]
            .iter()
            .filter_map(|o| match o {
                Output::Token(t) => Some(*t),
                _ => None,
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![1, 4]);
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let generate = |seed| {
            let mut s = Scheduler::new(cfg()).expect("valid config");
            let id = s
                .add_request(Request {
                    seed: Some(seed),
                    ..req(0..5, 20)
                })
                .expect("accepted");
            run(&mut s).0.remove(&id).expect("outputs")
        };
        assert_eq!(generate(7), generate(7));
        assert_ne!(generate(7), generate(8));
    }

    #[test]
    fn a_resumed_request_continues_the_same_seeded_output() {
        let tokens = |outputs: Vec<Output>| -> Vec<u32> {
            outputs
                .into_iter()
                .filter_map(|o| match o {
                    Output::Token(t) => Some(t),
                    _ => None,
                })
                .collect()
        };
        let config = MockerConfig {
            mean_output_tokens: 0,
            ..cfg()
        };
        let mut s = Scheduler::new(config.clone()).expect("valid config");
        let whole = s
            .add_request(Request {
                seed: Some(42),
                ..req(0..5, 30)
            })
            .expect("accepted");
        let whole = tokens(run(&mut s).0.remove(&whole).expect("outputs"));
        assert_eq!(whole.len(), 30);
        // The first 12 tokens came from a worker that died; another one resumes after them.
        let mut s = Scheduler::new(config).expect("valid config");
        let mut prompt: Vec<u32> = (0..5).collect();
        prompt.extend_from_slice(&whole[..12]);
        let resumed = s
            .add_request(Request {
                token_ids: prompt,
                max_tokens: 18,
                seed: Some(42),
                resumed_tokens: 12,
                ..Request::default()
            })
            .expect("accepted");
        let rest = tokens(run(&mut s).0.remove(&resumed).expect("outputs"));
        assert_eq!(rest, whole[12..]);
        // The same tokens as a fresh prompt are another request, with other output.
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let mut prompt: Vec<u32> = (0..5).collect();
        prompt.extend_from_slice(&whole[..12]);
        let fresh = s
            .add_request(Request {
                token_ids: prompt,
                max_tokens: 18,
                seed: Some(42),
                ..Request::default()
            })
            .expect("accepted");
        assert_ne!(tokens(run(&mut s).0.remove(&fresh).expect("outputs")), rest);
        assert!(matches!(
            Request {
                resumed_tokens: 3,
                ..req(0..3, 5)
            }
            .validate(&cfg()),
            Err(SubmitError::ResumedPastPrompt { .. })
        ));
    }

    #[test]
    fn cancel_frees_blocks_and_slot() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let a = s.add_request(req(0..10, 50)).expect("accepted");
        let waiting = s.add_request(req(0..10, 50)).expect("accepted");
        s.step();
        assert!(s.load().kv_blocks_used > 0);
        assert!(s.cancel(a));
        assert!(s.cancel(waiting) || s.load().running == 0);
        assert!(!s.cancel(a));
        assert_eq!(
            s.load(),
            LoadSnapshot {
                kv_blocks_total: 16,
                prompt_tokens_total: s.load().prompt_tokens_total,
                cached_tokens_total: s.load().cached_tokens_total,
                ..LoadSnapshot::default()
            }
        );
        assert!(!s.has_work());
    }

    #[test]
    fn requests_that_cannot_fit_are_refused() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        assert!(matches!(
            s.add_request(req([], 1)),
            Err(SubmitError::EmptyPrompt)
        ));
        assert!(matches!(
            s.add_request(req([1], 0)),
            Err(SubmitError::ZeroMaxTokens)
        ));
        let err = s.add_request(req(0..60, 5)).expect_err("too large");
        assert_eq!(
            err.to_string(),
            "request needs 17 KV blocks (prompt + max_tokens) but the engine has only 16"
        );
    }

    #[test]
    fn step_duration_follows_timing_model_and_speedup() {
        let base = MockerConfig {
            num_gpu_blocks: 200,
            block_size: 10,
            max_num_batched_tokens: 2048,
            ..cfg()
        };
        for speedup in [1.0, 4.0] {
            let mut s = Scheduler::new(MockerConfig {
                speedup,
                ..base.clone()
            })
            .expect("valid config");
            let t = s.config().timing;
            s.add_request(req(0..1000, 5)).expect("accepted");
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            // 1000 uncached tokens, first token emitted: 100 of 200 blocks in use.
            let expected = (0.4209989 + 15.18344 + 16.50142 + t.decode_ms(0.5)) / speedup;
            assert!((ms(s.step().duration) - expected).abs() < 1e-6);
            // Decode of token 1001 needs block 101.
            let expected = t.decode_ms(101.0 / 200.0) / speedup;
            assert!((ms(s.step().duration) - expected).abs() < 1e-6);
        }
        let mut s = Scheduler::new(base).expect("valid config");
        s.add_request(req(0..999, 2)).expect("accepted");
        s.step();
        // Pure decode at exactly half fill: max(1, -6.435 + 27.005 + 5.74) ms.
        let d = s.step().duration.as_secs_f64() * 1000.0;
        assert!((d - (-6.435 + 27.005 + 5.74)).abs() < 1e-6, "{d}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn every_request_completes_and_all_blocks_are_freed(
            reqs in proptest::collection::vec((1u32..40, 1u32..12, 0u32..3), 1..12),
            blocks in 12usize..40,
            budget in 4usize..48,
            chunked: bool,
            caching: bool,
        ) {
            let mut s = Scheduler::new(MockerConfig {
                num_gpu_blocks: blocks,
                max_num_batched_tokens: budget,
                enable_chunked_prefill: chunked,
                enable_prefix_caching: caching,
                ..cfg()
            }).expect("valid config");
            let mut expected = HashMap::new();
            for (len, max, family) in reqs {
                // Shared prefixes within a family.
                let prompt: Vec<u32> = (0..len).map(|i| family * 1000 + i).collect();
                if let Ok(id) = s.add_request(req(prompt, max)) {
                    expected.insert(id, max as usize);
                }
            }
            let (outputs, events, _) = run(&mut s);
            for (id, max) in expected {
                proptest::prop_assert_eq!(tokens(&outputs[&id]), max);
            }
            proptest::prop_assert_eq!(s.load().kv_blocks_used, 0);
            if !caching {
                proptest::prop_assert!(events.is_empty());
            }
            // Each stored hash is removed at most once per store.
            let stored = stored_hashes(&events);
            let removed = removed_hashes(&events);
            proptest::prop_assert!(removed.len() <= stored.len());
        }
    }

    #[test]
    fn prefill_only_holds_full_blocks_until_released() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let bs = s.config().block_size;
        let prompt: Vec<u32> = (0..(3 * bs + 2) as u32).collect();
        s.add_request(Request {
            prefill_only: true,
            ..req(prompt.clone(), 8)
        })
        .expect("accepted");
        let (outputs, _, _) = run(&mut s);
        let out = outputs.into_values().next().expect("one request");
        let Some(Output::Prefilled {
            lease,
            blocks,
            hashes,
        }) = out.get(1).cloned()
        else {
            panic!("expected Scheduled, Prefilled, Finished; got {out:?}");
        };
        assert_eq!(out.len(), 3);
        assert_eq!(blocks.len(), 3);
        assert_eq!(hashes, seq_hashes(&prompt, bs)[..3].to_vec());
        assert_eq!(s.load().kv_blocks_used, 3, "the full blocks stay held");
        assert!(s.release_held(lease));
        assert!(!s.release_held(lease));
        assert_eq!(s.load().kv_blocks_used, 0);
    }

    /// Admits `prompt` with its first `remote` blocks pulled; returns its id and the PullKv slots.
    fn admit_pulling(
        s: &mut Scheduler,
        prompt: &[u32],
        remote: u32,
    ) -> (RequestId, u32, Vec<u32>, StepOutput) {
        let id = s
            .add_request(Request {
                remote_blocks: remote,
                ..req(prompt.to_vec(), 2)
            })
            .expect("accepted");
        let step = s.step();
        let Some((_, Output::PullKv { first, slots, .. })) = step
            .outputs
            .iter()
            .find(|(_, o)| matches!(o, Output::PullKv { .. }))
            .cloned()
        else {
            panic!("expected PullKv, got {:?}", step.outputs);
        };
        (id, first, slots, step)
    }

    #[test]
    fn pulled_blocks_are_registered_and_only_the_tail_is_computed() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let bs = s.config().block_size;
        let prompt: Vec<u32> = (0..(4 * bs + 1) as u32).collect();
        // The first block is cached already: only the next three are pulled.
        s.add_request(req(prompt[..bs + 1].to_vec(), 1))
            .expect("accepted");
        run(&mut s);
        let (id, first, slots, step) = admit_pulling(&mut s, &prompt, 4);
        assert_eq!((first, slots.len()), (1, 3));
        assert!(step.duration.is_zero(), "nothing computed while pulling");
        assert_eq!(s.load().running, 1);
        s.transfer_done(id, true);
        let step = s.step();
        assert_eq!(
            stored_hashes(&step.events),
            seq_hashes(&prompt, bs)[1..4].to_vec()
        );
        assert!(
            step.outputs
                .iter()
                .any(|(i, o)| *i == id && matches!(o, Output::Token(_)))
        );
        // One token computed in the decode pass: its per-token share and one decode.
        let t = s.config().timing;
        let fill = 5.0 / s.config().num_gpu_blocks as f64;
        let expected = (t.prefill[1] + t.decode_ms(fill)) / 1000.0 / s.config().speedup;
        assert!(
            (step.duration.as_secs_f64() - expected).abs() < 1e-6,
            "{:?}",
            step.duration
        );
    }

    #[test]
    fn a_failed_pull_gives_its_blocks_back_and_prefills_locally() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let bs = s.config().block_size;
        let prompt: Vec<u32> = (0..(2 * bs + 1) as u32).collect();
        let (id, _, slots, _) = admit_pulling(&mut s, &prompt, 2);
        assert_eq!(slots.len(), 2);
        assert_eq!(s.load().kv_blocks_used, 2);
        s.transfer_done(id, false);
        let (outputs, events, _) = run(&mut s);
        assert_eq!(
            outputs[&id]
                .iter()
                .filter(|o| matches!(o, Output::Token(_)))
                .count(),
            2
        );
        assert_eq!(stored_hashes(&events)[..2], seq_hashes(&prompt, bs)[..2]);
        assert_eq!(s.load().kv_blocks_used, 0);
    }

    #[test]
    fn a_cancelled_pull_frees_its_blocks_and_a_late_completion_is_ignored() {
        let mut s = Scheduler::new(cfg()).expect("valid config");
        let bs = s.config().block_size;
        let prompt: Vec<u32> = (0..(3 * bs + 1) as u32).collect();
        let (id, _, _, _) = admit_pulling(&mut s, &prompt, 3);
        assert!(s.cancel(id));
        s.transfer_done(id, true);
        assert_eq!(s.load().kv_blocks_used, 0);
        assert!(!s.has_work());
    }
}
