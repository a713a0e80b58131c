//! The frontend's counters as the planner reads them: its `/metrics` text parsed into cumulative
//! sums, and two readings turned into an [`Observation`] of the window between them.

use std::time::{Duration, Instant};

use crate::{Decision, Observation, Planner, Replicas};

/// Cumulative frontend counters at one moment (summed over the frontends of a graph).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    requests: f64,
    isl_sum: f64,
    isl_count: f64,
    osl_sum: f64,
    cached_sum: f64,
    ttft_sum: f64,
    ttft_count: f64,
    itl_sum: f64,
    itl_count: f64,
    met: f64,
    missed: f64,
    ttft_missed: f64,
    itl_missed: f64,
    inflight: f64,
    live: f64,
    live_prefill: f64,
    remote: f64,
    remote_tokens: f64,
    /// Prompt tokens of the remote requests the prefill workers found cached.
    remote_cached: f64,
    /// Gauges: prompt tokens queued on prefill workers and on the others; KV blocks held and
    /// total on the workers that serve requests (aggregated or decode).
    queued_remote: f64,
    queued: f64,
    kv_active: f64,
    kv_total: f64,
}

/// The sum of every series of the metric `name` in a Prometheus/OpenMetrics text body; `None`
/// when it has none.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn labelled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| {
            l.rsplit_once('}')?
                .1
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// The sum of `name`'s series of the workers that serve requests (roles aggregated and decode).
fn serving(text: &str, name: &str) -> f64 {
    labelled(text, name, "role=\"aggregated\"") + labelled(text, name, "role=\"decode\"")
}

impl Counters {
    /// Reads a frontend's `/metrics` text; `None` when it is not a dynamo-rs frontend's.
    pub fn parse(text: &str) -> Option<Counters> {
        let f = "dynamo_frontend_";
        let m = |n: &str| metric(text, &format!("{f}{n}"));
        Some(Counters {
            requests: m("requests_total").unwrap_or(0.0),
            isl_sum: m("input_sequence_tokens_sum")?,
            isl_count: m("input_sequence_tokens_count")?,
            osl_sum: m("output_sequence_tokens_sum")?,
            cached_sum: m("cached_tokens_sum")?,
            ttft_sum: m("time_to_first_token_seconds_sum")?,
            ttft_count: m("time_to_first_token_seconds_count")?,
            itl_sum: m("inter_token_latency_seconds_sum")?,
            itl_count: m("inter_token_latency_seconds_count")?,
            met: labelled(text, &format!("{f}sla_requests_total"), "met=\"true\""),
            missed: labelled(text, &format!("{f}sla_requests_total"), "met=\"false\""),
            ttft_missed: labelled(text, &format!("{f}sla_misses_total"), "target=\"ttft\""),
            itl_missed: labelled(text, &format!("{f}sla_misses_total"), "target=\"itl\""),
            inflight: m("inflight_requests").unwrap_or(0.0),
            live: m("live_workers").unwrap_or(0.0),
            live_prefill: labelled(text, &format!("{f}live_workers"), "role=\"prefill\""),
            remote: labelled(
                text,
                &format!("{f}disagg_decisions_total"),
                "decision=\"remote\"",
            ),
            remote_tokens: labelled(
                text,
                &format!("{f}disagg_prompt_tokens_total"),
                "decision=\"remote\"",
            ),
            remote_cached: m("disagg_prefill_cached_tokens_total").unwrap_or(0.0),
            queued_remote: labelled(
                text,
                &format!("{f}worker_pending_prefill_tokens"),
                "role=\"prefill\"",
            ),
            queued: serving(text, &format!("{f}worker_pending_prefill_tokens")),
            kv_active: serving(text, &format!("{f}worker_kv_blocks_active")),
            kv_total: serving(text, &format!("{f}worker_kv_blocks_total")),
        })
    }

