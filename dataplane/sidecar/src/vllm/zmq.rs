//! The ZMQ side of the vLLM ingest: subscribes to the publisher, checks sequence numbers, repairs
//! gaps from the replay socket, and appends decoded events to the sidecar's [`EventLog`].

use std::time::Duration;

use bytes::Bytes;
use dynamo_kv::KvEvent;
use dynamo_protocol::log_limit::LogLimit;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::decode::{decode_batch, to_events};
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
    /// Decodes one payload into `log`; a malformed one is counted and dropped.
    pub fn ingest(&self, log: &EventLog, seq: i64, payload: &[u8]) {
        match decode_batch(payload).and_then(to_events) {
            Ok((kinds, skipped)) => {
                self.batches.inc();
                self.events.inc_by(kinds.len() as u64);
                self.skipped.inc_by(skipped);
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
pub async fn run(
    source: ZmqSource,
    log: EventLog,
    stats: IngestStats,
    shutdown: CancellationToken,
) {
    let mut last: Option<i64> = None;
    loop {
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
        tracing::info!(endpoint = %source.endpoint, "following vLLM KV events");
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
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
            if seq > expected && (last.is_some() || source.replay.is_some()) {
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

/// Fetches batches `from..until` from the replay socket; without one (or when it fails), clears
/// the worker's blocks so the index forgets what it can no longer vouch for.
async fn recover_gap(
    source: &ZmqSource,
    log: &EventLog,
    stats: &IngestStats,
    from: i64,
    until: i64,
) {
    stats.gaps.inc();
    if let Some(endpoint) = source.replay.clone() {
        // The zeromq crate panics on some peer errors inside recv: contain that in a task.
        let fetched = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), replay(&endpoint, from)).await
        })
        .await;
        if let Ok(Ok(Ok(batches))) = fetched {
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
    }
    if let Some(suppressed) = GAP.allow() {
        tracing::warn!(
            from,
            until,
            suppressed,
            "missed vLLM KV events could not be replayed; dropping this worker's blocks from the index"
        );
    }
    log.append([KvEvent::Cleared]);
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
