//! What to send and when: Mooncake trace lines, Azure LLM inference trace rows (read into the same
//! shape), or a synthetic multi-turn workload; the deterministic prompt tokens behind each
//! `hash_id`; and the oracle prefix-cache hit rate of a workload. Nothing here touches the network.

use std::{collections::HashSet, io::BufRead, path::Path, time::Duration};

use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::{Deserialize, Serialize};

use super::BenchError;

/// One request of a Mooncake trace: `{"timestamp", "input_length", "output_length", "hash_ids"}`.
/// `hash_ids[i]` stands for the whole prompt prefix up to and including block `i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceLine {
    /// Arrival time, milliseconds from the start of the trace.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u32,
    /// Completion tokens.
    pub output_length: u32,
    /// One id per `block_tokens` prompt tokens (the last block may be partial).
    pub hash_ids: Vec<u64>,
}

/// Parses one trace line; `line` (1-based) only feeds the error.
pub fn parse_line(text: &str, line: usize, block_tokens: u32) -> Result<TraceLine, BenchError> {
    let t: TraceLine =
        serde_json::from_str(text).map_err(|source| BenchError::ParseTraceLine { line, source })?;
    let capacity = t.hash_ids.len() as u64 * u64::from(block_tokens);
    if u64::from(t.input_length) > capacity {
        return Err(BenchError::InvalidTraceLine {
            line,
            reason: format!(
                "input_length {} needs more than the {} hash_ids x {block_tokens} tokens it lists",
                t.input_length,
                t.hash_ids.len()
            ),
        });
    }
    Ok(t)
}

/// Reads up to `limit` requests of a trace: the Azure LLM inference CSV format when the file starts
/// with its header (`TIMESTAMP,ContextTokens,GeneratedTokens`), a Mooncake JSONL trace otherwise.
/// Blank lines are skipped; any other malformed line is an error naming its line number.
pub fn read_trace(
    path: &Path,
    limit: Option<usize>,
    block_tokens: u32,
) -> Result<Vec<TraceLine>, BenchError> {
    let io_err = |source| BenchError::ReadTrace {
        path: path.to_owned(),
        source,
    };
    let mut first = String::new();
    std::io::BufReader::new(std::fs::File::open(path).map_err(io_err)?)
        .read_line(&mut first)
        .map_err(io_err)?;
    if first
        .trim_start_matches('\u{feff}')
        .starts_with(AZURE_HEADER)
    {
        read_azure(path, limit, block_tokens)
    } else {
        read_mooncake(path, limit, block_tokens)
    }
}

/// The header line of the Azure LLM inference traces (2023 and 2024 releases).
pub const AZURE_HEADER: &str = "TIMESTAMP,ContextTokens,GeneratedTokens";

