//! The dynamo-rs wire protocol: the worker's gRPC service (`dynamo.worker.v1`: request plane
//! `Generate`, event plane `SubscribeKvEvents`, `Info`/`Load`), conversions between the event
//! plane's messages and the one KV event type ([`dynamo_kv::KvEvent`]), [`net`], the accept loop
//! and shutdown signal every data-plane process serves with, and [`log_limit`], bounded logging of
//! bad input.
//!
//! It owns no policy and no engine: what a worker does with a request is the sidecar's business,
//! where a request goes is the frontend's.

pub mod log_limit;
pub mod net;
pub mod proto;

use dynamo_kv::{KvEvent, StoredBlock};

use crate::proto::kv_event::Kind;

impl From<KvEvent> for Kind {
    fn from(event: KvEvent) -> Kind {
        match event {
            KvEvent::Stored {
                parent_hash,
                blocks,
            } => Kind::Stored(proto::KvStored {
                parent_hash,
                blocks: blocks
                    .into_iter()
                    .map(|b| proto::StoredBlock {
                        block_hash: b.block_hash,
                        tokens_hash: b.tokens_hash,
                    })
                    .collect(),
            }),
            KvEvent::Removed { block_hashes } => Kind::Removed(proto::KvRemoved { block_hashes }),
            KvEvent::Cleared => Kind::Cleared(proto::KvCleared {}),
            KvEvent::Unknown => Kind::Unknown(proto::KvUnknown {}),
        }
    }
}

impl From<Kind> for KvEvent {
    fn from(kind: Kind) -> KvEvent {
        match kind {
            Kind::Stored(s) => KvEvent::Stored {
                parent_hash: s.parent_hash,
                blocks: s
                    .blocks
                    .into_iter()
                    .map(|b| StoredBlock {
                        block_hash: b.block_hash,
                        tokens_hash: b.tokens_hash,
                    })
                    .collect(),
            },
            Kind::Removed(r) => KvEvent::Removed {
                block_hashes: r.block_hashes,
            },
            Kind::Cleared(_) => KvEvent::Cleared,
            Kind::Unknown(_) => KvEvent::Unknown,
        }
    }
}

impl proto::KvEvent {
    /// The event this message carries; `None` for a message without one (a newer kind this build
    /// does not know).
    pub fn into_event(self) -> Option<KvEvent> {
        self.kind.map(KvEvent::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_survives_the_wire_unchanged() {
        let events = [
            KvEvent::stored(Some(7), [(1, 2), (3, 4)]),
            KvEvent::stored(None, []),
            KvEvent::Removed {
                block_hashes: vec![2, 4],
            },
            KvEvent::Cleared,
            KvEvent::Unknown,
        ];
        for event in events {
            let wire = proto::KvEvent {
                seq: 1,
                kind: Some(event.clone().into()),
            };
            assert_eq!(wire.into_event(), Some(event));
        }
        assert_eq!(proto::KvEvent { seq: 1, kind: None }.into_event(), None);
    }
}
