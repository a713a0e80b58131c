//! The SLA planner's decisions, with no I/O: given what the frontend observed over an interval
//! (request rate, prompt and output lengths, TTFT, ITL, cache hits, the share of requests that met
//! the SLA) and an engine [`Profile`], how many worker replicas the graph should run. The
//! operator and `dynamo serve` feed it metrics and carry out its decisions.
//!
//! Two algorithms share the same inputs and outputs, so they can be compared on one code path:
//!
//! - [`Algorithm::Sla`] (ours): a Holt forecast of the next interval's load, sized with the
//!   engine model of [`model`] (an aggregated engine's prefill and decode share its time), the
//!   model's mean latencies corrected by observed/predicted latency and held to a fraction of
//!   each target (room for the tail), that fraction tuned per target from the share of requests
//!   that met it (shrunk after an interval that missed, grown slowly while it holds), a fast
//!   reactive path that scales up within seconds when the short-term rate outgrows the fleet, and
//!   scale-down only to a fleet the model says still meets the targets at both the forecast and
//!   the observed load and that no burst of the last interval needed more than, at most a quarter
//!   of the fleet at a time and never right after an interval that missed.
//! - [`Algorithm::Dynamo`]: NVIDIA Dynamo's published throughput-based planner: predicted
//!   prefill tokens/s over one engine's prefill throughput at the forecast ISL (scaled by
//!   `min(1, observed/expected TTFT)`), predicted output tokens/s over one engine's decode
//!   throughput at the ITL target divided by the observed/expected ITL, at context ISL + OSL/2;
//!   an aggregated graph gets the larger of the two. It acts once per interval, with no reactive
//!   path.
//!
//! Both keep every decision within `[min_replicas, max_replicas]` and the GPU budget, and hold the
//! fleet (never below the floor) when an interval brought no metrics.

pub mod builtin;
pub mod frontend;
pub mod model;
pub mod predict;
pub mod profile;

use std::fmt::Write as _;

pub use model::{Latency, Load, Targets};
use predict::{Predictor, PredictorKind};
pub use profile::{DecodePoint, PrefillPoint, Profile, ProfileError};

/// Which sizing algorithm decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Sla,
    Dynamo,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Algorithm, String> {
        match s {
            "sla" | "dynamo-rs" => Ok(Algorithm::Sla),
            "dynamo" => Ok(Algorithm::Dynamo),
            other => Err(format!(
                "unknown planner algorithm {other:?}: use \"sla\" (dynamo-rs) or \"dynamo\" (NVIDIA Dynamo's throughput planner)"
            )),
        }
    }
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sla => "sla",
            Algorithm::Dynamo => "dynamo",
        }
    }
}

/// What the planner aims for and within which bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub algorithm: Algorithm,
    /// Per-request targets (milliseconds).
    pub ttft_ms: f64,
    pub itl_ms: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Most GPUs for the planned workers together.
    pub gpu_budget: Option<u32>,
    /// [`Algorithm::Sla`]: the model's mean TTFT is held to this fraction of the target at
    /// first, leaving the rest for the tail (long prompts, queues behind them); tuned online.
    pub headroom_ttft: f64,
    /// The same for the mean ITL (its tail is shorter: prefills that interrupt decoding).
    pub headroom_itl: f64,
    /// Share of requests that should meet both targets.
    pub attainment_goal: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            algorithm: Algorithm::Sla,
            ttft_ms: 1000.0,
            itl_ms: 50.0,
            min_replicas: 1,
            max_replicas: 8,
            gpu_budget: None,
            headroom_ttft: 0.45,
            headroom_itl: 0.67,
            attainment_goal: 0.99,
        }
    }
}

/// What the frontend saw over one window.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Observation {
    pub duration_s: f64,
    pub requests: f64,
    /// Means over the window's requests.
    pub isl: f64,
    pub osl: f64,
    pub hit_rate: f64,
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    /// Share of the window's finished requests that met both targets.
    pub attainment: Option<f64>,
    /// Shares that met each target.
    pub ttft_attainment: Option<f64>,
    pub itl_attainment: Option<f64>,
    /// Workers live during the window.
    pub workers: u32,
}

impl Observation {
    pub fn load(&self) -> Load {
        Load {
            rate: if self.duration_s > 0.0 {
                self.requests / self.duration_s
            } else {
                0.0
            },
            isl: self.isl,
            osl: self.osl,
            hit_rate: self.hit_rate,
        }
    }
}

/// Which path made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// The interval's forecast.
    Predictive,
    /// The fast check between intervals.
    Reactive,
    /// No metrics: the fleet is held.
    Hold,
}

