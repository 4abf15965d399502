//! Conversations and their messages. Every method takes the owner's id and treats another
//! user's conversation exactly like a missing one.

use super::tables::{self, decode, encode, get};
use super::{Redb, StoreError};
use crate::clock::Millis;
use base64::Engine;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A conversation's header; its messages are read separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: Uuid,
    pub user_id: Uuid,
    pub title: String,
    pub model: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub message_count: u32,
}

pub use crate::message::Role;

pub use crate::message::{ToolCall, Usage};

/// A stored message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: Uuid,
    pub role: Role,
    pub content: String,
    /// An assistant turn's function calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool result's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub created_at: Millis,
    pub usage: Option<Usage>,
}

/// A message to append; the store assigns its id.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: Role,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub usage: Option<Usage>,
}

impl Conversation {
    /// A new, empty conversation of `user_id`, created at `now`.
    pub(super) fn start(user_id: Uuid, title: String, model: String, now: Millis) -> Self {
        let id = Uuid::now_v7();
        Conversation {
            id,
            user_id,
            title,
            model,
            created_at: now,
            updated_at: now,
            message_count: 0,
        }
    }

    /// After a turn appended `stored` at `now`: its activity time, and the model that answered.
    pub(super) fn touched(&mut self, stored: &[Message], now: Millis) {
        self.updated_at = now.max(self.updated_at);
        if let Some(model) = stored.last().and_then(|m| m.model.clone()) {
            self.model = model;
        }
    }
}

impl Message {
    /// `m` as stored at `now`, with its id.
    pub(super) fn stored(m: NewMessage, now: Millis) -> Message {
        Message {
            id: Uuid::now_v7(),
            role: m.role,
            content: m.content,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            model: m.model,
            provider: m.provider,
            created_at: now,
            usage: m.usage,
        }
    }
}

/// Where a turn goes: a conversation created in the same transaction, or an existing one.
#[derive(Debug, Clone)]
pub enum TurnTarget {
    New { title: String, model: String },
    Existing(Uuid),
}

/// Where the next page of a listing starts: the last item's (updated_at, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    updated_at: u64,
    id: u128,
}