    /// What happened between `self` and the later `b`, `wall` apart, in the engines' time
    /// (durations and latencies times `speedup`).
    pub fn observe(&self, b: &Counters, wall: Duration, speedup: f64) -> Observation {
        let a = self;
        let d = |x: f64, y: f64| (y - x).max(0.0);
        let n = d(a.isl_count, b.isl_count);
        let per = |sum: f64| if n > 0.0 { sum / n } else { 0.0 };
        let isl = per(d(a.isl_sum, b.isl_sum));
        let mean_ms = |s: f64, c: f64| (c > 0.0).then(|| s / c * 1000.0 * speedup);
        let judged = d(a.met, b.met) + d(a.missed, b.missed);
        let share = |missed: f64| (judged > 0.0).then(|| 1.0 - (missed / judged).min(1.0));
        // Arrivals: requests that finished plus the change in those in flight.
        let arrived = (b.requests - a.requests + b.inflight - a.inflight).max(0.0);
        Observation {
            duration_s: wall.as_secs_f64() * speedup,
            requests: arrived,
            isl,
            osl: per(d(a.osl_sum, b.osl_sum)),
            hit_rate: if isl > 0.0 {
                per(d(a.cached_sum, b.cached_sum)) / isl
            } else {
                0.0
            },
            ttft_ms: mean_ms(d(a.ttft_sum, b.ttft_sum), d(a.ttft_count, b.ttft_count)),
            itl_ms: mean_ms(d(a.itl_sum, b.itl_sum), d(a.itl_count, b.itl_count)),
            attainment: (judged > 0.0).then(|| d(a.met, b.met) / judged),
            ttft_attainment: share(d(a.ttft_missed, b.ttft_missed)),
            itl_attainment: share(d(a.itl_missed, b.itl_missed)),
            workers: b.live as u32,
            prefill_workers: b.live_prefill as u32,
            queued_remote_tokens: b.queued_remote,
            queued_tokens: b.queued,
            kv_usage: (b.kv_total > 0.0).then(|| (b.kv_active / b.kv_total).clamp(0.0, 1.0)),
            remote_requests: d(a.remote, b.remote),
            remote_isl: {
                let r = d(a.remote, b.remote);
                if r > 0.0 {
                    d(a.remote_tokens, b.remote_tokens) / r
                } else {
                    0.0
                }
            },
            remote_hit_rate: {
                let tokens = d(a.remote_tokens, b.remote_tokens);
                if tokens > 0.0 {
                    (d(a.remote_cached, b.remote_cached) / tokens).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            },
        }
    }

    /// The sum of two frontends' counters.
    pub fn add(&self, o: &Counters) -> Counters {
        Counters {
            requests: self.requests + o.requests,
            isl_sum: self.isl_sum + o.isl_sum,
            isl_count: self.isl_count + o.isl_count,
            osl_sum: self.osl_sum + o.osl_sum,
            cached_sum: self.cached_sum + o.cached_sum,
            ttft_sum: self.ttft_sum + o.ttft_sum,
            ttft_count: self.ttft_count + o.ttft_count,
            itl_sum: self.itl_sum + o.itl_sum,
            itl_count: self.itl_count + o.itl_count,
            met: self.met + o.met,
            missed: self.missed + o.missed,
            ttft_missed: self.ttft_missed + o.ttft_missed,
            itl_missed: self.itl_missed + o.itl_missed,
            inflight: self.inflight + o.inflight,
            // Every frontend sees the same workers.
            live: self.live.max(o.live),
            live_prefill: self.live_prefill.max(o.live_prefill),
            remote: self.remote + o.remote,
            remote_tokens: self.remote_tokens + o.remote_tokens,
            remote_cached: self.remote_cached + o.remote_cached,
            queued_remote: self.queued_remote + o.queued_remote,
            queued: self.queued + o.queued,
            // Each frontend books its own requests' blocks on the same workers.
            kv_active: self.kv_active + o.kv_active,
            kv_total: self.kv_total.max(o.kv_total),
        }
    }
}

/// How often the fast check runs, and how far back it looks, in engine time.
pub const TICK: Duration = Duration::from_secs(5);
pub const SHORT_WINDOW: Duration = Duration::from_secs(15);

/// When a planner decides, and on which window of counters: the interval's decision on the
/// readings one interval apart, the fast check in between on the last [`SHORT_WINDOW`]. Times are
/// wall clock; the interval and windows are in engine time, divided by the speedup.
#[derive(Debug, Clone)]
pub struct Cadence {
    interval: Duration,
    speedup: f64,
    history: std::collections::VecDeque<(Instant, Counters)>,
    last_interval: Option<(Instant, Counters)>,
    interval_start: Instant,
}

impl Cadence {
    pub fn new(interval: Duration, speedup: f64, now: Instant) -> Cadence {
        Cadence {
            interval,
            speedup: speedup.max(1e-9),
            history: Default::default(),
            last_interval: None,
            interval_start: now,
        }
    }

