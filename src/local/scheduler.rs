//! The generation thread: owns the weights, takes requests from a bounded FIFO queue, and serves
//! up to `max_batch` of them round-robin, one step each, so no request starves another.

use super::model::Weights;
use super::sampler::{Sampler, SamplingParams};
use super::text::{Step, TextStream};
use super::tokenizer::TextTokenizer;
use super::{Event, FinishReason, LocalError, Usage};
use candle_core::Device;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
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
    /// Sequences in the running batch, as the generation thread last left it.
    active: AtomicUsize,
}

struct QueueState {
    waiting: VecDeque<Job>,
    shutdown: bool,
}

impl Queue {
    pub fn new(max_waiting: usize) -> Self {
        let state = QueueState { waiting: VecDeque::new(), shutdown: false };
        Queue { state: Mutex::new(state), wake: Condvar::new(), max_waiting, active: 0.into() }
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
            queue.active.store(active.len(), Ordering::Relaxed);
            active.retain_mut(|s| s.step(&tokenizer, &device));
            queue.active.store(active.len(), Ordering::Relaxed);
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
    /// Time in decode steps, for the tokens/s metric.
    decode_time: Duration,
    sampler: Sampler,
    text: TextStream,
}

impl Sequence {
    fn new(job: Job, base: &Weights) -> Self {
        let sampler = Sampler::new(job.params, job.seed);
        let text = TextStream::new(job.stop.clone());
        let tokens = job.prompt.clone();
        Sequence {
            weights: base.fresh(),
            job,
            tokens,
            cached: 0,
            generated: 0,
            decode_time: Duration::ZERO,
            sampler,
            text,
        }
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
                // The first token comes out of the prefill; the rest are decode steps.
                let decoded = self.generated.saturating_sub(1);
                if decoded > 0 && !self.decode_time.is_zero() {
                    crate::metrics::local_decode_rate(
                        decoded as f64 / self.decode_time.as_secs_f64(),
                    );
                }
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
        let chunk = self.weights.prefill_chunk(PREFILL_CHUNK);
        let end = self.cached.saturating_add(chunk).min(self.tokens.len());
        let started = Instant::now();
        let mut logits =
            self.weights.forward(&self.tokens[self.cached..end], self.cached, device)?;
        let took = started.elapsed();
        let phase = match self.cached < self.job.prompt.len() {
            true => "prefill",
            false => {
                self.decode_time += took;
                "decode"
            }
        };
        crate::metrics::local_forward(phase, end - self.cached, took);
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
