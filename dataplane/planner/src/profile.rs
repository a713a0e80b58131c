//! An engine's measured performance: TTFT against prompt length on an idle engine, and ITL
//! against concurrency and context length. `dynamo profile --url` writes one from any OpenAI
//! endpoint; the built-in engine can describe itself from its timing model. The planner
//! interpolates it.

use serde::{Deserialize, Serialize};

/// Time to first token of one request of `isl` prompt tokens on an idle engine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub isl: f64,
    pub ttft_ms: f64,
}

/// Mean inter-token latency with `concurrency` requests decoding, each with about `context`
/// tokens of context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub concurrency: f64,
    pub context: f64,
    pub itl_ms: f64,
}

/// One engine's profile (one worker replica, `gpus` GPUs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Where it came from: an endpoint URL, or the built-in engine's timing model.
    pub source: String,
    /// GPUs of one worker replica.
    #[serde(default = "one")]
    pub gpus: u32,
    /// Most requests one engine runs at once (the ITL grid stops there).
    #[serde(default)]
    pub max_concurrency: Option<f64>,
    pub prefill: Vec<PrefillPoint>,
    pub decode: Vec<DecodePoint>,
}

fn one() -> u32 {
    1
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("the profile has no prefill points (TTFT vs ISL); run `dynamo profile` again")]
    NoPrefill,
    #[error(
        "the profile has no decode points (ITL vs concurrency and context); run `dynamo profile` again"
    )]
    NoDecode,
    #[error("profile point {0} is not a positive finite number")]
    Invalid(String),
}

impl Profile {
    /// Sorts the points and checks them.
    pub fn validated(mut self) -> Result<Profile, ProfileError> {
        if self.prefill.is_empty() {
            return Err(ProfileError::NoPrefill);
        }
        if self.decode.is_empty() {
            return Err(ProfileError::NoDecode);
        }
        let ok = |v: f64| v.is_finite() && v > 0.0;
        for p in &self.prefill {
            if !(ok(p.isl) && ok(p.ttft_ms)) {
                return Err(ProfileError::Invalid(format!("{p:?}")));
            }
        }
        for p in &self.decode {
            if !(ok(p.concurrency) && ok(p.context) && ok(p.itl_ms)) {
                return Err(ProfileError::Invalid(format!("{p:?}")));
            }
        }
        self.gpus = self.gpus.max(1);
        self.prefill.sort_by(|a, b| a.isl.total_cmp(&b.isl));
        self.decode.sort_by(|a, b| {
            a.context
                .total_cmp(&b.context)
                .then(a.concurrency.total_cmp(&b.concurrency))
        });
        Ok(self)
    }

    /// Idle-engine TTFT of an `isl`-token prompt: piecewise linear, extended linearly past the
    /// last point (prefill cost keeps growing) and flat below the first.
    pub fn ttft_ms(&self, isl: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self.prefill.iter().map(|p| (p.isl, p.ttft_ms)).collect();
        interpolate(&pts, isl, true)
    }

    /// Prefill tokens per second of one engine at prompt length `isl` (Dynamo's "prefill
    /// throughput per GPU" times the GPUs): `isl / TTFT(isl)`.
    pub fn prefill_tokens_per_s(&self, isl: f64) -> f64 {
        let isl = isl.max(1.0);
        isl / self.ttft_ms(isl) * 1000.0
    }

    /// ITL with `concurrency` requests decoding at `context` tokens each: linear in concurrency
    /// within each measured context, then linear between the two nearest contexts (clamped to
    /// the measured range of contexts; extended linearly past the largest concurrency).
    pub fn itl_ms(&self, concurrency: f64, context: f64) -> f64 {
        let mut rows: Vec<(f64, Vec<(f64, f64)>)> = Vec::new();
        for p in &self.decode {
            match rows.last_mut() {
                Some((c, row)) if *c == p.context => row.push((p.concurrency, p.itl_ms)),
                _ => rows.push((p.context, vec![(p.concurrency, p.itl_ms)])),
            }
        }
        let at = |row: &[(f64, f64)]| interpolate(row, concurrency, true);
        let i = rows.partition_point(|(c, _)| *c < context);
        match (i.checked_sub(1).and_then(|j| rows.get(j)), rows.get(i)) {
            (Some((c0, r0)), Some((c1, r1))) => {
                let t = (context - c0) / (c1 - c0);
                at(r0) + (at(r1) - at(r0)) * t
            }
            (Some((_, r)), None) | (None, Some((_, r))) => at(r),
            (None, None) => f64::INFINITY,
        }
    }

