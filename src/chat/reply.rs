//! An answer in progress: its deltas as they come, then, once the provider has finished, the
//! turn stored in one transaction and the completion with its ids.

use super::local_tools::Plan;
use super::{context, local_error, title, Answerer, ChatError, ChatInput, Thread};
use crate::clock::{now_ms, Millis};
use crate::llm::{Event, EventStream, FinishReason, ToolCall, ToolCallDelta, Usage};
use crate::local::Generation;
use crate::message::{Message, Role};
use crate::store::{NewMessage, Store, TurnTarget};
use futures_util::stream::{BoxStream, StreamExt};
use serde_json::Value;
use uuid::Uuid;

/// What `Reply::next` yields: the answer's pieces as they come, then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Delta(String),
    ToolCall(ToolCallDelta),
    Refusal(String),
    Logprobs(Vec<Value>),
    Done(Completion),
}

/// A finished answer; the ids are `None` when the turn was not stored.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    pub text: String,
    /// The functions the model called, in index order.
    pub tool_calls: Vec<ToolCall>,
    /// The model's refusal to answer, when it gave one instead of text.
    pub refusal: Option<String>,
    /// Per-token log probabilities, when asked for and given.
    pub logprobs: Vec<Value>,
    /// The upstream's `system_fingerprint`, when it sent one.
    pub fingerprint: Option<String>,
    pub finish: FinishReason,
    pub usage: Usage,
    pub conversation_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
    pub created_at: Millis,
}

/// How the finished turn is written.
pub(super) struct Persist {
    store: Store,
    input: ChatInput,
}

impl Persist {
    /// `None` for `Thread::Unstored`.
    pub(super) fn new(store: Store, input: &ChatInput) -> Option<Persist> {
        (input.thread != Thread::Unstored).then(|| Persist { store, input: input.clone() })
    }
}

/// Where `input`'s turn answered by `who` goes, and its messages: the turn's own, then the
/// answer. `None` for `Thread::Unstored`.
pub fn turn(
    input: &ChatInput,
    who: &Answerer,
    done: &Completion,
) -> Option<(TurnTarget, Vec<NewMessage>)> {
    let target = match input.thread {
        Thread::Unstored => return None,
        Thread::Continue(id) => TurnTarget::Existing(id),
        Thread::New => TurnTarget::New { title: title(&input.messages), model: who.model.clone() },
    };
    let said = input.messages.iter().map(|m| NewMessage {
        role: m.role,
        content: m.content.clone(),
        tool_calls: m.tool_calls.clone(),
        tool_call_id: m.tool_call_id.clone(),
        model: None,
        provider: None,
        usage: None,
    });
    let answer = NewMessage {
        role: Role::Assistant,
        content: done.text.clone(),
        tool_calls: done.tool_calls.clone(),
        tool_call_id: None,
        model: Some(who.model.clone()),
        provider: Some(who.provider.as_str().to_string()),
        usage: Some(done.usage),
    };
    Some((target, said.chain([answer]).collect()))
}

/// A streaming answer. Dropping it cancels the upstream request or the local generation, and
/// nothing is stored.
pub struct Reply {
    who: Answerer,
    events: BoxStream<'static, Result<Event, ChatError>>,
    persist: Option<Persist>,
    /// What was sent, for a usage estimate when the provider reports none.
    prompt: Vec<Message>,
    /// The answer so far.
    so_far: Completion,
    done: bool,
}

impl Reply {
    pub(super) fn remote(
        persist: Option<Persist>,
        who: Answerer,
        events: EventStream,
        prompt: Vec<Message>,
    ) -> Reply {
        let provider = who.provider;
        let events = events
            .map(move |e| e.map_err(|e| ChatError::Upstream { provider, reason: e.reason() }))
            .boxed();
        Reply { who, events, persist, prompt, so_far: Completion::default(), done: false }
    }

    pub(super) fn local(
        persist: Option<Persist>,
        who: Answerer,
        generation: Generation,
        tools: Plan,
    ) -> Reply {
        let events = tools.adapt(generation.map(|e| e.map_err(local_error)).boxed());
        let so_far = Completion::default();
        Reply { who, events, persist, prompt: Vec::new(), so_far, done: false }
    }

    /// Who answers.
    pub fn answerer(&self) -> &Answerer {
        &self.who
    }

