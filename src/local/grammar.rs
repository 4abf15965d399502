//! Constrained decoding: a JSON schema becomes a token mask per step (llguidance, the engine
//! mistral.rs and others use), so that the local model's answer always parses and validates.
//! The vocabulary's trie is built once per model, on the first constrained request; a schema
//! compiles per request (about a millisecond) and its mask costs microseconds per token.

use super::tokenizer::TextTokenizer;
use super::LocalError;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// The vocabulary as llguidance sees it: each token's bytes.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Only used for bytes the grammar forces, which we do not ask for (no fast-forward).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }
}

/// A model's grammar compiler.
pub(crate) struct Grammars {
    factory: ParserFactory,
    /// Every id that ends a turn: allowed wherever the grammar allows its end.
    eos: Vec<u32>,
    /// Tokens the trie knows; logits past them (padding) are never allowed.
    vocab: usize,
}

impl Grammars {
    /// The compiler for `tokenizer`'s vocabulary.
    pub(crate) fn new(tokenizer: &TextTokenizer) -> Result<Grammars, LocalError> {
        let fail = |e: String| LocalError::Generation(format!("cannot build the grammar: {e}"));
        let tokens: Vec<Vec<u8>> = tokenizer
            .vocabulary_bytes()
            .into_iter()
            .map(|(mut bytes, special)| {
                if special {
                    bytes.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
                }
                bytes
            })
            .collect();
        let eos = tokenizer.eos.clone();
        let first =
            *eos.first().ok_or_else(|| fail("the model has no end-of-turn token".into()))?;
        let vocab = tokens.len();
        let info = TokRxInfo::new(vocab as u32, first);
        let env: TokEnv = Arc::new(Vocabulary { trie: TokTrie::from(&info, &tokens) });
        let caps = InferenceCapabilities::default();
        let mut factory = ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())
            .map_err(|e| fail(e.to_string()))?;
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Grammars { factory, eos, vocab })
    }

    /// A matcher for JSON valid against `schema` (`None`: any JSON object), or the reason the
    /// schema cannot be used.
    pub(crate) fn json(&self, schema: Option<&Value>) -> Result<Constraint, LocalError> {
        let schema = schema.cloned().unwrap_or_else(|| json!({"type": "object"}));
        self.compile(TopLevelGrammar::from_json_schema(compact(schema)))
    }

    /// A matcher for one tool call: blanks (models put a newline after `<tool_call>`), then
    /// JSON valid against `schema`.
    pub(crate) fn call(&self, schema: &Value) -> Result<Constraint, LocalError> {
        let schema = compact(schema.clone());
        self.compile(TopLevelGrammar::from_lark(format!(
            "start: call | BLANKS call\nBLANKS: /[ \\t\\n]+/\ncall: %json {schema}"
        )))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<Constraint, LocalError> {
        let parser = self.factory.create_parser(grammar).map_err(|e| {
            LocalError::InvalidRequest(format!("the JSON schema cannot be used: {e}"))
        })?;
        let matcher = Matcher::new(Ok(parser));
        Ok(Constraint { matcher, eos: self.eos.clone(), vocab: self.vocab })
    }
}

/// `schema` written on one line, without runs of blanks: a sampled model could otherwise pad
/// forever.
fn compact(mut schema: Value) -> Value {
    JsonCompileOptions { whitespace_flexible: false, ..Default::default() }.apply_to(&mut schema);
    schema
}

/// One request's grammar state; a clone starts from the same point.
#[derive(Clone)]
pub(crate) struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
    vocab: usize,
}

impl Constraint {
    /// Sets every token the grammar does not allow next to -inf.
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), LocalError> {
        let mask = self.matcher.compute_mask().map_err(grammar_error)?;
        let eos_ok = self.eos.iter().any(|&e| mask.is_allowed(e));
        for (id, l) in logits.iter_mut().enumerate() {
            let allowed = id < self.vocab && mask.is_allowed(id as u32)
                || eos_ok && self.eos.contains(&(id as u32));
            if !allowed {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Takes the sampled token; `true` once the grammar is complete (nothing may follow).
    pub(crate) fn accept(&mut self, token: u32) -> Result<bool, LocalError> {
        let token = match self.eos.contains(&token) {
            true => self.eos[0],
            false => token,
        };
        self.matcher.consume_token(token).map_err(grammar_error)?;
        Ok(self.matcher.is_stopped())
    }
}

fn grammar_error(e: impl std::fmt::Display) -> LocalError {
    LocalError::Generation(format!("constrained decoding failed: {e}"))
}
