//! Mutual authentication with a per-graph shared secret: an HMAC-SHA256 challenge-response run at the
//! start of every connection, before any block is named or sent.
//!
//! ```text
//! server -> client   MAGIC (8) | server_nonce (32)
//! client -> server   client_nonce (32) | HMAC(secret, "client" | server_nonce | client_nonce)
//! server -> client   OK (1) | HMAC(secret, "server" | server_nonce | client_nonce)      or REJECTED (1), close
//! ```
//!
//! Both sides use fresh random nonces, tags are compared in constant time, and the secret itself never
//! crosses the wire. This authenticates peers; it does not encrypt the blocks (KV cache moves inside the
//! cluster network, like NIXL/UCX traffic).

use std::fmt;
use std::io;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"DYNKVX01";
const NONCE: usize = 32;
const TAG: usize = 32;
const OK: u8 = 0;
const REJECTED: u8 = 1;

/// The secret every process of one graph shares. `Debug` does not print it.
#[derive(Clone)]
pub struct SharedSecret(Arc<[u8]>);

impl SharedSecret {
    /// The shortest secret accepted.
    pub const MIN_LEN: usize = 16;

    /// A secret from raw bytes (at least [`Self::MIN_LEN`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes: Vec<u8> = bytes.into();
        if bytes.len() < Self::MIN_LEN {
            return Err(Error::WeakSecret {
                len: bytes.len(),
                min: Self::MIN_LEN,
            });
        }
        Ok(Self(bytes.into()))
    }

    fn tag(&self, role: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> io::Result<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(&self.0).map_err(io::Error::other)?;
        mac.update(role);
        mac.update(server_nonce);
        mac.update(client_nonce);
        Ok(mac)
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

/// How a handshake failed; the caller adds the peer.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Io(io::Error),
    /// Server side: the client's proof was wrong. Client side: the server said so.
    Rejected,
    /// Client side: the server's proof was wrong.
    BadServerProof,
    /// Client side: not one of our servers.
    BadMagic,
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn nonce() -> [u8; NONCE] {
    // ThreadRng is a CSPRNG seeded from the OS.
    rand::random()
}

/// Runs the server side; `Err(Rejected)` after telling the client so.
pub(crate) async fn server_handshake<S>(
    stream: &mut S,
    secret: &SharedSecret,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let server_nonce = nonce();
    let mut hello = [0u8; 8 + NONCE];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..].copy_from_slice(&server_nonce);
    stream.write_all(&hello).await?;

    let mut proof = [0u8; NONCE + TAG];
    stream.read_exact(&mut proof).await?;
    let (client_nonce, client_tag) = proof.split_at(NONCE);
    let valid = secret
        .tag(b"client", &server_nonce, client_nonce)?
        .verify_slice(client_tag)
        .is_ok();
    if !valid {
        stream.write_all(&[REJECTED]).await?;
        stream.shutdown().await?;
        return Err(HandshakeError::Rejected);
    }
    let server_tag = secret
        .tag(b"server", &server_nonce, client_nonce)?
        .finalize()
        .into_bytes();
    let mut reply = [0u8; 1 + TAG];
    reply[0] = OK;
    reply[1..].copy_from_slice(&server_tag);
    stream.write_all(&reply).await?;
    Ok(())
}

/// Runs the client side.
pub(crate) async fn client_handshake<S>(
    stream: &mut S,
    secret: &SharedSecret,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; 8 + NONCE];
    stream.read_exact(&mut hello).await?;
    if &hello[..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let server_nonce = &hello[8..];
    let client_nonce = nonce();
    let client_tag = secret
        .tag(b"client", server_nonce, &client_nonce)?
        .finalize()
        .into_bytes();
    let mut proof = [0u8; NONCE + TAG];
    proof[..NONCE].copy_from_slice(&client_nonce);
    proof[NONCE..].copy_from_slice(&client_tag);
    stream.write_all(&proof).await?;

    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await?;
    if status[0] != OK {
        return Err(HandshakeError::Rejected);
    }
    let mut server_tag = [0u8; TAG];
    stream.read_exact(&mut server_tag).await?;
    secret
        .tag(b"server", server_nonce, &client_nonce)?
        .verify_slice(&server_tag)
        .map_err(|_| HandshakeError::BadServerProof)
}

/// Maps a client-side handshake failure to the crate error, naming the peer.
pub(crate) fn client_error(peer: &crate::Endpoint, e: HandshakeError) -> Error {
    let peer = peer.clone();
    match e {
        HandshakeError::Io(source) => Error::Handshake { peer, source },
        HandshakeError::Rejected => Error::AuthRejected { peer },
        HandshakeError::BadServerProof => Error::PeerNotAuthenticated { peer },
        HandshakeError::BadMagic => Error::Protocol {
            peer,
            what: "not a dynamo-transfer server (bad greeting)",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> SharedSecret {
        SharedSecret(vec![byte; 32].into())
    }

    async fn run(
        server_secret: SharedSecret,
        client_secret: SharedSecret,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::join!(
            server_handshake(&mut a, &server_secret),
            client_handshake(&mut b, &client_secret)
        )
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (server, client) = run(secret(1), secret(1)).await;
        assert!(server.is_ok(), "{server:?}");
        assert!(client.is_ok(), "{client:?}");
    }

    #[tokio::test]
    async fn different_secret_is_rejected_on_both_sides() {
        let (server, client) = run(secret(1), secret(2)).await;
        assert!(matches!(server, Err(HandshakeError::Rejected)));
        assert!(matches!(client, Err(HandshakeError::Rejected)));
    }

    #[tokio::test]
    async fn client_detects_a_server_that_is_not_ours() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let client = tokio::spawn(async move { client_handshake(&mut b, &secret(1)).await });
        let _ = a
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n______________")
            .await;
        let got = client.await.map_err(|e| e.to_string());
        assert!(matches!(got, Ok(Err(HandshakeError::BadMagic))), "{got:?}");
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_the_secret() {
        assert!(matches!(
            SharedSecret::new(b"short".to_vec()),
            Err(Error::WeakSecret { len: 5, .. })
        ));
        let s = SharedSecret::new(b"0123456789abcdef-secret".to_vec());
        assert_eq!(format!("{s:?}"), "Ok(SharedSecret(..))");
    }
}
