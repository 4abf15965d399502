//! Choosing the next token from the logits: greedy, or temperature / top-k / top-p sampling with
//! a repetition penalty, reproducible under a seed; and the model's defaults for those.

use super::gguf::GgufFile;
use super::{GenerateRequest, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many recent tokens the repetition penalty looks at (llama.cpp's `repeat_last_n`).
const PENALTY_WINDOW: usize = 64;

/// How a model samples when a request does not say: the GGUF's `general.sampling.*` values
/// (as llama.cpp reads them), else edgechat's. The server and `edgechat chat` both start from
/// these, so the same model answers the same way through either.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables it.
    pub repetition_penalty: f32,
}

impl Default for SamplingDefaults {
    /// SmolLM2's model card suggests a low temperature; OpenAI's default of 1.0 rambles on
    /// small models.
    fn default() -> Self {
        SamplingDefaults { temperature: 0.2, top_p: 1.0, top_k: 0, repetition_penalty: 1.0 }
    }
}

impl SamplingDefaults {
    /// The file's values where it has valid ones, ours for the rest.
    pub(crate) fn of(gguf: &GgufFile) -> Self {
        let ours = SamplingDefaults::default();
        let key = |k: &str| gguf.f32(&format!("general.sampling.{k}")).filter(|v| v.is_finite());
        SamplingDefaults {
            temperature: key("temp").filter(|t| *t >= 0.0).unwrap_or(ours.temperature),
            top_p: key("top_p").filter(|p| *p > 0.0 && *p <= 1.0).unwrap_or(ours.top_p),
            top_k: key("top_k").filter(|k| *k >= 0.0).map_or(ours.top_k, |k| k as usize),
            repetition_penalty: key("penalty_repeat")
                .filter(|r| *r > 0.0)
                .unwrap_or(ours.repetition_penalty),
        }
    }

    /// A request for `messages` sampled this way (greedy decoding: set `temperature` to 0).
    pub fn request(&self, messages: Vec<Message>, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            messages,
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            ..GenerateRequest::default()
        }
    }
}

/// Sampling settings, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    /// OpenAI's penalties: subtracted once per recent token present, and per occurrence.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

pub(crate) struct Sampler {
    params: SamplingParams,
    /// Added to these tokens' logits first (OpenAI's `logit_bias`).
    bias: Vec<(u32, f32)>,
    rng: StdRng,
    /// Reused between tokens: (logit, id) pairs of the candidates.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler { params, bias: Vec::new(), rng, candidates: Vec::new() }
    }

    /// The sampler with `bias` added to those tokens' logits.
    pub fn with_bias(self, bias: Vec<(u32, f32)>) -> Self {
        Sampler { bias, ..self }
    }

    /// The log probability of `chosen` and of the `top` likeliest tokens, over `logits` as
    /// `sample` left them (biased and penalized, before temperature).
    pub fn logprobs(&self, logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_total = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let lp = |id: u32| logits.get(id as usize).map_or(f32::NEG_INFINITY, |l| l - log_total);
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || best.last().is_some_and(|b| l > b.1) {
                let at = best.partition_point(|b| b.1 >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
        (lp(chosen), best.into_iter().map(|(id, l)| (id, l - log_total)).collect())
    }

    /// The next token given `logits` over the vocabulary and the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (l * inv_t, i as u32)));
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit);
        let max = self.candidates[0].0;
        let mut total = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0;
        }
        // Keep the smallest prefix whose probability reaches top_p.
        let mut kept = self.candidates.len();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += c.0 / total;
                if cumulative >= self.params.top_p {
                    kept = i + 1;
                    break;
                }
            }
        }
        let mass: f32 = self.candidates[..kept].iter().map(|c| c.0).sum();
        let mut target = self.rng.gen::<f32>() * mass;
        for c in &self.candidates[..kept] {
            target -= c.0;
            if target <= 0.0 {
                return c.1;
            }
        }
        self.candidates[kept - 1].1
    }

    /// The logit bias, then CTRL's penalty as llama.cpp applies it (each distinct recent token
    /// once) and OpenAI's presence and frequency penalties over the same window.
    fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        for &(id, b) in &self.bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        let p = &self.params;
        if p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(PENALTY_WINDOW)..];
        let mut seen: Vec<u32> = recent.to_vec();
        seen.sort_unstable();
        for run in seen.chunk_by(|a, b| a == b) {
            let Some(l) = logits.get_mut(run[0] as usize) else { continue };
            if p.repetition_penalty != 1.0 {
                let r = p.repetition_penalty;
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
            *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
        }
    }
}

/// The first index of the largest logit, so ties resolve the same way every time.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        temperature: f32,
        top_p: f32,
        top_k: usize,
        repetition_penalty: f32,
    ) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0, 1.0, 0, 1.0), None);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(5.0, 1.0, 1, 1.0), Some(7));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4], &[]), 1);
        }
    }

    #[test]
    fn a_small_top_p_keeps_only_the_likeliest() {
        let mut s = Sampler::new(params(1.0, 0.1, 0, 1.0), Some(1));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 4.0, 1.0], &[]), 1);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.95, 40, 1.0), Some(seed));
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn bias_and_openai_penalties_move_greedy_choices() {
        let mut s = Sampler::new(params(0.0, 1.0, 0, 1.0), None).with_bias(vec![(1, 5.0)]);
        assert_eq!(s.sample(&mut [3.0, 0.0], &[]), 1);
        let mut frequency = params(0.0, 1.0, 0, 1.0);
        frequency.frequency_penalty = 0.5;
        let mut s = Sampler::new(frequency, None);
        // 3.0 - 0.5 × 3 occurrences = 1.5 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0, 0, 0]), 1);
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 0);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_likeliest_first() {
        let s = Sampler::new(params(0.0, 1.0, 0, 1.0), None);
        let logits = [0.0f32, 2.0, 1.0];
        let (chosen, top) = s.logprobs(&logits, 2, 2);
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((chosen - (1.0f32.exp() / total).ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((top[0].1 - (2.0f32.exp() / total).ln()).abs() < 1e-5);
    }

    #[test]
    fn the_penalty_turns_greedy_away_from_repeats() {
        let mut s = Sampler::new(params(0.0, 1.0, 0, 2.0), None);
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
    }
}