/// One decision: the replicas wanted, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub replicas: u32,
    pub previous: u32,
    pub path: Path,
    pub reason: String,
    pub observed: Option<Load>,
    pub predicted: Option<Load>,
}

impl Decision {
    pub fn changed(&self) -> bool {
        self.replicas != self.previous
    }
}

/// Fewest requests in a window for its latencies to move the corrections.
const MIN_REQUESTS_FOR_CORRECTION: f64 = 20.0;

/// The planner of one graph's worker pool.
#[derive(Debug, Clone)]
pub struct Planner {
    config: Config,
    profile: Profile,
    rate: Predictor,
    isl: Predictor,
    osl: Predictor,
    /// Observed over predicted mean TTFT and ITL (smoothed).
    correction: (f64, f64),
    /// Fractions of the TTFT and ITL targets the corrected mean latencies are held to.
    headroom: (f64, f64),
    /// The most replicas a fast check asked for since the last interval: scale-down goes no
    /// lower (a stabilisation window, so a fleet does not shrink at the interval only to grow
    /// again at the next burst).
    recent_peak: u32,
}

/// Bounds of the tuned headroom.
const HEADROOM_MIN: f64 = 0.2;
const HEADROOM_MAX: f64 = 0.95;

impl Planner {
    pub fn new(config: Config, profile: Profile) -> Planner {
        let kind = match config.algorithm {
            Algorithm::Sla => PredictorKind::Holt,
            Algorithm::Dynamo => PredictorKind::Arima,
        };
        Planner {
            config,
            profile,
            rate: Predictor::new(kind),
            isl: Predictor::new(kind),
            osl: Predictor::new(kind),
            correction: (1.0, 1.0),
            headroom: (config.headroom_ttft, config.headroom_itl),
            recent_peak: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// `(floor, ceiling)` of replicas: `min_replicas`, and `max_replicas` within the GPU budget.
    pub fn bounds(&self) -> (u32, u32) {
        let per = self.profile.gpus.max(1);
        let ceiling = self
            .config
            .gpu_budget
            .map_or(self.config.max_replicas, |b| {
                self.config.max_replicas.min(b / per)
            });
        let floor = self.config.min_replicas.min(ceiling);
        (floor, ceiling.max(floor))
    }

    fn clamp(&self, n: u32) -> u32 {
        let (lo, hi) = self.bounds();
        n.clamp(lo, hi)
    }

    fn targets(&self, headroom: (f64, f64)) -> Targets {
        Targets {
            ttft_ms: self.config.ttft_ms * headroom.0,
            itl_ms: self.config.itl_ms * headroom.1,
        }
    }

    /// The fewest replicas the profile says meet the targets at `load` (what an ideal fleet runs
    /// in an interval with that load: the configured headroom, no online correction), within the
    /// bounds.
    pub fn ideal(&self, load: &Load) -> u32 {
        let (_, hi) = self.bounds();
        let headroom = (self.config.headroom_ttft, self.config.headroom_itl);
        self.clamp(model::aggregated_replicas(
            &self.profile,
            load,
            self.targets(headroom),
            (1.0, 1.0),
            hi,
        ))
    }

    fn sized(&self, load: &Load) -> u32 {
        let (_, hi) = self.bounds();
        model::aggregated_replicas(
            &self.profile,
            load,
            self.targets(self.headroom),
            self.correction,
            hi,
        )
    }

    /// The decision at the end of an interval; `None` when the interval brought no metrics.
    pub fn on_interval(&mut self, obs: Option<&Observation>, current: u32) -> Decision {
        let Some(obs) = obs else {
            let replicas = self.clamp(current);
            return Decision {
                replicas,
                previous: current,
                path: Path::Hold,
                reason: format!(
                    "no metrics this interval: holding {replicas} replica(s) (never below the floor of {})",
                    self.bounds().0
                ),
                observed: None,
                predicted: None,
            };
        };
        let observed = obs.load();
        if obs.requests > 0.0 {
            self.rate.observe(observed.rate);
            self.isl.observe(obs.isl);
            self.osl.observe(obs.osl);
        } else {
            self.rate.observe(0.0);
        }
        let predicted = Load {
            rate: self.rate.forecast().unwrap_or(0.0),
            isl: self.isl.forecast().unwrap_or(obs.isl),
            osl: self.osl.forecast().unwrap_or(obs.osl),
            hit_rate: obs.hit_rate,
        };
        match self.config.algorithm {
            Algorithm::Sla => self.sla_interval(obs, observed, predicted, current),
            Algorithm::Dynamo => self.dynamo_interval(obs, observed, predicted, current),
        }
    }

    fn sla_interval(
        &mut self,
        obs: &Observation,
        observed: Load,
        predicted: Load,
        current: u32,
    ) -> Decision {
        let mut why = String::new();
        if obs.requests >= MIN_REQUESTS_FOR_CORRECTION
            && let Some(model) = model::aggregated(&self.profile, &observed.per(obs.workers))
        {
            let smooth = |c: f64, seen: Option<f64>, expected: f64| {
                seen.filter(|_| expected > 0.0)
                    .map_or(c, |s| (0.5 * c + 0.5 * s / expected).clamp(0.5, 3.0))
            };
            self.correction = (
                smooth(self.correction.0, obs.ttft_ms, model.ttft_ms),
                smooth(self.correction.1, obs.itl_ms, model.itl_ms),
            );
        }
        let goal = self.config.attainment_goal;
        let missed = obs.attainment.is_some_and(|a| a < goal);
        // Tune each target's headroom: tighter after a miss the fleet could have prevented (it
        // was below its ceiling), looser while the target holds.
        let (_, hi) = self.bounds();
        let tune = |h: f64, seen: Option<f64>| match seen {
            Some(a) if a < goal && current < hi => (h * 0.9).max(HEADROOM_MIN),
            Some(a) if a >= goal => (h * 1.03).min(HEADROOM_MAX),
            _ => h,
        };
        self.headroom = (
            tune(self.headroom.0, obs.ttft_attainment),
            tune(self.headroom.1, obs.itl_attainment),
        );
        let want_forecast = self.sized(&predicted);
        let want_observed = self.sized(&observed);
        let mut replicas = self.clamp(want_forecast.max(if want_forecast < current {
            want_observed
        } else {
            0
        }));
        let _ = write!(
            why,
            "load {:.2} req/s (forecast {:.2}), ISL {:.0}, OSL {:.0}, hit {:.0}%; TTFT {} ITL {} (x{:.2}/x{:.2} of model); attainment {}; headroom {:.2}/{:.2}: ",
            observed.rate,
            predicted.rate,
            observed.isl,
            observed.osl,
            observed.hit_rate * 100.0,
            ms(obs.ttft_ms),
            ms(obs.itl_ms),
            self.correction.0,
            self.correction.1,
            obs.attainment
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            self.headroom.0,
            self.headroom.1,
        );
        if replicas < current {
            if missed {
                replicas = self.clamp(current);
                let _ = write!(why, "requests missed the SLA; not scaling down");
            } else {
                let step = (current / 4).max(1);
                let floor = current.saturating_sub(step).max(self.recent_peak);
                replicas = self.clamp(replicas.max(floor).min(current));
                let _ = write!(
                    why,
                    "{replicas} replica(s) meet the targets at the forecast and the observed load{}",
                    if self.recent_peak > want_forecast.max(want_observed) {
                        format!(
                            " and the last interval's bursts (up to {})",
                            self.recent_peak
                        )
                    } else {
                        String::new()
                    }
                );
            }
        } else {
            let _ = write!(
                why,
                "{replicas} replica(s) meet the targets at the forecast load"
            );
        }
        self.recent_peak = 0;
        Decision {
            replicas,
            previous: current,
            path: Path::Predictive,
            reason: why,
            observed: Some(observed),
            predicted: Some(predicted),
        }
    }

    fn dynamo_interval(
        &mut self,
        obs: &Observation,
        observed: Load,
        predicted: Load,
        current: u32,
    ) -> Decision {
        let p = &self.profile;
        let context = predicted.isl + predicted.osl / 2.0;
        if obs.requests > 0.0 {
            if let Some(t) = obs.ttft_ms {
                self.correction.0 = t / p.ttft_ms(obs.isl.max(1.0));
            }
            if let Some(i) = obs.itl_ms {
                let conc = observed.rate * obs.osl * i / 1000.0 / f64::from(obs.workers.max(1));
                self.correction.1 = i / p.itl_ms(conc.max(1.0), obs.isl + obs.osl / 2.0);
            }
        }
        let (_, hi) = self.bounds();
        let prefill_tps = predicted.rate * predicted.isl * self.correction.0.min(1.0);
        let n_prefill = (prefill_tps / p.prefill_tokens_per_s(predicted.isl)).ceil();
        let corrected_itl = self.config.itl_ms / self.correction.1.max(1e-3);
        let per_engine = p.decode_tokens_per_s(corrected_itl, context);
        let decode_tps = predicted.rate * predicted.osl;
        let n_decode = if decode_tps <= 0.0 {
            0.0
        } else if per_engine > 0.0 {
            (decode_tps / per_engine).ceil()
        } else {
            f64::from(hi)
        };
        let want = n_prefill.max(n_decode).min(f64::from(hi)) as u32;
        let replicas = self.clamp(want);
        Decision {
            replicas,
            previous: current,
            path: Path::Predictive,
            reason: format!(
                "dynamo: forecast {:.2} req/s, ISL {:.0}, OSL {:.0}; prefill {:.0} tok/s over {:.0} per engine (TTFT correction {:.2}) = {n_prefill}; decode {:.0} tok/s over {:.0} per engine at ITL {:.1} ms (ITL correction {:.2}) = {n_decode}: {replicas} replica(s)",
                predicted.rate,
                predicted.isl,
                predicted.osl,
                prefill_tps,
                p.prefill_tokens_per_s(predicted.isl),
                self.correction.0,
                decode_tps,
                per_engine,
                corrected_itl,
                self.correction.1,
            ),
            observed: Some(observed),
            predicted: Some(predicted),
        }
    }

    /// The fast check between intervals ([`Algorithm::Sla`] only): scales up at once when the
    /// last few seconds' load needs more replicas than run now, or when the fleet is below its
    /// floor. Never scales down. `None`: nothing to do.
    pub fn on_tick(&mut self, obs: Option<&Observation>, current: u32) -> Option<Decision> {
        let (lo, _) = self.bounds();
        if current < lo {
            return Some(Decision {
                replicas: lo,
                previous: current,
                path: Path::Reactive,
                reason: format!("{current} replica(s) is below the floor of {lo}"),
                observed: None,
                predicted: None,
            });
        }
        if self.config.algorithm != Algorithm::Sla {
            return None;
        }
        let obs = obs.filter(|o| o.requests > 0.0)?;
        let observed = obs.load();
        let want = self.clamp(self.sized(&observed));
        self.recent_peak = self.recent_peak.max(want);
        (want > current).then(|| Decision {
            replicas: want,
            previous: current,
            path: Path::Reactive,
            reason: format!(
                "burst: {:.2} req/s over the last {:.0} s (ISL {:.0}, OSL {:.0}) needs {want} replica(s)",
                observed.rate, obs.duration_s, observed.isl, observed.osl
            ),
            observed: Some(observed),
            predicted: None,
        })
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::engine;

    fn config(algorithm: Algorithm) -> Config {
        Config {
            algorithm,
            ttft_ms: 200.0,
            itl_ms: 30.0,
            min_replicas: 1,
            max_replicas: 16,
            gpu_budget: None,
            headroom_ttft: 0.5,
            headroom_itl: 0.5,
            attainment_goal: 0.99,
        }
    }

    fn window(rate: f64, workers: u32, attainment: f64) -> Observation {
        Observation {
            duration_s: 60.0,
            requests: rate * 60.0,
            isl: 1024.0,
            osl: 100.0,
            hit_rate: 0.0,
            ttft_ms: None,
            itl_ms: None,
            attainment: Some(attainment),
            ttft_attainment: Some(attainment),
            itl_attainment: Some(1.0),
            workers,
        }
    }

    #[test]
    fn no_metrics_holds_the_fleet_and_never_goes_below_the_floor() {
        let mut c = config(Algorithm::Sla);
        c.min_replicas = 2;
        let mut p = Planner::new(c, engine());
        let d = p.on_interval(None, 5);
        assert_eq!((d.replicas, d.path), (5, Path::Hold));
        assert_eq!(p.on_interval(None, 0).replicas, 2);
        let up = p.on_tick(None, 1).expect("below the floor");
        assert_eq!(up.replicas, 2);
    }

    #[test]
    fn the_fleet_follows_the_load_up_and_down() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        // Without SLA counts the headroom stays put, so the fleet settles on the ideal.
        let unjudged = |rate, n| Observation {
            attainment: None,
            ttft_attainment: None,
            itl_attainment: None,
            ..window(rate, n, 1.0)
        };
        let mut n = 1;
        for _ in 0..4 {
            n = p.on_interval(Some(&unjudged(40.0, n)), n).replicas;
        }
        let busy = n;
        assert_eq!(busy, p.ideal(&window(40.0, 1, 1.0).load()));
        for _ in 0..12 {
            n = p.on_interval(Some(&unjudged(4.0, n)), n).replicas;
        }
        assert!(
            n < busy && n == p.ideal(&window(4.0, 1, 1.0).load()),
            "{n} vs {busy}"
        );
    }

    #[test]
    fn scale_down_is_gradual_and_stops_after_a_missed_interval() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let d = p.on_interval(Some(&window(1.0, 12, 1.0)), 12);
        assert_eq!(d.replicas, 9, "a quarter at a time: {}", d.reason);
        let d = p.on_interval(Some(&window(1.0, 9, 0.9)), 9);
        assert_eq!(d.replicas, 9, "{}", d.reason);
    }

    #[test]
    fn a_burst_in_the_last_interval_holds_off_scale_down() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let calm = window(4.0, 8, 1.0);
        let mut burst = window(40.0, 8, 1.0);
        burst.duration_s = 15.0;
        burst.requests = 600.0;
        let needed = p.ideal(&burst.load());
        assert!(needed > 2 && needed < 8, "{needed}");
        // A burst the fleet of 8 absorbed (nothing to scale up) still counts.
        assert_eq!(p.on_tick(Some(&burst), 8), None);
        let d = p.on_interval(Some(&calm), 8);
        assert!(
            d.replicas >= needed,
            "{} < {needed}: {}",
            d.replicas,
            d.reason
        );
        // The next interval, with no burst, goes on down.
        let d2 = p.on_interval(Some(&calm), d.replicas);
        assert!(d2.replicas < d.replicas, "{d2:?}");
    }

