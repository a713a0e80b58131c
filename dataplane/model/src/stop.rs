//! [`StopMatcher`]: OpenAI `stop` strings over streamed text.
//!
//! A stop string may arrive split across several decoded chunks, so the matcher holds back the tail of the
//! text that could still be the start of a stop string and releases it once it cannot. Stop *tokens* (EOS ids)
//! are not handled here; the caller compares generated ids with the model card's `eos_token_ids`.

/// Streaming stop-string matcher for one response.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes (0 when there are none).
    max_len: usize,
    /// Text received but not yet released: a suffix that is a proper prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: Vec<String>) -> StopMatcher {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher {
            stops,
            max_len,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text. Returns the text that is safe to emit now and whether a stop string was found.
    ///
    /// On a match, the text before the earliest stop string is emitted and the stop string and everything after
    /// it are dropped; later calls return `("", true)`.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);

        // Earliest match wins; on a tie the position is the same, so the emitted text is too.
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(pos);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }

        let keep = self.partial_match_len();
        let emit_len = self.held.len() - keep;
        if keep == 0 {
            return (std::mem::take(&mut self.held), false);
        }
        let tail = self.held.split_off(emit_len);
        (std::mem::replace(&mut self.held, tail), false)
    }

    /// Ends the stream: releases the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            self.held.clear();
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_bytes();
        let longest = held.len().min(self.max_len.saturating_sub(1));
        (1..=longest)
            .rev()
            .find(|&k| {
                let start = held.len() - k;
                self.held.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.as_bytes().starts_with(&held[start..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn stop_split_across_two_pushes_emits_text_before_it() {
        let mut m = matcher(&["lo w"]);
        // The trailing "l" could start "lo w", so it is held back until the next push decides.
        assert_eq!(m.push("Hel"), ("He".to_owned(), false));
        assert_eq!(m.push("lo wor"), ("l".to_owned(), true));
        assert!(m.stopped());
        assert_eq!(m.push("more"), (String::new(), true));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_prefix_is_held_until_it_cannot_match() {
        let mut m = matcher(&["lo w"]);
        assert_eq!(m.push("Hello"), ("Hel".to_owned(), false));
        assert_eq!(m.push(" there"), ("lo there".to_owned(), false));
    }

    #[test]
    fn no_hold_back_when_no_prefix_matches() {
        let mut m = matcher(&["STOP", "</s>"]);
        assert_eq!(m.push("Hello world"), ("Hello world".to_owned(), false));
        assert_eq!(m.push("abc"), ("abc".to_owned(), false));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn multiple_stops_pick_the_earliest() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push("Hello world"), ("Hel".to_owned(), true));
    }

    #[test]
    fn finish_releases_held_text() {
        let mut m = matcher(&["</answer>"]);
        assert_eq!(m.push("42 </ans"), ("42 ".to_owned(), false));
        assert_eq!(m.finish(), "</ans");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = matcher(&[""]);
        assert_eq!(m.push("abc"), ("abc".to_owned(), false));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let mut m = matcher(&["éé"]);
        assert_eq!(m.push("caféé"), ("caf".to_owned(), true));
        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("café"), ("caf".to_owned(), false));
        assert_eq!(m.push("?"), ("é?".to_owned(), false));
    }

    #[test]
    fn stop_at_start_of_stream_emits_nothing() {
        let mut m = matcher(&["\n\n"]);
        assert_eq!(m.push("\n"), (String::new(), false));
        assert_eq!(m.push("\nrest"), (String::new(), true));
    }
}
