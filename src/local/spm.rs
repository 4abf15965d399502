//! SentencePiece-style tokenization from GGUF metadata (`tokenizer.ggml.model = "llama"`: Gemma,
//! Llama 2, Mistral, TinyLlama), written to give exactly llama.cpp's token ids:
//!
//! 1. control, user-defined and unknown tokens are cut out of the text first, each matched
//!    whole, longest token first (Gemma's `<start_of_turn>`, but also its runs of spaces and
//!    newlines, which are user-defined tokens);
//! 2. each remaining piece gets a leading space when the model asks for one
//!    (`add_space_prefix`) and it follows the start or a special token, and its spaces become
//!    `▁`;
//! 3. starting from single characters, the adjacent pair whose joined text is the
//!    highest-scoring vocabulary entry is merged, again and again (the leftmost on equal
//!    scores), until no joined pair is in the vocabulary;
//! 4. a character that is no token by itself becomes its UTF-8 bytes as `<0xNN>` tokens.
//!
//! The `tokenizers` crate's BPE cannot stand in: it merges by a ranked pair list (which would
//! have to hold every split of all 262k Gemma tokens, tens of MB built at every load) and
//! breaks ties between different pairs by rank rather than by position.

use aho_corasick::{AhoCorasick, MatchKind};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// How SentencePiece writes a space inside a token.
const SPACE: &str = "\u{2581}";

/// A token's kind, from `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Normal,
    Unknown,
    /// BOS, EOS, turn markers: matched whole in text, left out of decoded text.
    Control,
    /// Matched whole in text and decoded as written (Gemma's `\n`, `  `, `<b>` …).
    UserDefined,
    /// `<0xNN>`: one byte of UTF-8.
    Byte,
    /// Undefined (0) or unused (5): never produced by encoding text, decoded as nothing.
    Other,
}

impl Kind {
    /// The kind for a `tokenizer.ggml.token_type` value.
    pub fn from_gguf(value: u32) -> Kind {
        match value {
            1 => Kind::Normal,
            2 => Kind::Unknown,
            3 => Kind::Control,
            4 => Kind::UserDefined,
            6 => Kind::Byte,
            _ => Kind::Other,
        }
    }

    fn is_special(self) -> bool {
        matches!(self, Kind::Control | Kind::UserDefined | Kind::Unknown)
    }
}

/// A SentencePiece vocabulary ready to encode and decode.
pub(crate) struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<Kind>,
    ids: HashMap<String, u32>,
    /// The token for each byte, for characters outside the vocabulary.
    bytes: [Option<u32>; 256],
    /// Stands in for a byte that has no token (a vocabulary without byte fallback).
    unk: Option<u32>,
    specials: Specials,
    add_space_prefix: bool,
}

/// The special tokens, in the order llama.cpp cuts them out: longest first (by id among equal
/// lengths), with one automaton that finds which of them occur in a text at all.
struct Specials {
    ids: Vec<u32>,
    finder: Option<AhoCorasick>,
}

/// A piece of the text after special tokens have been cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

impl Spm {
    /// `scores` and `kinds` default per token (0.0, normal) when the file has none, as in
    /// llama.cpp.
    pub fn new(
        pieces: Vec<String>,
        scores: Option<Vec<f32>>,
        kinds: Option<Vec<Kind>>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Spm, String> {
        let n = pieces.len();
        let scores = scores.unwrap_or_else(|| vec![0.0; n]);
        let kinds = kinds.unwrap_or_else(|| vec![Kind::Normal; n]);
        if scores.len() != n || kinds.len() != n {
            return Err(format!(
                "{n} tokens but {} scores and {} token types",
                scores.len(),
                kinds.len()
            ));
        }
        if u32::try_from(n).is_err() {
            return Err(format!("{n} tokens do not fit 32-bit ids"));
        }
        // A later duplicate wins, as in llama.cpp's map.
        let ids: HashMap<String, u32> =
            pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            let plain = char::from_u32(b as u32).filter(|_| b < 0x80).map(String::from);
            *slot = ids.get(&hex).or_else(|| plain.and_then(|p| ids.get(&p))).copied();
        }
        let specials = Specials::new(&pieces, &kinds)?;
        Ok(Spm { pieces, scores, kinds, ids, bytes, unk, specials, add_space_prefix })
    }

