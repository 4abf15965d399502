//! Tools and JSON output on the local model. A `required` or named `tool_choice` is served by constrained
//! decoding: the answer must be `{"name": …, "arguments": …}` for one of the allowed tools,
//! valid against its parameters' schema. `auto` needs a chat template that knows tools (Qwen2.5,
//! Qwen3, Llama 3.x): the model sees them there and decides; an answer in the template's call
//! format (`<tool_call>{…}</tool_call>`, or the bare JSON object) naming an offered tool becomes
//! a tool call, anything else stays text. Either way the answer is held back until it is
//! complete, since its first tokens cannot tell a call from text.

use crate::llm::{Event, FinishReason, Tool, ToolCallDelta, ToolChoice};
use crate::message::{JsonSchema, Message, ResponseFormat, Role, Shape, Unsupported};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};

/// How the local model serves a request's tools.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// No tools (none offered, or `tool_choice: none`).
    Text,
    /// It must call one of these; the grammar sees to it.
    Call(Vec<Tool>),
    /// It may call one of these, as its template taught it.
    Auto(Vec<Tool>),
}

impl Plan {
    /// The plan for `shape` on a model whose template does (or does not) know tools.
    pub(super) fn of(shape: &Shape, template_knows_tools: bool) -> Result<Plan, Unsupported> {
        if !shape.offers_tools() {
            return Ok(Plan::Text);
        }
        let tools = shape.tools.clone();
        match &shape.tool_choice {
            Some(ToolChoice::Required) => Ok(Plan::Call(tools)),
            Some(ToolChoice::Function(name)) => {
                Ok(Plan::Call(tools.into_iter().filter(|t| &t.name == name).collect()))
            }
            _ if template_knows_tools => Ok(Plan::Auto(tools)),
            _ => Err(Unsupported::new(
                "tools",
                "tools with tool_choice auto are not supported by this local model (its chat \
                 template has no tools); tool_choice required or a named function works",
            )),
        }
    }

    /// The tools the chat template renders.
    pub(super) fn rendered(&self, template_knows_tools: bool) -> Vec<Tool> {
        match self {
            Plan::Call(tools) | Plan::Auto(tools) if template_knows_tools => tools.clone(),
            _ => Vec::new(),
        }
    }

    /// The grammar of a forced call: one of the tools, by name, with valid arguments.
    pub(super) fn format(&self) -> Option<ResponseFormat> {
        let Plan::Call(tools) = self else { return None };
        let one = |t: &Tool| {
            json!({"type": "object", "additionalProperties": false, "required": ["name", "arguments"],
                "properties": {"name": {"const": t.name},
                    "arguments": t.parameters.clone().unwrap_or_else(|| json!({"type": "object"}))}})
        };
        let schema = json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()});
        let json_schema = JsonSchema {
            name: "tool_call".into(),
            description: None,
            schema: Some(schema),
            strict: Some(true),
        };
        Some(ResponseFormat::JsonSchema { json_schema })
    }

    /// A forced call on a template that does not render tools: they are described at the end
    /// of the last user message instead.
    pub(super) fn hint(&self, turn: &mut [Message], template_knows_tools: bool) {
        let (Plan::Call(tools), false) = (self, template_knows_tools) else { return };
        let Some(last) = turn.iter_mut().rev().find(|m| m.role == Role::User) else { return };
        last.content.push_str("\n\nAnswer by calling one of these functions, as JSON {\"name\": …, \"arguments\": …}:");
        for t in tools {
            let params = t.parameters.clone().unwrap_or(Value::Null);
            let about = t.description.as_deref().unwrap_or("");
            last.content.push_str(&format!("\n- {}: {about} Arguments: {params}", t.name));
        }
    }

    /// The generation's events with a call's text turned into the call: the text is held back
    /// until the end, then sent as one tool call (`finish_reason: tool_calls`) or as text.
    pub(super) fn adapt<E: Send + 'static>(
        self,
        events: BoxStream<'static, Result<Event, E>>,
    ) -> BoxStream<'static, Result<Event, E>> {
        let tools = match self {
            Plan::Text => return events,
            Plan::Call(tools) | Plan::Auto(tools) => tools,
        };
        let mut text = String::new();
        events
            .flat_map(move |event| {
                let out = match event {
                    Ok(Event::Delta(d)) => {
                        text.push_str(&d);
                        Vec::new()
                    }
                    Ok(Event::Finish { reason, usage }) => {
                        let text = std::mem::take(&mut text);
                        let (first, reason) = match call(&text, &tools) {
                            Some(call) if reason == FinishReason::Stop => {
                                (Event::ToolCall(call), FinishReason::ToolCalls)
                            }
                            _ => (Event::Delta(text), reason),
                        };
                        vec![Ok(first), Ok(Event::Finish { reason, usage })]
                    }
                    other => vec![other],
                };
                stream::iter(out)
            })
            .boxed()
    }
}

