//! The sidecar's event plane: numbers its engine's KV events, keeps the newest in a ring for
//! subscribers that resume after a gap, mirrors the set of blocks the engine holds so a subscriber
//! with no usable history can start from a snapshot, and fans live events out to subscribers.
//!
//! Events come from the built-in engine ([`EventLog::pump`]) or from an external engine's vLLM
//! ZMQ publisher ([`crate::vllm`]), as [`KvEvent`]s; they leave as the event plane's messages.
//! This module does not index or route; the router does.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::BuildHasherDefault,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use dynamo_kv::KvEvent;
use dynamo_kv::indexer::U64Hasher;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use dynamo_protocol::proto::{self, kv_event::Kind};

type U64Build = BuildHasherDefault<U64Hasher>;

/// A subscription's start: what to send first, and the live feed to follow it with.
pub struct Subscription {
    /// Replayed events or a snapshot; `None` when there is nothing to catch up on.
    pub head: Option<proto::KvEventBatch>,
    /// Sequence number of the last event `head` covers; live events at or below it are skipped.
    pub last: u64,
    pub live: broadcast::Receiver<Arc<Vec<proto::KvEvent>>>,
}

/// Numbers KV events, keeps the last `cap` for replay, and mirrors the engine's block set.
#[derive(Clone)]
pub struct EventLog {
    /// Random per engine incarnation, sent with every batch (see `KvEventBatch.instance`): new
    /// for each process, and again when an external engine restarts ([`EventLog::restart`]).
    instance: Arc<AtomicU64>,
    /// Tokens per block (an external engine's is known once it answers, or from its events).
    block_size: Arc<AtomicU32>,
    inner: Arc<Mutex<Ring>>,
    live: broadcast::Sender<Arc<Vec<proto::KvEvent>>>,
}

struct Ring {
    next_seq: u64,
    events: VecDeque<proto::KvEvent>,
    cap: usize,
    mirror: Mirror,
}

/// The blocks the engine holds, as its events describe them: sequence hash → parent, local hash and
/// the order it was stored in.
#[derive(Default)]
struct Mirror {
    blocks: HashMap<u64, MirrorBlock, U64Build>,
    stored: u64,
    /// Since a [`KvEvent::Unknown`] and until a [`KvEvent::Cleared`]: the engine may hold blocks
    /// no event described, so a snapshot starts by saying so.
    unknown: bool,
}

#[derive(Clone, Copy)]
struct MirrorBlock {
    parent: Option<u64>,
    local: u64,
    order: u64,
}

impl Mirror {
    fn apply(&mut self, event: &KvEvent) {
        match event {
            KvEvent::Stored {
                parent_hash,
                blocks,
            } => {
                let mut parent = *parent_hash;
                for b in blocks {
                    self.stored += 1;
                    self.blocks.insert(
                        b.block_hash,
                        MirrorBlock {
                            parent,
                            local: b.tokens_hash,
                            order: self.stored,
                        },
                    );
                    parent = Some(b.block_hash);
                }
            }
            KvEvent::Removed { block_hashes } => {
                for h in block_hashes {
                    self.blocks.remove(h);
                }
            }
            KvEvent::Cleared => {
                self.blocks.clear();
                self.unknown = false;
            }
            KvEvent::Unknown => {
                self.blocks.clear();
                self.unknown = true;
            }
        }
    }

    /// One `stored` event per block reachable from a root, every block after its parent. Blocks whose
    /// parent the engine no longer holds cannot extend any prefix match and are left out.
    fn snapshot(&self, seq: u64) -> Vec<proto::KvEvent> {
        let mut order: Vec<(&u64, &MirrorBlock)> = self.blocks.iter().collect();
        order.sort_unstable_by_key(|(_, b)| b.order);
        let mut emitted: HashSet<u64, U64Build> = HashSet::default();
        // Children seen before their parent (re-stored later), waiting for it.
        let mut waiting: HashMap<u64, Vec<u64>, U64Build> = HashMap::default();
        let mut out = Vec::with_capacity(order.len() + 1);
        if self.unknown {
            out.push(proto::KvEvent {
                seq,
                kind: Some(Kind::Unknown(proto::KvUnknown {})),
            });
        }
        let event = |hash: u64, b: &MirrorBlock| proto::KvEvent {
            seq,
            kind: Some(Kind::Stored(proto::KvStored {
                parent_hash: b.parent,
                blocks: vec![proto::StoredBlock {
                    block_hash: hash,
                    tokens_hash: b.local,
                }],
            })),
        };
        for (&hash, b) in order {
            let ready = match b.parent {
                None => true,
                Some(p) => emitted.contains(&p),
            };
            if !ready {
                if let Some(p) = b.parent.filter(|p| self.blocks.contains_key(p)) {
                    waiting.entry(p).or_default().push(hash);
                }
                continue;
            }
            let mut stack = vec![hash];
            while let Some(h) = stack.pop() {
                if !emitted.insert(h) {
                    continue;
                }
                if let Some(block) = self.blocks.get(&h) {
                    out.push(event(h, block));
                }
                if let Some(children) = waiting.remove(&h) {
                    stack.extend(children);
                }
            }
        }
        out
    }
}

