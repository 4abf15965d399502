//! `/conversations*`: the caller's conversations, newest activity first, with their messages.
//! Another user's conversation answers exactly like a missing one (`404`).

use super::seed::UsageOut;
use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::clock::rfc3339;
use crate::http::{empty, json, Body};
use crate::store::{Conversation, Cursor, Message, Role, ToolCall};
use http::{Method, Response, StatusCode};
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

type Answer = Result<Response<Body>, ApiError>;

const NOT_FOUND: &str = "Conversation not found";

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("conversations", summary).secured();
    r.add(
        Method::GET,
        "/conversations",
        handler(list),
        doc("Your conversations, newest activity first")
            .paged("^([A-Za-z0-9_-]{32})?$")
            .json::<ConversationPageOut>(200)
            .errors(&[422]),
    );
    r.add(
        Method::GET,
        "/conversations/{id}",
        handler(get),
        doc("One conversation with its messages in order")
            .json::<ConversationDetail>(200)
            .errors(&[404]),
    );
    r.add(
        Method::DELETE,
        "/conversations/{id}",
        handler(delete),
        doc("Delete a conversation and its messages").empty(204).errors(&[404]),
    );
}

/// A conversation in a listing.
#[derive(Serialize, ToSchema)]
pub struct ConversationOut {
    id: String,
    title: String,
    model: String,
    created_at: String,
    updated_at: String,
    message_count: u32,
}

/// One page of conversations.
#[derive(Serialize, ToSchema)]
pub struct ConversationPageOut {
    items: Vec<ConversationOut>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// A conversation with its messages.
#[derive(Serialize, ToSchema)]
pub struct ConversationDetail {
    id: String,
    title: String,
    model: String,
    created_at: String,
    updated_at: String,
    message_count: u32,
    messages: Vec<MessageOut>,
}

/// A message as stored.
#[derive(Serialize, ToSchema)]
pub struct MessageOut {
    id: String,
    role: RoleOut,
    content: String,
    /// An assistant message's function calls (omitted when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    created_at: String,
    usage: Option<UsageOut>,
}

/// Who spoke.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoleOut {
    System,
    User,
    Assistant,
    Tool,
}

/// A function an assistant message called.
#[derive(Serialize, ToSchema)]
pub struct ToolCallOut {
    id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCallOut,
}

/// The function's name and its JSON arguments, as the model wrote them.
#[derive(Serialize, ToSchema)]
pub struct FunctionCallOut {
    name: String,
    arguments: String,
}

impl ToolCallOut {
    /// OpenAI's form of a stored call.
    fn of(c: &ToolCall) -> ToolCallOut {
        let function = FunctionCallOut { name: c.name.clone(), arguments: c.arguments.clone() };
        ToolCallOut { id: c.id.clone(), kind: "function", function }
    }
}

impl From<&Conversation> for ConversationOut {
    fn from(c: &Conversation) -> Self {
        ConversationOut {
            id: c.id.to_string(),
            title: c.title.clone(),
            model: c.model.clone(),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
            message_count: c.message_count,
        }
    }
}

impl From<&Message> for MessageOut {
    fn from(m: &Message) -> Self {
        let role = match m.role {
            Role::System => RoleOut::System,
            Role::User => RoleOut::User,
            Role::Assistant => RoleOut::Assistant,
            Role::Tool => RoleOut::Tool,
        };
        let usage = m.usage.as_ref().map(UsageOut::from);
        MessageOut {
            id: m.id.to_string(),
            role,
            content: m.content.clone(),
            tool_calls: m.tool_calls.iter().map(ToolCallOut::of).collect(),
            tool_call_id: m.tool_call_id.clone(),
            model: m.model.clone(),
            provider: m.provider.clone(),
            created_at: rfc3339(m.created_at),
            usage,
        }
    }
}

/// `limit` and `cursor`, with every problem reported at once.
async fn list(app: Arc<App>, req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let (limit, cursor) = req.page(Cursor::decode)?;
    let page = app.store.conversations(user.id, limit, cursor).await?;
    let out = ConversationPageOut {
        items: page.items.iter().map(ConversationOut::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    };
    Ok(json(StatusCode::OK, &out))
}

async fn get(app: Arc<App>, req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let id = req.id("id", NOT_FOUND)?;
    let (c, messages) =
        app.store.conversation(user.id, id).await?.ok_or(ApiError::NotFound(NOT_FOUND))?;
    let out = ConversationDetail {
        id: c.id.to_string(),
        title: c.title,
        model: c.model,
        created_at: rfc3339(c.created_at),
        updated_at: rfc3339(c.updated_at),
        message_count: c.message_count,
        messages: messages.iter().map(MessageOut::from).collect(),
    };
    Ok(json(StatusCode::OK, &out))
}

async fn delete(app: Arc<App>, req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let id = req.id("id", NOT_FOUND)?;
    app.store.delete_conversation(user.id, id).await.map_err(|e| match e {
        crate::store::StoreError::NotFound => ApiError::NotFound(NOT_FOUND),
        other => other.into(),
    })?;
    Ok(empty(StatusCode::NO_CONTENT))
}
