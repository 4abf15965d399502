//! Turning generated token ids into text deltas that never split a UTF-8 character or a grapheme
//! and never show any part of a stop string.

use super::tokenizer::TextTokenizer;
use super::LocalError;
use unicode_segmentation::UnicodeSegmentation;

/// What a new token did to the visible text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Text safe to show now (possibly empty while a character or stop string is incomplete).
    Continue(String),
    /// A stop string appeared: the text before it, and generation ends.
    Stop(String),
}

pub(crate) struct TextStream {
    ids: Vec<u32>,
    /// The decoded text of `ids`, up to the last complete character.
    decoded: String,
    /// Bytes of `decoded` already handed out.
    emitted: usize,
    stops: Vec<String>,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        TextStream { ids: Vec::new(), decoded: String::new(), emitted: 0, stops }
    }

    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Step, LocalError> {
        self.ids.push(id);
        // Decoding all ids each time keeps byte-level merges across tokens right; answers are
        // short, so the quadratic cost stays far below one forward pass.
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(Step::Continue(String::new()));
        }
        self.decoded = text;
        if self.emitted > self.decoded.len() || !self.decoded.is_char_boundary(self.emitted) {
            self.emitted = self.decoded.len();
        }
        Ok(self.advance())
    }

    /// The text so far, shown or not (up to its last complete character).
    pub fn decoded(&self) -> &str {
        &self.decoded
    }

    /// Everything still held back, for the end of generation.
    pub fn finish(&mut self) -> String {
        let rest = self.decoded[self.emitted..].to_owned();
        self.emitted = self.decoded.len();
        rest
    }

    fn advance(&mut self) -> Step {
        let pending = &self.decoded[self.emitted..];
        let first_stop = self.stops.iter().filter_map(|s| pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let out = pending[..at].to_owned();
            self.emitted = self.decoded.len();
            return Step::Stop(out);
        }
        let end = self.emitted + self.safe_len(pending);
        let out = self.decoded[self.emitted..end].to_owned();
        self.emitted = end;
        Step::Continue(out)
    }

    /// How much of `pending` can be shown: not the last grapheme (the next token may extend it,
    /// as with emoji sequences or combining accents), and not a tail that may begin a stop string.
    fn safe_len(&self, pending: &str) -> usize {
        let grapheme = pending.grapheme_indices(true).next_back().map_or(0, |(i, _)| i);
        let stop = pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&pending[i..])))
            .unwrap_or(pending.len());
        grapheme.min(stop)
    }
}
