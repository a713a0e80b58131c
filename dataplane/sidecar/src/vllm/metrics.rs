//! Reading vLLM's Prometheus `/metrics` text: the KV geometry (`vllm:cache_config_info`'s
//! `block_size` and `num_gpu_blocks` labels) and the load gauges and counters the router and the
//! sidecar's own metrics use. Series of every label set (one per engine / data-parallel rank) are
//! summed. Lines it does not know are ignored.

use dynamo_mocker::LoadSnapshot;

/// The values of one scrape.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scrape {
    /// `(block_size, num_gpu_blocks)`, when `vllm:cache_config_info` carries both.
    pub geometry: Option<(u32, u64)>,
    pub running: f64,
    pub waiting: f64,
    /// Fraction of KV blocks in use, 0–1 (the mean over label sets).
    pub kv_usage: f64,
    pub prompt_tokens: f64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cache_hits: f64,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        let mut usage_series = 0u32;
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            match name {
                "vllm:num_requests_running" => s.running += value,
                "vllm:num_requests_waiting" => s.waiting += value,
                "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                    s.kv_usage += value;
                    usage_series += 1;
                }
                "vllm:prompt_tokens_total" => s.prompt_tokens += value,
                "vllm:prefix_cache_hits_total" => s.prefix_cache_hits += value,
                "vllm:cache_config_info" => {
                    let bs = label(labels, "block_size").and_then(|v| v.parse().ok());
                    let n = label(labels, "num_gpu_blocks").and_then(|v| v.parse().ok());
                    if let (Some(bs), Some(n)) = (bs, n) {
                        s.geometry = Some((bs, n));
                    }
                }
                _ => {}
            }
        }
        if usage_series > 1 {
            s.kv_usage /= f64::from(usage_series);
        }
        s
    }

    /// As the sidecar's load, for an engine of `blocks_total` KV blocks.
    pub fn load(&self, blocks_total: u64) -> LoadSnapshot {
        let count = |v: f64| v.max(0.0).round() as usize;
        LoadSnapshot {
            kv_blocks_used: count(self.kv_usage * blocks_total as f64),
            kv_blocks_total: blocks_total as usize,
            running: count(self.running),
            waiting: count(self.waiting),
            prompt_tokens_total: self.prompt_tokens.max(0.0) as u64,
            cached_tokens_total: self.prefix_cache_hits.max(0.0) as u64,
        }
    }
}

/// The value of `key` in a label list `a="x",b="y"` (values without escaped quotes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let (v, tail) = after.split_once('"')?;
        if k.trim_start_matches(',').trim() == key {
            return Some(v);
        }
        rest = tail.trim_start_matches(',');
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as vLLM 0.32 serves them (abridged).
    const TEXT: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 640.0
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 640.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 320.0
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",num_gpu_blocks="1024",prefix_caching_hash_algo="sha256"} 1.0
python_gc_objects_collected_total{generation="0"} 1.0
"#;

    #[test]
    fn geometry_and_load_are_read_from_vllm_metrics() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.geometry, Some((32, 1024)));
        let load = s.load(1024);
        assert_eq!(
            load,
            LoadSnapshot {
                kv_blocks_used: 256,
                kv_blocks_total: 1024,
                running: 2,
                waiting: 1,
                prompt_tokens_total: 640,
                cached_tokens_total: 320,
            }
        );
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let s = Scrape::parse(
            "vllm:num_requests_running{engine=\"0\"} x\nnonsense\n{}\nvllm:cache_config_info{block_size=\"16\"} 1\n",
        );
        assert_eq!(s, Scrape::default());
    }
}
