//! What a fleet of engines does under a load, from a [`Profile`]: mean TTFT and ITL of one
//! engine at a request rate, and the fewest engines that keep both within targets.
//!
//! An aggregated engine interleaves prefill with decode (chunked prefill): each prompt costs
//! about its idle TTFT of engine time less the one decode pass that emits its first token, so at
//! `rate` requests per second the engine spends the fraction `rho = rate x prefill(new tokens)`
//! prefilling. Decode steps run in the remaining
//! time, so the ITL is the profile's ITL at the engine's decode concurrency stretched by
//! `1 / (1 - rho)`; the concurrency follows from Little's law (`rate x OSL x ITL`). A prompt waits
//! for the prompts ahead of it (an M/D/1 queue: `rho / (2 (1 - rho))` prefills on average) and
//! for the step in progress. Prefill-only and decode-only engines are the two halves of this.

use crate::profile::Profile;

/// Load on a fleet, or on one engine: requests per second with their mean lengths.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Load {
    pub rate: f64,
    pub isl: f64,
    pub osl: f64,
    /// Share of prompt tokens served from the prefix cache.
    #[serde(default)]
    pub hit_rate: f64,
}

impl Load {
    /// This load spread over `n` engines.
    pub fn per(&self, n: u32) -> Load {
        Load {
            rate: self.rate / f64::from(n.max(1)),
            ..*self
        }
    }

    /// Prompt tokens each request computes (what the cache does not hold); at least one.
    pub fn new_tokens(&self) -> f64 {
        (self.isl * (1.0 - self.hit_rate.clamp(0.0, 1.0))).max(1.0)
    }
}

/// Predicted mean latencies of one engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub ttft_ms: f64,
    pub itl_ms: f64,
    /// Share of the engine's time spent prefilling.
    pub prefill_busy: f64,
    /// Requests decoding at once.
    pub concurrency: f64,
}

/// Beyond this prefill share an engine is taken as saturated (its queue grows without bound).
const SATURATED: f64 = 0.95;

/// Mean TTFT and ITL of one aggregated engine serving `load`; `None` when it cannot keep up.
pub fn aggregated(profile: &Profile, load: &Load) -> Option<Latency> {
    let prefill_ms = prefill_work_ms(profile, load);
    let rho = load.rate * prefill_ms / 1000.0;
    if !(0.0..SATURATED).contains(&rho) {
        return None;
    }
    let stretch = 1.0 / (1.0 - rho);
    let (itl_ms, concurrency) = decode_fixed_point(profile, load, stretch)?;
    let wait = prefill_ms * rho / (2.0 * (1.0 - rho));
    Some(Latency {
        // Queue, own prefill, the pass that emits the first token, and half a step in progress.
        ttft_ms: prefill_ms + wait + itl_ms * 1.5,
        itl_ms,
        prefill_busy: rho,
        concurrency,
    })
}

/// Engine time one prompt's prefill takes: its idle TTFT less the decode pass in it.
fn prefill_work_ms(profile: &Profile, load: &Load) -> f64 {
    let tokens = load.new_tokens();
    let ttft = profile.ttft_ms(tokens);
    (ttft - profile.itl_ms(1.0, tokens)).max(ttft * 0.5)
}

/// Mean TTFT of one prefill-only engine serving `load` (queue plus compute).
pub fn prefill_only(profile: &Profile, load: &Load) -> Option<f64> {
    let prefill_ms = profile.ttft_ms(load.new_tokens());
    let rho = load.rate * prefill_ms / 1000.0;
    (0.0..SATURATED)
        .contains(&rho)
        .then(|| prefill_ms * (1.0 + rho / (2.0 * (1.0 - rho))))
}

/// Mean ITL of one decode-only engine serving `load`.
pub fn decode_only(profile: &Profile, load: &Load) -> Option<f64> {
    decode_fixed_point(profile, load, 1.0).map(|(itl, _)| itl)
}

