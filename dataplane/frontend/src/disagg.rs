//! Disaggregated prefill/decode, the frontend's part: which requests the prefill pool computes
//! ([`decide`], Dynamo's conditional-disaggregation policies), the prefill leg (a prefill-only
//! request to a prefill worker, retried on another when one fails), and the metrics of both.
//!
//! The decode worker is chosen first (kv cost over the decode pool, which counts what it already
//! holds), so the policy knows how many of the prompt's tokens it would have to compute itself.
//! When the request goes to the prefill pool, the prefill worker answers with transfer parameters
//! that the frontend passes to the decode worker unread. The decode worker pulls only the blocks
//! it lacks and generates every output token: the first token comes from decode, so one engine
//! produces the whole output (seeded and greedy output match an aggregated run token for token,
//! and a decode failure migrates like any other); the cost is the transfer plus one decode step
//! before the first token.
//!
//! Nothing here fails a request: no prefill worker, a prefill worker that dies, or a pull that
//! fails all end with the decode worker prefilling locally, counted by reason.

use dynamo_protocol::proto;
use tokio::time::Instant;

use crate::{AppState, pool::Lease};

/// When a request's prompt goes to the prefill pool (`--disagg-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DisaggPolicy {
    /// Every request with a prefill worker available.
    Always,
    /// Locally when the decode worker has little left to compute (Dynamo's `isl_bounding`).
    IslBounding,
    /// Locally when the prefill pool is busy (`prefill_load`).
    PrefillLoad,
    /// Locally when either holds (`isl_or_load`).
    IslOrLoad,
    /// Never (prefill workers idle).
    Never,
}

/// Thresholds of the policies.
#[derive(Debug, Clone, Copy)]
pub struct DisaggConfig {
    pub policy: DisaggPolicy,
    /// `isl_bounding`: prefill locally when the decode worker has fewer new tokens than this to
    /// compute...
    pub max_local_prefill_tokens: u64,
    /// ...and they are less than this share of the prompt (it holds most of it already).
    pub max_local_prefill_ratio: f64,
    /// `prefill_load`: the pool is busy when its least-loaded worker has this many prompt tokens
    /// queued.
    pub prefill_busy_tokens: u64,
    /// Never prefill locally on a decode worker with this many prompt tokens queued (0: off).
    pub decode_busy_tokens: u64,
    /// Backpressure: while the prefill pool has this many prompt tokens queued in all, prompts are
    /// prefilled by their decode worker instead (0: off).
    pub max_prefill_queue_tokens: u64,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        Self {
            policy: DisaggPolicy::IslBounding,
            max_local_prefill_tokens: 2048,
            max_local_prefill_ratio: 0.7,
            prefill_busy_tokens: 16_384,
            decode_busy_tokens: 0,
            max_prefill_queue_tokens: 0,
        }
    }
}

/// Where a prompt is prefilled, and why (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Remote(&'static str),
    Local(&'static str),
}

/// What the policy sees of one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Situation {
    pub prompt_tokens: u64,
    /// Prompt tokens the chosen decode worker holds.
    pub decode_cached_tokens: u64,
    /// Prompt tokens queued on the chosen decode worker.
    pub decode_pending: u64,
    /// Prompt tokens queued on the least-loaded prefill worker, and on all of them.
    pub prefill_min: u64,
    pub prefill_total: u64,
}

/// The policy (pure).
pub fn decide(c: &DisaggConfig, s: &Situation) -> Decision {
    let new = s.prompt_tokens.saturating_sub(s.decode_cached_tokens);
    // Dynamo's `isl_bounding`: the decode worker computes the prompt itself only when what it
    // lacks is both short and a small share of the prompt, i.e. a follow-up turn whose history it
    // holds. A fresh prompt, short or long, goes to the prefill pool.
    let short = new < c.max_local_prefill_tokens
        && (new as f64) < c.max_local_prefill_ratio * s.prompt_tokens as f64;
    let busy = s.prefill_min >= c.prefill_busy_tokens;
    let local = match c.policy {
        DisaggPolicy::Never => return Decision::Local("never"),
        DisaggPolicy::Always => None,
        DisaggPolicy::IslBounding => short.then_some("isl_bounding"),
        DisaggPolicy::PrefillLoad => busy.then_some("prefill_load"),
        DisaggPolicy::IslOrLoad => short
            .then_some("isl_bounding")
            .or(busy.then_some("prefill_load")),
    };
    match local {
        Some(_) if c.decode_busy_tokens > 0 && s.decode_pending >= c.decode_busy_tokens => {
            Decision::Remote("decode_busy")
        }
        Some(reason) => Decision::Local(reason),
        None if c.max_prefill_queue_tokens > 0 && s.prefill_total >= c.max_prefill_queue_tokens => {
            Decision::Local("backpressure")
        }
        None => Decision::Remote(match c.policy {
            DisaggPolicy::Always => "always",
            _ => "new_prompt",
        }),
    }
}

