//! The ZMQ side of the vLLM ingest: subscribes to the publisher, checks sequence numbers, repairs
//! gaps from the replay socket, and appends decoded events to the sidecar's [`EventLog`].

use std::time::Duration;

use bytes::Bytes;
use dynamo_kv::KvEvent;
use dynamo_protocol::log_limit::LogLimit;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::decode::{VllmEvent, decode_batch, to_events};
use crate::event_log::EventLog;

// Bad input is counted in full (`IngestStats`) and logged at a bounded rate: the first 10 of each
// kind, then one line per 10 s with the number left out.
static MALFORMED_BATCH: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static MALFORMED_FRAMES: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static STREAM_BROKE: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static GAP: LogLimit = LogLimit::new(10, Duration::from_secs(10));

/// Counters of the ingest, registered on the sidecar's `/metrics`.
#[derive(Clone, Default)]
pub struct IngestStats {
    pub batches: Counter,
    pub events: Counter,
    pub skipped: Counter,
    pub malformed: Counter,
    pub gaps: Counter,
    /// Times the engine's cache became unknown (events lost beyond replay).
    pub unknown: Counter,
}

/// Where to read vLLM's events.
#[derive(Debug, Clone)]
pub struct ZmqSource {
    /// The publisher's PUB endpoint, e.g. `tcp://127.0.0.1:5557`.
    pub endpoint: String,
    /// The publisher's ROUTER replay endpoint, if it has one.
    pub replay: Option<String>,
    /// Topic prefix to subscribe to (vLLM's default is empty).
    pub topic: String,
}

/// One message's sequence number and payload; `None` when the frames are not vLLM's shape.
fn split_frames(message: ZmqMessage) -> Option<(i64, Bytes)> {
    let mut frames = message.into_vec();
    let payload = frames.pop()?;
    let seq = frames.pop()?;
    let seq: [u8; 8] = seq.as_ref().try_into().ok()?;
    Some((i64::from_be_bytes(seq), payload))
}

impl IngestStats {
    /// Decodes one payload into `log`; a malformed one is counted and dropped. The log's block
    /// size follows the engine's stored blocks.
    pub fn ingest(&self, log: &EventLog, seq: i64, payload: &[u8]) {
        let decoded = decode_batch(payload).and_then(|events| {
            let block_size = events.iter().find_map(|e| match e {
                VllmEvent::Stored { block_size, .. } => Some(*block_size),
                _ => None,
            });
            to_events(events).map(|r| (r, block_size))
        });
        match decoded {
            Ok(((kinds, skipped), block_size)) => {
                self.batches.inc();
                self.events.inc_by(kinds.len() as u64);
                self.skipped.inc_by(skipped);
                if let Some(bs) = block_size {
                    log.set_block_size(bs);
                }
                log.append(kinds);
            }
            Err(error) => {
                self.malformed.inc();
                if let Some(suppressed) = MALFORMED_BATCH.allow() {
                    tracing::warn!(seq, %error, bytes = payload.len(), suppressed, "skipping a malformed vLLM KV event batch");
                }
            }
        }
    }
}

/// Reads `source` into `log` until `shutdown`, reconnecting after errors.
///
/// With `epochs` (an engine the sidecar watches, `--engine vllm`), it starts once the engine
/// serves and starts over on each engine restart. On every (re)connect it first asks the replay
/// socket for everything after the last sequence number it applied (from 0 for a new engine), so
/// blocks cached before the subscription was live are not missed. When the publisher no longer
/// buffers that far back, or there is no replay socket to ask, the worker's cache is marked
/// unknown ([`KvEvent::Unknown`]) until the engine clears it or restarts.
pub async fn run(
    source: ZmqSource,
    log: EventLog,
    stats: IngestStats,
    mut epochs: Option<watch::Receiver<u64>>,
    shutdown: CancellationToken,
) {
    let mut last: Option<i64> = None;
    let mut epoch = 0;
    loop {
        if let Some(rx) = &mut epochs {
            let now = tokio::select! {
                () = shutdown.cancelled() => return,
                r = rx.wait_for(|&e| e > 0) => match r {
                    Ok(e) => *e,
                    Err(_) => return,
                },
            };
            rx.mark_unchanged();
            if now != epoch {
                // A new engine incarnation numbers its events from 0 again.
                epoch = now;
                last = None;
            }
        }
        let mut socket = zeromq::SubSocket::new();
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            r = socket.connect(&source.endpoint) => r,
        };
        if let Err(error) = connected {
            tracing::warn!(endpoint = %source.endpoint, %error, "cannot connect to the vLLM KV event publisher; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        if let Err(error) = socket.subscribe(&source.topic).await {
            tracing::warn!(%error, "cannot subscribe to vLLM KV events; retrying");
            continue;
        }
        tracing::info!(endpoint = %source.endpoint, replay = ?source.replay, "following vLLM KV events");
        if source.replay.is_some() {
            let from = last.map_or(0, |l| l + 1);
            last = catch_up(&source, &log, &stats, from).await.or(last);
        }
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                () = engine_restarted(&mut epochs) => break,
                m = socket.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(error) => {
                    if let Some(suppressed) = STREAM_BROKE.allow() {
                        tracing::warn!(%error, suppressed, "vLLM KV event stream broke; reconnecting");
                    }
                    break;
                }
            };
            let Some((seq, payload)) = split_frames(message) else {
                stats.malformed.inc();
                if let Some(suppressed) = MALFORMED_FRAMES.allow() {
                    tracing::warn!(
                        suppressed,
                        "skipping a vLLM KV event message without [topic, seq, payload] frames"
                    );
                }
                continue;
            };
            let expected = last.map_or(0, |l| l + 1);
            if seq > expected {
                recover_gap(&source, &log, &stats, expected, seq).await;
            }
            if last.is_some_and(|l| seq <= l) {
                if seq != 0 {
                    continue; // already applied (a replayed batch)
                }
                // The publisher restarted, and its engine's cache with it.
                log.append([KvEvent::Cleared]);
            }
            stats.ingest(&log, seq, &payload);
            last = Some(seq);
        }
    }
}

