//! The SLA planner's decisions, with no I/O: given what the frontend observed over an interval
//! (request rate, prompt and output lengths, TTFT, ITL, cache hits, where prompts were prefilled,
//! the share of requests that met the SLA) and engine [`Profile`]s, how many workers each pool of
//! the graph should run: one aggregated pool, or a prefill pool and a decode pool. The operator
//! and `dynamo serve` feed it metrics and carry out its decisions.
//!
//! Two algorithms share the same inputs and outputs, so they can be compared on one code path:
//!
//! - [`Algorithm::Sla`] (ours): a Holt forecast of the next interval's load, sized with the
//!   engine model of [`model`] (an aggregated engine's prefill and decode share its time; a
//!   decode engine prefills only the prompts the frontend keeps local; a prefill engine is a
//!   queue), the model's mean latencies corrected by observed/predicted latency and held to a
//!   fraction of each target (room for the tail), that fraction tuned per target from the share
//!   of requests that met it (shrunk after an interval that missed, grown slowly while it holds),
//!   a fast reactive path that scales a pool up within seconds when the short-term load outgrows
//!   it, and scale-down only to a fleet the model says still meets the targets at both the
//!   forecast and the observed load and that no burst of the last interval needed more than, at
//!   most a quarter of a pool at a time and never right after an interval that missed the pool's
//!   target.
//! - [`Algorithm::Dynamo`]: NVIDIA Dynamo's published throughput-based planner: predicted
//!   prefill tokens/s over one engine's prefill throughput at the forecast ISL (scaled by
//!   `min(1, observed/expected TTFT)`), predicted output tokens/s over one engine's decode
//!   throughput at the ITL target divided by the observed/expected ITL, at context ISL + OSL/2;
//!   an aggregated graph gets the larger of the two. It acts once per interval, with no reactive
//!   path.
//!
//! Both keep every pool within its `[min, max]` and the fleet within the GPU budget (shared by
//! the pools: when their wants exceed it, both are cut in proportion), and hold the fleet (never
//! below a floor) when an interval brought no metrics.

pub mod builtin;
pub mod frontend;
pub mod model;
pub mod predict;
pub mod profile;

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use model::{Demand, Latency, Load, Split, Targets};
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

/// A pool of workers the planner sizes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// Workers that prefill and decode (an aggregated graph's only pool).
    Aggregated,
    Prefill,
    Decode,
}

impl Pool {
    /// The pool's name, as workers report their role.
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Aggregated => "aggregated",
            Pool::Prefill => "prefill",
            Pool::Decode => "decode",
        }
    }
}

/// Replicas per pool.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Replicas(BTreeMap<Pool, u32>);

impl Replicas {
    /// `n` replicas of one pool.
    pub fn of(pool: Pool, n: u32) -> Replicas {
        Replicas(BTreeMap::from([(pool, n)]))
    }

    /// Replicas of `pool` (0 when it has none).
    pub fn get(&self, pool: Pool) -> u32 {
        self.0.get(&pool).copied().unwrap_or(0)
    }

    pub fn set(&mut self, pool: Pool, n: u32) {
        self.0.insert(pool, n);
    }

    pub fn iter(&self) -> impl Iterator<Item = (Pool, u32)> + '_ {
        self.0.iter().map(|(p, n)| (*p, *n))
    }
}

impl FromIterator<(Pool, u32)> for Replicas {
    fn from_iter<I: IntoIterator<Item = (Pool, u32)>>(iter: I) -> Replicas {
        Replicas(iter.into_iter().collect())
    }
}

