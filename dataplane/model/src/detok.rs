//! Incremental detokenization: turns a stream of generated token ids into text, one token at a time.
//!
//! Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, DeepSeek...) get a fast path: at load, [`ByteTable`] maps
//! every token id to the raw bytes it stands for, so [`Decoder::push`] is a table lookup plus a UTF-8 check, with
//! no allocation once the decoder's buffers are warm. Other tokenizers (SentencePiece-style Metaspace, WordPiece)
//! go through the `tokenizers` crate's `DecodeStream`. Both paths produce exactly what a one-shot
//! [`Model::decode`](crate::Model::decode) of the whole sequence produces.
//!
//! Not here: stop strings ([`StopMatcher`](crate::StopMatcher)) and stop tokens (the caller checks ids against
//! [`ModelCard::eos_token_ids`](crate::ModelCard::eos_token_ids)).

use tokenizers::decoders::DecoderWrapper;
use tokenizers::tokenizer::DecodeStream;
use tokenizers::{
    ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
};

use crate::ModelError;

/// The `tokenizers` stream decoder for the general (non byte-level) path.
type Stream<'a> = DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

// === impl ByteTable ===

/// Per-token raw bytes for a byte-level tokenizer, built once at load.
#[derive(Debug)]
pub(crate) struct ByteTable {
    /// All tokens' bytes, back to back.
    bytes: Vec<u8>,
    /// `bytes[offsets[id]..offsets[id + 1]]` are token `id`'s bytes.
    offsets: Vec<u32>,
    /// Per id: [`SPECIAL`] and/or [`UTF8`].
    flags: Vec<u8>,
}

/// The token is an added token marked special (hidden when skipping special tokens).
const SPECIAL: u8 = 1;
/// The token's bytes are valid UTF-8 on their own.
const UTF8: u8 = 2;

impl ByteTable {
    /// Builds the table if `tokenizer` decodes with a plain byte-level decoder, else `None`.
    pub(crate) fn build(tokenizer: &Tokenizer) -> Option<ByteTable> {
        if !is_byte_level(tokenizer.get_decoder()?) {
            return None;
        }
        let inverse = byte_decoder();
        let added = tokenizer.get_added_tokens_decoder();
        let model_max = tokenizer.get_vocab_size(false);
        let added_max = added.keys().map(|&id| id as usize + 1).max().unwrap_or(0);
        let len = model_max.max(added_max);
        // Ids must fit u32 offsets; a vocabulary this large does not exist, so fall back rather than fail.
        let mut table = ByteTable {
            bytes: Vec::with_capacity(len * 6),
            offsets: Vec::with_capacity(len + 1),
            flags: Vec::with_capacity(len),
        };
        table.offsets.push(0);
        for id in 0..u32::try_from(len).ok()? {
            let mut flags = 0;
            if let Some(token) = tokenizer.id_to_token(id) {
                // The same rule as the ByteLevel decoder: map every char back to its byte; a token with a char
                // outside the byte alphabet (an added token such as "<|im_end|>" with a space) is taken verbatim.
                let start = table.bytes.len();
                let mapped = token.chars().try_for_each(|c| {
                    let b = inverse.get(c as usize).copied().flatten()?;
                    table.bytes.push(b);
                    Some(())
                });
                if mapped.is_none() {
                    table.bytes.truncate(start);
                    table.bytes.extend_from_slice(token.as_bytes());
                }
                if std::str::from_utf8(&table.bytes[start..]).is_ok() {
                    flags |= UTF8;
                }
            } else {
                flags |= UTF8; // unknown id: decodes to nothing, like `Tokenizer::decode`
            }
            if added.get(&id).is_some_and(|t| t.special) {
                flags |= SPECIAL;
            }
            table.offsets.push(u32::try_from(table.bytes.len()).ok()?);
            table.flags.push(flags);
        }
        table.bytes.shrink_to_fit();
        Some(table)
    }