impl AppState {
    /// The prefill leg of a new request bound for `decode`: decides, and for a remote prefill
    /// returns what the prefill worker did. `None`: the decode worker prefills.
    pub(crate) async fn prefill_leg(
        &self,
        request: &proto::GenerateRequest,
        decode: &mut Lease,
    ) -> Option<RemotePrefill> {
        let pool = self.pool();
        let (prefill_min, prefill_total) = pool.prefill_pool_load()?;
        let bs = u64::from(decode.worker.info.block_size.max(1));
        let situation = Situation {
            prompt_tokens: request.token_ids.len() as u64,
            decode_cached_tokens: u64::from(decode.overlap_blocks) * bs,
            decode_pending: pool.pending_prefill(&decode.worker),
            prefill_min,
            prefill_total,
        };
        let decision = decide(&self.disagg, &situation);
        self.metrics.count_disagg(decision, situation.prompt_tokens);
        let Decision::Remote(_) = decision else {
            return None;
        };
        // The decode worker only pulls: its prefill booking goes.
        decode.first_token();
        let prefill = proto::GenerateRequest {
            prefill_only: true,
            max_tokens: 1,
            kv_transfer_params: Vec::new(),
            ..request.clone()
        };
        let mut failed = Vec::new();
        for _ in 0..=self.migration_limit {
            let Some(mut lease) = pool.pick_prefill(&request.token_ids, &failed) else {
                self.metrics.count_prefill_fallback("no_prefill_worker");
                return None;
            };
            let started = Instant::now();
            match run_prefill(&lease, prefill.clone()).await {
                Ok(done) => {
                    lease.first_token();
                    self.metrics
                        .prefill_leg
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .disagg_prefill_cached
                        .inc_by(u64::from(done.cached_tokens));
                    return Some(done);
                }
                Err(status) => {
                    tracing::warn!(worker = %lease.worker.url, %status, request = %request.request_id, "prefill worker failed; trying another");
                    self.metrics.count_prefill_fallback("prefill_worker_failed");
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::Unknown
                    ) {
                        pool.leave(lease.worker.id, status.message());
                    }
                    failed.push(lease.worker.id);
                }
            }
        }
        None
    }

    /// Counts how a decode worker got a prompt's KV (its first message's report).
    pub(crate) fn record_transfer(&self, report: &proto::KvTransferReport) {
        if report.error.is_empty() {
            if report.blocks > 0 {
                self.metrics.count_transfer(report);
            }
        } else {
            tracing::warn!(error = %report.error, "the decode worker could not pull the prompt's KV and prefilled it locally");
            self.metrics.count_prefill_fallback("transfer_failed");
        }
    }
}

/// A prompt the prefill pool prefilled.
pub(crate) struct RemotePrefill {
    /// Where the decode worker pulls the prompt's KV from.
    pub params: Vec<u8>,
    /// Prompt tokens the prefill worker found in its cache: the request's cached tokens (what
    /// its decode worker pulls was computed for it all the same).
    pub cached_tokens: u32,
}

/// Sends a prefill-only request and waits for its transfer parameters.
async fn run_prefill(
    lease: &Lease,
    request: proto::GenerateRequest,
) -> Result<RemotePrefill, tonic::Status> {
    let mut client = lease.worker.client.clone();
    let mut stream = client.generate(request).await?.into_inner();
    let mut cached_tokens = 0;
    while let Some(msg) = stream.message().await? {
        if let Some(c) = msg.cached_tokens {
            cached_tokens = c;
        }
        if !msg.kv_transfer_params.is_empty() {
            return Ok(RemotePrefill {
                params: msg.kv_transfer_params,
                cached_tokens,
            });
        }
    }
    Err(tonic::Status::unavailable(
        "the prefill worker ended the request without transfer parameters",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(prompt: u64, cached: u64) -> Situation {
        Situation {
            prompt_tokens: prompt,
            decode_cached_tokens: cached,
            ..Situation::default()
        }
    }

    #[test]
    fn isl_bounding_keeps_only_short_mostly_cached_remainders_local() {
        let c = DisaggConfig::default();
        // A follow-up turn: 1000 new of 8000 (12%).
        assert_eq!(decide(&c, &s(8000, 7000)), Decision::Local("isl_bounding"));
        // Short but fresh (all of it new), or 5000 new of 8000 (62%, but not short), or a long
        // fresh prompt: the prefill pool computes it.
        assert_eq!(decide(&c, &s(1000, 0)), Decision::Remote("new_prompt"));
        assert_eq!(decide(&c, &s(8000, 3000)), Decision::Remote("new_prompt"));
        assert_eq!(decide(&c, &s(3000, 0)), Decision::Remote("new_prompt"));
        // 1500 new of 2000 (75%): short, but most of the prompt.
        assert_eq!(decide(&c, &s(2000, 500)), Decision::Remote("new_prompt"));
    }

    #[test]
    fn prefill_load_and_the_gates() {
        let busy = Situation {
            prefill_min: 20_000,
            prefill_total: 50_000,
            ..s(8000, 0)
        };
        let c = DisaggConfig {
            policy: DisaggPolicy::PrefillLoad,
            ..DisaggConfig::default()
        };
        assert_eq!(decide(&c, &busy), Decision::Local("prefill_load"));
        assert_eq!(decide(&c, &s(8000, 0)), Decision::Remote("new_prompt"));
        let c = DisaggConfig {
            policy: DisaggPolicy::IslOrLoad,
            decode_busy_tokens: 4096,
            ..DisaggConfig::default()
        };
        assert_eq!(decide(&c, &busy), Decision::Local("prefill_load"));
        let decode_busy = Situation {
            decode_pending: 5000,
            ..busy
        };
        assert_eq!(decide(&c, &decode_busy), Decision::Remote("decode_busy"));
        let c = DisaggConfig {
            policy: DisaggPolicy::Always,
            max_prefill_queue_tokens: 40_000,
            ..DisaggConfig::default()
        };
        assert_eq!(decide(&c, &busy), Decision::Local("backpressure"));
        assert_eq!(decide(&c, &s(100, 0)), Decision::Remote("always"));
    }
}