/// Reads an Azure LLM inference trace: `TIMESTAMP,ContextTokens,GeneratedTokens` rows with times
/// such as `2023-11-16 18:15:46.6805900`. The traces carry no prompt content, so each request gets
/// prompt blocks of its own (no prefix is shared); timestamps become milliseconds from the first.
pub fn read_azure(
    path: &Path,
    limit: Option<usize>,
    block_tokens: u32,
) -> Result<Vec<TraceLine>, BenchError> {
    let io_err = |source| BenchError::ReadTrace {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut out = Vec::new();
    let mut origin = None;
    for (i, text) in std::io::BufReader::new(file).lines().enumerate().skip(1) {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let text = text.map_err(io_err)?;
        if text.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let (ms, input_length, output_length) = parse_azure_row(&text)
            .map_err(|reason| BenchError::InvalidTraceLine { line, reason })?;
        let t0 = *origin.get_or_insert(ms);
        if ms < t0 {
            return Err(BenchError::InvalidTraceLine {
                line,
                reason: "timestamp earlier than the first row's (rows must be in time order)"
                    .into(),
            });
        }
        let blocks = input_length.div_ceil(block_tokens.max(1)).max(1);
        // Ids above 2^41 keep clear of Mooncake ids and of the synthetic workload's.
        let base = (1u64 << 41) + ((out.len() as u64) << 16);
        out.push(TraceLine {
            timestamp: (ms - t0) as u64,
            input_length,
            output_length,
            hash_ids: (0..u64::from(blocks)).map(|b| base + b).collect(),
        });
    }
    Ok(out)
}

/// `(milliseconds since 1970, context tokens, generated tokens)` of one Azure row.
fn parse_azure_row(text: &str) -> Result<(i64, u32, u32), String> {
    let mut cols = text.trim().split(',');
    let (Some(ts), Some(ctx), Some(gen_), None) =
        (cols.next(), cols.next(), cols.next(), cols.next())
    else {
        return Err(format!(
            "expected 3 columns ({AZURE_HEADER}), found {:?}",
            text.trim()
        ));
    };
    let ms = parse_timestamp(ts.trim())
        .ok_or_else(|| format!("{ts:?} is not a time like 2023-11-16 18:15:46.6805900"))?;
    let count = |what: &str, v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|e| format!("{what} {v:?} is not a token count: {e}"))
    };
    let input = count("ContextTokens", ctx)?;
    if input == 0 {
        return Err("ContextTokens is 0; a request needs a prompt".into());
    }
    Ok((ms, input, count("GeneratedTokens", gen_)?))
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` (a `T` also separates) as milliseconds since 1970 (UTC).
fn parse_timestamp(s: &str) -> Option<i64> {
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    let frac_ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        digits.parse::<i64>().ok()?
    };
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + frac_ms)
}

/// Reads up to `limit` lines of a Mooncake JSONL trace.
fn read_mooncake(
    path: &Path,
    limit: Option<usize>,
    block_tokens: u32,
) -> Result<Vec<TraceLine>, BenchError> {
    let io_err = |source| BenchError::ReadTrace {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut out = Vec::new();
    for (i, text) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let text = text.map_err(io_err)?;
        if text.trim().is_empty() {
            continue;
        }
        out.push(parse_line(&text, i + 1, block_tokens)?);
    }
    Ok(out)
}

/// A synthetic workload in trace form: `requests` requests arriving as a Poisson process of
/// `rate` req/s, spread over conversations of `turns` turns. Turn `k` of a conversation has the
/// prompt of turn `k-1`, plus an `osl`-token stand-in for its answer, plus `isl` new tokens, so
/// later turns share their predecessors' prefix. Requests are interleaved across conversations
/// (request `j` is turn `j / C` of conversation `j % C`) so that turns are spaced apart.
pub fn synthetic(
    requests: usize,
    rate: f64,
    isl: u32,
    osl: u32,
    turns: u32,
    block_tokens: u32,
    seed: u64,
) -> Vec<TraceLine> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let turns = turns.max(1) as usize;
    let conversations = requests.div_ceil(turns).max(1);
    let mut t = 0.0f64;
    (0..requests)
        .map(|j| {
            if j > 0 && rate > 0.0 {
                // Exponential inter-arrival gap; `1 - u` is in (0, 1].
                let u: f64 = rng.random();
                t += -(1.0 - u).ln() / rate;
            }
            let (conv, turn) = ((j % conversations) as u64, (j / conversations) as u32);
            let input_length = isl * (turn + 1) + osl * turn;
            let blocks = input_length.div_ceil(block_tokens).max(1);
            // Ids above 2^40 keep clear of the ids real traces use.
            let hash_ids = (0..u64::from(blocks))
                .map(|b| (1 << 40) + (seed << 48) + (conv << 20) + b)
                .collect();
            TraceLine {
                timestamp: (t * 1000.0) as u64,
                input_length,
                output_length: osl,
                hash_ids,
            }
        })
        .collect()
}

/// Turns hash ids into prompt tokens: `block_tokens` ids per hash id, drawn from a generator seeded
/// with the id over the tokenizer's vocabulary minus its special tokens.
#[derive(Debug, Clone)]
pub struct PromptTokens {
    allowed: Vec<u32>,
    block_tokens: u32,
}

impl PromptTokens {
    pub fn new(vocab_size: u32, special_token_ids: &[u32], block_tokens: u32) -> PromptTokens {
        let allowed = (0..vocab_size)
            .filter(|id| special_token_ids.binary_search(id).is_err())
            .collect();
        PromptTokens {
            allowed,
            block_tokens: block_tokens.max(1),
        }
    }

    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// The `block_tokens` token ids of one hash id: the same ids for the same hash id, always.
    pub fn block(&self, hash_id: u64) -> Vec<u32> {
        let mut rng = SmallRng::seed_from_u64(hash_id);
        (0..self.block_tokens)
            .map(|_| self.allowed[rng.random_range(0..self.allowed.len())])
            .collect()
    }

    /// The prompt of a trace line: its blocks concatenated and cut to `input_length`.
    pub fn prompt(&self, line: &TraceLine) -> Vec<u32> {
        let len = line.input_length as usize;
        let mut out = Vec::with_capacity(len);
        for &h in &line.hash_ids {
            if out.len() >= len {
                break;
            }
            out.extend(self.block(h));
        }
        out.truncate(len);
        out
    }

    /// The blocks of a trace line as `(hash_id, tokens)`, the last one cut so the total is
    /// `input_length`; used to decode a chat prompt block by block.
    pub fn blocks<'a>(&'a self, line: &'a TraceLine) -> impl Iterator<Item = Vec<u32>> + 'a {
        let len = line.input_length as usize;
        let bt = self.block_tokens as usize;
        line.hash_ids
            .iter()
            .enumerate()
            .take_while(move |(i, _)| i * bt < len)
            .map(move |(i, &h)| {
                let mut b = self.block(h);
                b.truncate(len - i * bt);
                b
            })
    }
}

/// The hit rate of one unlimited prefix cache shared by all requests, in blocks: the fraction of
/// all hash ids that an earlier request already listed. Since a hash id stands for its whole
/// prefix, a seen id means the whole prefix up to it is cached.
pub fn oracle_hit_rate(lines: &[TraceLine]) -> f64 {
    let mut seen = HashSet::new();
    let (mut hits, mut total) = (0u64, 0u64);
    for line in lines {
        for &h in &line.hash_ids {
            total += 1;
            if !seen.insert(h) {
                hits += 1;
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// When each line is due, relative to the start of the run: timestamps divided by `time_scale`,
/// measured from the first line's timestamp.
pub fn schedule(lines: &[TraceLine], time_scale: f64) -> Vec<Duration> {
    let first = lines.iter().map(|l| l.timestamp).min().unwrap_or(0);
    let scale = if time_scale > 0.0 { time_scale } else { 1.0 };
    lines
        .iter()
        .map(|l| Duration::from_secs_f64((l.timestamp - first) as f64 / 1000.0 / scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ts: u64, input: u32, ids: &[u64]) -> TraceLine {
        TraceLine {
            timestamp: ts,
            input_length: input,
            output_length: 8,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn parses_a_mooncake_line() {
        let t = parse_line(
            r#"{"timestamp": 5, "input_length": 700, "output_length": 9, "hash_ids": [0, 1]}"#,
            1,
            512,
        )
        .expect("valid line");
        assert_eq!(t, line(5, 700, &[0, 1]).with_output(9));
    }

    #[test]
    fn malformed_lines_name_their_line_number() {
        let e = parse_line(r#"{"timestamp": 5, "input_length": 7}"#, 42, 512).expect_err("invalid");
        assert!(e.to_string().contains("line 42"), "{e}");
        let e = parse_line("not json", 3, 512).expect_err("invalid");
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = parse_line(
            r#"{"timestamp": 5, "input_length": 2000, "output_length": 9, "hash_ids": [0]}"#,
            7,
            512,
        )
        .expect_err("invalid");
        assert!(e.to_string().contains("line 7"), "{e}");
    }

    #[test]
    fn lines_sharing_k_hash_ids_share_exactly_k_blocks_of_tokens() {
        let p = PromptTokens::new(8192, &[0, 1, 2], 16);
        let a = line(0, 60, &[7, 8, 9, 10]);
        let b = line(0, 50, &[7, 8, 11, 12]);
        let (pa, pb) = (p.prompt(&a), p.prompt(&b));
        assert_eq!(pa.len(), 60);
        assert_eq!(pb.len(), 50);
        let shared = pa.iter().zip(&pb).take_while(|(x, y)| x == y).count();
        assert_eq!(shared, 32);
        assert!(pa.iter().all(|t| *t > 2), "no special tokens");
        assert_eq!(p.prompt(&a), pa, "deterministic");
        let joined: Vec<u32> = p.blocks(&a).flatten().collect();
        assert_eq!(joined, pa);
    }

    #[test]
    fn azure_rows_become_requests_with_prompts_of_their_own() {
        let dir = std::env::temp_dir().join(format!("azure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("t.csv");
        std::fs::write(
            &path,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 23:59:59.5000000,374,44\n\
             2023-11-17 00:00:01.2224670,879,55\n\n",
        )
        .expect("write");
        let lines = read_trace(&path, None, 512).expect("valid trace");
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].timestamp, lines[1].timestamp), (0, 1722));
        assert_eq!((lines[1].input_length, lines[1].output_length), (879, 55));
        assert_eq!(lines[1].hash_ids.len(), 2);
        assert_eq!(oracle_hit_rate(&lines), 0.0, "no shared prefix");

        std::fs::write(
            &path,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374\n",
        )
        .expect("write");
        let e = read_trace(&path, None, 512).expect_err("two columns");
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("3 columns"),
            "{e}"
        );
        std::fs::write(
            &path,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n16/11/2023 18:15,374,4\n",
        )
        .expect("write");
        let e = read_trace(&path, None, 512).expect_err("bad time");
        assert!(e.to_string().contains("is not a time"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_shared_azure_trace_is_read_whole() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/traces/azure_conv_2023.csv");
        if !path.exists() {
            return;
        }
        let lines = read_trace(&path, None, 64).expect("valid trace");
        assert_eq!(lines.len(), 19_366);
        let last = lines.last().expect("rows").timestamp;
        assert!((3_500_000..3_600_000).contains(&last), "{last} ms");
    }

    #[test]
    fn oracle_counts_hash_ids_seen_earlier() {
        let lines = [
            line(0, 1, &[1, 2, 3]),
            line(1, 1, &[1, 2, 4]),
            line(2, 1, &[5]),
            line(3, 1, &[1, 2, 4, 6]),
        ];
        // Hits: 0 + 2 + 0 + 3 = 5 of 11 blocks.
        assert!((oracle_hit_rate(&lines) - 5.0 / 11.0).abs() < 1e-12);
        assert_eq!(oracle_hit_rate(&[]), 0.0);
    }

    #[test]
    fn synthetic_turns_extend_their_conversation() {
        let lines = synthetic(8, 100.0, 100, 20, 2, 64, 0);
        assert_eq!(lines.len(), 8);
        // 4 conversations; request 4 is turn 2 of conversation 0.
        assert_eq!(lines[4].input_length, 220);
        assert!(lines[4].hash_ids.starts_with(&lines[0].hash_ids));
        assert!(lines.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        assert!(oracle_hit_rate(&lines) > 0.0);
    }

    impl TraceLine {
        fn with_output(mut self, n: u32) -> TraceLine {
            self.output_length = n;
            self
        }
    }
}