impl Cursor {
    /// The opaque form clients pass back.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&self.updated_at.to_be_bytes());
        bytes[8..].copy_from_slice(&self.id.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses what `encode` made; `None` for anything else.
    pub fn decode(text: &str) -> Option<Cursor> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        let bytes: [u8; 24] = bytes.try_into().ok()?;
        Some(Cursor {
            updated_at: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            id: u128::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

impl Cursor {
    /// The cursor that continues a listing after `c`.
    pub(super) fn after(c: &Conversation) -> Cursor {
        Cursor { updated_at: c.updated_at.max(0) as u64, id: c.id.as_u128() }
    }

    /// (updated_at, id) of the last item seen.
    pub(super) fn parts(&self) -> (Millis, Uuid) {
        (self.updated_at as Millis, Uuid::from_u128(self.id))
    }
}

/// One page of a user's conversations, newest activity first.
#[derive(Debug, Clone)]
pub struct ConversationPage {
    pub items: Vec<Conversation>,
    pub next: Option<Cursor>,
}

fn by_user_key(c: &Conversation) -> (u128, u64, u128) {
    (c.user_id.as_u128(), c.updated_at.max(0) as u64, c.id.as_u128())
}

impl Redb {
    /// Appends messages to a conversation (creating it first for `TurnTarget::New`) in one
    /// transaction, so a turn is stored whole or not at all. Turns recorded at the same time
    /// share that transaction and its fsync (group commit); each call returns after the commit
    /// that holds its turn.
    pub async fn record_turn(
        &self,
        user_id: Uuid,
        target: TurnTarget,
        messages: Vec<NewMessage>,
        now: Millis,
    ) -> Result<(Conversation, Vec<Message>), StoreError> {
        self.turns.write(self, Turn { user_id, target, messages, now }).await
    }

    /// A page of the user's conversations, newest activity first, starting after `after`.
    pub fn conversations(
        &self,
        user_id: Uuid,
        limit: usize,
        after: Option<Cursor>,
    ) -> Result<ConversationPage, StoreError> {
        self.read(|tx| {
            let index = tx.open_table(tables::CONVERSATIONS_BY_USER)?;
            let convs = tx.open_table(tables::CONVERSATIONS)?;
            let u = user_id.as_u128();
            let rows = match after {
                Some(c) => index.range((u, 0, 0)..(u, c.updated_at, c.id))?,
                None => index.range((u, 0, 0)..=(u, u64::MAX, u128::MAX))?,
            };
            let mut items = Vec::with_capacity(limit);
            let mut more = false;
            for row in rows.rev() {
                if items.len() == limit {
                    more = true;
                    break;
                }
                let (_, _, id) = row?.0.value();
                items.extend(get::<u128, Conversation>(&convs, "conversations", id)?);
            }
            let next = items.last().filter(|_| more).map(Cursor::after);
            Ok(ConversationPage { items, next })
        })
    }

    /// The user's conversation without its messages, or `None`.
    pub fn conversation_header(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Conversation>, StoreError> {
        self.read(|tx| {
            let conv: Option<Conversation> =
                get(&tx.open_table(tables::CONVERSATIONS)?, "conversations", id.as_u128())?;
            Ok(conv.filter(|c| c.user_id == user_id))
        })
    }

    /// The user's conversation with all its messages in order, or `None`.
    pub fn conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<Message>)>, StoreError> {
        self.read(|tx| {
            let conv: Option<Conversation> =
                get(&tx.open_table(tables::CONVERSATIONS)?, "conversations", id.as_u128())?;
            let Some(conv) = conv.filter(|c| c.user_id == user_id) else { return Ok(None) };
            let table = tx.open_table(tables::MESSAGES)?;
            let mut messages = Vec::with_capacity(conv.message_count as usize);
            for row in table.range((id.as_u128(), 0)..=(id.as_u128(), u32::MAX))? {
                messages.push(decode("messages", row?.1.value())?);
            }
            Ok(Some((conv, messages)))
        })
    }

    /// Deletes the user's conversation and its messages; `NotFound` when it is not theirs.
    pub async fn delete_conversation(&self, user_id: Uuid, id: Uuid) -> Result<(), StoreError> {
        self.write(move |tx| {
            let mut convs = tx.open_table(tables::CONVERSATIONS)?;
            let conv: Conversation = get(&convs, "conversations", id.as_u128())?
                .filter(|c: &Conversation| c.user_id == user_id)
                .ok_or(StoreError::NotFound)?;
            convs.remove(id.as_u128())?;
            tx.open_table(tables::CONVERSATIONS_BY_USER)?.remove(by_user_key(&conv))?;
            let mut messages = tx.open_table(tables::MESSAGES)?;
            for seq in 0..conv.message_count {
                messages.remove((id.as_u128(), seq))?;
            }
            Ok(())
        })
        .await
    }
}

/// Deletes every conversation of `user_id` and their messages, inside the caller's transaction
/// (`Store::delete_user`); returns (conversations, messages).
pub(super) fn delete_all_in(
    tx: &redb::WriteTransaction,
    user_id: Uuid,
) -> Result<(u64, u64), StoreError> {
    let u = user_id.as_u128();
    let mut index = tx.open_table(tables::CONVERSATIONS_BY_USER)?;
    let keys: Vec<(u128, u64, u128)> = index
        .range((u, 0, 0)..=(u, u64::MAX, u128::MAX))?
        .map(|row| row.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?;
    let mut convs = tx.open_table(tables::CONVERSATIONS)?;
    let mut messages = tx.open_table(tables::MESSAGES)?;
    let mut removed = 0;
    for key in &keys {
        let id = key.2;
        index.remove(*key)?;
        convs.remove(id)?;
        // Every sequence of the conversation, whatever its header says.
        let seqs: Vec<u32> = messages
            .range((id, 0)..=(id, u32::MAX))?
            .map(|row| row.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for seq in seqs {
            messages.remove((id, seq))?;
            removed += 1;
        }
    }
    Ok((keys.len() as u64, removed))
}

/// A turn waiting for its group commit.
pub(super) struct Turn {
    user_id: Uuid,
    target: TurnTarget,
    messages: Vec<NewMessage>,
    now: Millis,
}

/// A stored turn: its conversation as it now is, and the messages appended.
pub(super) type Recorded = (Conversation, Vec<Message>);

/// `record_turn_in` for the group commit (which relies on its checks coming before its writes).
pub(super) fn record_grouped(tx: &redb::WriteTransaction, t: Turn) -> Result<Recorded, StoreError> {
    record_turn_in(tx, t.user_id, t.target, t.messages, t.now)
}

/// `record_turn` inside a caller's transaction (a background job stores its turn and its final
/// state together).
pub(super) fn record_turn_in(
    tx: &redb::WriteTransaction,
    user_id: Uuid,
    target: TurnTarget,
    messages: Vec<NewMessage>,
    now: Millis,
) -> Result<Recorded, StoreError> {
    // Every refusal comes before the first write (the group commit relies on it).
    // A request authenticated just before its user was deleted must not leave rows behind.
    if tx.open_table(tables::USERS)?.get(user_id.as_u128())?.is_none() {
        return Err(StoreError::NotFound);
    }
    let mut convs = tx.open_table(tables::CONVERSATIONS)?;
    let mut index = tx.open_table(tables::CONVERSATIONS_BY_USER)?;
    let mut conv = match target {
        TurnTarget::New { title, model } => Conversation::start(user_id, title, model, now),
        TurnTarget::Existing(id) => {
            let c: Conversation = get(&convs, "conversations", id.as_u128())?
                .filter(|c: &Conversation| c.user_id == user_id)
                .ok_or(StoreError::NotFound)?;
            index.remove(by_user_key(&c))?;
            c
        }
    };
    let mut table = tx.open_table(tables::MESSAGES)?;
    let mut stored = Vec::with_capacity(messages.len());
    for m in messages {
        let message = Message::stored(m, now);
        table.insert((conv.id.as_u128(), conv.message_count), encode(&message).as_slice())?;
        conv.message_count += 1;
        stored.push(message);
    }
    conv.touched(&stored, now);
    index.insert(by_user_key(&conv), ())?;
    convs.insert(conv.id.as_u128(), encode(&conv).as_slice())?;
    Ok((conv, stored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::msg;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_turns_share_commits_and_one_refusal_spares_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Redb::open(dir.path()).unwrap();
        let new_user = crate::store::NewUser {
            username: "carol".into(),
            email: "carol@x.io".into(),
            password_hash: "$argon2id$x".into(),
            is_admin: false,
        };
        let carol = store.create_user(new_user, 0).await.unwrap().id;
        const TURNS: usize = 64;
        // Another write holds redb's write lock until every turn has queued, so that what
        // shares a commit does not depend on how fast this machine spawns tasks.
        let (held, release) = (tokio::sync::oneshot::channel(), std::sync::mpsc::channel::<()>());
        let blocker = store.clone();
        let blocker = tokio::spawn(async move {
            blocker
                .write(move |_| {
                    let _ = held.0.send(());
                    let _ = release.1.recv();
                    Ok(())
                })
                .await
        });
        held.1.await.unwrap();
        let mut queued = tokio::sync::mpsc::unbounded_channel::<()>();
        let before = store.transactions.load(std::sync::atomic::Ordering::Relaxed);
        let turns: Vec<_> = (0..TURNS)
            .map(|i| {
                let store = store.clone();
                // One turn in the crowd names a conversation that does not exist.
                let target = match i {
                    17 => TurnTarget::Existing(Uuid::now_v7()),
                    _ => TurnTarget::New { title: format!("t{i}"), model: "m".into() },
                };
                let queued = queued.0.clone();
                tokio::spawn(async move {
                    let hi = vec![msg(Role::User, "hi")];
                    let turn = store.record_turn(carol, target, hi, i as Millis);
                    tokio::pin!(turn);
                    // Polled once, the turn is queued (and waits for its commit): say so.
                    tokio::select! {
                        biased;
                        done = &mut turn => return done,
                        () = std::future::ready(()) => {}
                    }
                    let _ = queued.send(());
                    turn.await
                })
            })
            .collect();
        // Every turn queued while the lock was held: they go in at most two commits (what the
        // first commit had taken when it began waiting for the lock, then all the rest).
        for _ in 0..TURNS {
            queued.1.recv().await.unwrap();
        }
        release.0.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let outcomes = futures_util::future::join_all(turns).await;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match (i, outcome.unwrap()) {
                (17, Err(StoreError::NotFound)) => {}
                (17, other) => panic!("the missing conversation answered {other:?}"),
                (_, Ok((conv, stored))) => assert_eq!((conv.message_count, stored.len()), (1, 1)),
                (_, Err(e)) => panic!("turn {i} failed: {e}"),
            }
        }
        let listed = store.conversations(carol, 100, None).unwrap().items.len();
        assert_eq!(listed, TURNS - 1, "every acknowledged turn is stored");
        let commits = store.transactions.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(commits <= 2, "{commits} commits for {TURNS} turns queued at once");
    }
}
