//! Decoding one vLLM KV-event payload (untrusted bytes from the network) into [`KvEvent`]s. No I/O:
//! the socket side is [`super::zmq`].

use dynamo_kv::{KvEvent, StoredBlock};
use rmpv::Value;

/// What can be wrong with one payload. Static messages: this runs per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not msgpack")]
    NotMsgpack,
    #[error("payload is not a KVEventBatch (ts, events, data_parallel_rank)")]
    NotABatch,
    #[error("event is not a tagged BlockStored / BlockRemoved / AllBlocksCleared")]
    UnknownEvent,
    #[error("event field has the wrong type")]
    BadField,
    #[error("BlockStored token_ids do not fill its block_hashes at block_size")]
    TokenCountMismatch,
}

/// One vLLM event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VllmEvent {
    Stored {
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        /// A LoRA adapter (`lora_id` or `lora_name`) is set.
        lora: bool,
        medium: Option<String>,
    },
    Removed {
        block_hashes: Vec<u64>,
        medium: Option<String>,
    },
    Cleared,
}

const STORED_FIELDS: [&str; 7] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
];
const REMOVED_FIELDS: [&str; 2] = ["block_hashes", "medium"];

/// Decodes one `KVEventBatch` payload.
pub fn decode_batch(mut payload: &[u8]) -> Result<Vec<VllmEvent>, DecodeError> {
    let value = rmpv::decode::read_value(&mut payload).map_err(|_| DecodeError::NotMsgpack)?;
    let events = match &value {
        Value::Array(fields) => fields.get(1),
        Value::Map(_) => field(&value, "events"),
        _ => None,
    };
    let Some(Value::Array(events)) = events else {
        return Err(DecodeError::NotABatch);
    };
    events.iter().map(decode_event).collect()
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    match map {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// The event's tag and its fields in declaration order (absent trailing fields are `None`).
fn tagged<'a, const N: usize>(
    event: &'a Value,
    names: &[&str; N],
) -> Result<[Option<&'a Value>; N], DecodeError> {
    let mut out = [None; N];
    match event {
        Value::Array(items) => {
            for (slot, v) in out.iter_mut().zip(items.iter().skip(1)) {
                *slot = Some(v);
            }
        }
        Value::Map(_) => {
            for (slot, name) in out.iter_mut().zip(names) {
                *slot = field(event, name);
            }
        }
        _ => return Err(DecodeError::UnknownEvent),
    }
    Ok(out)
}

fn tag(event: &Value) -> Option<&str> {
    match event {
        Value::Array(items) => items.first().and_then(Value::as_str),
        Value::Map(_) => field(event, "type").and_then(Value::as_str),
        _ => None,
    }
}

fn decode_event(event: &Value) -> Result<VllmEvent, DecodeError> {
    match tag(event).ok_or(DecodeError::UnknownEvent)? {
        "BlockStored" => {
            let [
                hashes,
                parent,
                tokens,
                block_size,
                lora_id,
                medium,
                lora_name,
            ] = tagged(event, &STORED_FIELDS)?;
            let token_ids = match tokens {
                Some(Value::Array(ts)) => ts
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or(DecodeError::BadField)?,
                _ => return Err(DecodeError::BadField),
            };
            let block_size = block_size
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|&b| b > 0)
                .ok_or(DecodeError::BadField)?;
            Ok(VllmEvent::Stored {
                block_hashes: hash_list(hashes)?,
                parent: optional_hash(parent)?,
                token_ids,
                block_size,
                lora: !is_nil(lora_id) || !is_nil(lora_name),
                medium: optional_str(medium)?,
            })
        }
        "BlockRemoved" => {
            let [hashes, medium] = tagged(event, &REMOVED_FIELDS)?;
            Ok(VllmEvent::Removed {
                block_hashes: hash_list(hashes)?,
                medium: optional_str(medium)?,
            })
        }
        "AllBlocksCleared" => Ok(VllmEvent::Cleared),
        _ => Err(DecodeError::UnknownEvent),
    }
}

