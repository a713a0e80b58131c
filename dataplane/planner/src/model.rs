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

    /// This load's requests so far apart that none waits for another.
    pub fn idle(&self) -> Load {
        Load {
            rate: self.rate.min(1e-6),
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
    engine(profile, load, load)
}

/// Mean latencies of one engine that decodes `decode` and prefills `prefill` of those requests
/// itself (a decode worker of a disaggregated graph prefills the prompts the policy keeps local;
/// an aggregated engine prefills them all). The TTFT is that of the prompts it prefills.
pub fn engine(profile: &Profile, decode: &Load, prefill: &Load) -> Option<Latency> {
    let prefill_ms = prefill_work_ms(profile, prefill);
    let rho = prefill.rate * prefill_ms / 1000.0;
    if !(0.0..SATURATED).contains(&rho) {
        return None;
    }
    let stretch = 1.0 / (1.0 - rho);
    let (itl_ms, concurrency) = decode_fixed_point(profile, decode, stretch)?;
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
/// correction) stay within `targets` at `load`; `max` when none does, unless even an idle engine
/// misses them ([`fewest`]). 0 for no load.
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
    let score = |load: &Load| {
        aggregated(profile, load).map(|l| {
            (l.ttft_ms * correction.0 / targets.ttft_ms)
                .max(l.itl_ms * correction.1 / targets.itl_ms)
        })
    };
    fewest(max, |n| score(&load.per(n)), score(&load.idle()))
}

/// Within this share of an idle engine's latency, more engines are not worth adding to a pool
/// whose target even an idle engine misses.
const NO_BETTER: f64 = 1.1;

/// The fewest engines, 1 to `max`, whose `score` (the worst of the corrected latencies over their
/// targets; `None`: the engines cannot keep up) is at most 1; `max` when none is. Unless `idle`
/// (the score of an engine with next to no load) is above 1: then no count meets the target (a
/// prompt alone takes longer than the TTFT target), engines added past the point where the
/// queue is gone change nothing, and the pool gets the fewest within [`NO_BETTER`] of `idle`.
fn fewest(max: u32, score: impl Fn(u32) -> Option<f64>, idle: Option<f64>) -> u32 {
    let max = max.max(1);
    if let Some(n) = (1..=max).find(|&n| score(n).is_some_and(|s| s <= 1.0)) {
        return n;
    }
    match idle {
        Some(floor) if floor > 1.0 => (1..=max)
            .find(|&n| score(n).is_some_and(|s| s <= floor * NO_BETTER))
            .unwrap_or(max),
        _ => max,
    }
}

/// Where a disaggregated graph's prompts are prefilled: the share of requests the prefill pool
/// prefills, their mean prompt length, and the share of those prompts' tokens the prefill
/// workers found in their caches (the decode workers' hits say nothing of the prefill pool's
/// work: a fresh prompt goes remote, a follow-up turn whose history its decode worker holds stays).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub share: f64,
    pub isl: f64,
    #[serde(default)]
    pub hit_rate: f64,
}

impl Split {
    /// Every prompt to the prefill pool, of `isl` tokens, none cached.
    pub fn all_remote(isl: f64) -> Split {
        Split {
            share: 1.0,
            isl,
            hit_rate: 0.0,
        }
    }
}

/// A load split by where its prompts are prefilled (a disaggregated graph's frontend sends some
/// to the prefill pool and lets the decode worker prefill the rest).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Demand {
    /// Every request (each is decoded by the decode pool, or by an aggregated engine).
    pub all: Load,
    /// The requests the prefill pool prefills.
    pub remote: Load,
    /// The requests their decode worker prefills.
    pub local: Load,
}

impl Demand {
    /// Every prompt prefilled where it is decoded (an aggregated graph).
    pub fn aggregated(all: Load) -> Demand {
        Demand {
            all,
            remote: Load { rate: 0.0, ..all },
            local: all,
        }
    }

