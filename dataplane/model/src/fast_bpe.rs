//! Fast prompt encoding for GPT-2-style byte-level BPE tokenizers, with token ids identical to the `tokenizers`
//! crate's.
//!
//! [`FastBpe::build`] accepts a tokenizer only when all of these hold (else `None`, and
//! [`Model::encode`](crate::Model::encode) keeps using `tokenizers`, unchanged):
//!
//! - the model is BPE without dropout, `continuing_subword_prefix`, `end_of_word_suffix` or `byte_fallback`,
//!   and all 256 single-byte tokens are in its vocabulary (`ignore_merges` is supported);
//! - there is no normalizer, and the pre-tokenizer is `ByteLevel` with `use_regex: true` and
//!   `add_prefix_space: false` (alone or as the only element of a `Sequence`);
//! - no added token is `single_word`, `lstrip` or `rstrip`, and special tokens are not set to be encoded as
//!   text (`encode_special_tokens`).
//!
//! A text with a whitespace run of [`MAX_SPACE_RUN`] chars or more also goes to `tokenizers` (whose regex
//! engine gives up on runs near a million chars and then stops splitting the text).
//!
//! The post-processor matters only when `add_special_tokens` is true: the fast path then serves the call only
//! if the post-processor is absent or `ByteLevel` (alone or in a `Sequence`), which add no tokens;
//! [`FastBpe::encode`] returns `None` otherwise (for example `TemplateProcessing` adding a BOS), and the caller
//! uses `tokenizers`.
//!
//! The steps mirror `tokenizers` exactly:
//!
//! 1. added tokens are split out of the text, the non-`normalized` ones first and then, in the text between,
//!    the `normalized` ones (leftmost-longest matching, as `tokenizers`' `AddedVocabulary` does);
//! 2. the text between is cut into words by a hand-written scanner equivalent to the GPT-2 pattern that
//!    `ByteLevel` uses (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`), with the
//!    `\p{L}`, `\p{N}` and `\s` classes taken from `regex-syntax`, the same tables the regex engine uses;
//! 3. each word's UTF-8 bytes are merged by BPE (lowest merge rank first, leftmost on ties), working on raw
//!    bytes rather than the byte-level alphabet (a bijection, so the ids are the same);
//! 4. word → ids results are cached in a shared, capped cache, so repeated words cost a hash lookup.
//!
//! The module's tests check the ids against `tokenizers` on varied text and random strings.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{OnceLock, PoisonError, RwLock};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex_syntax::hir::{Class, HirKind};
use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::{ModelWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

use crate::detok::byte_decoder;

/// Words longer than this (in bytes) are merged with a heap instead of a linear scan per merge.
const SHORT_WORD: usize = 48;
/// Words longer than this (in bytes) are not cached (as `tokenizers`' own BPE cache).
const MAX_CACHED_WORD: usize = 256;
/// The cache is cleared when it would grow past this many words.
const CACHE_CAP: usize = 100_000;
/// A text with a whitespace run this long (in chars) goes to `tokenizers`: its regex engine overflows its
/// backtracking stack on runs of about a million whitespace chars and then stops splitting, which the scanner
/// does not emulate.
const MAX_SPACE_RUN: usize = 100_000;

/// `(left id, right id)` packed into a `u64` → `(rank, merged id)`.
type MergeMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;
/// Word bytes → token ids. `ahash` with per-process random keys: fast, and words are attacker-chosen.
type WordCache = HashMap<Box<[u8]>, Box<[u32]>, ahash::RandomState>;

/// The fast encoder; see the module docs for when it applies. `Send + Sync`.
pub(crate) struct FastBpe {
    /// Added tokens matched on the raw text (`normalized: false`), split out first.
    raw_added: Option<AddedTokens>,
    /// Added tokens matched on the normalized text (`normalized: true`), split out of the text between.
    normalized_added: Option<AddedTokens>,
    /// Whether the post-processor adds no tokens even with `add_special_tokens`.
    post_adds_nothing: bool,
    /// Single-byte token ids.
    byte_ids: [u32; 256],
    merges: MergeMap,
    /// With `ignore_merges`: every vocabulary token's bytes → id (a word in the vocabulary is one token).
    whole_words: Option<HashMap<Box<[u8]>, u32>>,
    classes: &'static Classes,
    cache: RwLock<WordCache>,
}

impl std::fmt::Debug for FastBpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastBpe")
            .field("merges", &self.merges.len())
            .field("ignore_merges", &self.whole_words.is_some())
            .field("post_adds_nothing", &self.post_adds_nothing)
            .finish_non_exhaustive()
    }
}

