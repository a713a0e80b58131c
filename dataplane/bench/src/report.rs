//! Per-request records, the summary computed from them, the result file (`LABEL.json`) and the
//! human table that puts several runs side by side.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What happened to one request. Times are milliseconds; offsets are from the start of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Index in the workload.
    pub index: usize,
    /// When it was due.
    pub scheduled_ms: f64,
    /// When it was sent.
    pub start_ms: f64,
    /// How late it was sent (`start_ms - scheduled_ms`).
    pub lag_ms: f64,
    /// Time to the first chunk with text.
    pub ttft_ms: Option<f64>,
    /// Inter-token latencies: gaps between text chunks, each divided by the tokens per chunk.
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
    /// HTTP status, if a response came.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// What the workload asked for.
    pub input_length: u32,
    pub output_length: u32,
    /// From the final usage chunk.
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    /// Chunks that carried text.
    pub text_chunks: u32,
    /// Whether it met the run's SLA (both targets), when the run has one. A failed request does
    /// not; a request with fewer than two output tokens is judged on its TTFT alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_met: Option<bool>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status == Some(200)
    }

    /// Mean gap between this request's tokens (its ITL for the SLA), when it had two or more.
    pub fn mean_itl_ms(&self) -> Option<f64> {
        (!self.itl_ms.is_empty() && self.completion_tokens.max(self.text_chunks) >= 2)
            .then(|| self.itl_ms.iter().sum::<f64>() / self.itl_ms.len() as f64)
    }

    /// Judges this request against wall-clock targets: `(ttft met, itl met)`; ITL is met
    /// trivially by a request with fewer than two output tokens.
    pub fn judge(&self, sla: &WallSla) -> (bool, bool) {
        if !self.ok() {
            return (false, false);
        }
        let ttft = self.ttft_ms.is_some_and(|t| t <= sla.ttft_ms);
        let itl = self.mean_itl_ms().is_none_or(|i| i <= sla.itl_ms);
        (ttft, itl)
    }
}

/// SLA targets in wall-clock milliseconds (the trace-time targets divided by the time scale).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WallSla {
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

/// SLA figures of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Attainment {
    /// Share of all requests that met both targets.
    pub both: f64,
    pub ttft: f64,
    /// Among requests with at least two output tokens.
    pub itl: f64,
}

/// Marks each record's `sla_met` and returns the run's attainment.
pub fn judge_all(records: &mut [RequestRecord], sla: &WallSla) -> Attainment {
    let (mut both, mut ttft, mut itl, mut itl_n) = (0usize, 0usize, 0usize, 0usize);
    for r in records.iter_mut() {
        let (t, i) = r.judge(sla);
        r.sla_met = Some(t && i);
        both += usize::from(t && i);
        ttft += usize::from(t);
        if !r.ok() || r.mean_itl_ms().is_some() {
            itl_n += 1;
            itl += usize::from(r.ok() && i);
        }
    }
    let share = |k: usize, n: usize| if n == 0 { 1.0 } else { k as f64 / n as f64 };
    Attainment {
        both: share(both, records.len()),
        ttft: share(ttft, records.len()),
        itl: share(itl, itl_n),
    }
}

/// The summary numbers of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub req_per_s: f64,
    pub output_tok_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// Σ cached_tokens / Σ prompt_tokens over successful requests.
    pub hit_rate: f64,
    /// Block hit rate of one unlimited shared prefix cache (see `workload::oracle_hit_rate`).
    pub oracle_hit_rate: f64,
    /// `hit_rate / oracle_hit_rate` (0 when the oracle is 0).
    pub hit_of_oracle: f64,
    pub lag_p99_ms: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Share of requests that met both SLA targets (`--sla-ttft-ms`, `--sla-itl-ms`); absent without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_attainment: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_ttft_attainment: Option<f64>,
    /// Among requests with at least two output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_itl_attainment: Option<f64>,
    /// GPUs of the live workers (the frontend's `dynamo_frontend_worker_gpus`) integrated over the
    /// run, in wall seconds x the time scale (trace seconds); absent when the server reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_seconds: Option<f64>,
    /// Changes of that GPU count during the run (scaling actions as the frontend saw them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_actions: Option<u32>,
}

