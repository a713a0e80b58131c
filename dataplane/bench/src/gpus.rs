//! The fleet as the server reports it: bench reads the frontend's `/metrics` while a run goes on
//! and keeps the GPUs of its live workers (`dynamo_frontend_worker_gpus`, summed over its series),
//! to integrate into GPU-seconds and to draw over time beside the load and the SLA attainment.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{png, report::Report};

/// The metric bench reads.
pub const GPU_METRIC: &str = "dynamo_frontend_worker_gpus";

/// Reads `url` every `interval` until `stop`, returning `(ms since start, GPUs)` for each read
/// that carried the metric. Unreachable or metric-less servers give no samples.
pub async fn sample(
    client: reqwest::Client,
    url: String,
    interval: std::time::Duration,
    start: Instant,
    stop: CancellationToken,
) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(interval.max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let read = async { client.get(&url).send().await?.text().await };
        let text = tokio::select! {
            () = stop.cancelled() => break,
            r = read => r,
        };
        if let Some(gpus) = text.ok().as_deref().and_then(parse_gpus) {
            out.push((start.elapsed().as_secs_f64() * 1000.0, gpus));
        }
    }
    out
}

/// The sum of every `dynamo_frontend_worker_gpus` series in a Prometheus/OpenMetrics text body.
pub fn parse_gpus(text: &str) -> Option<f64> {
    dynamo_planner::frontend::metric(text, GPU_METRIC)
}

/// GPU x wall seconds from the first sample to `end_ms`, each sample's count held until the next.
pub fn integrate(samples: &[(f64, f64)], end_ms: f64) -> Option<f64> {
    let (&(first, _), _) = samples.split_first()?;
    let mut total = 0.0;
    for (i, &(t, gpus)) in samples.iter().enumerate() {
        let until = samples.get(i + 1).map_or(end_ms.max(t), |n| n.0);
        total += gpus * (until - t).max(0.0);
    }
    // Before the first read the count is taken to be the first read's.
    total += samples[0].1 * first.min(end_ms).max(0.0);
    Some(total / 1000.0)
}

/// How often the GPU count changed between reads.
pub fn changes(samples: &[(f64, f64)]) -> Option<u32> {
    (!samples.is_empty()).then(|| samples.windows(2).filter(|w| w[0].1 != w[1].1).count() as u32)
}

/// Load (requests per trace second), GPUs and SLA attainment per `window_s` of trace time.
pub fn timeline(report: &Report, time_scale: f64, window_s: f64) -> (Vec<u8>, png::TimelineLegend) {
    let window_s = if window_s > 0.0 { window_s } else { 60.0 };
    let trace_s = |wall_ms: f64| wall_ms / 1000.0 * time_scale;
    let end = report
        .records
        .iter()
        .map(|r| trace_s(r.scheduled_ms))
        .fold(0.0, f64::max);
    let windows = (end / window_s).floor() as usize + 1;
    let (mut count, mut met) = (vec![0usize; windows], vec![0usize; windows]);
    for r in &report.records {
        let w = ((trace_s(r.scheduled_ms) / window_s) as usize).min(windows - 1);
        count[w] += 1;
        met[w] += usize::from(r.sla_met == Some(true));
    }
    let x = |w: usize| w as f64 * window_s;
    let load = (0..windows)
        .map(|w| (x(w), count[w] as f64 / window_s))
        .collect();
    let mut panels = vec![("load, requests per trace second".to_owned(), None, load)];
    if !report.gpu_samples.is_empty() {
        let gpus = report
            .gpu_samples
            .iter()
            .map(|&(t, g)| (trace_s(t), g))
            .collect();
        panels.push(("GPUs of live workers".to_owned(), None, gpus));
    }
    if report.summary.sla_attainment.is_some() {
        let att = (0..windows)
            .filter(|&w| count[w] > 0)
            .map(|w| (x(w), met[w] as f64 / count[w] as f64))
            .collect();
        panels.push(("SLA attainment per window".to_owned(), Some(1.0), att));
    }
    png::timeline(&panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_summed_over_series_and_lookalikes_ignored() {
        let text = "# TYPE dynamo_frontend_worker_gpus gauge\n\
                    dynamo_frontend_worker_gpus{role=\"prefill\"} 2\n\
                    dynamo_frontend_worker_gpus{role=\"decode\"} 3\n\
                    dynamo_frontend_worker_gpus_total 99\n";
        assert_eq!(parse_gpus(text), Some(5.0));
        assert_eq!(parse_gpus("dynamo_frontend_worker_gpus 4\n"), Some(4.0));
        assert_eq!(parse_gpus("vllm:num_requests_running 1\n"), None);
    }

    #[test]
    fn integration_holds_each_count_until_the_next_read() {
        // 2 GPUs from 0 (first read at 500 ms) to 1,000 ms, then 4 until 3,000 ms.
        let s = [(500.0, 2.0), (1000.0, 4.0)];
        assert_eq!(
            integrate(&s, 3000.0),
            Some((2.0 * 1000.0 + 4.0 * 2000.0) / 1000.0)
        );
        assert_eq!(integrate(&[], 3000.0), None);
        assert_eq!(
            changes(&[(0.0, 1.0), (1.0, 1.0), (2.0, 2.0), (3.0, 1.0)]),
            Some(2)
        );
    }
}