/// One set of added tokens: a leftmost-longest matcher and, per pattern, its id.
struct AddedTokens {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

/// The vocabulary and merges as `tokenizers` serializes a BPE model (merges ordered by rank).
#[derive(Deserialize)]
struct BpeParts<'a> {
    #[serde(borrow)]
    vocab: HashMap<Token<'a>, u32, ahash::RandomState>,
    #[serde(borrow)]
    merges: Vec<(Token<'a>, Token<'a>)>,
}

/// A token string, borrowed from the JSON unless it has escapes.
#[derive(Deserialize, PartialEq, Eq, Hash)]
struct Token<'a>(#[serde(borrow)] Cow<'a, str>);

// === impl FastBpe: loading ===

impl FastBpe {
    /// The fast encoder for `tokenizer`, or `None` when it does not apply (see the module docs).
    pub(crate) fn build(tokenizer: &Tokenizer) -> Option<FastBpe> {
        if tokenizer.get_normalizer().is_some()
            || !is_plain_byte_level(tokenizer.get_pre_tokenizer()?)
            || tokenizer.get_encode_special_tokens()
            || tokenizer.get_truncation().is_some()
            || tokenizer.get_padding().is_some()
        {
            return None;
        }
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
            return None;
        };
        let (byte_ids, merges, whole_words) = bpe_tables(bpe)?;

        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (&id, token) in tokenizer.get_added_tokens_decoder().iter() {
            if token.single_word || token.lstrip || token.rstrip {
                return None;
            }
            if token.content.is_empty() {
                continue;
            }
            if token.normalized {
                normalized.push((token.content.clone(), id));
            } else {
                raw.push((token.content.clone(), id));
            }
        }
        let post_adds_nothing = tokenizer
            .get_post_processor()
            .is_none_or(post_processor_adds_nothing);
        Some(FastBpe {
            raw_added: AddedTokens::build(raw)?,
            normalized_added: AddedTokens::build(normalized)?,
            post_adds_nothing,
            byte_ids,
            merges,
            whole_words,
            classes: Classes::get()?,
            cache: RwLock::new(WordCache::default()),
        })
    }
}

