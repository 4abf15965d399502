//! Conversations and messages on PostgreSQL. A turn is one transaction that holds its
//! conversation's row lock, so turns appended to one conversation from two replicas take
//! sequence numbers one after the other.

use super::{col, exec, json, one, rows, snapshot, Pg};
use crate::clock::Millis;
use crate::store::{
    Conversation, ConversationPage, Cursor, Message, NewMessage, Role, StoreError, TurnTarget,
};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

const CONVERSATION_COLUMNS: &str =
    "id, user_id, title, model, created_at, updated_at, message_count";

fn conversation_of(row: &Row) -> Result<Conversation, StoreError> {
    let t = "conversations";
    let count: i32 = col(row, t, "message_count")?;
    Ok(Conversation {
        id: col(row, t, "id")?,
        user_id: col(row, t, "user_id")?,
        title: col(row, t, "title")?,
        model: col(row, t, "model")?,
        created_at: col(row, t, "created_at")?,
        updated_at: col(row, t, "updated_at")?,
        message_count: count.max(0) as u32,
    })
}

fn message_of(row: &Row) -> Result<Message, StoreError> {
    let t = "messages";
    let role: String = col(row, t, "role")?;
    let role: Role = serde_json::from_value(serde_json::Value::String(role))
        .map_err(|e| StoreError::Corrupt { table: t, message: e.to_string() })?;
    Ok(Message {
        id: col(row, t, "id")?,
        role,
        content: col(row, t, "content")?,
        tool_calls: json(row, t, "tool_calls")?.unwrap_or_default(),
        tool_call_id: col(row, t, "tool_call_id")?,
        model: col(row, t, "model")?,
        provider: col(row, t, "provider")?,
        created_at: col(row, t, "created_at")?,
        usage: json(row, t, "usage")?,
    })
}

impl Pg {
    pub(in crate::store) async fn record_turn(
        &self,
        user_id: Uuid,
        target: TurnTarget,
        messages: Vec<NewMessage>,
        now: Millis,
    ) -> Result<(Conversation, Vec<Message>), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let stored = record_turn_in(&tx, user_id, target, messages, now).await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub(in crate::store) async fn conversations(
        &self,
        user_id: Uuid,
        limit: usize,
        after: Option<Cursor>,
    ) -> Result<ConversationPage, StoreError> {
        let client = self.client().await?;
        // One more than asked says whether another page follows.
        let take = limit as i64 + 1;
        let found = match after {
            Some(c) => {
                let (updated_at, id) = c.parts();
                let sql = format!(
                    "SELECT {CONVERSATION_COLUMNS} FROM conversations
                     WHERE user_id = $1 AND (updated_at, id) < ($2, $3)
                     ORDER BY updated_at DESC, id DESC LIMIT $4"
                );
                rows(&client, &sql, &[&user_id, &updated_at, &id, &take]).await?
            }
            None => {
                let sql = format!(
                    "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1
                     ORDER BY updated_at DESC, id DESC LIMIT $2"
                );
                rows(&client, &sql, &[&user_id, &take]).await?
            }
        };
        let mut items = found.iter().map(conversation_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > limit;
        items.truncate(limit);
        let next = items.last().filter(|_| more).map(Cursor::after);
        Ok(ConversationPage { items, next })
    }

    pub(in crate::store) async fn conversation_header(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Conversation>, StoreError> {
        let client = self.client().await?;
        header(&client, user_id, id, "").await
    }

    pub(in crate::store) async fn conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<Message>)>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the header and its messages, as redb's read transaction gives.
        let tx = snapshot(&mut client).await?;
        let Some(conv) = header(&tx, user_id, id, "").await? else { return Ok(None) };
        let found = rows(
            &tx,
            "SELECT id, role, content, tool_calls, tool_call_id, model, provider, created_at, usage
             FROM messages WHERE conversation_id = $1 ORDER BY seq",
            &[&id],
        )
        .await?;
        let messages = found.iter().map(message_of).collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        Ok(Some((conv, messages)))
    }

    pub(in crate::store) async fn delete_conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        // Its messages go with it (ON DELETE CASCADE).
        let sql = "DELETE FROM conversations WHERE id = $1 AND user_id = $2";
        match exec(&client, sql, &[&id, &user_id]).await? {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }
}

/// The user's conversation header, `lock` appended to the query (`FOR UPDATE` or nothing).
async fn header<C: GenericClient>(
    c: &C,
    user_id: Uuid,
    id: Uuid,
    lock: &str,
) -> Result<Option<Conversation>, StoreError> {
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND user_id = $2 {lock}"
    );
    one(c, &sql, &[&id, &user_id]).await?.as_ref().map(conversation_of).transpose()
}

/// Stores a turn inside the caller's transaction (a background job settles its turn and its
/// final state together). `NotFound` when the user or the conversation is gone.
pub(super) async fn record_turn_in<C: GenericClient>(
    tx: &C,
    user_id: Uuid,
    target: TurnTarget,
    messages: Vec<NewMessage>,
    now: Millis,
) -> Result<(Conversation, Vec<Message>), StoreError> {
    // The user's row is share-locked until the commit: a deletion waits for this turn (then
    // deletes it too), or came first and leaves nothing for it to write to.
    if one(tx, "SELECT 1 FROM users WHERE id = $1 FOR KEY SHARE", &[&user_id]).await?.is_none() {
        return Err(StoreError::NotFound);
    }
    let (mut conv, new) = match target {
        TurnTarget::New { title, model } => (Conversation::start(user_id, title, model, now), true),
        TurnTarget::Existing(id) => {
            (header(tx, user_id, id, "FOR UPDATE").await?.ok_or(StoreError::NotFound)?, false)
        }
    };
    if new {
        insert_conversation(tx, &conv).await?;
    }
    let mut stored = Vec::with_capacity(messages.len());
    for m in messages {
        let message = Message::stored(m, now);
        insert_message(tx, conv.id, conv.message_count, &message).await?;
        conv.message_count += 1;
        stored.push(message);
    }
    conv.touched(&stored, now);
    exec(
        tx,
        "UPDATE conversations SET model = $2, updated_at = $3, message_count = $4 WHERE id = $1",
        &[&conv.id, &conv.model, &conv.updated_at, &(conv.message_count as i32)],
    )
    .await?;
    Ok((conv, stored))
}

/// One message row; `store copy` writes them too.
pub(in crate::store) async fn insert_message<C: GenericClient>(
    c: &C,
    conversation: Uuid,
    seq: u32,
    m: &Message,
) -> Result<(), StoreError> {
    let tool_calls = (!m.tool_calls.is_empty()).then(|| serde_json::json!(m.tool_calls));
    let usage = m.usage.map(|u| serde_json::json!(u));
    exec(
        c,
        "INSERT INTO messages (conversation_id, seq, id, role, content, tool_calls, tool_call_id,
                               model, provider, created_at, usage)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &conversation,
            &(seq as i32),
            &m.id,
            &m.role.as_str(),
            &m.content,
            &tool_calls,
            &m.tool_call_id,
            &m.model,
            &m.provider,
            &m.created_at,
            &usage,
        ],
    )
    .await?;
    Ok(())
}

/// One row as it is (`store copy` writes them too).
pub(super) async fn insert_conversation<C: GenericClient>(
    c: &C,
    v: &Conversation,
) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO conversations (id, user_id, title, model, created_at, updated_at,
                                    message_count)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &v.id,
            &v.user_id,
            &v.title,
            &v.model,
            &v.created_at,
            &v.updated_at,
            &(v.message_count as i32),
        ],
    )
    .await
    .map(|_| ())
}
