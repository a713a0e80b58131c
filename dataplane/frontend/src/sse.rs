//! Server-sent-event framing of streamed completions, byte-for-byte as OpenAI sends them:
//! `data: <json>\n\n` per chunk and `data: [DONE]\n\n` at the end.
//!
//! Chunks of one response differ only in their text and finish reason, so the constant JSON head
//! (`id`, `object`, `created`, `model`) is rendered once per request and reused for every token.

use bytes::{BufMut, BytesMut};

use super::openai::Usage;

/// Which endpoint's chunk shape to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Writes the SSE events of one streamed response.
#[derive(Debug)]
pub struct ChunkWriter {
    kind: Kind,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,`
    head: String,
    /// `,"logprobs":null,"finish_reason":null}]` + `,"usage":null` when usage is requested + `}\n\n`
    tail_open: String,
    include_usage: bool,
}

impl ChunkWriter {
    pub fn new(
        kind: Kind,
        id: &str,
        created: u64,
        model: &str,
        include_usage: bool,
    ) -> ChunkWriter {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let head = format!(
            "data: {{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},\"choices\":[{{\"index\":0,",
            json_str(id),
            json_str(model)
        );
        let usage = if include_usage { ",\"usage\":null" } else { "" };
        ChunkWriter {
            kind,
            head,
            tail_open: format!(",\"logprobs\":null,\"finish_reason\":null}}]{usage}}}\n\n"),
            include_usage,
        }
    }

    /// The first chat chunk: the assistant role with empty content. Completions have none.
    pub fn start(&self, out: &mut BytesMut) {
        if self.kind == Kind::Chat {
            out.put_slice(self.head.as_bytes());
            out.put_slice(br#""delta":{"role":"assistant","content":""}"#);
            out.put_slice(self.tail_open.as_bytes());
        }
    }

    /// A chunk carrying `text`.
    pub fn delta(&self, out: &mut BytesMut, text: &str) {
        out.put_slice(self.head.as_bytes());
        match self.kind {
            Kind::Chat => out.put_slice(br#""delta":{"content":"#),
            Kind::Completion => out.put_slice(br#""text":"#),
        }
        write_json_str(out, text);
        if self.kind == Kind::Chat {
            out.put_u8(b'}');
        }
        out.put_slice(self.tail_open.as_bytes());
    }

    /// The chunk with the finish reason (empty delta).
    pub fn finish(&self, out: &mut BytesMut, reason: &str) {
        out.put_slice(self.head.as_bytes());
        match self.kind {
            Kind::Chat => out.put_slice(br#""delta":{}"#),
            Kind::Completion => out.put_slice(br#""text":"""#),
        }
        out.put_slice(br#","logprobs":null,"finish_reason":"#);
        write_json_str(out, reason);
        out.put_slice(b"}]");
        if self.include_usage {
            out.put_slice(br#","usage":null"#);
        }
        out.put_slice(b"}\n\n");
    }

    /// The usage chunk (`choices: []`), sent when `stream_options.include_usage` is set.
    pub fn usage(&self, out: &mut BytesMut, usage: &Usage) {
        if !self.include_usage {
            return;
        }
        // head ends with `"choices":[{"index":0,`; the usage chunk needs `"choices":[]`.
        let cut = self.head.len() - "[{\"index\":0,".len();
        out.put_slice(&self.head.as_bytes()[..cut]);
        out.put_slice(b"[],\"usage\":");
        if serde_json::to_writer((&mut *out).writer(), usage).is_err() {
            out.put_slice(b"null");
        }
        out.put_slice(b"}\n\n");
    }

    pub fn done(out: &mut BytesMut) {
        out.put_slice(b"data: [DONE]\n\n");
    }

    /// An error event (the stream broke after the response started).
    pub fn error(out: &mut BytesMut, error_json: &str) {
        out.put_slice(b"data: ");
        out.put_slice(error_json.as_bytes());
        out.put_slice(b"\n\n");
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn write_json_str(out: &mut BytesMut, s: &str) {
    if serde_json::to_writer(out.writer(), s).is_err() {
        out.put_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn events(buf: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(buf).expect("utf8");
        assert!(text.ends_with("\n\n"), "every event ends with a blank line");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data: prefix").to_owned())
            .collect()
    }

    #[test]
    fn chat_stream_frames_match_openai() {
        let w = ChunkWriter::new(Kind::Chat, "chatcmpl-1", 7, "tiny", true);
        let mut b = BytesMut::new();
        w.start(&mut b);
        w.delta(&mut b, "he said \"hi\"\n");
        w.finish(&mut b, "length");
        w.usage(&mut b, &Usage::new(5, 2, 4));
        ChunkWriter::done(&mut b);
        let ev = events(&b);
        assert_eq!(ev.len(), 5);
        let parse = |s: &str| serde_json::from_str::<Value>(s).expect("valid json");
        let first = parse(&ev[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["usage"].is_null() && first.get("usage").is_some());
        assert_eq!(
            parse(&ev[1])["choices"][0]["delta"]["content"],
            "he said \"hi\"\n"
        );
        assert!(parse(&ev[1])["choices"][0]["finish_reason"].is_null());
        let fin = parse(&ev[2]);
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        assert_eq!(fin["choices"][0]["delta"], serde_json::json!({}));
        let usage = parse(&ev[3]);
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(ev[4], "[DONE]");
    }

    #[test]
    fn completion_stream_has_text_chunks_and_no_usage_unless_asked() {
        let w = ChunkWriter::new(Kind::Completion, "cmpl-1", 7, "m\"odel", false);
        let mut b = BytesMut::new();
        w.start(&mut b);
        w.delta(&mut b, "abc");
        w.finish(&mut b, "stop");
        w.usage(&mut b, &Usage::new(1, 1, 0));
        let ev = events(&b);
        assert_eq!(ev.len(), 2, "no role chunk, no usage chunk");
        let c: Value = serde_json::from_str(&ev[0]).expect("json");
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["model"], "m\"odel");
        assert_eq!(c["choices"][0]["text"], "abc");
        assert!(c.get("usage").is_none());
        let f: Value = serde_json::from_str(&ev[1]).expect("json");
        assert_eq!(f["choices"][0]["finish_reason"], "stop");
    }
}