/// Whether `pre` is `ByteLevel { add_prefix_space: false, use_regex: true }`, possibly the only element of a
/// `Sequence`.
fn is_plain_byte_level(pre: &PreTokenizerWrapper) -> bool {
    match pre {
        PreTokenizerWrapper::ByteLevel(b) => b.use_regex && !b.add_prefix_space,
        PreTokenizerWrapper::Sequence(seq) => match seq.as_ref() {
            [only] => is_plain_byte_level(only),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `post` never adds tokens: `ByteLevel` (it only trims offsets), or a `Sequence` of those.
fn post_processor_adds_nothing(post: &PostProcessorWrapper) -> bool {
    match post {
        PostProcessorWrapper::ByteLevel(_) => true,
        PostProcessorWrapper::Sequence(seq) => (0..)
            .map_while(|i| seq.get(i))
            .all(post_processor_adds_nothing),
        _ => false,
    }
}

/// The byte → id table, the merge map and (with `ignore_merges`) the whole-word map, or `None` when the model
/// uses a feature the fast path does not implement or lacks a single-byte token.
#[allow(clippy::type_complexity)]
fn bpe_tables(bpe: &BPE) -> Option<([u32; 256], MergeMap, Option<HashMap<Box<[u8]>, u32>>)> {
    let no_dropout = bpe.dropout.is_none_or(|p| p == 0.0);
    let no_affix = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
    if !no_dropout
        || bpe.byte_fallback
        || !no_affix(&bpe.continuing_subword_prefix)
        || !no_affix(&bpe.end_of_word_suffix)
    {
        return None;
    }
    // The merge map is private to `tokenizers`; its serialization lists the merges in rank order (duplicates
    // already collapsed as the model does), which is all BPE needs.
    let json = serde_json::to_vec(bpe).ok()?;
    let parts: BpeParts<'_> = serde_json::from_slice(&json).ok()?;

    let inverse = byte_decoder();
    let byte_of = |c: char| inverse.get(c as usize).copied().flatten();
    let mut byte_ids = [None; 256];
    let mut whole_words = HashMap::new();
    for (Token(token), &id) in &parts.vocab {
        let mut chars = token.chars();
        if let (Some(c), None) = (chars.next(), chars.next())
            && let Some(b) = byte_of(c)
        {
            byte_ids[usize::from(b)] = Some(id);
        }
        // Tokens with characters outside the byte alphabet can never be produced from text bytes.
        if bpe.ignore_merges
            && let Some(bytes) = token.chars().map(byte_of).collect::<Option<Box<[u8]>>>()
        {
            whole_words.insert(bytes, id);
        }
    }
    let mut table = [0u32; 256];
    for (slot, id) in table.iter_mut().zip(byte_ids) {
        *slot = id?;
    }

    let mut merges = MergeMap::default();
    merges.reserve(parts.merges.len());
    let mut joined = String::new();
    let id = |token: &str| parts.vocab.get(&Token(Cow::Borrowed(token))).copied();
    for (rank, (Token(a), Token(b))) in parts.merges.iter().enumerate() {
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        let (a, b, new) = (id(a)?, id(b)?, id(&joined)?);
        merges.insert(pair_key(a, b), (u32::try_from(rank).ok()?, new));
    }
    drop(parts);
    drop(json);
    Some((table, merges, bpe.ignore_merges.then_some(whole_words)))
}

impl AddedTokens {
    /// The matcher for `tokens` (`None` inside when there are none); `None` outside if it cannot be built or two
    /// tokens share a content (which `tokenizers` rejects too).
    fn build(mut tokens: Vec<(String, u32)>) -> Option<Option<AddedTokens>> {
        if tokens.is_empty() {
            return Some(None);
        }
        tokens.sort();
        if tokens.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(content, _)| content))
            .ok()?;
        Some(Some(AddedTokens {
            matcher,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
        }))
    }
}

// === impl FastBpe: encoding ===

/// Per-call state: the output, the shared cache (read-locked for the call) and this call's new words.
struct Encoding<'c, 't> {
    ids: Vec<u32>,
    /// Set when the text needs `tokenizers` after all (see [`MAX_SPACE_RUN`]).
    give_up: bool,
    cache: &'c WordCache,
    /// Words merged in this call (borrowed from the text) → their ids' range in `ids`.
    fresh: HashMap<&'t [u8], (usize, usize), ahash::RandomState>,
    scratch: Scratch,
}

impl FastBpe {
    /// The ids `tokenizers` would produce for `text`, or `None` when `add_special_tokens` is set and the
    /// post-processor may add tokens (the caller then uses `tokenizers`).
    pub(crate) fn encode(&self, text: &str, add_special_tokens: bool) -> Option<Vec<u32>> {
        if add_special_tokens && !self.post_adds_nothing {
            return None;
        }
        let (ids, fresh) = {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            let mut enc = Encoding {
                // About 4 bytes per token for English; a miss only costs a reallocation.
                ids: Vec::with_capacity(text.len() / 3 + 16),
                give_up: false,
                cache: &cache,
                fresh: HashMap::default(),
                scratch: Scratch::default(),
            };
            self.encode_raw(text, &mut enc);
            if enc.give_up {
                return None;
            }
            (enc.ids, enc.fresh)
        };
        if !fresh.is_empty() && fresh.len() <= CACHE_CAP {
            let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
            if cache.len() + fresh.len() > CACHE_CAP {
                cache.clear();
            }
            cache.extend(
                fresh
                    .into_iter()
                    .map(|(word, (start, end))| (word.into(), ids[start..end].into())),
            );
        }
        Some(ids)
    }

    /// Splits out the non-normalized added tokens, then the normalized ones from the text between.
    fn encode_raw<'t>(&self, text: &'t str, enc: &mut Encoding<'_, 't>) {
        split_added(self.raw_added.as_ref(), text, enc, |enc, piece| {
            split_added(self.normalized_added.as_ref(), piece, enc, |enc, piece| {
                self.encode_words(piece, enc);
            });
        });
    }

    /// Pre-tokenizes `text` (no added tokens in it) and BPE-encodes each word.
    fn encode_words<'t>(&self, text: &'t str, enc: &mut Encoding<'_, 't>) {
        let mut start = 0;
        while start < text.len() && !enc.give_up {
            let Some(end) = word_end(self.classes, text, start) else {
                enc.give_up = true;
                return;
            };
            self.encode_word(&text.as_bytes()[start..end], enc);
            start = end;
        }
    }

    fn encode_word<'t>(&self, word: &'t [u8], enc: &mut Encoding<'_, 't>) {
        if let Some(ids) = enc.cache.get(word) {
            enc.ids.extend_from_slice(ids);
            return;
        }
        if let Some(&(start, end)) = enc.fresh.get(word) {
            enc.ids.extend_from_within(start..end);
            return;
        }
        let start = enc.ids.len();
        self.bpe(word, &mut enc.scratch, &mut enc.ids);
        if word.len() <= MAX_CACHED_WORD {
            enc.fresh.insert(word, (start, enc.ids.len()));
        }
    }

    /// BPE-merges `word` (non-empty) and appends its ids to `out`.
    fn bpe(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if let Some(whole) = &self.whole_words
            && let Some(&id) = whole.get(word)
        {
            out.push(id);
            return;
        }
        if let [b] = word {
            out.push(self.byte_ids[usize::from(*b)]);
        } else if word.len() <= SHORT_WORD {
            self.merge_short(word, scratch, out);
        } else {
            self.merge_long(word, scratch, out);
        }
    }

    #[inline]
    fn merge(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merges.get(&pair_key(left, right)).copied()
    }

    /// Merges by rescanning the pair ranks for the minimum after each merge: O(n²), fastest for short words.
    fn merge_short(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let Scratch { symbols, pairs, .. } = scratch;
        symbols.clear();
        symbols.extend(word.iter().map(|&b| self.byte_ids[usize::from(b)]));
        // pairs[k]: the (rank, merged id) of symbols k and k + 1, rank u32::MAX when they do not merge.
        let no_merge = (u32::MAX, 0);
        pairs.clear();
        pairs.extend(
            symbols
                .windows(2)
                .map(|w| self.merge(w[0], w[1]).unwrap_or(no_merge)),
        );
        loop {
            let mut best = None;
            let mut best_rank = u32::MAX;
            for (k, &(rank, _)) in pairs.iter().enumerate() {
                if rank < best_rank {
                    best_rank = rank;
                    best = Some(k);
                }
            }
            let Some(k) = best else { break };
            symbols[k] = pairs[k].1;
            symbols.remove(k + 1);
            pairs.remove(k);
            if k > 0 {
                pairs[k - 1] = self.merge(symbols[k - 1], symbols[k]).unwrap_or(no_merge);
            }
            if k + 1 < symbols.len() {
                pairs[k] = self.merge(symbols[k], symbols[k + 1]).unwrap_or(no_merge);
            }
        }
        out.extend_from_slice(symbols);
    }

    /// Merges with a priority queue of (rank, position), as `tokenizers` does: O(n log n) for long words.
    fn merge_long(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let Scratch {
            symbols,
            prev,
            next,
            heap,
            ..
        } = scratch;
        let n = word.len();
        symbols.clear();
        symbols.extend(word.iter().map(|&b| self.byte_ids[usize::from(b)]));
        prev.clear();
        prev.extend((0..n).map(|i| i.checked_sub(1).unwrap_or(NONE)));
        next.clear();
        next.extend((1..=n).map(|i| if i < n { i } else { NONE }));
        heap.clear();
        for (pos, w) in symbols.windows(2).enumerate() {
            if let Some((rank, new)) = self.merge(w[0], w[1]) {
                heap.push(Reverse((rank, pos, new)));
            }
        }
        // A removed symbol has prev == next == NONE and is not the first one.
        while let Some(Reverse((_, pos, new))) = heap.pop() {
            let right = next[pos];
            if right == NONE {
                continue; // last symbol, or removed
            }
            // Skip stale entries: the pair at `pos` changed since it was pushed.
            if self.merge(symbols[pos], symbols[right]).map(|m| m.1) != Some(new) {
                continue;
            }
            symbols[pos] = new;
            let after = next[right];
            next[pos] = after;
            prev[right] = NONE;
            next[right] = NONE;
            if after != NONE {
                prev[after] = pos;
                if let Some((rank, merged)) = self.merge(new, symbols[after]) {
                    heap.push(Reverse((rank, pos, merged)));
                }
            }
            let before = prev[pos];
            if before != NONE
                && let Some((rank, merged)) = self.merge(symbols[before], new)
            {
                heap.push(Reverse((rank, before, merged)));
            }
        }
        let mut pos = 0;
        while pos != NONE {
            out.push(symbols[pos]);
            pos = next[pos];
        }
    }
}

