//! Incremental parsing of an OpenAI streaming response: SSE lines out of arbitrary byte chunks,
//! then each `data:` payload into what the load generator needs (was there text, usage, an error,
//! or the `[DONE]` marker). Works for chat and completions chunks alike.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Splits a byte stream into lines, keeping a partial line across pushes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `bytes`, calling `f` with each complete line (without `\n` / `\r\n`).
    pub fn push(&mut self, mut bytes: &[u8], mut f: impl FnMut(&[u8])) {
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n') {
            let (head, rest) = bytes.split_at(pos);
            if self.buf.is_empty() {
                f(trim_cr(head));
            } else {
                self.buf.extend_from_slice(head);
                f(trim_cr(&self.buf));
                self.buf.clear();
            }
            bytes = &rest[1..];
        }
        self.buf.extend_from_slice(bytes);
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Token accounting of the final usage chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

/// What one SSE line said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A chunk: whether it carried non-empty text, and usage if present.
    Chunk { text: bool, usage: Option<Usage> },
    /// An error object in the stream.
    Error(String),
    /// `data: [DONE]`.
    Done,
}

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<WireChoice<'a>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// Parses one SSE line; `None` for comments, blank lines and non-`data` fields.
pub fn parse_line(line: &[u8]) -> Option<Event> {
    let data = line.strip_prefix(b"data:")?;
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data == b"[DONE]" {
        return Some(Event::Done);
    }
    let chunk: WireChunk = match serde_json::from_slice(data) {
        Ok(c) => c,
        Err(e) => return Some(Event::Error(format!("unparseable chunk: {e}"))),
    };
    if let Some(err) = chunk.error {
        let msg = err
            .get("message")
            .and_then(|m| m.as_str())
            .map_or_else(|| err.to_string(), str::to_owned);
        return Some(Event::Error(msg));
    }
    let text = chunk.choices.iter().any(|c| {
        c.text.as_deref().is_some_and(|t| !t.is_empty())
            || c.delta
                .as_ref()
                .and_then(|d| d.content.as_deref())
                .is_some_and(|t| !t.is_empty())
    });
    let usage = chunk.usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
    });
    Some(Event::Chunk { text, usage })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_arbitrary_chunk_boundaries() {
        let stream = b"data: {\"a\":1}\r\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut s = LineSplitter::default();
            let mut lines = Vec::new();
            s.push(&stream[..cut], |l| lines.push(l.to_vec()));
            s.push(&stream[cut..], |l| lines.push(l.to_vec()));
            let want: Vec<&[u8]> = vec![b"data: {\"a\":1}", b"", b"data: [DONE]", b""];
            assert_eq!(lines, want, "cut at {cut}");
        }
    }

    #[test]
    fn parses_chat_and_completion_content() {
        let chat = br#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        assert_eq!(
            parse_line(chat),
            Some(Event::Chunk {
                text: true,
                usage: None
            })
        );
        let role_only =
            br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(
            parse_line(role_only),
            Some(Event::Chunk {
                text: false,
                usage: None
            })
        );
        let completion = br#"data: {"choices":[{"index":0,"text":"x\"y"}],"usage":null}"#;
        assert_eq!(
            parse_line(completion),
            Some(Event::Chunk {
                text: true,
                usage: None
            })
        );
    }

    #[test]
    fn parses_usage_done_and_errors() {
        let usage = br#"data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":4,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            parse_line(usage),
            Some(Event::Chunk {
                text: false,
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: 4,
                    cached_tokens: 8
                })
            })
        );
        assert_eq!(parse_line(b"data: [DONE]"), Some(Event::Done));
        assert_eq!(
            parse_line(br#"data: {"error":{"message":"boom","type":"x"}}"#),
            Some(Event::Error("boom".into()))
        );
        assert!(matches!(parse_line(b"data: {oops"), Some(Event::Error(_))));
        assert_eq!(parse_line(b": keep-alive"), None);
        assert_eq!(parse_line(b""), None);
    }
}