    /// Token ids of `text`, special tokens in it recognised. No BOS/EOS are added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut after_special = true;
        for fragment in self.specials.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(piece) => {
                    let prefix = if self.add_space_prefix && after_special { " " } else { "" };
                    let escaped = format!("{prefix}{piece}").replace(' ', SPACE);
                    self.merge(&escaped, &mut out);
                    after_special = false;
                }
            }
        }
        out
    }

    /// Text of `ids`: `▁` back to spaces, byte tokens back to bytes, control and unknown
    /// tokens left out, and the leading space `add_space_prefix` put in front removed.
    /// Invalid UTF-8 (a character cut short) shows as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let start = bytes.len();
            self.piece_bytes(id, &mut bytes);
            if i == 0 && self.add_space_prefix && bytes.get(start) == Some(&b' ') {
                bytes.remove(start);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The id of the token written `piece`, as the GGUF spells it (`▁` for spaces).
    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// The token `id` as the GGUF spells it.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Tokens in the vocabulary, special ones included.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The bytes token `id` stands for, and whether it is a control token (written as its
    /// piece); `None` past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<(Vec<u8>, bool)> {
        let kind = *self.kinds.get(id as usize)?;
        if matches!(kind, Kind::Control | Kind::Unknown | Kind::Other) {
            return Some((self.pieces[id as usize].as_bytes().to_vec(), true));
        }
        let mut bytes = Vec::new();
        self.piece_bytes(id, &mut bytes);
        Some((bytes, false))
    }

    fn piece_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let i = id as usize;
        let (Some(piece), Some(kind)) = (self.pieces.get(i), self.kinds.get(i)) else { return };
        match kind {
            Kind::Normal => out.extend_from_slice(piece.replace(SPACE, " ").as_bytes()),
            Kind::UserDefined => out.extend_from_slice(piece.as_bytes()),
            Kind::Byte => out.extend(byte_of(piece)),
            Kind::Control | Kind::Unknown | Kind::Other => {}
        }
    }

    /// Step 3 and 4 of the module doc on one escaped fragment.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol { start, len: c.len_utf8(), prev: None, next: None })
            .collect();
        let count = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < count).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..count {
            self.push_pair(text, &symbols, i - 1, Some(i), &mut queue);
        }
        while let Some(pair) = queue.pop() {
            let (left, right) = (symbols[pair.left], symbols[pair.right]);
            // Stale: one side has been merged into something else since this pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != pair.len {
                continue;
            }
            symbols[pair.left].len += right.len;
            symbols[pair.left].next = right.next;
            symbols[pair.right].len = 0;
            if let Some(next) = right.next {
                symbols[next].prev = Some(pair.left);
            }
            if let Some(prev) = left.prev {
                self.push_pair(text, &symbols, prev, Some(pair.left), &mut queue);
            }
            self.push_pair(text, &symbols, pair.left, right.next, &mut queue);
        }
        let mut at = (count > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize].or(self.unk)))
                }
            }
            at = s.next;
        }
    }

    /// Queues `left` + `right` if their joined text is a token.
    fn push_pair(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: Option<usize>,
        queue: &mut BinaryHeap<Pair>,
    ) {
        let Some(right) = right else { return };
        let start = symbols[left].start;
        let end = symbols[right].start + symbols[right].len;
        if let Some(&id) = self.ids.get(&text[start..end]) {
            queue.push(Pair { score: self.scores[id as usize], left, right, len: end - start });
        }
    }
}

impl Specials {
    fn new(pieces: &[String], kinds: &[Kind]) -> Result<Specials, String> {
        let mut ids: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&i| kinds[i as usize].is_special() && !pieces[i as usize].is_empty())
            .collect();
        ids.sort_by_key(|&i| std::cmp::Reverse(pieces[i as usize].len()));
        let finder = if ids.is_empty() {
            None
        } else {
            let patterns = ids.iter().map(|&i| pieces[i as usize].as_str());
            let built = AhoCorasick::builder().match_kind(MatchKind::Standard).build(patterns);
            Some(built.map_err(|e| format!("special tokens: {e}"))?)
        };
        Ok(Specials { ids, finder })
    }

    /// Cuts the special tokens out of `text` as llama.cpp does: for each special token, longest
    /// first, every non-overlapping occurrence, from the left, in every text piece left so far.
    /// Only tokens that occur in `text` at all are tried, so 6k Gemma specials cost one scan.
    fn partition<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        let Some(finder) = &self.finder else { return fragments };
        // Where each special token first occurs; in rank order (longest first).
        let mut present: Vec<(usize, std::ops::Range<usize>)> = finder
            .find_overlapping_iter(text)
            .map(|m| (m.pattern().as_usize(), m.range()))
            .collect();
        present.sort_by_key(|(rank, range)| (*rank, range.start));
        present.dedup_by_key(|(rank, _)| *rank);
        for (rank, range) in present {
            fragments = split_all(fragments, &text[range], self.ids[rank]);
        }
        fragments
    }
}

/// Replaces each occurrence of `special` in the text fragments by the token `id`.
fn split_all<'t>(fragments: Vec<Fragment<'t>>, special: &str, id: u32) -> Vec<Fragment<'t>> {
    let mut out = Vec::with_capacity(fragments.len());
    for fragment in fragments {
        let Fragment::Text(text) = fragment else {
            out.push(fragment);
            continue;
        };
        let mut rest = 0;
        for (at, _) in text.match_indices(special) {
            if at > rest {
                out.push(Fragment::Text(&text[rest..at]));
            }
            out.push(Fragment::Token(id));
            rest = at + special.len();
        }
        if rest < text.len() {
            out.push(Fragment::Text(&text[rest..]));
        }
    }
    out
}