    /// Decode tokens per second of one engine at the ITL target: the largest concurrency (up to
    /// the profile's maximum) whose ITL at `context` stays within `itl_ms`, over that ITL
    /// (Dynamo's "decode throughput per GPU at the ITL target" times the GPUs). 0 when even one
    /// request misses the target.
    pub fn decode_tokens_per_s(&self, itl_ms: f64, context: f64) -> f64 {
        let max = self.max_concurrency.unwrap_or_else(|| {
            self.decode
                .iter()
                .map(|p| p.concurrency)
                .fold(1.0, f64::max)
        });
        let (mut lo, mut hi) = (0.0, max);
        if self.itl_ms(1.0, context) > itl_ms {
            return 0.0;
        }
        if self.itl_ms(max, context) <= itl_ms {
            lo = max;
        } else {
            for _ in 0..50 {
                let mid = (lo + hi) / 2.0;
                if self.itl_ms(mid.max(1.0), context) <= itl_ms {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
        }
        let k = lo.max(1.0);
        k / self.itl_ms(k, context) * 1000.0
    }
}

/// Piecewise-linear `y(x)` through `pts` (sorted by x): flat below the first point, and past the
/// last one either flat or extended along the last segment.
fn interpolate(pts: &[(f64, f64)], x: f64, extend: bool) -> f64 {
    match pts {
        [] => f64::INFINITY,
        [(_, y)] => *y,
        _ => {
            if x <= pts[0].0 {
                return pts[0].1;
            }
            let i = pts.partition_point(|(px, _)| *px < x).min(pts.len() - 1);
            let (x0, y0) = pts[i - 1];
            let (x1, y1) = pts[i];
            if x > x1 && !extend {
                return y1;
            }
            if x1 == x0 {
                return y1;
            }
            (y0 + (y1 - y0) * (x - x0) / (x1 - x0)).max(0.0)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A profile shaped like the built-in engine: TTFT 20 ms + 0.02 ms/token, ITL 10 ms + 0.1 ms
    /// per concurrent request at 1k context, twice that growth at 4k.
    pub fn engine() -> Profile {
        Profile {
            source: "test".into(),
            gpus: 1,
            max_concurrency: Some(64.0),
            prefill: [128.0, 1024.0, 4096.0]
                .iter()
                .map(|&isl| PrefillPoint {
                    isl,
                    ttft_ms: 20.0 + 0.02 * isl,
                })
                .collect(),
            decode: [(1024.0, 0.1), (4096.0, 0.2)]
                .iter()
                .flat_map(|&(context, slope)| {
                    [1.0, 8.0, 64.0].map(|concurrency| DecodePoint {
                        concurrency,
                        context,
                        itl_ms: 10.0 + slope * concurrency,
                    })
                })
                .collect(),
        }
        .validated()
        .expect("valid")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn ttft_interpolates_and_extends_past_the_last_point() {
        let p = engine();
        assert!(close(p.ttft_ms(2048.0), 20.0 + 0.02 * 2048.0));
        assert!(
            close(p.ttft_ms(8192.0), 20.0 + 0.02 * 8192.0),
            "linear past the end"
        );
        assert!(
            close(p.ttft_ms(10.0), p.ttft_ms(128.0)),
            "flat below the first"
        );
        assert!(close(
            p.prefill_tokens_per_s(1024.0),
            1024.0 / 40.48 * 1000.0
        ));
    }

    #[test]
    fn itl_is_bilinear_in_concurrency_and_context() {
        let p = engine();
        assert!(close(p.itl_ms(8.0, 1024.0), 10.8));
        assert!(close(p.itl_ms(36.0, 1024.0), 13.6));
        // Halfway between the contexts: the mean of the two rows.
        assert!(close(p.itl_ms(8.0, 2560.0), (10.8 + 11.6) / 2.0));
        assert!(
            close(p.itl_ms(8.0, 100_000.0), 11.6),
            "clamped to the largest context"
        );
    }

    #[test]
    fn decode_throughput_is_the_best_concurrency_under_the_target() {
        let p = engine();
        // ITL 12 ms at 1k context: concurrency 20 (10 + 0.1 x 20), 20 / 12 ms.
        assert!(close(
            p.decode_tokens_per_s(12.0, 1024.0),
            20.0 / 12.0 * 1000.0
        ));
        // Every concurrency meets a loose target: the profile's maximum.
        assert!(close(
            p.decode_tokens_per_s(100.0, 1024.0),
            64.0 / 16.4 * 1000.0
        ));
        assert_eq!(p.decode_tokens_per_s(5.0, 1024.0), 0.0, "even one misses");
    }

    #[test]
    fn empty_or_negative_profiles_are_refused_with_a_reason() {
        let mut p = engine();
        p.prefill.clear();
        assert_eq!(p.validated(), Err(ProfileError::NoPrefill));
        let mut p = engine();
        p.decode[0].itl_ms = -1.0;
        assert!(matches!(p.validated(), Err(ProfileError::Invalid(_))));
    }
}