/// The nearest-rank percentile `p` (0..=100) of `sorted` (ascending); 0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

impl Summary {
    pub fn new(records: &[RequestRecord], oracle_hit_rate: f64) -> Summary {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let duration_s = records
            .iter()
            .map(|r| r.start_ms + r.e2e_ms)
            .fold(0.0, f64::max)
            / 1000.0;
        let ttft = sorted(ok.iter().filter_map(|r| r.ttft_ms).collect());
        let itl = sorted(ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect());
        let e2e = sorted(ok.iter().map(|r| r.e2e_ms).collect());
        let lag = sorted(records.iter().map(|r| r.lag_ms).collect());
        let prompt_tokens: u64 = ok.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let completion_tokens: u64 = ok.iter().map(|r| u64::from(r.completion_tokens)).sum();
        let cached_tokens: u64 = ok.iter().map(|r| u64::from(r.cached_tokens)).sum();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let hit_rate = if prompt_tokens > 0 {
            cached_tokens as f64 / prompt_tokens as f64
        } else {
            0.0
        };
        Summary {
            requests: records.len(),
            ok: ok.len(),
            failed: records.len() - ok.len(),
            duration_s,
            req_per_s: per_s(ok.len() as f64),
            output_tok_per_s: per_s(completion_tokens as f64),
            ttft_p50_ms: percentile(&ttft, 50.0),
            ttft_p90_ms: percentile(&ttft, 90.0),
            ttft_p99_ms: percentile(&ttft, 99.0),
            itl_p50_ms: percentile(&itl, 50.0),
            itl_p90_ms: percentile(&itl, 90.0),
            e2e_p50_ms: percentile(&e2e, 50.0),
            e2e_p99_ms: percentile(&e2e, 99.0),
            hit_rate,
            oracle_hit_rate,
            hit_of_oracle: if oracle_hit_rate > 0.0 {
                hit_rate / oracle_hit_rate
            } else {
                0.0
            },
            lag_p99_ms: percentile(&lag, 99.0),
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            ..Summary::default()
        }
    }
}

/// The result file of one run: `OUT/LABEL.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub config: serde_json::Value,
    pub summary: Summary,
    pub records: Vec<RequestRecord>,
    /// `(wall ms from the start, GPUs of live workers)` as read from the server's `/metrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_samples: Vec<(f64, f64)>,
}

impl Report {
    /// Sorted TTFTs of the successful requests (the CDF's x values).
    pub fn ttfts(&self) -> Vec<f64> {
        sorted(
            self.records
                .iter()
                .filter(|r| r.ok())
                .filter_map(|r| r.ttft_ms)
                .collect(),
        )
    }
}