    /// The upstream's `system_fingerprint`, once it has sent one.
    pub fn fingerprint(&self) -> Option<&str> {
        self.so_far.fingerprint.as_deref()
    }

    /// The next delta, or the completion after the turn is stored; `None` after that.
    pub async fn next(&mut self) -> Option<Result<Step, ChatError>> {
        if self.done {
            return None;
        }
        let event = loop {
            match self.events.next().await {
                Some(Ok(Event::Fingerprint(f))) => self.so_far.fingerprint = Some(f),
                Some(e) => break e,
                None => {
                    break Err(ChatError::Upstream { provider: self.who.provider, reason: "ended" })
                }
            }
        };
        let so_far = &mut self.so_far;
        match event {
            Ok(Event::Delta(d)) => {
                so_far.text.push_str(&d);
                Some(Ok(Step::Delta(d)))
            }
            Ok(Event::ToolCall(d)) => {
                add_tool_call(&mut so_far.tool_calls, &d);
                Some(Ok(Step::ToolCall(d)))
            }
            Ok(Event::Refusal(r)) => {
                so_far.refusal.get_or_insert_with(String::new).push_str(&r);
                Some(Ok(Step::Refusal(r)))
            }
            Ok(Event::Logprobs(items)) => {
                so_far.logprobs.extend(items.iter().cloned());
                Some(Ok(Step::Logprobs(items)))
            }
            Ok(Event::Fingerprint(_)) => unreachable!("taken above"),
            Ok(Event::Finish { reason, usage }) => {
                self.done = true;
                let done = self.finish(reason, usage).await;
                let tokens = done
                    .as_ref()
                    .map_or((0, 0), |c| (c.usage.prompt_tokens, c.usage.completion_tokens));
                self.count(if done.is_ok() { "ok" } else { "error" }, tokens);
                Some(done.map(Step::Done))
            }
            Err(e) => {
                self.done = true;
                self.count("error", (0, 0));
                Some(Err(e))
            }
        }
    }

    fn count(&self, outcome: &'static str, tokens: (u32, u32)) {
        crate::metrics::chat_answer(self.who.provider.as_str(), &self.who.model, outcome, tokens);
    }

    /// Runs the answer to its end.
    pub async fn collect(&mut self) -> Result<Completion, ChatError> {
        while let Some(step) = self.next().await {
            if let Step::Done(c) = step? {
                return Ok(c);
            }
        }
        Err(ChatError::Upstream { provider: self.who.provider, reason: "ended" })
    }

    async fn finish(
        &mut self,
        finish: FinishReason,
        usage: Option<Usage>,
    ) -> Result<Completion, ChatError> {
        let answer = Message {
            tool_calls: self.so_far.tool_calls.clone(),
            ..Message::new(Role::Assistant, &*self.so_far.text)
        };
        let usage = usage.unwrap_or_else(|| Usage {
            prompt_tokens: context::estimate_tokens(&self.prompt) as u32,
            completion_tokens: context::estimate_tokens(&[answer]) as u32,
            cached_tokens: 0,
        });
        let now = now_ms();
        let mut done =
            Completion { finish, usage, created_at: now, ..std::mem::take(&mut self.so_far) };
        self.so_far.fingerprint.clone_from(&done.fingerprint);
        let Some(p) = self.persist.take() else { return Ok(done) };
        let Some((target, messages)) = turn(&p.input, &self.who, &done) else { return Ok(done) };
        let (conv, stored) =
            p.store.record_turn(p.input.user, target, messages, now).await.map_err(
                |e| match e {
                    crate::store::StoreError::NotFound => ChatError::ConversationNotFound,
                    e => ChatError::Store(e),
                },
            )?;
        done.conversation_id = Some(conv.id);
        done.message_id = stored.last().map(|m| m.id);
        Ok(done)
    }
}

/// Folds a streamed fragment into the calls: a new index starts a call, the rest of its
/// fragments append to its arguments.
fn add_tool_call(calls: &mut Vec<ToolCall>, d: &ToolCallDelta) {
    let i = d.index as usize;
    while calls.len() <= i {
        calls.push(ToolCall { id: String::new(), name: String::new(), arguments: String::new() });
    }
    let call = &mut calls[i];
    if let Some(id) = &d.id {
        call.id.clone_from(id);
    }
    if let Some(name) = &d.name {
        call.name.push_str(name);
    }
    call.arguments.push_str(&d.arguments);
}