    /// `all` divided as `split` says: the share `split.share` of its requests, of mean prompt
    /// `split.isl` (0: unknown, the mean prompt) with `split.hit_rate` of it in the prefill
    /// workers' caches, prefilled by the prefill pool; the rest by their decode workers, with
    /// what is left of `all`'s cache hits.
    pub fn split(all: Load, split: Split) -> Demand {
        let s = split.share.clamp(0.0, 1.0);
        // Unknown remote prompt length (nothing sent yet): the mean prompt.
        let remote_isl = match (s > 0.0, split.isl > 0.0) {
            (false, _) => 0.0,
            (true, true) => split.isl,
            (true, false) => all.isl.max(1.0),
        };
        let remote_hit = if s > 0.0 {
            split.hit_rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let local_isl = if s < 1.0 {
            ((all.isl - s * remote_isl) / (1.0 - s)).max(1.0)
        } else {
            all.isl
        };
        // The cached tokens of a mean request, less those of the remote prompts, over the local
        // prompts' tokens.
        let local_hit = if s < 1.0 {
            let cached = all.isl * all.hit_rate.clamp(0.0, 1.0) - s * remote_isl * remote_hit;
            (cached / ((1.0 - s) * local_isl)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        Demand {
            all,
            remote: Load {
                rate: all.rate * s,
                isl: remote_isl,
                hit_rate: remote_hit,
                ..all
            },
            local: Load {
                rate: all.rate * (1.0 - s),
                isl: local_isl,
                hit_rate: local_hit,
                ..all
            },
        }
    }

    /// The same split with its requests so far apart that none waits for another.
    pub fn idle(&self) -> Demand {
        Demand {
            all: self.all.idle(),
            remote: self.remote.idle(),
            local: self.local.idle(),
        }
    }

    /// Share of requests the prefill pool prefills.
    pub fn remote_share(&self) -> f64 {
        if self.all.rate > 0.0 {
            (self.remote.rate / self.all.rate).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Mean latencies of a disaggregated fleet of `prefill` prefill engines and `decode` decode
/// engines: the TTFT over all requests (a remote prompt waits for a prefill engine, then for one
/// decode pass that emits its first token; the KV transfer is left to the correction), and the
/// decode engines' ITL. `None` when a pool cannot keep up.
pub fn disaggregated(
    profiles: (&Profile, &Profile),
    demand: &Demand,
    prefill: u32,
    decode: u32,
) -> Option<Latency> {
    let d = engine(
        profiles.1,
        &demand.all.per(decode),
        &demand.local.per(decode),
    )?;
    let share = demand.remote_share();
    let ttft_ms = if share > 0.0 {
        if prefill == 0 {
            return None;
        }
        let remote = prefill_only(profiles.0, &demand.remote.per(prefill))? + 1.5 * d.itl_ms;
        share * remote + (1.0 - share) * d.ttft_ms
    } else {
        d.ttft_ms
    };
    Some(Latency { ttft_ms, ..d })
}

/// The fewest (prefill, decode) engines, up to `max` each, that keep the corrected mean latencies
/// within `targets`: the decode pool sized first on the ITL (and on the TTFT of the prompts it
/// prefills itself), then the prefill pool on the TTFT of the rest. A pool that no count
/// satisfies gets its maximum, unless even an idle engine misses its target ([`fewest`]); a pool
/// with nothing to do gets 0.
pub fn disaggregated_replicas(
    profiles: (&Profile, &Profile),
    demand: &Demand,
    targets: Targets,
    correction: (f64, f64),
    max: (u32, u32),
) -> (u32, u32) {
    if demand.all.rate <= 0.0 {
        return (0, 0);
    }
    let decode_score = |all: &Load, local: &Load| {
        engine(profiles.1, all, local).map(|l| {
            let itl = l.itl_ms * correction.1 / targets.itl_ms;
            if demand.local.rate > 0.0 {
                itl.max(l.ttft_ms * correction.0 / targets.ttft_ms)
            } else {
                itl
            }
        })
    };
    let decode = fewest(
        max.1,
        |n| decode_score(&demand.all.per(n), &demand.local.per(n)),
        decode_score(&demand.all.idle(), &demand.local.idle()),
    );
    if demand.remote.rate <= 0.0 {
        return (0, decode);
    }
    let prefill_score = |demand: &Demand, n: u32| {
        disaggregated(profiles, demand, n, decode)
            .map(|l| l.ttft_ms * correction.0 / targets.ttft_ms)
    };
    let prefill = fewest(
        max.0,
        |n| prefill_score(demand, n),
        prefill_score(&demand.idle(), 1),
    );
    (prefill, decode)
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

    #[test]
    fn a_disaggregated_fleet_sizes_prefill_on_ttft_and_decode_on_itl() {
        let p = engine();
        let all = Load {
            rate: 20.0,
            isl: 3000.0,
            osl: 100.0,
            hit_rate: 0.0,
        };
        let t = Targets {
            ttft_ms: 300.0,
            itl_ms: 20.0,
        };
        let demand = Demand::split(all, Split::all_remote(3000.0));
        let (np, nd) = disaggregated_replicas((&p, &p), &demand, t, (1.0, 1.0), (32, 32));
        let meets = |np, nd| {
            disaggregated((&p, &p), &demand, np, nd)
                .is_some_and(|l| l.ttft_ms <= t.ttft_ms && l.itl_ms <= t.itl_ms)
        };
        assert!(meets(np, nd), "{np} {nd}");
        assert!(!meets(np - 1, nd), "prefill is the fewest: {np}");
        // Decode engines that never prefill need fewer than aggregated ones for the same ITL.
        let agg = aggregated_replicas(&p, &all, t, (1.0, 1.0), 64);
        assert!(nd < agg, "{nd} vs {agg}");
        // More prompt tokens: more prefill engines, the same decode pool.
        let longer = Demand::split(Load { isl: 6000.0, ..all }, Split::all_remote(6000.0));
        let (np2, nd2) = disaggregated_replicas((&p, &p), &longer, t, (1.0, 1.0), (32, 32));
        assert!(np2 > np && nd2 >= nd, "{np2} {nd2}");
        // Nothing sent to the prefill pool: it needs no engine, and decode prefills it all.
        let local = Demand::split(all, Split::default());
        let (np3, nd3) = disaggregated_replicas((&p, &p), &local, t, (1.0, 1.0), (32, 32));
        assert_eq!(np3, 0);
        assert_eq!(nd3, agg);
    }

    #[test]
    fn a_target_no_engine_count_meets_gets_the_fewest_that_do_as_well_as_any() {
        let p = engine();
        let t = Targets {
            ttft_ms: 300.0,
            itl_ms: 20.0,
        };
        // A trickle of prompts so long that one alone misses the TTFT target: more engines do not
        // help, so one it is (not the maximum).
        let trickle = Load {
            rate: 0.01,
            isl: 30_000.0,
            osl: 100.0,
            hit_rate: 0.0,
        };
        assert!(aggregated(&p, &trickle).expect("keeps up").ttft_ms > t.ttft_ms);
        assert_eq!(aggregated_replicas(&p, &trickle, t, (1.0, 1.0), 16), 1);
        let demand = Demand::split(trickle, Split::all_remote(30_000.0));
        assert_eq!(
            disaggregated_replicas((&p, &p), &demand, t, (1.0, 1.0), (16, 16)),
            (1, 1)
        );
        // Heavy load of those prompts: more engines keep shortening the queue; far more than one.
        // (A target missed only for want of engines still gets them all: see the tests above.)
        let heavy = Load {
            rate: 2.0,
            ..trickle
        };
        let n = aggregated_replicas(&p, &heavy, t, (1.0, 1.0), 16);
        assert!(n > 4, "{n}");
    }

    #[test]
    fn a_split_keeps_the_mean_prompt() {
        let all = Load {
            rate: 10.0,
            isl: 1000.0,
            osl: 50.0,
            hit_rate: 0.0,
        };
        let d = Demand::split(
            all,
            Split {
                share: 0.25,
                isl: 3000.0,
                hit_rate: 0.0,
            },
        );
        assert_eq!(d.remote.rate, 2.5);
        // 0.25 x 3000 + 0.75 x local = 1000.
        assert!((d.local.isl - 1000.0 / 3.0).abs() < 1e-9);
        assert_eq!(d.remote_share(), 0.25);
        assert_eq!(Demand::aggregated(all).local, all);
    }

    #[test]
    fn a_split_gives_the_decode_workers_the_cache_hits_the_prefill_pool_did_not_have() {
        // Half the requests are follow-up turns their decode worker holds (kept local); the other
        // half are fresh prompts the prefill workers compute in full: 50% hit overall.
        let all = Load {
            rate: 10.0,
            isl: 3000.0,
            osl: 50.0,
            hit_rate: 0.5,
        };
        let fresh = Split {
            share: 0.5,
            isl: 3000.0,
            hit_rate: 0.0,
        };
        let d = Demand::split(all, fresh);
        assert_eq!(d.remote.hit_rate, 0.0);
        assert_eq!(d.remote.new_tokens(), 3000.0);
        assert!((d.local.hit_rate - 1.0).abs() < 1e-9);
        // Every prompt remote with 40% in the prefill workers' caches.
        let d = Demand::split(
            Load {
                hit_rate: 0.4,
                ..all
            },
            Split {
                hit_rate: 0.4,
                ..Split::all_remote(3000.0)
            },
        );
        assert!((d.remote.new_tokens() - 1800.0).abs() < 1e-9);
        assert_eq!(d.local.hit_rate, 0.0);
    }
}