    /// New settings: the readings so far are forgotten; the interval in progress goes on.
    pub fn reconfigure(&mut self, interval: Duration, speedup: f64) {
        self.interval = interval;
        self.speedup = speedup.max(1e-9);
        self.history.clear();
        self.last_interval = None;
    }

    /// Wall time between two fast checks.
    pub fn tick(&self) -> Duration {
        TICK.div_f64(self.speedup)
    }

    /// Takes the reading at `now` (`None`: the frontends did not answer) and returns the
    /// decision due, if any: `planner.on_interval` once an interval has passed (not on the first
    /// reading, which only sets the baseline), `planner.on_tick` otherwise.
    pub fn decide(
        &mut self,
        planner: &mut Planner,
        now: Instant,
        snap: Option<Counters>,
        current: &Replicas,
    ) -> Option<Decision> {
        let speed = self.speedup;
        if let Some(snap) = snap {
            self.history.push_back((now, snap));
            let short = SHORT_WINDOW.div_f64(speed);
            while self.history.len() > 2 && now - self.history[1].0 >= short {
                self.history.pop_front();
            }
        }
        if now - self.interval_start >= self.interval.div_f64(speed) {
            self.interval_start = now;
            let obs = match (self.last_interval, snap) {
                (Some((t, a)), Some(b)) => Some(a.observe(&b, now - t, speed)),
                _ => None,
            };
            self.last_interval = snap.map(|b| (now, b));
            if obs.is_none() && snap.is_some() {
                return None;
            }
            Some(planner.on_interval(obs.as_ref(), current))
        } else {
            if self.last_interval.is_none() {
                self.last_interval = snap.map(|b| (now, b));
            }
            let obs = match (self.history.front(), snap) {
                (Some((t, a)), Some(b)) if now - *t >= self.tick() => {
                    Some(a.observe(&b, now - *t, speed))
                }
                _ => None,
            };
            planner.on_tick(obs.as_ref(), current)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_counters_become_a_trace_time_observation() {
        let text = |n: f64, met: f64| {
            format!(
                "dynamo_frontend_requests_total{{model=\"m\",endpoint=\"completions\",request_type=\"stream\",status=\"success\"}} {n}\n\
                 dynamo_frontend_input_sequence_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_input_sequence_tokens_count{{model=\"m\"}} {n}\n\
                 dynamo_frontend_output_sequence_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_cached_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_time_to_first_token_seconds_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_time_to_first_token_seconds_count{{model=\"m\"}} {n}\n\
                 dynamo_frontend_inter_token_latency_seconds_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_inter_token_latency_seconds_count{{model=\"m\"}} {}\n\
                 dynamo_frontend_sla_requests_total{{met=\"true\"}} {met}\n\
                 dynamo_frontend_sla_requests_total{{met=\"false\"}} {}\n\
                 dynamo_frontend_sla_misses_total{{target=\"itl\"}} {}\n\
                 dynamo_frontend_inflight_requests{{model=\"m\"}} {}\n\
                 dynamo_frontend_live_workers{{role=\"prefill\"}} 1\n\
                 dynamo_frontend_live_workers{{role=\"decode\"}} 2\n\
                 dynamo_frontend_disagg_decisions_total{{decision=\"remote\",reason=\"isl\"}} {}\n\
                 dynamo_frontend_disagg_decisions_total{{decision=\"local\",reason=\"isl\"}} {}\n\
                 dynamo_frontend_disagg_prompt_tokens_total{{decision=\"remote\"}} {}\n\
                 dynamo_frontend_disagg_prefill_cached_tokens_total {}\n\
                 dynamo_frontend_worker_pending_prefill_tokens{{role=\"prefill\"}} 3000\n\
                 dynamo_frontend_worker_pending_prefill_tokens{{role=\"decode\"}} 500\n\
                 dynamo_frontend_worker_kv_blocks_active{{role=\"decode\"}} 900\n\
                 dynamo_frontend_worker_kv_blocks_total{{role=\"decode\"}} 1000\n",
                n * 1000.0,
                n * 100.0,
                n * 250.0,
                n * 0.01,
                n * 99.0 * 0.002,
                n * 99.0,
                n - met,
                n - met,
                n / 10.0,
                n / 2.0,
                n / 2.0,
                n / 2.0 * 1500.0,
                n / 2.0 * 300.0,
            )
        };
        let a = Counters::parse(&text(10.0, 10.0)).expect("parses");
        let b = Counters::parse(&text(110.0, 100.0)).expect("parses");
        // 100 requests over 2 s of wall time at speedup 5: 10 trace seconds.
        let o = a.observe(&b, Duration::from_secs(2), 5.0);
        assert_eq!(o.duration_s, 10.0);
        // 100 finished, and 10 more in flight than before.
        assert_eq!(o.requests, 110.0);
        assert_eq!((o.isl, o.osl, o.hit_rate), (1000.0, 100.0, 0.25));
        assert!(
            (o.ttft_ms.expect("ttft") - 50.0).abs() < 1e-9,
            "10 ms wall x 5"
        );
        assert!((o.itl_ms.expect("itl") - 10.0).abs() < 1e-9);
        assert!((o.attainment.expect("judged") - 0.9).abs() < 1e-12);
        assert_eq!(o.ttft_attainment, Some(1.0));
        assert!((o.itl_attainment.expect("judged") - 0.9).abs() < 1e-12);
        assert_eq!((o.workers, o.prefill_workers), (3, 1));
        // Half the requests went to the prefill pool, with prompts of 1,500 tokens.
        assert_eq!((o.remote_requests, o.remote_isl), (50.0, 1500.0));
        // The prefill workers had 300 of each 1,500 cached.
        assert!((o.remote_hit_rate - 0.2).abs() < 1e-12);
        // Gauges: what the later reading says.
        assert_eq!((o.queued_remote_tokens, o.queued_tokens), (3000.0, 500.0));
        assert_eq!(o.kv_usage, Some(0.9));
        assert!(
            Counters::parse("vllm:requests 1\n").is_none(),
            "not our frontend"
        );
    }

    #[test]
    fn the_cadence_decides_per_interval_and_checks_in_between() {
        let mut planner =
            crate::Planner::new(crate::Config::default(), crate::profile::tests::engine());
        let t0 = Instant::now();
        // A 10 s interval at speedup 10: one decision per second of wall time.
        let mut c = Cadence::new(Duration::from_secs(10), 10.0, t0);
        let two = Replicas::of(crate::Pool::Aggregated, 2);
        assert_eq!(c.tick(), Duration::from_millis(500));
        let reading = |n: f64| Counters {
            requests: n,
            isl_sum: n * 100.0,
            isl_count: n,
            live: 2.0,
            ..Counters::default()
        };
        // The first reading only sets the baseline; no load, nothing to scale up.
        assert_eq!(c.decide(&mut planner, t0, Some(reading(0.0)), &two), None);
        let fast = c.decide(
            &mut planner,
            t0 + Duration::from_millis(500),
            Some(reading(1.0)),
            &two,
        );
        assert!(fast.is_none(), "{fast:?}");
        let d = c
            .decide(
                &mut planner,
                t0 + Duration::from_secs(1),
                Some(reading(2.0)),
                &two,
            )
            .expect("an interval passed");
        assert_eq!(d.path, crate::Path::Predictive);
        // 2 requests over 10 s of engine time.
        assert!((d.observed.expect("observed").rate - 0.2).abs() < 1e-9);
        // No reading at the next interval: hold.
        let d = c
            .decide(&mut planner, t0 + Duration::from_secs(2), None, &two)
            .expect("an interval passed");
        assert_eq!(d.path, crate::Path::Hold);
    }
}