fn is_nil(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_nil)
}

fn hash(v: &Value) -> Result<u64, DecodeError> {
    match v {
        // Python ints: vLLM's builtin-hash modes can be negative; keep the bits.
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or(DecodeError::BadField),
        Value::Binary(b) => Ok(xxhash_rust::xxh3::xxh3_64(b)),
        _ => Err(DecodeError::BadField),
    }
}

fn hash_list(v: Option<&Value>) -> Result<Vec<u64>, DecodeError> {
    match v {
        Some(Value::Array(items)) => items.iter().map(hash).collect(),
        _ => Err(DecodeError::BadField),
    }
}

fn optional_hash(v: Option<&Value>) -> Result<Option<u64>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(h) => hash(h).map(Some),
    }
}

fn optional_str(v: Option<&Value>) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => s
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or(DecodeError::BadField),
        Some(_) => Err(DecodeError::BadField),
    }
}

fn on_gpu(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("gpu"))
}

/// Turns decoded events into [`KvEvent`]s; returns them and how many were skipped
/// (other medium, LoRA).
pub fn to_events(events: Vec<VllmEvent>) -> Result<(Vec<KvEvent>, u64), DecodeError> {
    let mut kinds = Vec::with_capacity(events.len());
    let mut skipped = 0;
    for event in events {
        match event {
            VllmEvent::Stored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora,
                medium,
            } => {
                if lora || !on_gpu(medium.as_deref()) {
                    skipped += 1;
                    continue;
                }
                let bs = block_size as usize;
                if token_ids.len() != block_hashes.len() * bs {
                    return Err(DecodeError::TokenCountMismatch);
                }
                let blocks = block_hashes
                    .iter()
                    .zip(token_ids.chunks_exact(bs))
                    .map(|(&h, tokens)| StoredBlock {
                        block_hash: h,
                        tokens_hash: dynamo_kv::local_block_hash(tokens),
                    })
                    .collect();
                kinds.push(KvEvent::Stored {
                    parent_hash: parent,
                    blocks,
                });
            }
            VllmEvent::Removed {
                block_hashes,
                medium,
            } => {
                if !on_gpu(medium.as_deref()) {
                    skipped += 1;
                    continue;
                }
                kinds.push(KvEvent::Removed { block_hashes });
            }
            VllmEvent::Cleared => kinds.push(KvEvent::Cleared),
        }
    }
    Ok((kinds, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encodes");
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    fn ints(xs: &[u64]) -> Value {
        Value::Array(xs.iter().map(|&x| Value::from(x)).collect())
    }

    #[test]
    fn array_like_batch_decodes_and_hashes_each_block_locally() {
        let tokens: Vec<u64> = (0..8).collect();
        let batch = Value::Array(vec![
            Value::from(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[11, 12]),
                    Value::Nil,
                    ints(&tokens),
                    Value::from(4),
                    Value::Nil,
                    s("GPU"),
                ]),
                Value::Array(vec![s("BlockRemoved"), ints(&[11]), Value::Nil]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
            Value::from(0),
        ]);
        let events = decode_batch(&encode(&batch)).expect("decodes");
        let (kinds, skipped) = to_events(events).expect("valid");
        assert_eq!(skipped, 0);
        let KvEvent::Stored {
            parent_hash,
            blocks,
        } = &kinds[0]
        else {
            panic!("{kinds:?}")
        };
        assert_eq!(*parent_hash, None);
        assert_eq!(blocks[0].block_hash, 11);
        assert_eq!(
            blocks[1].tokens_hash,
            dynamo_kv::local_block_hash(&[4, 5, 6, 7])
        );
        assert!(matches!(&kinds[1], KvEvent::Removed { block_hashes } if block_hashes == &[11]));
        assert!(matches!(&kinds[2], KvEvent::Cleared));
    }

    #[test]
    fn map_like_batch_with_bytes_hashes_decodes() {
        let stored = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![7; 32])]),
            ),
            (s("parent_block_hash"), Value::Binary(vec![1; 32])),
            (s("token_ids"), ints(&[1, 2])),
            (s("block_size"), Value::from(2)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s("GPU")),
            (s("lora_name"), Value::Nil),
        ]);
        let batch = Value::Map(vec![
            (s("ts"), Value::from(2.0)),
            (s("events"), Value::Array(vec![stored])),
        ]);
        let events = decode_batch(&encode(&batch)).expect("decodes");
        assert_eq!(
            events,
            [VllmEvent::Stored {
                block_hashes: vec![xxhash_rust::xxh3::xxh3_64(&[7; 32])],
                parent: Some(xxhash_rust::xxh3::xxh3_64(&[1; 32])),
                token_ids: vec![1, 2],
                block_size: 2,
                lora: false,
                medium: Some("GPU".into()),
            }]
        );
    }

    #[test]
    fn cpu_tier_and_lora_events_are_skipped() {
        let events = vec![
            VllmEvent::Removed {
                block_hashes: vec![1],
                medium: Some("CPU".into()),
            },
            VllmEvent::Stored {
                block_hashes: vec![1],
                parent: None,
                token_ids: vec![1],
                block_size: 1,
                lora: true,
                medium: None,
            },
        ];
        let (kinds, skipped) = to_events(events).expect("valid");
        assert!(kinds.is_empty());
        assert_eq!(skipped, 2);
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        assert_eq!(decode_batch(&[0x92, 0x01]), Err(DecodeError::NotMsgpack));
        // A 4-billion-element array header with nothing behind it: no huge allocation, an error.
        assert_eq!(
            decode_batch(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::NotMsgpack)
        );
        assert_eq!(
            decode_batch(&encode(&Value::from(3))),
            Err(DecodeError::NotABatch)
        );
        let unknown = Value::Array(vec![
            Value::from(0.0),
            Value::Array(vec![Value::Array(vec![s("Nope")])]),
        ]);
        assert_eq!(
            decode_batch(&encode(&unknown)),
            Err(DecodeError::UnknownEvent)
        );
        let short = Value::Array(vec![
            Value::from(0.0),
            Value::Array(vec![Value::Array(vec![
                s("BlockStored"),
                ints(&[1, 2]),
                Value::Nil,
                ints(&[1, 2, 3]),
                Value::from(2),
            ])]),
        ]);
        let events = decode_batch(&encode(&short)).expect("decodes");
        assert_eq!(to_events(events), Err(DecodeError::TokenCountMismatch));
        let bad_token = Value::Array(vec![
            Value::from(0.0),
            Value::Array(vec![Value::Array(vec![
                s("BlockStored"),
                ints(&[1]),
                Value::Nil,
                Value::Array(vec![s("x")]),
                Value::from(1),
            ])]),
        ]);
        assert_eq!(
            decode_batch(&encode(&bad_token)),
            Err(DecodeError::BadField)
        );
    }

    fn valid_payload() -> Vec<u8> {
        encode(&Value::Array(vec![
            Value::from(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[11, 12]),
                    Value::from(3),
                    ints(&[1, 2, 3, 4]),
                    Value::from(2),
                    Value::Nil,
                    s("GPU"),
                ]),
                Value::Array(vec![s("BlockRemoved"), ints(&[11]), Value::Nil]),
            ]),
        ]))
    }

    proptest::proptest! {
        /// Untrusted bytes from the network: any input decodes or errors, never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_batch(&bytes).and_then(to_events);
        }

        /// A valid batch with bytes flipped or cut short decodes or errors, never panics.
        #[test]
        fn corrupted_batches_never_panic(
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..8),
            cut in 0usize..64,
        ) {
            let mut bytes = valid_payload();
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] = b;
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 8));
            let _ = decode_batch(&bytes).and_then(to_events);
        }
    }
}
