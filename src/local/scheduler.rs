//! The generation thread: owns the weights, takes requests from a bounded FIFO queue, and serves
//! up to `max_batch` of them round-robin, one step each, so no request starves another.

use super::model::Weights;
use super::sampler::{Sampler, SamplingParams};
use super::text::{Step, TextStream};
use super::tokenizer::TextTokenizer;
use super::{Event, FinishReason, LocalError, Usage};
use candle_core::Device;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens run per step: long prompts are cut so the other sequences keep streaming.
const PREFILL_CHUNK: usize = 128;

pub(crate) type Reply = UnboundedSender<Result<Event, LocalError>>;

/// One accepted request, tokenized and checked against the context window.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub reply: Reply,
}

/// Requests waiting for the generation thread.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    max_waiting: usize,
}

struct QueueState {
    waiting: VecDeque<Job>,
    shutdown: bool,
}

impl Queue {
    pub fn new(max_waiting: usize) -> Self {
        let state = QueueState { waiting: VecDeque::new(), shutdown: false };
        Queue { state: Mutex::new(state), wake: Condvar::new(), max_waiting }
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

    pub fn shutdown(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
        self.wake.notify_all();
    }

    /// Moves waiting jobs into `active` up to `max`; blocks while there is nothing at all to do.
    /// `false` once shut down.
    fn admit(&self, active: &mut Vec<Sequence>, max: usize, base: &Weights) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.shutdown {
                return false;
            }
            while active.len() < max {
                match state.waiting.pop_front() {
                    Some(job) if !job.reply.is_closed() => active.push(Sequence::new(job, base)),
                    Some(_) => {}
                    None => break,
                }
            }
            if !active.is_empty() {
                return true;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Runs until the queue shuts down; call it on a dedicated thread.
pub(crate) fn run(
    queue: Arc<Queue>,
    base: Weights,
    tokenizer: Arc<TextTokenizer>,
    device: Device,
    max_batch: usize,
) {
    // One pool context for the whole loop: entering candle's pool per op is costly.
    device.clone().with_context(|| {
        let mut active: Vec<Sequence> = Vec::new();
        while queue.admit(&mut active, max_batch, &base) {
            active.retain_mut(|s| s.step(&tokenizer, &device));
        }
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
    generated: usize,
    sampler: Sampler,
    text: TextStream,
}

impl Sequence {
    fn new(job: Job, base: &Weights) -> Self {
        let sampler = Sampler::new(job.params, job.seed);
        let text = TextStream::new(job.stop.clone());
        let tokens = job.prompt.clone();
        Sequence { weights: base.fresh(), job, tokens, cached: 0, generated: 0, sampler, text }
    }

    /// Advances by one forward pass; `false` when this sequence is finished or abandoned.
    fn step(&mut self, tokenizer: &TextTokenizer, device: &Device) -> bool {
        // A dropped stream is a cancelled request: stop before spending another token on it.
        if self.job.reply.is_closed() {
            return false;
        }
        match self.advance(tokenizer, device) {
            Ok(None) => true,
            Ok(Some(reason)) => {
                let tail = self.text.finish();
                self.send_text(tail);
                let usage = Usage {
                    prompt_tokens: self.job.prompt.len(),
                    completion_tokens: self.generated,
                };
                let _ = self.job.reply.send(Ok(Event::Done { finish_reason: reason, usage }));
                false
            }
            Err(e) => {
                let _ = self.job.reply.send(Err(e));
                false
            }
        }
    }

    fn advance(
        &mut self,
        tokenizer: &TextTokenizer,
        device: &Device,
    ) -> Result<Option<FinishReason>, LocalError> {
        let end = (self.cached + PREFILL_CHUNK).min(self.tokens.len());
        let mut logits =
            self.weights.forward(&self.tokens[self.cached..end], self.cached, device)?;
        self.cached = end;
        if self.cached < self.tokens.len() {
            return Ok(None); // more prompt to read first
        }
        let next = self.sampler.sample(&mut logits, &self.tokens);
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
        Ok((self.generated >= self.job.max_tokens).then_some(FinishReason::Length))
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            let _ = self.job.reply.send(Ok(Event::Delta(text)));
        }
    }
}
