//! The fixed-size frames of the TCP and shared-memory protocols, kept apart from the sockets so the
//! decoder of untrusted bytes can be tested on its own. All integers little-endian.
//!
//! ```text
//! request   op u8 | 0 u8 x3 | count u32 | pool u64 | block_bytes u64        (24 bytes)
//!           READ: then count x block id u32
//! response  status u8 | 0 u8 x3 | block u32 | a u64 | b u64                (24 bytes)
//!           READ ok: a = total bytes, then the blocks' bytes back to back in request order
//!           MAP ok:  a = block_bytes, b = num_blocks, the memfd attached (SCM_RIGHTS)
//!           refused: status = RemoteError code, block = offending block or u32::MAX
//! ```

use crate::descriptor::PoolId;
use crate::error::RemoteError;

pub(crate) const HEADER_LEN: usize = 24;
/// The most blocks one READ may name (4 MiB of ids); more is refused with `TooManyBlocks`.
pub(crate) const MAX_BLOCKS_PER_REQUEST: u32 = 1 << 20;
const NO_BLOCK: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Stream the listed blocks (TCP).
    Read = 1,
    /// Send the pool's memfd (shared memory).
    Map = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub op: Op,
    pub count: u32,
    pub pool: PoolId,
    pub block_bytes: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[0] = self.op as u8;
        buf[4..8].copy_from_slice(&self.count.to_le_bytes());
        buf[8..16].copy_from_slice(&self.pool.0.to_le_bytes());
        buf[16..24].copy_from_slice(&self.block_bytes.to_le_bytes());
        buf
    }

    /// Parses a request header from an authenticated but otherwise untrusted peer.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, RemoteError> {
        let op = match buf[0] {
            1 => Op::Read,
            2 => Op::Map,
            _ => return Err(RemoteError::BadRequest),
        };
        let count = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if count > MAX_BLOCKS_PER_REQUEST {
            return Err(RemoteError::TooManyBlocks);
        }
        Ok(Self {
            op,
            count,
            pool: PoolId(u64_at(buf, 8)),
            block_bytes: u64_at(buf, 16),
        })
    }
}

/// A response header: `Ok((a, b))` or a refusal naming the block at fault, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Response {
    Ok {
        a: u64,
        b: u64,
    },
    Refused {
        reason: RemoteError,
        block: Option<u32>,
    },
}

impl Response {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        match *self {
            Self::Ok { a, b } => {
                buf[4..8].copy_from_slice(&NO_BLOCK.to_le_bytes());
                buf[8..16].copy_from_slice(&a.to_le_bytes());
                buf[16..24].copy_from_slice(&b.to_le_bytes());
            }
            Self::Refused { reason, block } => {
                buf[0] = reason.code();
                buf[4..8].copy_from_slice(&block.unwrap_or(NO_BLOCK).to_le_bytes());
            }
        }
        buf
    }

    pub fn decode(buf: &[u8; HEADER_LEN]) -> Self {
        if buf[0] == 0 {
            return Self::Ok {
                a: u64_at(buf, 8),
                b: u64_at(buf, 16),
            };
        }
        let block = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        Self::Refused {
            reason: RemoteError::from_code(buf[0]),
            block: (block != NO_BLOCK).then_some(block),
        }
    }
}

fn u64_at(buf: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes `count` little-endian block ids into `out` (cleared first).
pub(crate) fn decode_ids(bytes: &[u8], out: &mut Vec<u32>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

/// Appends `ids` little-endian to `out`.
pub(crate) fn encode_ids(ids: &[u32], out: &mut Vec<u8>) {
    out.reserve(ids.len() * 4);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            op: Op::Read,
            count: 17,
            pool: PoolId(0x0102_0304_0506_0708),
            block_bytes: 8 << 20,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn unknown_op_and_oversized_requests_are_refused() {
        let mut buf = Request {
            op: Op::Map,
            count: 1,
            pool: PoolId(1),
            block_bytes: 1,
        }
        .encode();
        buf[0] = 9;
        assert_eq!(Request::decode(&buf), Err(RemoteError::BadRequest));
        buf[0] = 1;
        buf[4..8].copy_from_slice(&(MAX_BLOCKS_PER_REQUEST + 1).to_le_bytes());
        assert_eq!(Request::decode(&buf), Err(RemoteError::TooManyBlocks));
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Ok { a: 5, b: u64::MAX },
            Response::Refused {
                reason: RemoteError::BlockOutOfRange,
                block: Some(7),
            },
            Response::Refused {
                reason: RemoteError::UnknownPool,
                block: None,
            },
        ] {
            assert_eq!(Response::decode(&r.encode()), r);
        }
    }

    #[test]
    fn every_header_decodes_without_panicking() {
        // A cheap sweep over the first byte and a few patterns; the decoder must be total.
        for first in 0..=u8::MAX {
            for fill in [0u8, 0x7f, 0xff] {
                let mut buf = [fill; HEADER_LEN];
                buf[0] = first;
                let _ = Request::decode(&buf);
                let _ = Response::decode(&buf);
            }
        }
    }

    #[test]
    fn ids_round_trip() {
        let ids = [0u32, 1, u32::MAX, 42];
        let mut bytes = Vec::new();
        encode_ids(&ids, &mut bytes);
        let mut out = vec![9];
        decode_ids(&bytes, &mut out);
        assert_eq!(out, ids);
    }
}