/// One row per metric, one column per run; with two or more runs a last column gives each later
/// run's value over the first's.
pub fn table(runs: &[&Report]) -> String {
    type Row = (&'static str, fn(&Summary) -> f64, u8);
    const ROWS: &[Row] = &[
        ("requests ok", |s| s.ok as f64, 0),
        ("requests failed", |s| s.failed as f64, 0),
        ("duration s", |s| s.duration_s, 1),
        ("req/s", |s| s.req_per_s, 2),
        ("output tok/s", |s| s.output_tok_per_s, 1),
        ("TTFT p50 ms", |s| s.ttft_p50_ms, 1),
        ("TTFT p90 ms", |s| s.ttft_p90_ms, 1),
        ("TTFT p99 ms", |s| s.ttft_p99_ms, 1),
        ("ITL p50 ms", |s| s.itl_p50_ms, 2),
        ("ITL p90 ms", |s| s.itl_p90_ms, 2),
        ("E2E p50 ms", |s| s.e2e_p50_ms, 1),
        ("E2E p99 ms", |s| s.e2e_p99_ms, 1),
        ("hit rate", |s| s.hit_rate, 3),
        ("oracle hit rate", |s| s.oracle_hit_rate, 3),
        ("hit / oracle", |s| s.hit_of_oracle, 3),
        ("schedule lag p99 ms", |s| s.lag_p99_ms, 1),
        (
            "SLA attainment",
            |s| s.sla_attainment.unwrap_or(f64::NAN),
            4,
        ),
        ("GPU-seconds", |s| s.gpu_seconds.unwrap_or(f64::NAN), 0),
        (
            "scaling actions",
            |s| s.scaling_actions.map_or(f64::NAN, f64::from),
            0,
        ),
    ];
    let width = runs
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(0)
        .max(12)
        + 2;
    let mut out = String::new();
    let _ = write!(out, "{:<22}", "");
    for r in runs {
        let _ = write!(out, "{:>width$}", r.label);
    }
    if runs.len() > 1 {
        for r in &runs[1..] {
            let _ = write!(
                out,
                "{:>width$}",
                format!("{}/{}", short(&r.label), short(&runs[0].label))
            );
        }
    }
    out.push('\n');
    for (name, get, prec) in ROWS {
        let _ = write!(out, "{name:<22}");
        for r in runs {
            let _ = write!(
                out,
                "{:>width$.prec$}",
                get(&r.summary),
                prec = usize::from(*prec)
            );
        }
        if runs.len() > 1 {
            let base = get(&runs[0].summary);
            for r in &runs[1..] {
                let v = get(&r.summary);
                if base != 0.0 && base.is_finite() && v.is_finite() {
                    let _ = write!(out, "{:>width$.2}", v / base);
                } else {
                    let _ = write!(out, "{:>width$}", "-");
                }
            }
        }
        out.push('\n');
    }
    out
}

fn short(label: &str) -> &str {
    label.get(..label.len().min(8)).unwrap_or(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 90.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn sla_judges_ttft_and_mean_itl_and_skips_itl_of_one_token_answers() {
        let sla = WallSla {
            ttft_ms: 100.0,
            itl_ms: 10.0,
        };
        let ok = |ttft: f64, itl: Vec<f64>, tokens: u32| RequestRecord {
            status: Some(200),
            ttft_ms: Some(ttft),
            text_chunks: tokens,
            completion_tokens: tokens,
            itl_ms: itl,
            ..RequestRecord::default()
        };
        let mut records = vec![
            ok(50.0, vec![5.0, 14.0], 3),  // mean ITL 9.5: met
            ok(150.0, vec![5.0], 2),       // TTFT missed
            ok(50.0, vec![12.0, 12.0], 3), // ITL missed
            ok(90.0, vec![], 1),           // one token: TTFT only
            RequestRecord {
                status: Some(500),
                error: Some("x".into()),
                ..RequestRecord::default()
            },
        ];
        let a = judge_all(&mut records, &sla);
        let met: Vec<Option<bool>> = records.iter().map(|r| r.sla_met).collect();
        assert_eq!(
            met,
            [
                Some(true),
                Some(false),
                Some(false),
                Some(true),
                Some(false)
            ]
        );
        assert!((a.both - 0.4).abs() < 1e-12);
        assert!((a.ttft - 0.6).abs() < 1e-12);
        // ITL among the 4 with two or more tokens, or failed: 2 of 4.
        assert!((a.itl - 0.5).abs() < 1e-12);
    }

    #[test]
    fn summary_counts_failures_and_hit_rate() {
        let ok = RequestRecord {
            status: Some(200),
            ttft_ms: Some(10.0),
            e2e_ms: 100.0,
            prompt_tokens: 100,
            cached_tokens: 25,
            completion_tokens: 10,
            ..RequestRecord::default()
        };
        let failed = RequestRecord {
            status: Some(500),
            error: Some("x".into()),
            ..RequestRecord::default()
        };
        let s = Summary::new(&[ok, failed], 0.5);
        assert_eq!((s.ok, s.failed), (1, 1));
        assert!((s.hit_rate - 0.25).abs() < 1e-12);
        assert!((s.hit_of_oracle - 0.5).abs() < 1e-12);
        assert_eq!(s.ttft_p50_ms, 10.0);
    }
}