/// Resolves when the watched engine restarts (never without one).
async fn engine_restarted(epochs: &mut Option<watch::Receiver<u64>>) {
    match epochs {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Applies what the replay socket still holds from `from` on; returns the last sequence number
/// applied. What it cannot fetch, or what no longer reaches back to `from`, makes the worker's
/// cache unknown.
async fn catch_up(
    source: &ZmqSource,
    log: &EventLog,
    stats: &IngestStats,
    from: i64,
) -> Option<i64> {
    source.replay.as_ref()?;
    let Some(batches) = fetch_replay(source, from).await else {
        stats.gaps.inc();
        mark_unknown(log, stats);
        tracing::warn!(
            replay = ?source.replay,
            from,
            "the vLLM KV event replay socket did not answer: the blocks this engine cached before now are unknown; routing to it learns from its own decisions until the engine clears its cache or restarts (check --vllm-kv-events-replay against the engine's replay_endpoint)"
        );
        return None;
    };
    let mut last = None;
    if let Some(&(first, _)) = batches.first()
        && first > from
    {
        stats.gaps.inc();
        mark_unknown(log, stats);
        tracing::warn!(
            from,
            oldest = first,
            "the vLLM KV event replay buffer no longer reaches back to what this sidecar missed: this engine's cache is unknown until it clears or restarts; routing to it learns from its own decisions meanwhile (a larger buffer_steps in --kv-events-config keeps more)"
        );
    }
    let replayed = batches.len();
    for (seq, payload) in batches {
        if last.is_none_or(|l| seq > l) {
            stats.ingest(log, seq, &payload);
            last = Some(seq);
        }
    }
    tracing::info!(
        from,
        replayed,
        "caught up with the vLLM KV event replay buffer"
    );
    last
}

/// The replay socket's batches from `from` on; `None` without a replay socket, or when it fails
/// or does not answer within 5 s.
async fn fetch_replay(source: &ZmqSource, from: i64) -> Option<Vec<(i64, Bytes)>> {
    let endpoint = source.replay.clone()?;
    // The zeromq crate panics on some peer errors inside recv: contain that in a task.
    let fetched = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), replay(&endpoint, from)).await
    })
    .await;
    match fetched {
        Ok(Ok(Ok(batches))) => Some(batches),
        _ => None,
    }
}

/// Events were lost beyond replay: the engine may hold blocks no event described.
fn mark_unknown(log: &EventLog, stats: &IngestStats) {
    stats.unknown.inc();
    log.append([KvEvent::Unknown]);
}

/// Fetches batches `from..until` from the replay socket; without one (or when it fails), the
/// worker's cache is unknown: the index forgets what it can no longer vouch for.
async fn recover_gap(
    source: &ZmqSource,
    log: &EventLog,
    stats: &IngestStats,
    from: i64,
    until: i64,
) {
    stats.gaps.inc();
    if let Some(batches) = fetch_replay(source, from).await {
        let mut next = from;
        for (seq, payload) in batches {
            if seq == next && seq < until {
                stats.ingest(log, seq, &payload);
                next += 1;
            }
        }
        if next == until {
            if let Some(suppressed) = GAP.allow() {
                tracing::info!(
                    from,
                    until,
                    suppressed,
                    "recovered missed vLLM KV events from the replay socket"
                );
            }
            return;
        }
    }
    if let Some(suppressed) = GAP.allow() {
        tracing::warn!(
            from,
            until,
            suppressed,
            "missed vLLM KV events could not be replayed: this worker's cache is unknown until the engine clears it or restarts"
        );
    }
    mark_unknown(log, stats);
}

async fn replay(endpoint: &str, from: i64) -> zeromq::ZmqResult<Vec<(i64, Bytes)>> {
    let mut socket = zeromq::DealerSocket::new();
    socket.connect(endpoint).await?;
    let request: ZmqMessage = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]
        .try_into()
        .map_err(|_| zeromq::ZmqError::NoMessage)?;
    socket.send(request).await?;
    let mut out = Vec::new();
    loop {
        let Some((seq, payload)) = split_frames(socket.recv().await?) else {
            continue;
        };
        if seq < 0 {
            return Ok(out);
        }
        out.push((seq, payload));
    }
}