    /// Token `id`'s bytes (empty for an unknown id) and its flags.
    #[inline]
    fn get(&self, id: u32) -> (&[u8], u8) {
        let i = id as usize;
        match (self.flags.get(i), self.offsets.get(i..i + 2)) {
            (Some(&flags), Some(&[start, end])) => {
                (&self.bytes[start as usize..end as usize], flags)
            }
            _ => (&[], UTF8),
        }
    }
}

/// The id of the single-byte token for byte `b` (tests build split UTF-8 characters from these).
#[cfg(test)]
pub(crate) fn byte_token_id(table: &ByteTable, b: u8) -> Option<u32> {
    (0..table.flags.len()).find_map(|i| {
        let id = u32::try_from(i).ok()?;
        (table.get(id).0 == [b] && table.get(id).1 & SPECIAL == 0).then_some(id)
    })
}

/// Whether `decoder` is exactly a byte-level decoder (possibly wrapped in a one-element `Sequence`).
fn is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(seq) => match seq.get_decoders() {
            [only] => is_byte_level(only),
            _ => false,
        },
        _ => false,
    }
}

/// GPT-2's `bytes_to_unicode`, inverted: `table[char as usize] == Some(byte)`.
pub(crate) fn byte_decoder() -> Vec<Option<u8>> {
    let mut table = vec![None; 256 + 256];
    let mut extra = 0usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            usize::from(b)
        } else {
            extra += 1;
            255 + extra
        };
        table[c] = Some(b);
    }
    table
}

// === impl Decoder ===

/// Incremental detokenizer for one response stream; see [`Model::decoder`](crate::Model::decoder).
pub struct Decoder<'a> {
    inner: Inner<'a>,
    /// The text returned by the last push when it does not borrow from the table.
    out: String,
}

enum Inner<'a> {
    Bytes {
        table: &'a ByteTable,
        skip_special_tokens: bool,
        /// Bytes of an incomplete UTF-8 character carried to the next token.
        pending: Vec<u8>,
    },
    Stream {
        tokenizer: &'a Tokenizer,
        stream: Stream<'a>,
        skip_special_tokens: bool,
        /// Ids that produced the last emitted text (context for `flush`).
        context: Vec<u32>,
        /// Ids pushed since the last emitted text.
        held: Vec<u32>,
    },
}

impl std::fmt::Debug for Decoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match self.inner {
            Inner::Bytes { .. } => "byte-table",
            Inner::Stream { .. } => "decode-stream",
        };
        f.debug_struct("Decoder")
            .field("path", &path)
            .finish_non_exhaustive()
    }
}

