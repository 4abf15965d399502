//! Conversations and messages on PostgreSQL. A turn is one transaction that holds its
//! conversation's row lock, so turns appended to one conversation from two replicas take
//! sequence numbers one after the other.

use super::{col, exec, json, one, rows, snapshot, Pg};
use crate::clock::Millis;
use crate::store::{
    Conversation, ConversationPage, Cursor, Message, NewMessage, Role, StoreError, TurnTarget,
};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
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
        header(&client, user_id, id).await
    }

    pub(in crate::store) async fn conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<Message>)>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the header and its messages, as redb's read transaction gives.
        let tx = snapshot(&mut client).await?;
        let Some(conv) = header(&tx, user_id, id).await? else { return Ok(None) };
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

/// The user's conversation header, or `None` (also for another user's).
async fn header<C: GenericClient>(
    c: &C,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<Conversation>, StoreError> {
    let sql =
        format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND user_id = $2");
    one(c, &sql, &[&id, &user_id]).await?.as_ref().map(conversation_of).transpose()
}

/// Messages as the rows `t` of a statement — `t(id, role, content, tool_calls, tool_call_id,
/// model, provider, created_at, usage, ord)`, from parameters `$1`–`$9` (`message_arrays`) — and
/// the insert they feed, whose sequence numbers are `ord - 1` on from a base the statement
/// gives.
const MESSAGE_ROWS: &str = "unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[],
        $6::text[], $7::text[], $8::int8[], $9::jsonb[])
    WITH ORDINALITY AS t(id, role, content, tool_calls, tool_call_id, model, provider,
                         created_at, usage, ord)";
const MESSAGE_INSERT: &str = "INSERT INTO messages (conversation_id, seq, id, role, content,
        tool_calls, tool_call_id, model, provider, created_at, usage)";

/// The columns of `messages` as the arrays `MESSAGE_ROWS` reads.
struct MessageArrays {
    ids: Vec<Uuid>,
    roles: Vec<&'static str>,
    contents: Vec<String>,
    tool_calls: Vec<Option<serde_json::Value>>,
    tool_call_ids: Vec<Option<String>>,
    models: Vec<Option<String>>,
    providers: Vec<Option<String>>,
    created: Vec<i64>,
    usages: Vec<Option<serde_json::Value>>,
}

impl MessageArrays {
    fn of(messages: &[Message]) -> MessageArrays {
        let calls =
            |m: &Message| (!m.tool_calls.is_empty()).then(|| serde_json::json!(m.tool_calls));
        MessageArrays {
            ids: messages.iter().map(|m| m.id).collect(),
            roles: messages.iter().map(|m| m.role.as_str()).collect(),
            contents: messages.iter().map(|m| m.content.clone()).collect(),
            tool_calls: messages.iter().map(calls).collect(),
            tool_call_ids: messages.iter().map(|m| m.tool_call_id.clone()).collect(),
            models: messages.iter().map(|m| m.model.clone()).collect(),
            providers: messages.iter().map(|m| m.provider.clone()).collect(),
            created: messages.iter().map(|m| m.created_at).collect(),
            usages: messages.iter().map(|m| m.usage.map(|u| serde_json::json!(u))).collect(),
        }
    }

    /// `$1`–`$9`, then `more`.
    fn params<'a>(&'a self, more: &[&'a (dyn ToSql + Sync)]) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = vec![
            &self.ids,
            &self.roles,
            &self.contents,
            &self.tool_calls,
            &self.tool_call_ids,
            &self.models,
            &self.providers,
            &self.created,
            &self.usages,
        ];
        p.extend_from_slice(more);
        p
    }
}

/// Stores a turn in one statement (one round trip): the conversation created, or updated
/// under its row lock, and the messages appended after its last. Inside a caller's
/// transaction too (a background job settles its turn and its final state together).
/// `NotFound` when the user (the foreign key) or the conversation is gone.
pub(super) async fn record_turn_in<C: GenericClient>(
    tx: &C,
    user_id: Uuid,
    target: TurnTarget,
    messages: Vec<NewMessage>,
    now: Millis,
) -> Result<(Conversation, Vec<Message>), StoreError> {
    let stored: Vec<Message> = messages.into_iter().map(|m| Message::stored(m, now)).collect();
    let arrays = MessageArrays::of(&stored);
    let n = stored.len() as i32;
    let conv = match target {
        TurnTarget::New { title, model } => {
            let mut conv = Conversation::start(user_id, title, model, now);
            conv.message_count = stored.len() as u32;
            conv.touched(&stored, now);
            let sql = format!(
                "WITH c AS (INSERT INTO conversations (id, user_id, title, model, created_at,
                                                      updated_at, message_count)
                            VALUES ($10, $11, $12, $13, $14, $14, $15) RETURNING id)
                 {MESSAGE_INSERT} SELECT c.id, (t.ord - 1)::int, t.id, t.role, t.content,
                     t.tool_calls, t.tool_call_id, t.model, t.provider, t.created_at, t.usage
                 FROM c, {MESSAGE_ROWS}"
            );
            let more: [&(dyn ToSql + Sync); 6] =
                [&conv.id, &user_id, &conv.title, &conv.model, &now, &n];
            exec(tx, &sql, &arrays.params(&more)).await?;
            conv
        }
        TurnTarget::Existing(id) => {
            let model = stored.last().and_then(|m| m.model.clone());
            let sql = format!(
                "WITH c AS (UPDATE conversations SET message_count = message_count + $12,
                                updated_at = greatest(updated_at, $13), model = coalesce($14, model)
                            WHERE id = $10 AND user_id = $11 RETURNING {CONVERSATION_COLUMNS}),
                      m AS ({MESSAGE_INSERT} SELECT c.id, (c.message_count - $12 + t.ord - 1)::int,
                                t.id, t.role, t.content, t.tool_calls, t.tool_call_id, t.model,
                                t.provider, t.created_at, t.usage
                            FROM c, {MESSAGE_ROWS})
                 SELECT * FROM c"
            );
            let more: [&(dyn ToSql + Sync); 5] = [&id, &user_id, &n, &now, &model];
            let row = one(tx, &sql, &arrays.params(&more)).await?.ok_or(StoreError::NotFound)?;
            conversation_of(&row)?
        }
    };
    Ok((conv, stored))
}

/// A conversation's messages as they are, in one statement (`store copy`); their sequence
/// numbers run from 0 in order, as the redb file keeps them.
pub(in crate::store) async fn insert_messages<C: GenericClient>(
    c: &C,
    conversation: Uuid,
    messages: &[Message],
) -> Result<(), StoreError> {
    let sql = format!(
        "{MESSAGE_INSERT} SELECT $10, (t.ord - 1)::int, t.id, t.role, t.content, t.tool_calls,
             t.tool_call_id, t.model, t.provider, t.created_at, t.usage FROM {MESSAGE_ROWS}"
    );
    let arrays = MessageArrays::of(messages);
    exec(c, &sql, &arrays.params(&[&conversation])).await?;
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