impl EventLog {
    pub fn new(cap: usize, block_size: u32) -> EventLog {
        let (live, _) = broadcast::channel(1024);
        EventLog {
            instance: Arc::new(AtomicU64::new(rand::random())),
            block_size: Arc::new(AtomicU32::new(block_size)),
            inner: Arc::new(Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(cap.min(1 << 16)),
                cap: cap.max(1),
                mirror: Mirror::default(),
            })),
            live,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size.load(Ordering::Relaxed)
    }

    /// Sets the block size batches carry (an external engine's, once known).
    pub fn set_block_size(&self, block_size: u32) {
        if block_size > 0 {
            self.block_size.store(block_size, Ordering::Relaxed);
        }
    }

    /// This incarnation's number (`KvEventBatch.instance`, `WorkerInfo.instance_id`).
    pub fn instance(&self) -> u64 {
        self.instance.load(Ordering::Relaxed)
    }

    /// The engine restarted with an empty cache: a new instance number (routers make it a new
    /// member and drop the old one's blocks), no history and no blocks. Subscribers of the old
    /// instance see their stream end.
    pub fn restart(&self) {
        let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        ring.events.clear();
        ring.mirror = Mirror::default();
        self.instance.store(rand::random(), Ordering::Relaxed);
    }

    /// Numbers `events`, records them and sends them to live subscribers as one batch.
    pub fn append(&self, events: impl IntoIterator<Item = KvEvent>) {
        let mut batch = Vec::new();
        {
            let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            for event in events {
                let seq = ring.next_seq;
                ring.next_seq += 1;
                ring.mirror.apply(&event);
                let e = proto::KvEvent {
                    seq,
                    kind: Some(Kind::from(event)),
                };
                if ring.events.len() == ring.cap {
                    ring.events.pop_front();
                }
                ring.events.push_back(e.clone());
                batch.push(e);
            }
        }
        if !batch.is_empty() {
            // No subscriber is fine: the ring still holds the events.
            let _ = self.live.send(Arc::new(batch));
        }
    }

    /// Forwards the built-in engine's events until its channel closes.
    pub async fn pump(self, mut rx: mpsc::UnboundedReceiver<KvEvent>) {
        let mut events = Vec::new();
        while let Some(first) = rx.recv().await {
            events.push(first);
            while let Ok(next) = rx.try_recv() {
                events.push(next);
            }
            self.append(events.drain(..));
        }
    }

    /// Blocks the engine holds now.
    pub fn mirrored_blocks(&self) -> usize {
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        ring.mirror.blocks.len()
    }

    /// Starts a subscription after `after` (0: from now on). When those events are not buffered
    /// (or `after` is from an earlier incarnation of this worker), `snapshot` decides between a
    /// snapshot of the block set and an OUT_OF_RANGE error.
    pub fn subscribe(&self, after: u64, snapshot: bool) -> Result<Subscription, Status> {
        // Subscribe before reading the backlog so nothing falls between the two.
        let live = self.live.subscribe();
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let head_seq = ring.next_seq - 1;
        let oldest = ring.events.front().map_or(ring.next_seq, |e| e.seq);
        let replayable = after > 0 && after <= head_seq && after + 1 >= oldest;
        let batch = |events, snapshot| proto::KvEventBatch {
            block_size: self.block_size(),
            events,
            instance: self.instance(),
            snapshot,
            snapshot_seq: if snapshot { head_seq } else { 0 },
        };
        if replayable {
            let backlog: Vec<_> = ring
                .events
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect();
            let head = (!backlog.is_empty()).then(|| batch(backlog, false));
            return Ok(Subscription {
                head,
                last: head_seq,
                live,
            });
        }
        if snapshot {
            return Ok(Subscription {
                head: Some(batch(ring.mirror.snapshot(head_seq), true)),
                last: head_seq,
                live,
            });
        }
        if after == 0 {
            return Ok(Subscription {
                head: None,
                last: head_seq,
                live,
            });
        }
        Err(if after > head_seq {
            // A subscriber of an earlier incarnation of this worker (it restarted): its view is stale.
            Status::out_of_range(format!(
                "after_seq {after} is ahead of this worker's newest event ({head_seq}); the worker restarted: drop its blocks and resubscribe with snapshot = true"
            ))
        } else {
            Status::out_of_range(format!(
                "events after {after} are no longer buffered (oldest is {oldest}); resubscribe with snapshot = true"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent::stored(parent, hashes.iter().map(|&h| (h + 1000, h)))
    }

    fn removed(hashes: &[u64]) -> KvEvent {
        KvEvent::Removed {
            block_hashes: hashes.to_vec(),
        }
    }

    fn stored_hashes(batch: &proto::KvEventBatch) -> Vec<(Option<u64>, u64)> {
        batch
            .events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Stored(s)) => Some((s.parent_hash, s.blocks[0].block_hash)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn resume_within_the_ring_replays_exactly_the_missed_events() {
        let log = EventLog::new(8, 64);
        log.append([stored(None, &[1, 2]), stored(Some(2), &[3]), removed(&[3])]);
        let sub = log.subscribe(1, true).expect("replayable");
        let head = sub.head.expect("a backlog");
        assert!(!head.snapshot);
        assert_eq!(
            head.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(sub.last, 3);
    }

    #[test]
    fn gap_older_than_the_ring_gets_a_snapshot_of_the_current_blocks() {
        let log = EventLog::new(2, 64);
        log.append([
            stored(None, &[1, 2, 3]),
            stored(None, &[10]),
            removed(&[3]),
            stored(Some(10), &[11]),
        ]);
        assert!(log.subscribe(1, false).is_err(), "no snapshot asked: error");
        let sub = log.subscribe(1, true).expect("snapshot");
        let head = sub.head.expect("a snapshot");
        assert!(head.snapshot);
        assert_eq!(head.snapshot_seq, 4);
        assert_eq!(
            stored_hashes(&head),
            [(None, 1), (Some(1), 2), (None, 10), (Some(10), 11)]
        );
        assert!(head.events.iter().all(|e| e.seq == 4));
    }

    #[test]
    fn snapshot_puts_a_re_stored_parent_before_its_children_and_skips_orphans() {
        let log = EventLog::new(64, 64);
        log.append([
            stored(None, &[1, 2, 3]),
            removed(&[1]),
            stored(None, &[1]),
            // 5's parent 4 is gone: unreachable.
            stored(None, &[4, 5]),
            removed(&[4]),
        ]);
        let sub = log.subscribe(0, true).expect("snapshot");
        assert_eq!(
            stored_hashes(&sub.head.expect("a snapshot")),
            [(None, 1), (Some(1), 2), (Some(2), 3)]
        );
        assert_eq!(log.mirrored_blocks(), 4);
    }

    #[test]
    fn a_subscriber_from_an_earlier_incarnation_is_told_to_snapshot() {
        let log = EventLog::new(8, 64);
        log.append([stored(None, &[1])]);
        let err = log.subscribe(99, false).err().expect("refused");
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(
            err.message().contains("snapshot = true"),
            "{}",
            err.message()
        );
        let sub = log.subscribe(99, true).expect("snapshot");
        assert_eq!(stored_hashes(&sub.head.expect("a snapshot")), [(None, 1)]);
    }

    #[test]
    fn cleared_empties_the_mirror() {
        let log = EventLog::new(8, 64);
        log.append([stored(None, &[1, 2]), KvEvent::Cleared]);
        assert_eq!(log.mirrored_blocks(), 0);
        let sub = log.subscribe(0, true).expect("snapshot");
        assert!(sub.head.expect("a snapshot").events.is_empty());
    }

    #[test]
    fn an_unknown_cache_is_in_the_snapshot_until_cleared() {
        let log = EventLog::new(8, 32);
        log.append([stored(None, &[1]), KvEvent::Unknown, stored(None, &[2])]);
        let head = log
            .subscribe(0, true)
            .expect("snapshot")
            .head
            .expect("a snapshot");
        assert!(matches!(head.events[0].kind, Some(Kind::Unknown(_))));
        assert_eq!(
            stored_hashes(&head),
            [(None, 2)],
            "blocks stored after it are known"
        );
        log.append([KvEvent::Cleared]);
        let head = log
            .subscribe(0, true)
            .expect("snapshot")
            .head
            .expect("a snapshot");
        assert!(head.events.is_empty());
    }

    #[test]
    fn a_restart_is_a_new_instance_without_history_or_blocks() {
        let log = EventLog::new(8, 0);
        log.append([stored(None, &[1, 2])]);
        let before = log.instance();
        log.set_block_size(32);
        log.restart();
        assert_ne!(log.instance(), before);
        assert_eq!(log.mirrored_blocks(), 0);
        let head = log
            .subscribe(0, true)
            .expect("snapshot")
            .head
            .expect("a snapshot");
        assert_eq!(
            (head.block_size, head.instance, head.events.len()),
            (32, log.instance(), 0)
        );
    }
}