/// Reusable buffers for merging one word.
#[derive(Default)]
struct Scratch {
    symbols: Vec<u32>,
    pairs: Vec<(u32, u32)>,
    prev: Vec<usize>,
    next: Vec<usize>,
    heap: BinaryHeap<Reverse<(u32, usize, u32)>>,
}

/// Calls `each` with the text between the matches of `added` (none when `added` is `None`), pushing the
/// matches' ids in between. Empty pieces are skipped.
fn split_added<'t, 'c>(
    added: Option<&AddedTokens>,
    text: &'t str,
    enc: &mut Encoding<'c, 't>,
    mut each: impl FnMut(&mut Encoding<'c, 't>, &'t str),
) {
    let Some(added) = added else {
        if !text.is_empty() {
            each(enc, text);
        }
        return;
    };
    let mut start = 0;
    for m in added.matcher.find_iter(text) {
        if start < m.start() {
            each(enc, &text[start..m.start()]);
        }
        enc.ids.push(added.ids[m.pattern().as_usize()]);
        start = m.end();
    }
    if start < text.len() {
        each(enc, &text[start..]);
    }
}

// === pre-tokenizer ===

/// The GPT-2 pattern's character classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CharClass {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s`
    Space,
    /// `[^\s\p{L}\p{N}]`
    Other,
}