/// The byte a `<0xNN>` token stands for.
fn byte_of(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// One symbol of the text being merged: a byte range, linked to its neighbours; `len` 0 once
/// merged into the symbol on its left.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Two adjacent symbols whose joined text is a token with `score`.
#[derive(Debug)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the joined text, to spot pairs made stale by other merges.
    len: usize,
}

/// The best pair first: highest score, then leftmost. Scores compare as llama.cpp compares
/// them (`<`), so -0.0 and 0.0 tie.
impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pair {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of `(piece, score, kind)`, plus byte tokens for every byte.
    fn vocab(entries: &[(&str, f32, Kind)], add_space_prefix: bool) -> Spm {
        let mut pieces: Vec<String> = entries.iter().map(|e| e.0.to_owned()).collect();
        let mut scores: Vec<f32> = entries.iter().map(|e| e.1).collect();
        let mut kinds: Vec<Kind> = entries.iter().map(|e| e.2).collect();
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            kinds.push(Kind::Byte);
        }
        Spm::new(pieces, Some(scores), Some(kinds), None, add_space_prefix).unwrap()
    }

    fn ids_of(spm: &Spm, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| spm.token_to_id(p).unwrap_or_else(|| panic!("{p}"))).collect()
    }

    use Kind::*;

    #[test]
    fn the_highest_scoring_pair_merges_first() {
        // "abc": "ab" scores higher than "bc", so a+b merge and "bc" never forms.
        let spm = vocab(
            &[
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("c", -1.0, Normal),
                ("ab", -2.0, Normal),
                ("bc", -3.0, Normal),
            ],
            false,
        );
        assert_eq!(spm.encode("abc"), ids_of(&spm, &["ab", "c"]));
        let spm = vocab(
            &[
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("c", -1.0, Normal),
                ("ab", -3.0, Normal),
                ("bc", -2.0, Normal),
            ],
            false,
        );
        assert_eq!(spm.encode("abc"), ids_of(&spm, &["a", "bc"]));
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let spm = vocab(&[("a", -1.0, Normal), ("aa", -2.0, Normal)], false);
        assert_eq!(spm.encode("aaa"), ids_of(&spm, &["aa", "a"]));
    }

    #[test]
    fn merges_need_only_the_joined_text_in_the_vocabulary() {
        // "é" alone is no token: its bytes; "xé" is, so it merges from single characters.
        let spm = vocab(&[("x", -1.0, Normal), ("xé", -2.0, Normal)], false);
        assert_eq!(spm.encode("xé"), ids_of(&spm, &["xé"]));
        assert_eq!(spm.encode("é"), ids_of(&spm, &["<0xC3>", "<0xA9>"]));
        assert_eq!(spm.decode(&spm.encode("é")), "é");
    }

    #[test]
    fn spaces_become_the_marker_and_come_back() {
        let spm = vocab(
            &[
                ("▁", -1.0, Normal),
                ("h", -1.0, Normal),
                ("i", -1.0, Normal),
                ("▁hi", -2.0, Normal),
                ("hi", -3.0, Normal),
            ],
            true,
        );
        assert_eq!(spm.encode("hi hi"), ids_of(&spm, &["▁hi", "▁hi"]));
        assert_eq!(spm.encode(" hi"), ids_of(&spm, &["▁", "▁hi"]));
        for text in ["hi hi", " hi", "  hi ", ""] {
            assert_eq!(spm.decode(&spm.encode(text)), text, "{text:?}");
        }
        let plain = vocab(
            &[
                ("▁", -1.0, Normal),
                ("h", -1.0, Normal),
                ("i", -1.0, Normal),
                ("▁hi", -2.0, Normal),
                ("hi", -3.0, Normal),
            ],
            false,
        );
        assert_eq!(plain.encode("hi hi"), ids_of(&plain, &["hi", "▁hi"]));
    }

    #[test]
    fn specials_are_cut_out_longest_first_and_decoded_by_kind() {
        let spm = vocab(
            &[
                ("<s>", 0.0, Control),
                ("<turn>", 0.0, Control),
                ("\n", 0.0, UserDefined),
                ("\n\n", 0.0, UserDefined),
                ("a", -1.0, Normal),
                ("▁", -1.0, Normal),
                ("▁a", -2.0, Normal),
            ],
            true,
        );
        // After a special token the prefix space comes back (llama.cpp's rule).
        assert_eq!(
            spm.encode("<turn>a\n\n\na"),
            ids_of(&spm, &["<turn>", "▁a", "\n\n", "\n", "▁a"])
        );
        assert_eq!(spm.decode(&spm.encode("<s>a\n\n")), " a\n\n");
        assert_eq!(spm.decode(&spm.encode("a\n\n")), "a\n\n");
    }

    #[test]
    fn kinds_come_from_gguf_numbers() {
        assert_eq!(Kind::from_gguf(1), Normal);
        assert_eq!(Kind::from_gguf(3), Control);
        assert_eq!(Kind::from_gguf(4), UserDefined);
        assert_eq!(Kind::from_gguf(6), Byte);
        assert_eq!(Kind::from_gguf(5), Other);
        assert_eq!(byte_of("<0x0A>"), Some(10));
    }
}