    #[test]
    fn a_burst_scales_up_between_intervals() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        p.on_interval(Some(&window(10.0, 2, 1.0)), 2);
        let mut short = window(40.0, 2, 1.0);
        short.duration_s = 5.0;
        short.requests = 200.0;
        let d = p.on_tick(Some(&short), 2).expect("scales up");
        assert!(d.replicas > 2 && d.path == Path::Reactive, "{d:?}");
        assert_eq!(p.on_tick(Some(&window(1.0, 2, 1.0)), 2), None, "never down");
    }

    #[test]
    fn budget_and_maximum_cap_every_decision() {
        let mut c = config(Algorithm::Sla);
        c.gpu_budget = Some(6);
        let mut profile = engine();
        profile.gpus = 2;
        let mut p = Planner::new(c, profile);
        assert_eq!(p.bounds(), (1, 3));
        assert_eq!(p.on_interval(Some(&window(500.0, 3, 0.5)), 3).replicas, 3);
        let mut short = window(500.0, 3, 0.5);
        short.duration_s = 5.0;
        assert_eq!(p.on_tick(Some(&short), 3), None, "already at the ceiling");
        let mut d = Planner::new(config(Algorithm::Dynamo), engine());
        assert!(d.on_interval(Some(&window(5000.0, 1, 0.5)), 1).replicas <= 16);
    }

    #[test]
    fn dynamo_sizes_prefill_and_decode_throughput_and_takes_the_larger() {
        let mut p = Planner::new(config(Algorithm::Dynamo), engine());
        let d = p.on_interval(Some(&window(40.0, 4, 1.0)), 4);
        // Prefill: 40 x 1024 tok/s over 1024 / 40.48 ms per engine = 1.62 -> 2.
        // Decode: 4,000 tok/s over the best at ITL 30 ms (64 / 16.4 ms, capped by the profile)
        // = 1.03 -> 2.
        assert_eq!(d.replicas, 2, "{}", d.reason);
        assert!(d.reason.starts_with("dynamo:"));
        assert_eq!(
            p.on_tick(Some(&window(400.0, 2, 0.0)), 2),
            None,
            "no reactive path"
        );
    }

    #[test]
    fn a_missed_target_tightens_its_headroom_and_adds_replicas() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let steady = p.on_interval(Some(&window(20.0, 4, 1.0)), 4).replicas;
        let mut missed = window(20.0, steady, 0.9);
        missed.itl_attainment = Some(0.9);
        let mut more = steady;
        for _ in 0..3 {
            missed.workers = more;
            more = p.on_interval(Some(&missed), more).replicas;
        }
        assert!(more > steady, "{more} vs {steady}");
        assert!(p.headroom.0 < 0.5 && p.headroom.1 < 0.5);
        // The ideal ignores what the planner learned.
        assert_eq!(p.ideal(&window(20.0, 1, 1.0).load()), {
            let fresh = Planner::new(config(Algorithm::Sla), engine());
            fresh.ideal(&window(20.0, 1, 1.0).load())
        });
    }

    #[test]
    fn algorithm_names_parse_with_a_hint() {
        assert_eq!("dynamo".parse::<Algorithm>(), Ok(Algorithm::Dynamo));
        assert_eq!("sla".parse::<Algorithm>(), Ok(Algorithm::Sla));
        assert!(
            "arima"
                .parse::<Algorithm>()
                .expect_err("unknown")
                .contains("\"sla\"")
        );
    }
}
