//! The generation thread: owns the weights, takes requests from a bounded FIFO queue, and
//! serves up to `max_batch` of them together: each step is one forward pass over every running
//! sequence (a token each, or a slice of a new prompt), so the weights are read once for all,
//! requests join and leave between steps, and no request starves another.

use super::grammar::Constraint;
use super::model::{self, Input, Weights};
use super::sampler::{Sampler, SamplingParams};
use super::template::CallFormat;
use super::text::{Step, TextStream};
use super::tokenizer::TextTokenizer;
use super::{Event, FinishReason, LocalError, Usage};
use candle_core::Device;
use edgechat_llama::PrefixCache;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens run per step, all sequences together: long prompts are cut so the other
/// sequences keep streaming.
const PREFILL_CHUNK: usize = 128;

pub(crate) type Reply = UnboundedSender<Result<Event, LocalError>>;

/// One accepted request, tokenized and checked against the context window.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// The grammar the answer must follow (a JSON schema), or the open call's.
    pub constraint: Option<Constraint>,
    /// Tool calls the model may open on its own.
    pub calls: Option<Calls>,
    pub logit_bias: Vec<(u32, f32)>,
    /// Send each token's log probability, with this many alternatives.
    pub logprobs: Option<u8>,
    pub reply: Reply,
}

/// Tool calls in the template's format: text is free until the model opens a call, and the call
/// is held to `grammar` from there to its end.
pub(crate) struct Calls {
    pub format: CallFormat,
    /// One call's grammar, before its first token (each call starts from a clone).
    pub grammar: Constraint,
    /// Free text, and maybe another call, may follow a tagged call.
    pub parallel: bool,
}

/// Requests waiting for the generation thread.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    max_waiting: usize,
    /// Sequences in the running batch, as the generation thread last left it.
    active: AtomicUsize,
    /// KV cache bytes of the running sequences and of the prompt cache, after the last step.
    kv_bytes: AtomicUsize,
    prompt_cache_bytes: AtomicUsize,
}

struct QueueState {
    waiting: VecDeque<Job>,
    shutdown: bool,
}

impl Queue {
    pub fn new(max_waiting: usize) -> Self {
        let state = QueueState { waiting: VecDeque::new(), shutdown: false };
        Queue {
            state: Mutex::new(state),
            wake: Condvar::new(),
            max_waiting,
            active: 0.into(),
            kv_bytes: 0.into(),
            prompt_cache_bytes: 0.into(),
        }
    }

    /// Adds a job at the back, or refuses it when `max_waiting` are already waiting.
    pub fn push(&self, job: Job) -> Result<(), LocalError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.shutdown {
            return Err(LocalError::Stopped);
        }
        if state.waiting.len() >= self.max_waiting {
            return Err(LocalError::Busy { queued: state.waiting.len() });
        }
        state.waiting.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// Requests (waiting, in the running batch), for the metrics.
    pub fn depth(&self) -> (usize, usize) {
        let waiting = self.state.lock().unwrap_or_else(|p| p.into_inner()).waiting.len();
        (waiting, self.active.load(Ordering::Relaxed))
    }

    /// KV cache bytes held after the last step: the running sequences' and the prompt cache's.
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes.load(Ordering::Relaxed)
    }

    /// KV cache bytes the prompt cache held after the last step.
    pub fn prompt_cache_bytes(&self) -> usize {
        self.prompt_cache_bytes.load(Ordering::Relaxed)
    }

    pub fn shutdown(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
        self.wake.notify_all();
    }

    /// Moves waiting jobs into `active` up to `max`, each through `start` (which may copy a
    /// cached prefix, so it runs after the lock is released: `push` runs on tokio's threads);
    /// blocks while there is nothing at all to do. `false` once shut down.
    fn admit(
        &self,
        active: &mut Vec<Sequence>,
        max: usize,
        start: impl FnMut(Job) -> Sequence,
    ) -> bool {
        let mut jobs = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.shutdown {
                return false;
            }
            while active.len() + jobs.len() < max {
                match state.waiting.pop_front() {
                    Some(job) if !job.reply.is_closed() => jobs.push(job),
                    Some(_) => {}
                    None => break,
                }
            }
            if !active.is_empty() || !jobs.is_empty() {
                break;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        drop(state);
        active.extend(jobs.into_iter().map(start));
        true
    }
}

/// Whether `token`'s text opens a JSON object.
fn opens_object(tokenizer: &TextTokenizer, token: u32) -> bool {
    tokenizer.decode(&[token]).is_ok_and(|t| t.trim_start().starts_with('{'))
}