impl<'a> Decoder<'a> {
    pub(crate) fn bytes(table: &'a ByteTable, skip_special_tokens: bool) -> Decoder<'a> {
        Decoder {
            inner: Inner::Bytes {
                table,
                skip_special_tokens,
                pending: Vec::with_capacity(8),
            },
            out: String::with_capacity(64),
        }
    }

    pub(crate) fn stream(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Decoder<'a> {
        Decoder {
            inner: Inner::Stream {
                tokenizer,
                stream: tokenizer.decode_stream(skip_special_tokens),
                skip_special_tokens,
                context: Vec::new(),
                held: Vec::new(),
            },
            out: String::new(),
        }
    }

    /// Feeds one generated token and returns the text it completes.
    ///
    /// The text is empty while a multi-byte UTF-8 character is still incomplete (its remaining bytes come with
    /// later tokens) and for special tokens when skipping them. Invalid byte sequences come out as U+FFFD, as
    /// in [`Model::decode`](crate::Model::decode). Errors only on the general (non byte-level) path.
    pub fn push(&mut self, id: u32) -> Result<&str, ModelError> {
        match &mut self.inner {
            Inner::Bytes {
                table,
                skip_special_tokens,
                pending,
            } => {
                let (bytes, flags) = table.get(id);
                if *skip_special_tokens && flags & SPECIAL != 0 {
                    return Ok("");
                }
                if pending.is_empty() && flags & UTF8 != 0 {
                    // Fast path: a whole-character token with nothing carried borrows straight from the table.
                    return Ok(std::str::from_utf8(bytes).unwrap_or_default());
                }
                pending.extend_from_slice(bytes);
                self.out.clear();
                let consumed = drain_utf8(pending, &mut self.out, false);
                pending.drain(..consumed);
                Ok(&self.out)
            }
            Inner::Stream {
                stream,
                context,
                held,
                ..
            } => {
                held.push(id);
                let step = stream
                    .step(id)
                    .map_err(|source| ModelError::DecodeToken { id, source })?;
                self.out.clear();
                if let Some(text) = step {
                    self.out = text;
                    std::mem::swap(context, held);
                    held.clear();
                }
                Ok(&self.out)
            }
        }
    }

    /// Ends the stream: returns any held-back bytes (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        let mut out = String::new();
        match &mut self.inner {
            Inner::Bytes { pending, .. } => {
                drain_utf8(pending, &mut out, true);
                pending.clear();
            }
            Inner::Stream {
                tokenizer,
                skip_special_tokens,
                context,
                held,
                ..
            } => {
                if !held.is_empty() {
                    let before = tokenizer
                        .decode(context, *skip_special_tokens)
                        .unwrap_or_default();
                    context.append(held);
                    let after = tokenizer
                        .decode(context, *skip_special_tokens)
                        .unwrap_or_default();
                    out = match after.strip_prefix(before.as_str()) {
                        Some(rest) => rest.to_owned(),
                        None => after,
                    };
                }
            }
        }
        out
    }
}

/// Appends the decodable part of `bytes` to `out` (invalid sequences as U+FFFD, like
/// `String::from_utf8_lossy`) and returns how many bytes it consumed. An incomplete character at the end is
/// left unconsumed unless `at_end`.
fn drain_utf8(bytes: &[u8], out: &mut String, at_end: bool) -> usize {
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                return bytes.len();
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None if at_end => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return bytes.len();
                    }
                    None => return bytes.len() - after.len(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_range(table: &ByteTable, id: u32) -> std::ops::Range<usize> {
        let i = id as usize;
        table.offsets[i] as usize..table.offsets[i + 1] as usize
    }

    #[test]
    fn byte_decoder_inverts_gpt2_alphabet() {
        let t = byte_decoder();
        assert_eq!(t['!' as usize], Some(b'!'));
        assert_eq!(t['Ġ' as usize], Some(b' '));
        assert_eq!(t['Ċ' as usize], Some(b'\n'));
        assert_eq!(t['ÿ' as usize], Some(0xFF));
        assert_eq!(t.iter().flatten().count(), 256);
    }

    #[test]
    fn drain_utf8_carries_incomplete_tail_and_replaces_invalid_bytes() {
        let mut out = String::new();
        let e_acute = "é".as_bytes();
        assert_eq!(drain_utf8(&[b'a', e_acute[0]], &mut out, false), 1);
        assert_eq!(out, "a");
        out.clear();
        assert_eq!(drain_utf8(&[0xFF, b'b'], &mut out, false), 2);
        assert_eq!(out, "\u{FFFD}b");
        out.clear();
        assert_eq!(drain_utf8(&[e_acute[0]], &mut out, true), 1);
        assert_eq!(out, "\u{FFFD}");
    }

    #[test]
    fn table_maps_added_tokens_to_their_content() {
        let model = crate::Model::builtin();
        let table = model.byte_table().expect("tiny model is byte-level");
        let id = model.token_id("<|im_end|>").expect("im_end exists");
        assert_eq!(&table.bytes[token_range(table, id)], b"<|im_end|>");
        assert_ne!(table.get(id).1 & SPECIAL, 0);
    }
}