impl std::fmt::Display for Replicas {
    /// `3` for an aggregated pool alone, `prefill 2, decode 3` otherwise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let [(Pool::Aggregated, n)] = self.0.iter().collect::<Vec<_>>().as_slice() {
            return write!(f, "{n}");
        }
        let parts: Vec<String> = self
            .iter()
            .map(|(p, n)| format!("{} {n}", p.as_str()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Fewest and most replicas of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// What the planner aims for and within which bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub algorithm: Algorithm,
    /// Per-request targets (milliseconds).
    pub ttft_ms: f64,
    pub itl_ms: f64,
    /// Bounds of every pool that has none of its own.
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Bounds of a disaggregated graph's prefill and decode pools.
    pub prefill: Option<Bounds>,
    pub decode: Option<Bounds>,
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
            prefill: None,
            decode: None,
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
    /// Workers live during the window (every role).
    pub workers: u32,
    /// Of which prefill workers.
    #[serde(default)]
    pub prefill_workers: u32,
    /// Prompt tokens queued (routed, not yet prefilled) at the end of the window: on the
    /// prefill pool, and on the workers that serve requests (aggregated or decode).
    #[serde(default)]
    pub queued_remote_tokens: f64,
    #[serde(default)]
    pub queued_tokens: f64,
    /// Share of the serving workers' KV blocks the requests in flight hold.
    #[serde(default)]
    pub kv_usage: Option<f64>,
    /// Requests the frontend sent to the prefill pool, and their mean prompt length.
    #[serde(default)]
    pub remote_requests: f64,
    #[serde(default)]
    pub remote_isl: f64,
    /// Share of those prompts' tokens the prefill workers found in their caches.
    #[serde(default)]
    pub remote_hit_rate: f64,
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

    /// Share of the window's requests the prefill pool prefilled.
    pub fn remote_share(&self) -> f64 {
        if self.requests > 0.0 {
            (self.remote_requests / self.requests).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Where the window's prompts were prefilled.
    pub fn split(&self) -> Split {
        Split {
            share: self.remote_share(),
            isl: self.remote_isl,
            hit_rate: self.remote_hit_rate,
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

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Predictive => "predictive",
            Path::Reactive => "reactive",
            Path::Hold => "hold",
        }
    }
}

/// One decision: the replicas wanted per pool, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub replicas: Replicas,
    pub previous: Replicas,
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

/// What the planner learned that a restarted planner should not learn again: the tuned
/// headroom, the latency corrections, where prompts are prefilled, and the last forecast (kept
/// in the operator's status, so a restart or failover goes on from there).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Learned {
    pub headroom_ttft: f64,
    pub headroom_itl: f64,
    pub correction_ttft: f64,
    pub correction_itl: f64,
    #[serde(default)]
    pub remote_share: f64,
    #[serde(default)]
    pub remote_isl: f64,
    #[serde(default)]
    pub remote_hit_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Load>,
}

/// KV usage of the serving workers beyond which the fast check adds workers, and the usage it
/// sizes them back to.
const KV_FULL: f64 = 0.9;
const KV_COMFORTABLE: f64 = 0.8;

/// Fewest requests in a window for its latencies to move the corrections.
const MIN_REQUESTS_FOR_CORRECTION: f64 = 20.0;

/// The planner of one graph's worker pools.
#[derive(Debug, Clone)]
pub struct Planner {
    config: Config,
    /// Each planned pool's engine profile.
    profiles: BTreeMap<Pool, Profile>,
    rate: Predictor,
    isl: Predictor,
    osl: Predictor,
    /// Where prompts are prefilled (smoothed; disaggregated graphs).
    split: Split,
    /// Observed over predicted mean TTFT and ITL (smoothed).
    correction: (f64, f64),
    /// Fractions of the TTFT and ITL targets the corrected mean latencies are held to.
    headroom: (f64, f64),
    /// The most replicas per pool a fast check asked for since the last interval: scale-down goes
    /// no lower (a stabilisation window, so a pool does not shrink at the interval only to grow
    /// again at the next burst).
    recent_peak: Replicas,
    /// What the last decision took the fleet to: growth it asked for that has not happened yet
    /// (a rebalance waits for the shrinking pool's workers to leave) keeps its room in the
    /// budget, so a fast check does not give that room to another pool and undo the decision.
    target: Option<Replicas>,
    /// Intervals in a row each pool had fewer live workers than its replicas.
    joining: Replicas,
    /// What the last interval found each pool needs: a pool shrinks no lower than the larger of
    /// this and the present need (a two-interval stabilisation window, so a load wavering around
    /// a pool's margin does not add and remove a worker at every other interval).
    last_need: Option<Replicas>,
}

/// Intervals a pool whose new workers have not all joined is kept from shrinking: its window was
/// served by fewer workers than it has, so its latencies say nothing yet of the pool's size. After
/// this many the planner stops waiting (a worker that never joins does not pin the pool).
const JOINING_HOLD: u32 = 3;

/// Bounds of the tuned headroom.
const HEADROOM_MIN: f64 = 0.2;
const HEADROOM_MAX: f64 = 0.95;

impl Planner {
    /// The planner of an aggregated graph's one worker pool.
    pub fn new(config: Config, profile: Profile) -> Planner {
        Planner::with_pools(config, BTreeMap::from([(Pool::Aggregated, profile)]))
    }

    /// The planner of a disaggregated graph's prefill and decode pools.
    pub fn disaggregated(config: Config, prefill: Profile, decode: Profile) -> Planner {
        Planner::with_pools(
            config,
            BTreeMap::from([(Pool::Prefill, prefill), (Pool::Decode, decode)]),
        )
    }

    fn with_pools(config: Config, profiles: BTreeMap<Pool, Profile>) -> Planner {
        let kind = match config.algorithm {
            Algorithm::Sla => PredictorKind::Holt,
            Algorithm::Dynamo => PredictorKind::Arima,
        };
        Planner {
            config,
            profiles,
            rate: Predictor::new(kind),
            isl: Predictor::new(kind),
            osl: Predictor::new(kind),
            split: Split::all_remote(0.0),
            correction: (1.0, 1.0),
            headroom: (config.headroom_ttft, config.headroom_itl),
            recent_peak: Replicas::default(),
            joining: Replicas::default(),
            last_need: None,
            target: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The same pools and profiles with another configuration (what was learned is forgotten).
    pub fn reconfigured(&self, config: Config) -> Planner {
        Planner::with_pools(config, self.profiles.clone())
    }

    /// Sizes `pool` with `profile` from now on (what was learned stays); false when this
    /// planner has no such pool or already uses that profile.
    pub fn set_profile(&mut self, pool: Pool, profile: Profile) -> bool {
        match self.profiles.get_mut(&pool) {
            Some(p) if *p != profile => {
                *p = profile;
                true
            }
            _ => false,
        }
    }

    /// Replaces the profiles with those the workers describe themselves with (`/profiles` of a
    /// frontend: a JSON object of profiles by role name), for the pools it covers; returns the
    /// pools that changed.
    pub fn adopt_described(&mut self, described: &serde_json::Value) -> Vec<Pool> {
        let mut changed = Vec::new();
        for pool in self.pools().collect::<Vec<_>>() {
            let Some(p) = described
                .get(pool.as_str())
                .and_then(|v| serde_json::from_value::<Profile>(v.clone()).ok())
                .and_then(|p| p.validated().ok())
            else {
                continue;
            };
            if self.set_profile(pool, p) {
                changed.push(pool);
            }
        }
        changed
    }

    /// The pools this planner sizes.
    pub fn pools(&self) -> impl Iterator<Item = Pool> + '_ {
        self.profiles.keys().copied()
    }

    fn disaggregated_graph(&self) -> bool {
        self.profiles.contains_key(&Pool::Prefill)
    }

    /// The engine profile of `pool` (the decode pool's for a pool this planner does not size).
    pub fn profile(&self, pool: Pool) -> &Profile {
        self.profiles
            .get(&pool)
            .or_else(|| self.profiles.values().last())
            .expect("a planner has at least one pool")
    }

    fn gpus_per_replica(&self, pool: Pool) -> u32 {
        self.profile(pool).gpus.max(1)
    }

    /// GPUs of `r` replicas.
    pub fn gpus(&self, r: &Replicas) -> u32 {
        r.iter().map(|(p, n)| n * self.gpus_per_replica(p)).sum()
    }

    /// `(floor, ceiling)` of `pool`'s replicas: its minimum, and its maximum within the GPU
    /// budget (the other pools at their floors).
    pub fn bounds(&self, pool: Pool) -> (u32, u32) {
        let own = match pool {
            Pool::Prefill => self.config.prefill,
            Pool::Decode => self.config.decode,
            Pool::Aggregated => None,
        }
        .unwrap_or(Bounds {
            min: self.config.min_replicas,
            max: self.config.max_replicas,
        });
        let per = self.gpus_per_replica(pool);
        let others: u32 = self
            .pools()
            .filter(|p| *p != pool)
            .map(|p| self.own_min(p) * self.gpus_per_replica(p))
            .sum();
        let ceiling = self
            .config
            .gpu_budget
            .map_or(own.max, |b| own.max.min(b.saturating_sub(others) / per));
        let floor = own.min.min(ceiling);
        (floor, ceiling.max(floor))
    }

    fn own_min(&self, pool: Pool) -> u32 {
        match pool {
            Pool::Prefill => self.config.prefill,
            Pool::Decode => self.config.decode,
            Pool::Aggregated => None,
        }
        .map_or(self.config.min_replicas, |b| b.min)
    }

    /// Each pool of `want` within its bounds, then the fleet within the GPU budget: when it
    /// exceeds it, every pool is cut in proportion (never below its floor), and what is left of
    /// the budget goes back to the pools cut the most.
    fn fit(&self, want: &Replicas) -> Replicas {
        let mut r: Replicas = self
            .pools()
            .map(|p| {
                let (lo, hi) = self.bounds(p);
                (p, want.get(p).clamp(lo, hi))
            })
            .collect();
        let Some(budget) = self.config.gpu_budget else {
            return r;
        };
        let total = self.gpus(&r);
        if total <= budget {
            return r;
        }
        let wanted = r.clone();
        let scale = f64::from(budget) / f64::from(total);
        for p in self.pools().collect::<Vec<_>>() {
            let (lo, _) = self.bounds(p);
            r.set(
                p,
                ((f64::from(wanted.get(p)) * scale).floor() as u32).max(lo),
            );
        }
        // Still over (floors): take from the largest pools above their floor.
        while self.gpus(&r) > budget {
            let Some(p) = self
                .pools()
                .filter(|p| r.get(*p) > self.bounds(*p).0)
                .max_by_key(|p| r.get(*p) * self.gpus_per_replica(*p))
            else {
                break;
            };
            r.set(p, r.get(p) - 1);
        }
        // Room left: give it back to the pools furthest below what they wanted.
        self.grow(&r, &wanted)
    }

    fn targets(&self, headroom: (f64, f64)) -> Targets {
        Targets {
            ttft_ms: self.config.ttft_ms * headroom.0,
            itl_ms: self.config.itl_ms * headroom.1,
        }
    }

    /// `load` split the way this graph's frontend splits it (an aggregated graph prefills every
    /// prompt where it decodes it).
    pub fn demand(&self, load: Load) -> Demand {
        if self.disaggregated_graph() {
            Demand::split(load, self.split)
        } else {
            Demand::aggregated(load)
        }
    }

    /// The fewest replicas per pool the profiles say meet the targets at `demand` with
    /// `headroom` and `correction`, each pool up to its ceiling (GPU budget not applied).
    fn size(&self, demand: &Demand, headroom: (f64, f64), correction: (f64, f64)) -> Replicas {
        let targets = self.targets(headroom);
        if self.disaggregated_graph() {
            let (p, d) = model::disaggregated_replicas(
                (self.profile(Pool::Prefill), self.profile(Pool::Decode)),
                demand,
                targets,
                correction,
                (self.bounds(Pool::Prefill).1, self.bounds(Pool::Decode).1),
            );
            [(Pool::Prefill, p), (Pool::Decode, d)]
                .into_iter()
                .collect()
        } else {
            let n = model::aggregated_replicas(
                self.profile(Pool::Aggregated),
                &demand.all,
                targets,
                correction,
                self.bounds(Pool::Aggregated).1,
            );
            Replicas::of(Pool::Aggregated, n)
        }
    }

    /// The fewest replicas per pool the profiles say meet the targets at `demand` (what an
    /// ideal fleet runs in an interval with that load: the configured headroom, no online
    /// correction), within the bounds and the budget.
    pub fn ideal(&self, demand: &Demand) -> Replicas {
        let headroom = (self.config.headroom_ttft, self.config.headroom_itl);
        self.fit(&self.size(demand, headroom, (1.0, 1.0)))
    }

    fn sized(&self, demand: &Demand) -> Replicas {
        self.size(demand, self.headroom, self.correction)
    }

    /// The model's mean latencies for `demand` on `workers`.
    fn latency(&self, demand: &Demand, workers: &Replicas) -> Option<Latency> {
        if self.disaggregated_graph() {
            model::disaggregated(
                (self.profile(Pool::Prefill), self.profile(Pool::Decode)),
                demand,
                workers.get(Pool::Prefill),
                workers.get(Pool::Decode).max(1),
            )
        } else {
            model::aggregated(
                self.profile(Pool::Aggregated),
                &demand.all.per(workers.get(Pool::Aggregated)),
            )
        }
    }

    /// The workers per pool live in a window.
    fn observed_workers(&self, obs: &Observation) -> Replicas {
        if self.disaggregated_graph() {
            [
                (Pool::Prefill, obs.prefill_workers),
                (
                    Pool::Decode,
                    obs.workers.saturating_sub(obs.prefill_workers),
                ),
            ]
            .into_iter()
            .collect()
        } else {
            Replicas::of(Pool::Aggregated, obs.workers)
        }
    }

    fn observed_demand(&self, obs: &Observation) -> Demand {
        if self.disaggregated_graph() {
            Demand::split(obs.load(), obs.split())
        } else {
            Demand::aggregated(obs.load())
        }
    }

    /// What this planner learned (for [`Planner::restore`] after a restart).
    pub fn learned(&self) -> Learned {
        Learned {
            headroom_ttft: self.headroom.0,
            headroom_itl: self.headroom.1,
            correction_ttft: self.correction.0,
            correction_itl: self.correction.1,
            remote_share: self.split.share,
            remote_isl: self.split.isl,
            remote_hit_rate: self.split.hit_rate,
            forecast: self.rate.forecast().map(|rate| Load {
                rate,
                isl: self.isl.forecast().unwrap_or(0.0),
                osl: self.osl.forecast().unwrap_or(0.0),
                hit_rate: 0.0,
            }),
        }
    }

    /// Goes on from what an earlier planner of the same graph learned: its headroom and
    /// corrections (within their bounds), its split, and its last forecast as the first value of
    /// each series.
    pub fn restore(&mut self, l: &Learned) {
        let ok = |v: f64, lo: f64, hi: f64, d: f64| if v.is_finite() { v.clamp(lo, hi) } else { d };
        self.headroom = (
            ok(l.headroom_ttft, HEADROOM_MIN, HEADROOM_MAX, self.headroom.0),
            ok(l.headroom_itl, HEADROOM_MIN, HEADROOM_MAX, self.headroom.1),
        );
        self.correction = (
            ok(l.correction_ttft, 0.5, 3.0, 1.0),
            ok(l.correction_itl, 0.5, 3.0, 1.0),
        );
        if l.remote_isl > 0.0 {
            self.split = Split {
                share: ok(l.remote_share, 0.0, 1.0, 1.0),
                isl: l.remote_isl,
                hit_rate: ok(l.remote_hit_rate, 0.0, 1.0, 0.0),
            };
        }
        if let Some(f) = l.forecast
            && self.rate.forecast().is_none()
        {
            self.rate.observe(f.rate);
            self.isl.observe(f.isl);
            self.osl.observe(f.osl);
        }
    }

    /// The decision at the end of an interval; `obs` is `None` when the interval brought no
    /// metrics.
    pub fn on_interval(&mut self, obs: Option<&Observation>, current: &Replicas) -> Decision {
        let d = self.interval_decision(obs, current);
        self.target = Some(d.replicas.clone());
        d
    }

    fn interval_decision(&mut self, obs: Option<&Observation>, current: &Replicas) -> Decision {
        let Some(obs) = obs else {
            let replicas = self.fit(current);
            let floors: Vec<String> = self.pools().map(|p| self.bounds(p).0.to_string()).collect();
            return Decision {
                reason: format!(
                    "no metrics this interval: holding {replicas} replica(s) (never below the floor of {})",
                    floors.join("/")
                ),
                replicas,
                previous: current.clone(),
                path: Path::Hold,
                observed: None,
                predicted: None,
            };
        };
        let observed = obs.load();
        if obs.requests > 0.0 {
            self.rate.observe(observed.rate);
            self.isl.observe(obs.isl);
            self.osl.observe(obs.osl);
            if obs.remote_requests > 0.0 {
                let seen = obs.split();
                let mix = |a: f64, b: f64| 0.5 * a + 0.5 * b;
                self.split = if self.split.isl > 0.0 {
                    Split {
                        share: mix(self.split.share, seen.share),
                        isl: mix(self.split.isl, seen.isl),
                        hit_rate: mix(self.split.hit_rate, seen.hit_rate),
                    }
                } else {
                    seen
                };
            } else if obs.prefill_workers > 0 {
                // Prefill workers were there and got nothing: the frontend kept every prompt.
                self.split.share *= 0.5;
            }
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
        current: &Replicas,
    ) -> Decision {
        let mut why = String::new();
        let seen = self.observed_demand(obs);
        if obs.requests >= MIN_REQUESTS_FOR_CORRECTION
            && let Some(model) = self.latency(&seen, &self.observed_workers(obs))
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
        // Tune each target's headroom: tighter after a miss the fleet could have prevented (a
        // pool was below its ceiling), looser while the target holds.
        let room = self.pools().any(|p| current.get(p) < self.bounds(p).1)
            && self.config.gpu_budget.is_none_or(|b| {
                let cheapest = self.pools().map(|p| self.gpus_per_replica(p)).min();
                self.gpus(current) + cheapest.unwrap_or(1) <= b
            });
        let tune = |h: f64, seen: Option<f64>| match seen {
            Some(a) if a < goal && room => (h * 0.9).max(HEADROOM_MIN),
            Some(a) if a >= goal => (h * 1.03).min(HEADROOM_MAX),
            _ => h,
        };
        self.headroom = (
            tune(self.headroom.0, obs.ttft_attainment),
            tune(self.headroom.1, obs.itl_attainment),
        );
        let forecast = self.demand(predicted);
        let want_forecast = self.sized(&forecast);
        let want_observed = self.sized(&seen);
        let _ = write!(
            why,
            "load {:.2} req/s (forecast {:.2}), ISL {:.0}, OSL {:.0}, hit {:.0}%{}; TTFT {} ITL {} (x{:.2}/x{:.2} of model); attainment {}; headroom {:.2}/{:.2}: ",
            observed.rate,
            predicted.rate,
            observed.isl,
            observed.osl,
            observed.hit_rate * 100.0,
            if self.disaggregated_graph() {
                format!(
                    ", {:.0}% prefilled remotely (ISL {:.0})",
                    forecast.remote_share() * 100.0,
                    forecast.remote.isl
                )
            } else {
                String::new()
            },
            ms(obs.ttft_ms),
            ms(obs.itl_ms),
            self.correction.0,
            self.correction.1,
            obs.attainment
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            self.headroom.0,
            self.headroom.1,
        );
        let missed = |share: Option<f64>| share.is_some_and(|a| a < goal);
        let live = self.observed_workers(obs);
        let mut want = Replicas::default();
        let mut need = Replicas::default();
        let mut notes = Vec::new();
        for pool in self.pools().collect::<Vec<_>>() {
            let cur = current.get(pool);
            let short = live.get(pool) < cur;
            let joining = short && self.joining.get(pool) < JOINING_HOLD;
            self.joining
                .set(pool, if short { self.joining.get(pool) + 1 } else { 0 });
            let f = want_forecast.get(pool);
            let (lo, hi) = self.bounds(pool);
            let peak = self.recent_peak.get(pool);
            let needed = f.max(want_observed.get(pool)).max(peak).clamp(lo, hi);
            need.set(pool, needed);
            // No last interval (the planner just started): this one's need alone.
            let needed_before = self.last_need.as_ref().map_or(needed, |l| l.get(pool));
            let label = if self.disaggregated_graph() {
                format!("{} ", pool.as_str())
            } else {
                String::new()
            };
            // A pool does not shrink right after its target was missed.
            let blocked = match pool {
                Pool::Aggregated => missed(obs.attainment),
                Pool::Prefill => missed(obs.ttft_attainment),
                Pool::Decode => missed(obs.itl_attainment) || missed(obs.ttft_attainment),
            };
            let n = if f.clamp(lo, hi) >= cur {
                notes.push(format!(
                    "{label}{} replica(s) meet the targets at the forecast load",
                    f.clamp(lo, hi)
                ));
                f
            } else if blocked {
                notes.push(format!(
                    "{label}{cur}: requests missed the SLA; not scaling down"
                ));
                cur
            } else if joining {
                notes.push(format!(
                    "{label}{cur}: {} of {cur} worker(s) serving yet; not scaling down before the rest join",
                    live.get(pool)
                ));
                cur
            } else {
                let step = (cur / 4).max(1);
                let n = needed
                    .max(needed_before)
                    .max(cur.saturating_sub(step))
                    .min(cur)
                    .clamp(lo, hi);
                let seen = f.max(want_observed.get(pool));
                notes.push(format!(
                    "{label}{n} replica(s) meet the targets at the forecast and the observed load{}{}",
                    if peak > seen {
                        format!(" and the last interval's bursts (up to {peak})")
                    } else {
                        String::new()
                    },
                    if needed_before > needed && n > needed {
                        format!(" and at the last interval's ({needed_before})")
                    } else {
                        String::new()
                    }
                ));
                n
            };
            want.set(pool, n);
        }
        let replicas = self.fit(&want);
        why.push_str(&notes.join("; "));
        if replicas
            != self
                .pools()
                .map(|p| (p, want.get(p).clamp(self.bounds(p).0, self.bounds(p).1)))
                .collect()
        {
            let _ = write!(
                why,
                "; the GPU budget of {} allows {replicas}",
                self.config.gpu_budget.unwrap_or(0)
            );
        }
        self.recent_peak = Replicas::default();
        self.last_need = Some(need);
        Decision {
            replicas,
            previous: current.clone(),
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
        current: &Replicas,
    ) -> Decision {
        let pp = self.profile(Pool::Prefill).clone();
        let pd = self.profile(Pool::Decode).clone();
        let context = predicted.isl + predicted.osl / 2.0;
        let decode_workers = self
            .observed_workers(obs)
            .iter()
            .filter(|(p, _)| *p != Pool::Prefill)
            .map(|(_, n)| n)
            .sum::<u32>();
        if obs.requests > 0.0 {
            if let Some(t) = obs.ttft_ms {
                self.correction.0 = t / pp.ttft_ms(obs.isl.max(1.0));
            }
            if let Some(i) = obs.itl_ms {
                let conc = observed.rate * obs.osl * i / 1000.0 / f64::from(decode_workers.max(1));
                self.correction.1 = i / pd.itl_ms(conc.max(1.0), obs.isl + obs.osl / 2.0);
            }
        }
        // Dynamo sizes prefill for every prompt (its planner assumes each is disaggregated).
        let prefill_tps = predicted.rate * predicted.isl * self.correction.0.min(1.0);
        let n_prefill = (prefill_tps / pp.prefill_tokens_per_s(predicted.isl)).ceil();
        let corrected_itl = self.config.itl_ms / self.correction.1.max(1e-3);
        let per_engine = pd.decode_tokens_per_s(corrected_itl, context);
        let decode_tps = predicted.rate * predicted.osl;
        let hi = f64::from(self.bounds(Pool::Decode).1);
        let n_decode = if decode_tps <= 0.0 {
            0.0
        } else if per_engine > 0.0 {
            (decode_tps / per_engine).ceil()
        } else {
            hi
        };
        let want: Replicas = if self.disaggregated_graph() {
            [
                (Pool::Prefill, n_prefill.min(1e6) as u32),
                (Pool::Decode, n_decode.min(1e6) as u32),
            ]
            .into_iter()
            .collect()
        } else {
            Replicas::of(Pool::Aggregated, n_prefill.max(n_decode).min(1e6) as u32)
        };
        let replicas = self.fit(&want);
        Decision {
            reason: format!(
                "dynamo: forecast {:.2} req/s, ISL {:.0}, OSL {:.0}; prefill {:.0} tok/s over {:.0} per engine (TTFT correction {:.2}) = {n_prefill}; decode {:.0} tok/s over {:.0} per engine at ITL {:.1} ms (ITL correction {:.2}) = {n_decode}: {replicas} replica(s)",
                predicted.rate,
                predicted.isl,
                predicted.osl,
                prefill_tps,
                pp.prefill_tokens_per_s(predicted.isl),
                self.correction.0,
                decode_tps,
                per_engine,
                corrected_itl,
                self.correction.1,
            ),
            replicas,
            previous: current.clone(),
            path: Path::Predictive,
            observed: Some(observed),
            predicted: Some(predicted),
        }
    }

    /// The fast check between intervals ([`Algorithm::Sla`] only): scales a pool up at once
    /// when the last few seconds' load needs more of it than run now, or when it is below its
    /// floor. Never scales down. `None`: nothing to do.
    pub fn on_tick(&mut self, obs: Option<&Observation>, current: &Replicas) -> Option<Decision> {
        let d = self.tick_decision(obs, current)?;
        self.target = Some(d.replicas.clone());
        Some(d)
    }

    fn tick_decision(&mut self, obs: Option<&Observation>, current: &Replicas) -> Option<Decision> {
        let below: Vec<String> = self
            .pools()
            .filter(|p| current.get(*p) < self.bounds(*p).0)
            .map(|p| format!("{} {} < {}", p.as_str(), current.get(p), self.bounds(p).0))
            .collect();
        if !below.is_empty() {
            let want: Replicas = self
                .pools()
                .map(|p| (p, current.get(p).max(self.bounds(p).0)))
                .collect();
            return Some(Decision {
                replicas: self.fit(&want),
                previous: current.clone(),
                path: Path::Reactive,
                reason: format!("below the floor: {}", below.join(", ")),
                observed: None,
                predicted: None,
            });
        }
        if self.config.algorithm != Algorithm::Sla {
            return None;
        }
        let obs = obs.filter(|o| o.requests > 0.0)?;
        let observed = obs.load();
        let mut demand = self.demand(observed);
        if self.disaggregated_graph() && obs.remote_requests > 0.0 {
            demand = self.observed_demand(obs);
        }
        let sized = self.sized(&demand);
        let live = self.live_signals(obs, current, &demand);
        let mut want = current.clone();
        for pool in self.pools().collect::<Vec<_>>() {
            let (lo, hi) = self.bounds(pool);
            let n = sized.get(pool).max(live.0.get(pool)).clamp(lo, hi);
            self.recent_peak
                .set(pool, self.recent_peak.get(pool).max(n));
            want.set(pool, n.max(current.get(pool)));
        }
        // Growth the last decision asked for and the fleet has not made yet keeps its room.
        let reserved: Replicas = self
            .pools()
            .map(|p| {
                let pending = self.target.as_ref().map_or(0, |t| t.get(p));
                (p, current.get(p).max(pending))
            })
            .collect();
        let replicas = self.grow_into(current, &want, &reserved);
        (replicas != *current).then(|| Decision {
            reason: format!(
                "burst: {:.2} req/s over the last {:.0} s (ISL {:.0}, OSL {:.0}){} needs {want} replica(s){}",
                observed.rate,
                obs.duration_s,
                observed.isl,
                observed.osl,
                live.1,
                if replicas != want {
                    format!("; the GPU budget allows {replicas}")
                } else {
                    String::new()
                }
            ),
            replicas,
            previous: current.clone(),
            path: Path::Reactive,
            observed: Some(observed),
            predicted: None,
        })
    }

    /// What the workers' live state asks for beyond the rate model, per pool, and why: a prompt
    /// queue the pool cannot drain within the TTFT target (its headroom), and KV blocks so full
    /// that new requests would wait for room (more than [`KV_FULL`] held: enough workers to bring
    /// it back to [`KV_COMFORTABLE`]).
    fn live_signals(
        &self,
        obs: &Observation,
        current: &Replicas,
        demand: &Demand,
    ) -> (Replicas, String) {
        let mut want = Replicas::default();
        let mut why = Vec::new();
        let budget_ms = self.config.ttft_ms * self.headroom.0;
        for pool in self.pools().collect::<Vec<_>>() {
            let n = current.get(pool).max(1);
            let (queued, isl) = match pool {
                Pool::Prefill => (obs.queued_remote_tokens, demand.remote.isl),
                Pool::Aggregated | Pool::Decode => (obs.queued_tokens, demand.local.isl),
            };
            if queued > 0.0 && budget_ms > 0.0 {
                let isl = isl.max(1.0);
                // Prefill time of the whole queue on one worker, and on the pool as it is.
                let work_ms = queued * self.profile(pool).ttft_ms(isl) / isl;
                let drain_ms = work_ms / f64::from(n);
                if drain_ms > budget_ms {
                    let need = (work_ms / budget_ms).ceil() as u32;
                    want.set(pool, need);
                    why.push(format!(
                        "{} queue of {queued:.0} prompt tokens ({drain_ms:.0} ms each)",
                        pool.as_str()
                    ));
                }
            }
            if pool != Pool::Prefill
                && let Some(usage) = obs.kv_usage.filter(|u| *u > KV_FULL)
            {
                let need = (f64::from(n) * usage / KV_COMFORTABLE).ceil() as u32;
                want.set(pool, want.get(pool).max(need));
                why.push(format!("{} KV {:.0}% full", pool.as_str(), usage * 100.0));
            }
        }
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(", {}", why.join(", "))
        };
        (want, why)
    }

    /// `current` grown towards `want` one replica at a time, the pool furthest below what it
    /// wants first, as far as the GPU budget's room allows (nothing shrinks).
    fn grow(&self, current: &Replicas, want: &Replicas) -> Replicas {
        self.grow_into(current, want, current)
    }

    /// [`Planner::grow`] with the budget's room left beside `taken` rather than `current`.
    fn grow_into(&self, current: &Replicas, want: &Replicas, taken: &Replicas) -> Replicas {
        let mut r = current.clone();
        let mut room = self
            .config
            .gpu_budget
            .map_or(u32::MAX, |b| b.saturating_sub(self.gpus(taken)));
        loop {
            let Some(p) = self
                .pools()
                .filter(|p| r.get(*p) < want.get(*p) && self.gpus_per_replica(*p) <= room)
                .max_by(|a, b| {
                    let short = |p: &Pool| 1.0 - f64::from(r.get(*p)) / f64::from(want.get(*p));
                    short(a).total_cmp(&short(b))
                })
            else {
                return r;
            };
            r.set(p, r.get(p) + 1);
            room -= self.gpus_per_replica(p);
        }
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
            prefill: None,
            decode: None,
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
            ..Observation::default()
        }
    }

    fn agg(n: u32) -> Replicas {
        Replicas::of(Pool::Aggregated, n)
    }

    const A: Pool = Pool::Aggregated;

    #[test]
    fn no_metrics_holds_the_fleet_and_never_goes_below_the_floor() {
        let mut c = config(Algorithm::Sla);
        c.min_replicas = 2;
        let mut p = Planner::new(c, engine());
        let d = p.on_interval(None, &agg(5));
        assert_eq!((d.replicas.get(A), d.path), (5, Path::Hold));
        assert_eq!(p.on_interval(None, &agg(0)).replicas.get(A), 2);
        let up = p.on_tick(None, &agg(1)).expect("below the floor");
        assert_eq!(up.replicas.get(A), 2);
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
            n = p
                .on_interval(Some(&unjudged(40.0, n)), &agg(n))
                .replicas
                .get(A);
        }
        let busy = n;
        assert_eq!(
            busy,
            p.ideal(&Demand::aggregated(window(40.0, 1, 1.0).load()))
                .get(A)
        );
        for _ in 0..12 {
            n = p
                .on_interval(Some(&unjudged(4.0, n)), &agg(n))
                .replicas
                .get(A);
        }
        assert!(
            n < busy
                && n == p
                    .ideal(&Demand::aggregated(window(4.0, 1, 1.0).load()))
                    .get(A),
            "{n} vs {busy}"
        );
    }

    #[test]
    fn scale_down_is_gradual_and_stops_after_a_missed_interval() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let d = p.on_interval(Some(&window(1.0, 12, 1.0)), &agg(12));
        assert_eq!(d.replicas.get(A), 9, "a quarter at a time: {}", d.reason);
        let d = p.on_interval(Some(&window(1.0, 9, 0.9)), &agg(9));
        assert_eq!(d.replicas.get(A), 9, "{}", d.reason);
    }

    #[test]
    fn a_load_wavering_at_a_pools_margin_does_not_flap_it() {
        let unjudged = |rate, n| Observation {
            attainment: None,
            ttft_attainment: None,
            itl_attainment: None,
            ..window(rate, n, 1.0)
        };
        let p0 = Planner::new(config(Algorithm::Sla), engine());
        let ideal = |rate: f64| {
            p0.ideal(&Demand::aggregated(window(rate, 1, 1.0).load()))
                .get(A)
        };
        let hi = 40.0;
        let n = ideal(hi);
        // The lightest load that still needs n - 1.
        let lo = (1..400)
            .map(|i| hi - f64::from(i) * 0.1)
            .take_while(|&r| ideal(r) >= n - 1)
            .last()
            .expect("a load one replica lighter");
        assert_eq!(ideal(lo), n - 1);
        let mut p = p0.clone();
        for _ in 0..4 {
            p.on_interval(Some(&unjudged(hi, n)), &agg(n));
        }
        // High and low in turn: the last interval always needed n.
        for i in 0..8 {
            let rate = if i % 2 == 0 { lo } else { hi };
            let d = p.on_interval(Some(&unjudged(rate, n)), &agg(n));
            assert_eq!(
                d.replicas.get(A),
                n,
                "interval {i} at {rate} req/s: {}",
                d.reason
            );
        }
        // Low for good: down by one once two intervals in a row agree.
        let mut m = n;
        for _ in 0..4 {
            m = p
                .on_interval(Some(&unjudged(lo, m)), &agg(m))
                .replicas
                .get(A);
        }
        assert_eq!(m, n - 1);
    }

    #[test]
    fn a_pool_does_not_shrink_before_its_new_workers_join() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        // Scaled to 12 a moment ago; 4 serve yet, and the window they served was light.
        for i in 0..JOINING_HOLD {
            let d = p.on_interval(Some(&window(1.0, 4, 1.0)), &agg(12));
            assert_eq!(d.replicas.get(A), 12, "interval {i}: {}", d.reason);
            assert!(
                d.reason.contains("4 of 12 worker(s) serving yet"),
                "{}",
                d.reason
            );
        }
        // Workers that never join do not pin the pool: after the hold it shrinks as usual.
        let d = p.on_interval(Some(&window(1.0, 4, 1.0)), &agg(12));
        assert_eq!(d.replicas.get(A), 9, "{}", d.reason);
        // Every worker serving: no hold.
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let d = p.on_interval(Some(&window(1.0, 12, 1.0)), &agg(12));
        assert_eq!(d.replicas.get(A), 9, "{}", d.reason);
    }

    #[test]
    fn a_burst_in_the_last_interval_holds_off_scale_down() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let calm = window(4.0, 8, 1.0);
        let mut burst = window(40.0, 8, 1.0);
        burst.duration_s = 15.0;
        burst.requests = 600.0;
        let needed = p.ideal(&Demand::aggregated(burst.load())).get(A);
        assert!(needed > 2 && needed < 8, "{needed}");
        // A burst the fleet of 8 absorbed (nothing to scale up) still counts.
        assert_eq!(p.on_tick(Some(&burst), &agg(8)), None);
        let d = p.on_interval(Some(&calm), &agg(8));
        assert!(
            d.replicas.get(A) >= needed,
            "{} < {needed}: {}",
            d.replicas.get(A),
            d.reason
        );
        // The next interval, with no burst, goes on down.
        let d2 = p.on_interval(Some(&calm), &agg(d.replicas.get(A)));
        assert!(d2.replicas.get(A) < d.replicas.get(A), "{d2:?}");
    }

    #[test]
    fn a_burst_scales_up_between_intervals() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        p.on_interval(Some(&window(10.0, 2, 1.0)), &agg(2));
        let mut short = window(40.0, 2, 1.0);
        short.duration_s = 5.0;
        short.requests = 200.0;
        let d = p.on_tick(Some(&short), &agg(2)).expect("scales up");
        assert!(d.replicas.get(A) > 2 && d.path == Path::Reactive, "{d:?}");
        assert_eq!(
            p.on_tick(Some(&window(1.0, 2, 1.0)), &agg(2)),
            None,
            "never down"
        );
    }

    #[test]
    fn budget_and_maximum_cap_every_decision() {
        let mut c = config(Algorithm::Sla);
        c.gpu_budget = Some(6);
        let mut profile = engine();
        profile.gpus = 2;
        let mut p = Planner::new(c, profile);
        assert_eq!(p.bounds(A), (1, 3));
        assert_eq!(
            p.on_interval(Some(&window(500.0, 3, 0.5)), &agg(3))
                .replicas
                .get(A),
            3
        );
        let mut short = window(500.0, 3, 0.5);
        short.duration_s = 5.0;
        assert_eq!(
            p.on_tick(Some(&short), &agg(3)),
            None,
            "already at the ceiling"
        );
        let mut d = Planner::new(config(Algorithm::Dynamo), engine());
        assert!(
            d.on_interval(Some(&window(5000.0, 1, 0.5)), &agg(1))
                .replicas
                .get(A)
                <= 16
        );
    }

    #[test]
    fn dynamo_sizes_prefill_and_decode_throughput_and_takes_the_larger() {
        let mut p = Planner::new(config(Algorithm::Dynamo), engine());
        let d = p.on_interval(Some(&window(40.0, 4, 1.0)), &agg(4));
        // Prefill: 40 x 1024 tok/s over 1024 / 40.48 ms per engine = 1.62 -> 2.
        // Decode: 4,000 tok/s over the best at ITL 30 ms (64 / 16.4 ms, capped by the profile)
        // = 1.03 -> 2.
        assert_eq!(d.replicas.get(A), 2, "{}", d.reason);
        assert!(d.reason.starts_with("dynamo:"));
        assert_eq!(
            p.on_tick(Some(&window(400.0, 2, 0.0)), &agg(2)),
            None,
            "no reactive path"
        );
    }

    #[test]
    fn a_missed_target_tightens_its_headroom_and_adds_replicas() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let steady = p
            .on_interval(Some(&window(20.0, 4, 1.0)), &agg(4))
            .replicas
            .get(A);
        let mut missed = window(20.0, steady, 0.9);
        missed.itl_attainment = Some(0.9);
        let mut more = steady;
        for _ in 0..3 {
            missed.workers = more;
            more = p.on_interval(Some(&missed), &agg(more)).replicas.get(A);
        }
        assert!(more > steady, "{more} vs {steady}");
        assert!(p.headroom.0 < 0.5 && p.headroom.1 < 0.5);
        // The ideal ignores what the planner learned.
        assert_eq!(p.ideal(&Demand::aggregated(window(20.0, 1, 1.0).load())), {
            let fresh = Planner::new(config(Algorithm::Sla), engine());
            fresh.ideal(&Demand::aggregated(window(20.0, 1, 1.0).load()))
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

    fn disagg(c: Config) -> Planner {
        Planner::disaggregated(c, engine(), engine())
    }

    fn pools(p: u32, d: u32) -> Replicas {
        [(Pool::Prefill, p), (Pool::Decode, d)]
            .into_iter()
            .collect()
    }

    /// A window of long prompts, `share` of them sent to the prefill pool.
    fn long_prompts(rate: f64, share: f64, fleet: &Replicas) -> Observation {
        Observation {
            isl: 3000.0,
            remote_requests: rate * 60.0 * share,
            remote_isl: 3000.0,
            workers: fleet.get(Pool::Prefill) + fleet.get(Pool::Decode),
            prefill_workers: fleet.get(Pool::Prefill),
            ..window(rate, 0, 1.0)
        }
    }

    #[test]
    fn a_disaggregated_graph_gets_a_prefill_and_a_decode_count_within_their_own_bounds() {
        let mut c = config(Algorithm::Sla);
        c.prefill = Some(Bounds { min: 1, max: 12 });
        c.decode = Some(Bounds { min: 2, max: 6 });
        let mut p = disagg(c);
        assert_eq!(p.pools().collect::<Vec<_>>(), [Pool::Prefill, Pool::Decode]);
        assert_eq!(
            (p.bounds(Pool::Prefill), p.bounds(Pool::Decode)),
            ((1, 12), (2, 6))
        );
        let mut fleet = pools(1, 2);
        for _ in 0..4 {
            let obs = long_prompts(20.0, 1.0, &fleet);
            fleet = p.on_interval(Some(&obs), &fleet).replicas;
        }
        let busy = fleet.clone();
        assert!(busy.get(Pool::Prefill) > 1, "{busy}");
        assert!(
            busy.get(Pool::Decode) >= 2 && busy.get(Pool::Decode) <= 6,
            "{busy}"
        );
        // Twice the prompt rate with the same output: the prefill pool grows more than decode.
        for _ in 0..4 {
            let obs = long_prompts(40.0, 1.0, &fleet);
            fleet = p.on_interval(Some(&obs), &fleet).replicas;
        }
        assert!(
            fleet.get(Pool::Prefill) > busy.get(Pool::Prefill),
            "{fleet} vs {busy}"
        );
        // The load goes away: both pools shrink to their floors, a quarter at a time.
        let mut steps = 0;
        while fleet != pools(1, 2) && steps < 30 {
            let obs = long_prompts(0.1, 1.0, &fleet);
            let d = p.on_interval(Some(&obs), &fleet);
            for pool in [Pool::Prefill, Pool::Decode] {
                let (a, b) = (fleet.get(pool), d.replicas.get(pool));
                assert!(b >= a - (a / 4).max(1), "{pool:?} {a} -> {b}: {}", d.reason);
            }
            fleet = d.replicas;
            steps += 1;
        }
        assert_eq!(fleet, pools(1, 2));
        assert_eq!(fleet.to_string(), "prefill 1, decode 2");
    }

    #[test]
    fn prompts_kept_local_move_the_work_to_the_decode_pool() {
        let mut remote = disagg(config(Algorithm::Sla));
        let mut local = disagg(config(Algorithm::Sla));
        let fleet = pools(4, 4);
        let r = remote.on_interval(Some(&long_prompts(20.0, 1.0, &fleet)), &fleet);
        let l = local.on_interval(Some(&long_prompts(20.0, 0.0, &fleet)), &fleet);
        assert!(
            l.replicas.get(Pool::Decode) > r.replicas.get(Pool::Decode),
            "{} vs {}",
            l.replicas,
            r.replicas
        );
        assert!(
            l.replicas.get(Pool::Prefill) < r.replicas.get(Pool::Prefill),
            "{} vs {}",
            l.replicas,
            r.replicas
        );
    }

    #[test]
    fn the_budget_is_shared_cut_in_proportion_and_never_overshot_by_a_burst() {
        let mut c = config(Algorithm::Sla);
        c.gpu_budget = Some(6);
        let mut p = disagg(c);
        // Each pool alone may take what the other's floor leaves.
        assert_eq!(
            (p.bounds(Pool::Prefill), p.bounds(Pool::Decode)),
            ((1, 5), (1, 5))
        );
        let fleet = pools(3, 3);
        let d = p.on_interval(Some(&long_prompts(200.0, 1.0, &fleet)), &fleet);
        assert_eq!(p.gpus(&d.replicas), 6, "{}: {}", d.replicas, d.reason);
        assert!(d.reason.contains("GPU budget of 6"), "{}", d.reason);
        // A burst at a full budget adds nothing; with room, it adds only what fits.
        let mut short = long_prompts(200.0, 1.0, &fleet);
        short.duration_s = 5.0;
        short.requests = 1000.0;
        short.remote_requests = 1000.0;
        assert_eq!(p.on_tick(Some(&short), &d.replicas), None);
        // A fleet below the budget with no growth on its way.
        p.target = None;
        let small = pools(1, 2);
        let up = p.on_tick(Some(&short), &small).expect("room to grow");
        assert_eq!(p.gpus(&up.replicas), 6, "{}", up.replicas);
        assert!(up.replicas.get(Pool::Prefill) > 1 && up.replicas.get(Pool::Decode) >= 2);
    }

    #[test]
    fn a_queue_or_a_full_cache_scales_up_before_the_rate_says_so() {
        let mut p = disagg(config(Algorithm::Sla));
        let fleet = pools(1, 1);
        // A light rate the model sizes at 1 + 1...
        let mut calm = long_prompts(0.5, 1.0, &fleet);
        calm.duration_s = 15.0;
        calm.requests = 7.5;
        calm.remote_requests = 7.5;
        calm.isl = 1000.0;
        calm.remote_isl = 1000.0;
        assert_eq!(p.on_tick(Some(&calm), &fleet), None);
        // ...with 30,000 prompt tokens queued on the prefill worker: more than it prefills within
        // the TTFT target's headroom (100 ms).
        let queued = Observation {
            queued_remote_tokens: 30_000.0,
            ..calm
        };
        let d = p
            .on_tick(Some(&queued), &fleet)
            .expect("the queue asks for more");
        assert!(d.replicas.get(Pool::Prefill) > 1, "{}", d.reason);
        assert_eq!(d.replicas.get(Pool::Decode), 1);
        assert!(d.reason.contains("prefill queue of 30000"), "{}", d.reason);
        // The decode workers' KV blocks 96% held: enough workers to bring it to 80%.
        let full = Observation {
            kv_usage: Some(0.96),
            ..calm
        };
        let d = p
            .on_tick(Some(&full), &pools(1, 4))
            .expect("a full cache asks for more");
        assert_eq!(d.replicas.get(Pool::Decode), 5, "{}", d.reason);
        assert!(d.reason.contains("decode KV 96% full"), "{}", d.reason);
    }

    #[test]
    fn a_fast_check_leaves_the_room_of_growth_still_on_its_way() {
        let mut c = config(Algorithm::Sla);
        c.gpu_budget = Some(4);
        let mut p = disagg(c);
        // The interval gave the decode pool a second worker that has not started yet (the
        // budget's room is still held by a prefill worker leaving).
        p.target = Some(pools(2, 2));
        let mut burst = long_prompts(200.0, 1.0, &pools(2, 1));
        burst.duration_s = 5.0;
        burst.requests = 1000.0;
        burst.remote_requests = 1000.0;
        assert_eq!(p.on_tick(Some(&burst), &pools(2, 1)), None, "no room left");
        // Without that growth on its way, the burst takes the room.
        p.target = None;
        let d = p.on_tick(Some(&burst), &pools(2, 1)).expect("room to grow");
        assert_eq!(p.gpus(&d.replicas), 4, "{}", d.replicas);
    }

    #[test]
    fn dynamo_sizes_a_disaggregated_graph_pool_by_pool() {
        let mut p = disagg(config(Algorithm::Dynamo));
        let fleet = pools(2, 2);
        let d = p.on_interval(Some(&long_prompts(20.0, 1.0, &fleet)), &fleet);
        // Prefill: 20 x 3000 tok/s over one engine's throughput at 3000 tokens.
        let per = engine().prefill_tokens_per_s(3000.0);
        assert_eq!(
            d.replicas.get(Pool::Prefill),
            (60_000.0 / per).ceil() as u32,
            "{}",
            d.reason
        );
        assert!(d.replicas.get(Pool::Decode) >= 1);
    }

    #[test]
    fn profiles_the_workers_describe_replace_the_assumed_ones() {
        let mut p = disagg(config(Algorithm::Sla));
        let mut own = engine();
        own.source = "described by the engine".into();
        own.max_concurrency = Some(8.0);
        let described = serde_json::json!({
            "decode": own,
            "aggregated": engine(),
            "prefill": {"not": "a profile"},
        });
        assert_eq!(p.adopt_described(&described), [Pool::Decode]);
        assert_eq!(p.profile(Pool::Decode).source, "described by the engine");
        assert_ne!(p.profile(Pool::Prefill).source, "described by the engine");
        assert!(p.adopt_described(&described).is_empty(), "nothing new");
    }

    #[test]
    fn a_restarted_planner_goes_on_from_what_it_learned() {
        let mut p = Planner::new(config(Algorithm::Sla), engine());
        let mut missed = window(20.0, 4, 0.9);
        missed.ttft_attainment = Some(0.9);
        let mut n = 4;
        for _ in 0..3 {
            n = p.on_interval(Some(&missed), &agg(n)).replicas.get(A);
        }
        let learned = p.learned();
        assert!(learned.headroom_ttft < 0.5);
        let text = serde_json::to_string(&learned).expect("serialises");
        let mut q = Planner::new(config(Algorithm::Sla), engine());
        q.restore(&serde_json::from_str(&text).expect("parses"));
        let back = q.learned();
        assert!((back.headroom_ttft - learned.headroom_ttft).abs() < 1e-12);
        assert_eq!(back.forecast, learned.forecast);
        // The same next decision as the planner that never stopped.
        let calm = window(20.0, n, 1.0);
        assert_eq!(
            q.on_interval(Some(&calm), &agg(n)).replicas,
            p.clone().on_interval(Some(&calm), &agg(n)).replicas
        );
    }
}
