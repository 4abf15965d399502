//! The prompt (prefix) cache: KV caches of finished sequences kept by their tokens, so that a
//! prompt starting the same way — the next turn of a conversation, an OpenAI client resending
//! the history, a shared system prompt — computes only what follows. K and V of a position
//! depend only on the tokens up to it, and our pass gives the same rows whatever the chunking
//! (tests.rs holds it to that), so a cached prefix changes no output.

use crate::Model;

/// Caches bounded by bytes, least recently used evicted first.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    /// Bumped on every use; an entry's `used` orders the evictions.
    clock: u64,
}

struct Entry {
    /// The tokens whose K/V `model` holds, in order.
    tokens: Vec<u32>,
    model: Model,
    used: u64,
}

impl PrefixCache {
    /// A cache holding up to `budget` bytes of K/V; 0 turns it off.
    pub fn new(budget: usize) -> Self {
        PrefixCache { entries: Vec::new(), budget, clock: 0 }
    }

    /// A model whose cache holds the longest prefix of `prompt` that any entry shares, and the
    /// prefix's length — never the whole prompt: its last token must run to give logits. The
    /// entry stays (a copy is returned), so a shared system prompt serves every request.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(Model, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (entry, shared) = self
            .entries
            .iter_mut()
            .map(|e| {
                let shared = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (e, shared.min(limit))
            })
            .max_by_key(|(_, shared)| *shared)
            .filter(|(_, shared)| *shared > 0)?;
        self.clock += 1;
        entry.used = self.clock;
        Some((entry.model.prefix(shared), shared))
    }

    /// Keeps `model`'s cache of `tokens` (the tokens whose K/V it holds), dropping entries it
    /// extends and then the least recently used beyond the budget. A cache larger than the
    /// whole budget is not kept.
    pub fn insert(&mut self, tokens: &[u32], model: &Model) {
        if tokens.is_empty() || self.budget == 0 {
            return; // nothing to keep, or off: skip the copy
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            e.used = self.clock; // nothing new to keep
            return;
        }
        let model = model.prefix(tokens.len());
        if model.kv_bytes() > self.budget {
            return;
        }
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.entries.push(Entry { tokens: tokens.to_vec(), model, used: self.clock });
        while self.bytes() > self.budget {
            if let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) {
                self.entries.swap_remove(i);
            }
        }
    }

    /// Bytes of K/V held now.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.model.kv_bytes()).sum()
    }
}