/// Runs until the queue shuts down; call it on a dedicated thread.
pub(crate) fn run(
    queue: Arc<Queue>,
    base: Weights,
    tokenizer: Arc<TextTokenizer>,
    device: Device,
    max_batch: usize,
    prompt_cache: usize,
) {
    let mut prompts = PrefixCache::new(prompt_cache);
    let mut active: Vec<Sequence> = Vec::new();
    while queue.admit(&mut active, max_batch, |job| Sequence::new(job, &base, &mut prompts)) {
        queue.active.store(active.len(), Ordering::Relaxed);
        // Inside candle's pool for the step (entering it per candle op is costly), never while
        // waiting: an idle engine holding one of its workers would starve another engine's.
        device.with_context(|| step(&mut active, &tokenizer, &device, &mut prompts));
        queue.active.store(active.len(), Ordering::Relaxed);
        let running: usize = active.iter().map(|s| s.weights.kv_bytes()).sum();
        queue.kv_bytes.store(running + prompts.bytes(), Ordering::Relaxed);
        queue.prompt_cache_bytes.store(prompts.bytes(), Ordering::Relaxed);
    }
}

/// One forward pass over the running sequences; those that finish (or fail) leave.
fn step(
    active: &mut Vec<Sequence>,
    tokenizer: &TextTokenizer,
    device: &Device,
    prompts: &mut PrefixCache,
) {
    // A dropped stream is a cancelled request: its cache goes now, before another token.
    active.retain(|s| !s.job.reply.is_closed());
    if active.is_empty() {
        return;
    }
    let mut budget = PREFILL_CHUNK;
    let runs: Vec<Range<usize>> = active.iter().map(|s| s.next(&mut budget)).collect();
    let (mut batch, mut inputs, mut prefill) = (Vec::new(), Vec::new(), false);
    for (s, run) in active.iter_mut().zip(&runs).filter(|(_, r)| !r.is_empty()) {
        prefill |= s.cached < s.job.prompt.len();
        inputs.push(Input { tokens: &s.tokens[run.clone()], pos: run.start });
        batch.push(&mut s.weights);
    }
    let started = Instant::now();
    let result = model::forward_batch(batch, &inputs, device);
    let took = started.elapsed();
    let tokens = inputs.iter().map(|i| i.tokens.len()).sum();
    crate::metrics::local_forward(if prefill { "prefill" } else { "decode" }, tokens, took);
    let mut logits = match result {
        Ok(logits) => logits.into_iter(),
        Err(e) => {
            // The step failed as a whole: every sequence in it ends with its reason.
            let message = match e {
                LocalError::Generation(m) => m,
                other => other.to_string(),
            };
            active.drain(..).for_each(|s| s.fail(LocalError::Generation(message.clone())));
            return;
        }
    };
    let mut runs = runs.into_iter();
    active.retain_mut(|s| match runs.next().filter(|r| !r.is_empty()) {
        Some(run) => {
            let logits = logits.next().unwrap_or_default();
            let done = s.advance(run.end, logits, took, tokenizer);
            if done {
                s.weights.keep(&s.tokens[..s.cached], prompts);
            }
            !done
        }
        None => true, // sat this step out
    });
}

/// One request being generated, with its own KV cache.
struct Sequence {
    weights: Weights,
    job: Job,
    /// Prompt then generated tokens; positions in the KV cache.
    tokens: Vec<u32>,
    /// How many of `tokens` are already in the KV cache.
    cached: usize,
    /// How many of the prompt's came from the prompt cache.
    reused: usize,
    generated: usize,
    /// Time in decode steps, for the tokens/s metric.
    decode_time: Duration,
    sampler: Sampler,
    text: TextStream,
}

impl Sequence {
    fn new(job: Job, base: &Weights, prompts: &mut PrefixCache) -> Self {
        let sampler = Sampler::new(job.params, job.seed).with_bias(job.logit_bias.clone());
        let text = TextStream::new(job.stop.clone());
        let tokens = job.prompt.clone();
        let (weights, reused) = base.resume(&tokens, prompts);
        crate::metrics::local_prompt_cached(reused);
        Sequence {
            weights,
            job,
            tokens,
            cached: reused,
            reused,
            generated: 0,
            decode_time: Duration::ZERO,
            sampler,
            text,
        }
    }

    /// The tokens this sequence runs in the next step: its last one, or as much of its prompt
    /// as the step's prefill `budget` leaves (taken from it; none left: it sits out).
    fn next(&self, budget: &mut usize) -> Range<usize> {
        let rest = self.tokens.len() - self.cached;
        let take = match self.weights.prefill_chunk(PREFILL_CHUNK) {
            _ if rest == 1 => 1,
            PREFILL_CHUNK => rest.min(*budget),
            whole => rest.min(whole),
        };
        *budget = budget.saturating_sub(take);
        self.cached..self.cached + take
    }