/// `\p{L}`, `\p{N}` and `\s` as `regex-syntax` (and so the regex engine) defines them.
struct Classes {
    ascii: [CharClass; 128],
    /// Disjoint, sorted `(first, last, class)` code point ranges; code points outside them are `Other`.
    ranges: Vec<(u32, u32, CharClass)>,
}

impl Classes {
    /// The tables, built once per process; `None` if `regex-syntax` does not give plain Unicode classes.
    fn get() -> Option<&'static Classes> {
        static CLASSES: OnceLock<Option<Classes>> = OnceLock::new();
        CLASSES.get_or_init(Classes::build).as_ref()
    }

    fn build() -> Option<Classes> {
        let mut ranges = Vec::new();
        for (pattern, class) in [
            (r"\p{L}", CharClass::Letter),
            (r"\p{N}", CharClass::Number),
            (r"\s", CharClass::Space),
        ] {
            let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
            let HirKind::Class(Class::Unicode(set)) = hir.kind() else {
                return None;
            };
            ranges.extend(
                set.ranges()
                    .iter()
                    .map(|r| (u32::from(r.start()), u32::from(r.end()), class)),
            );
        }
        ranges.sort_unstable_by_key(|r| r.0);
        if ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return None; // the classes overlap: not what the pattern assumes
        }
        let mut classes = Classes {
            ascii: [CharClass::Other; 128],
            ranges,
        };
        for c in 0..128u32 {
            classes.ascii[c as usize] = classes.lookup(c);
        }
        Some(classes)
    }

    fn lookup(&self, c: u32) -> CharClass {
        let i = self.ranges.partition_point(|r| r.1 < c);
        match self.ranges.get(i) {
            Some(&(first, _, class)) if first <= c => class,
            _ => CharClass::Other,
        }
    }

    /// The class and UTF-8 length of the char starting at byte `i` of `text` (a char boundary).
    #[inline]
    fn at(&self, text: &str, i: usize) -> (CharClass, usize) {
        match text.as_bytes().get(i) {
            Some(&b) if b < 0x80 => (self.ascii[usize::from(b)], 1),
            _ => match text.get(i..).and_then(|rest| rest.chars().next()) {
                Some(c) => (self.lookup(u32::from(c)), c.len_utf8()),
                None => (CharClass::Other, 1),
            },
        }
    }
}