/// `turn` with the schema a JSON answer must follow told to the model, at the end of the last
/// user message (every chat template accepts that): the grammar makes the answer valid, the
/// schema in the prompt makes it meaningful.
pub(super) fn with_format_hint(mut turn: Vec<Message>, shape: &Shape) -> Vec<Message> {
    let Some(ResponseFormat::JsonSchema { json_schema }) = &shape.response_format else {
        return turn;
    };
    let (Some(schema), Some(last)) =
        (&json_schema.schema, turn.iter_mut().rev().find(|m| m.role == Role::User))
    else {
        return turn;
    };
    last.content.push_str(&format!("\n\nAnswer with JSON that follows this JSON schema: {schema}"));
    turn
}

/// The call `text` makes, when it is one: `{"name", "arguments"}` (or Llama's `parameters`),
/// bare or inside `<tool_call>…</tool_call>`, naming one of `tools`.
fn call(text: &str, tools: &[Tool]) -> Option<ToolCallDelta> {
    let inner = text.trim();
    let inner = inner
        .strip_prefix("<tool_call>")
        .map(|rest| rest.trim_end().strip_suffix("</tool_call>").unwrap_or(rest))
        .unwrap_or(inner);
    let value: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = value.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = value.get("arguments").or_else(|| value.get("parameters"))?;
    let arguments = match arguments {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let id = format!("call_{}", uuid::Uuid::now_v7().simple());
    Some(ToolCallDelta { index: 0, id: Some(id), name: Some(name.to_owned()), arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: None,
            parameters: Some(json!({"type": "object", "properties": {"city": {"type": "string"}}})),
            strict: None,
        }
    }

    #[test]
    fn calls_are_read_in_the_formats_templates_teach() {
        let tools = [weather()];
        for text in [
            r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            r#" {"name": "get_weather", "parameters": {"city": "Paris"}} "#,
        ] {
            let c = call(text, &tools).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((c.name.as_deref(), c.arguments.as_str()), (Some("get_weather"), r#"{"city":"Paris"}"#));
        }
        assert_eq!(call(r#"{"name": "other", "arguments": {}}"#, &tools), None);
        assert_eq!(call("It is sunny.", &tools), None);
    }

    #[test]
    fn auto_needs_a_template_that_knows_tools() {
        let shape = Shape { tools: vec![weather()], ..Shape::default() };
        assert_eq!(Plan::of(&shape, true), Ok(Plan::Auto(vec![weather()])));
        assert_eq!(Plan::of(&shape, false).unwrap_err().field, "tools");
        let required = Shape { tool_choice: Some(ToolChoice::Required), ..shape.clone() };
        assert_eq!(Plan::of(&required, false), Ok(Plan::Call(vec![weather()])));
        let none = Shape { tool_choice: Some(ToolChoice::None), ..shape };
        assert_eq!(Plan::of(&none, false), Ok(Plan::Text));
    }
}