    /// Takes the logits of a step that ran up to `end`; `true` when this sequence is done
    /// (finished, or failed).
    fn advance(
        &mut self,
        end: usize,
        logits: Vec<f32>,
        took: Duration,
        tokenizer: &TextTokenizer,
    ) -> bool {
        if self.cached >= self.job.prompt.len() {
            self.decode_time += took;
        }
        self.cached = end;
        if self.cached < self.tokens.len() {
            return false; // more prompt to read first
        }
        match self.sample(logits, tokenizer) {
            Ok(None) => false,
            Ok(Some(reason)) => {
                self.finish(reason);
                true
            }
            Err(e) => {
                self.fail(e);
                true
            }
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let tail = self.text.finish();
        self.send_text(tail);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let usage = Usage {
            prompt_tokens: count(self.job.prompt.len()),
            completion_tokens: count(self.generated),
            cached_tokens: count(self.reused),
        };
        // The first token comes out of the prefill; the rest are decode steps.
        let decoded = self.generated.saturating_sub(1);
        if decoded > 0 && !self.decode_time.is_zero() {
            crate::metrics::local_decode_rate(decoded as f64 / self.decode_time.as_secs_f64());
        }
        let _ = self.job.reply.send(Ok(Event::Finish { reason, usage: Some(usage) }));
    }

    fn fail(&self, e: LocalError) {
        let _ = self.job.reply.send(Err(e));
    }

    /// Picks the next token and streams its text; `Some` when generation ends here.
    fn sample(
        &mut self,
        mut logits: Vec<f32>,
        tokenizer: &TextTokenizer,
    ) -> Result<Option<FinishReason>, LocalError> {
        let free = self.may_open(CallFormat::Bare).then(|| logits.clone());
        if let Some(c) = &mut self.job.constraint {
            c.mask(&mut logits)?;
        }
        let mut next = self.sampler.sample(&mut logits, &self.tokens);
        // A bare call is the whole answer: when a token before any text opens a JSON object, the model
        // chose to call, and that token is drawn again under the call's grammar.
        if let Some(mut free) = free.filter(|_| opens_object(tokenizer, next)) {
            self.open_call();
            if let Some(c) = &mut self.job.constraint {
                c.mask(&mut free)?;
            }
            next = self.sampler.sample(&mut free, &self.tokens);
            logits = free;
        }
        if let Some(top) = self.job.logprobs {
            self.send_logprobs(&logits, next, top, tokenizer);
        }
        let complete = match &mut self.job.constraint {
            Some(c) => c.accept(next)?,
            None => false,
        };
        if tokenizer.eos.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        self.tokens.push(next);
        self.generated += 1;
        match self.text.push(tokenizer, next)? {
            Step::Stop(text) => {
                self.send_text(text);
                return Ok(Some(FinishReason::Stop));
            }
            Step::Continue(text) => self.send_text(text),
        }
        if complete && !self.close_call() {
            return Ok(Some(FinishReason::Stop));
        }
        if self.may_open(CallFormat::Tagged)
            && self.text.decoded().trim_end().ends_with(CallFormat::TAG)
        {
            self.open_call();
        }
        Ok((self.generated >= self.job.max_tokens).then_some(FinishReason::Length))
    }

    /// Whether a call in `format` may open here: a bare one only before the answer says
    /// anything, a tagged one whenever no call is open.
    fn may_open(&self, format: CallFormat) -> bool {
        let Some(calls) = &self.job.calls else { return false };
        let first = format == CallFormat::Tagged || self.text.decoded().trim().is_empty();
        calls.format == format && first && self.job.constraint.is_none()
    }

    fn open_call(&mut self) {
        self.job.constraint = self.job.calls.as_ref().map(|c| c.grammar.clone());
    }

    /// Ends the call whose grammar just completed; `false` when the answer ends with it.
    fn close_call(&mut self) -> bool {
        let more =
            self.job.calls.as_ref().is_some_and(|c| c.parallel && c.format == CallFormat::Tagged);
        if more {
            self.job.constraint = None;
        }
        more
    }

    /// OpenAI's `logprobs.content` item for `chosen`: its text, bytes and log probability,
    /// and the `top` likeliest alternatives.
    fn send_logprobs(&self, logits: &[f32], chosen: u32, top: u8, tokenizer: &TextTokenizer) {
        let (logprob, best) = self.sampler.logprobs(logits, chosen, top as usize);
        let ranked = std::iter::once((chosen, logprob)).chain(best);
        let (ids, logprobs): (Vec<u32>, Vec<f32>) = ranked.unzip();
        let spelled = tokenizer.spell(ids.into_iter());
        let mut items = spelled.into_iter().zip(logprobs).map(|((bytes, _), logprob)| {
            let token = String::from_utf8_lossy(&bytes);
            serde_json::json!({"token": token, "logprob": logprob, "bytes": bytes})
        });
        let mut entry = items.next().unwrap_or_default();
        entry["top_logprobs"] = items.collect();
        let _ = self.job.reply.send(Ok(Event::Logprobs(vec![entry])));
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            let _ = self.job.reply.send(Ok(Event::Delta(text)));
        }
    }
}