/// Solves `ITL = stretch x ITL_profile(k, context)` with `k = rate x OSL x ITL`.
fn decode_fixed_point(profile: &Profile, load: &Load, stretch: f64) -> Option<(f64, f64)> {
    let context = load.isl + load.osl / 2.0;
    let max = profile.max_concurrency.unwrap_or(f64::INFINITY);
    let mut itl = stretch * profile.itl_ms(1.0, context);
    let mut k = 1.0;
    for _ in 0..60 {
        k = (load.rate * load.osl * itl / 1000.0).max(1.0);
        if k > max {
            return None;
        }
        let next = stretch * profile.itl_ms(k, context);
        if (next - itl).abs() < 1e-6 * itl {
            itl = next;
            break;
        }
        itl = next;
    }
    itl.is_finite().then_some((itl, k))
}

/// Latency targets (milliseconds, means) a fleet is sized against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

/// The fewest aggregated engines, up to `max`, whose predicted latencies (each multiplied by its
/// correction) stay within `targets` at `load`; `max` when none does. 0 for no load.
pub fn aggregated_replicas(
    profile: &Profile,
    load: &Load,
    targets: Targets,
    correction: (f64, f64),
    max: u32,
) -> u32 {
    if load.rate <= 0.0 {
        return 0;
    }
    (1..=max.max(1))
        .find(|&n| {
            aggregated(profile, &load.per(n)).is_some_and(|l| {
                l.ttft_ms * correction.0 <= targets.ttft_ms
                    && l.itl_ms * correction.1 <= targets.itl_ms
            })
        })
        .unwrap_or(max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::engine;

    #[test]
    fn an_idle_engine_answers_at_its_profile() {
        let p = engine();
        let l = aggregated(
            &p,
            &Load {
                rate: 1e-9,
                isl: 1024.0,
                osl: 100.0,
                hit_rate: 0.0,
            },
        )
        .expect("keeps up");
        // Prefill work is the idle TTFT (40.48 ms) less one decode pass (10.1 ms at 1k context).
        let work = 40.48 - p.itl_ms(1.0, 1024.0);
        assert!((l.ttft_ms - (work + 1.5 * l.itl_ms)).abs() < 1e-3);
        assert!((l.itl_ms - p.itl_ms(1.0, 1074.0)).abs() < 1e-6);
    }

    #[test]
    fn latency_grows_with_load_until_the_engine_saturates() {
        let p = engine();
        let at = |rate| {
            aggregated(
                &p,
                &Load {
                    rate,
                    isl: 1024.0,
                    osl: 100.0,
                    hit_rate: 0.0,
                },
            )
        };
        let (a, b) = (at(5.0).expect("ok"), at(15.0).expect("ok"));
        assert!(b.ttft_ms > a.ttft_ms && b.itl_ms > a.itl_ms);
        assert!((a.prefill_busy - 5.0 * (40.48 - 10.1) / 1000.0).abs() < 1e-9);
        // 32 req/s x 30.4 ms = 0.97 of the engine's time: saturated.
        assert_eq!(at(32.0), None);
    }

    #[test]
    fn cached_prompt_tokens_cost_nothing() {
        let load = Load {
            rate: 10.0,
            isl: 4096.0,
            osl: 10.0,
            hit_rate: 0.75,
        };
        assert_eq!(load.new_tokens(), 1024.0);
    }

    #[test]
    fn replicas_are_the_fewest_that_meet_both_targets() {
        let p = engine();
        let load = Load {
            rate: 40.0,
            isl: 1024.0,
            osl: 100.0,
            hit_rate: 0.0,
        };
        let t = Targets {
            ttft_ms: 80.0,
            itl_ms: 20.0,
        };
        let n = aggregated_replicas(&p, &load, t, (1.0, 1.0), 32);
        let meets = |n: u32| {
            aggregated(&p, &load.per(n)).is_some_and(|l| l.ttft_ms <= 80.0 && l.itl_ms <= 20.0)
        };
        assert!(meets(n) && !meets(n - 1), "{n}");
        // A correction of 2 on TTFT asks for more.
        assert!(aggregated_replicas(&p, &load, t, (2.0, 1.0), 32) > n);
        assert_eq!(
            aggregated_replicas(&p, &Load::default(), t, (1.0, 1.0), 32),
            0
        );
        assert_eq!(
            aggregated_replicas(&p, &load, t, (1.0, 1.0), 2),
            2,
            "capped"
        );
    }
}