/// The end of the GPT-2 pattern's match starting at byte `start` of `text` (a char boundary before the end):
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, alternatives tried in order.
/// Every char is in one of the classes, so the matches tile the text. `None` for a whitespace run of
/// [`MAX_SPACE_RUN`] chars or more.
fn word_end(classes: &Classes, text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let n = bytes.len();
    let first = bytes[start];
    if first == b'\'' {
        match (bytes.get(start + 1), bytes.get(start + 2)) {
            (Some(b's' | b't' | b'm' | b'd'), _) => return Some(start + 2),
            (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => return Some(start + 3),
            _ => {}
        }
    }
    let (mut class, len) = classes.at(text, start);
    let mut end = start + len;
    // ` ?X+`: a single ASCII space joins the run that follows it.
    if first == b' ' && end < n {
        let (next, len) = classes.at(text, end);
        if next != CharClass::Space {
            class = next;
            end += len;
        }
    }
    if class != CharClass::Space {
        while end < n {
            let (c, len) = classes.at(text, end);
            if c != class {
                break;
            }
            end += len;
        }
        return Some(end);
    }
    // `\s+(?!\S)`: the whitespace run, less its last char when a non-space follows; `\s+` for a single char.
    let mut last = start;
    let mut chars = 1;
    while end < n {
        let (c, len) = classes.at(text, end);
        if c != CharClass::Space {
            break;
        }
        last = end;
        end += len;
        chars += 1;
    }
    if chars >= MAX_SPACE_RUN {
        return None;
    }
    Some(if end == n || last == start { end } else { last })
}

// === helpers ===

#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// A fast hasher for the merge map's fixed `u64` keys (folded multiply; not for attacker-chosen key sets).
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).rotate_left(23);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let m = u128::from(self.0) * 0x9E37_79B9_7F4A_7C15_u128;
        (m >> 64) as u64 ^ m as u64
    }
}

#[cfg(test)]
mod tests;
