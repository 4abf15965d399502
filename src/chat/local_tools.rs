//! Tools and JSON output on the local model. A `required` or named `tool_choice` is served by
//! constrained decoding: the answer must be `{"name": …, "arguments": …}` for one of the allowed
//! tools, valid against its parameters' schema. `auto` needs a chat template that offers tools
//! in a call format we know (Qwen2.5, Qwen3, Llama 3.x): the model sees them there and decides;
//! once it opens a call (`<tool_call>`, or a bare answer's `{`), the call is held to the same
//! grammar. Either way the answer is held back until it is complete, since its first tokens
//! cannot tell a call from text.

use crate::llm::{Event, FinishReason, Tool, ToolCallDelta, ToolChoice};
use crate::local::{AutoCalls, CallFormat};
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
    /// It may call these, in the format its template taught it.
    Auto(Vec<Tool>, CallFormat),
}

impl Plan {
    /// The plan for `shape` on a model whose template calls tools in `format` (or offers none).
    pub(super) fn of(shape: &Shape, format: Option<CallFormat>) -> Result<Plan, Unsupported> {
        if !shape.offers_tools() {
            return Ok(Plan::Text);
        }
        let tools = shape.tools.clone();
        match (&shape.tool_choice, format) {
            (Some(ToolChoice::Required), _) => Ok(Plan::Call(tools)),
            (Some(ToolChoice::Function(name)), _) => {
                Ok(Plan::Call(tools.into_iter().filter(|t| &t.name == name).collect()))
            }
            _ if wants_json(shape) => Err(Unsupported::new(
                "response_format",
                "response_format together with tools the model may call (tool_choice auto) is \
                 not supported by the local model; use one or the other",
            )),
            (_, Some(format)) => Ok(Plan::Auto(tools, format)),
            (_, None) => Err(Unsupported::new(
                "tools",
                "tools with tool_choice auto are not supported by this local model (its chat \
                 template offers no tools); tool_choice required or a named function works",
            )),
        }
    }

    /// The tools the chat template renders.
    pub(super) fn rendered(&self, template_knows_tools: bool) -> Vec<Tool> {
        match self {
            Plan::Call(tools) | Plan::Auto(tools, _) if template_knows_tools => tools.clone(),
            _ => Vec::new(),
        }
    }

    /// The grammar of a forced call: one of the tools, by name, with valid arguments.
    pub(super) fn format(&self) -> Option<ResponseFormat> {
        let Plan::Call(tools) = self else { return None };
        let json_schema = JsonSchema {
            name: "tool_call".into(),
            description: None,
            schema: Some(call_schema(tools, "arguments")),
            strict: Some(true),
        };
        Some(ResponseFormat::JsonSchema { json_schema })
    }

    /// The calls the model may open on its own, each held to one tool's schema.
    pub(super) fn calls(&self, shape: &Shape) -> Option<AutoCalls> {
        let Plan::Auto(tools, format) = self else { return None };
        let schema = call_schema(tools, format.arguments_key());
        Some(AutoCalls { schema, parallel: shape.parallel_tool_calls != Some(false) })
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
            Plan::Call(tools) | Plan::Auto(tools, _) => tools,
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
                        let (mut out, reason) = match calls(&text, &tools) {
                            Some((said, calls)) if reason == FinishReason::Stop => {
                                let said = (!said.is_empty()).then_some(Event::Delta(said));
                                let calls = calls.into_iter().map(Event::ToolCall);
                                (said.into_iter().chain(calls).collect(), FinishReason::ToolCalls)
                            }
                            _ => (vec![Event::Delta(text)], reason),
                        };
                        out.push(Event::Finish { reason, usage });
                        out.into_iter().map(Ok).collect()
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

fn wants_json(shape: &Shape) -> bool {
    !matches!(shape.response_format, None | Some(ResponseFormat::Text))
}

/// One call of one of `tools`: its name, and its arguments (under `key`) valid against its
/// parameters.
fn call_schema(tools: &[Tool], key: &str) -> Value {
    let one = |t: &Tool| {
        let arguments = t.parameters.clone().unwrap_or_else(|| json!({"type": "object"}));
        json!({"type": "object", "additionalProperties": false, "required": ["name", key],
            "properties": {"name": {"const": t.name}, key: arguments}})
    };
    json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()})
}

/// The calls `text` makes, with what it says before them: one bare `{"name", "arguments"}` (or
/// Llama's `parameters`), or any number of `<tool_call>…</tool_call>` blocks, each naming one
/// of `tools`. `None` when it is not all calls.
fn calls(text: &str, tools: &[Tool]) -> Option<(String, Vec<ToolCallDelta>)> {
    const CLOSE: &str = "</tool_call>";
    let Some(at) = text.find(CallFormat::TAG) else {
        return Some((String::new(), vec![call(text, tools, 0)?]));
    };
    let blocks = text[at..].split(CallFormat::TAG).skip(1);
    let blocks = blocks.map(|b| b.split(CLOSE).next().unwrap_or(b));
    let calls = (0..).zip(blocks).map(|(i, b)| call(b, tools, i)).collect::<Option<Vec<_>>>()?;
    Some((text[..at].trim().to_owned(), calls))
}

/// The call `text` is, when it is one naming one of `tools`.
fn call(text: &str, tools: &[Tool], index: u32) -> Option<ToolCallDelta> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
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
    Some(ToolCallDelta { index, id: Some(id), name: Some(name.to_owned()), arguments })
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
        let paris = (Some("get_weather"), r#"{"city":"Paris"}"#);
        for text in [
            r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            r#" {"name": "get_weather", "parameters": {"city": "Paris"}} "#,
        ] {
            let (said, calls) = calls(text, &tools).unwrap_or_else(|| panic!("{text}"));
            let [c] = &calls[..] else { panic!("one call in {text}") };
            assert_eq!((said.as_str(), c.name.as_deref(), c.arguments.as_str()), ("", paris.0, paris.1));
        }
        let two = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
            </tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}";
        let (said, calls) = calls(two, &tools).unwrap();
        assert_eq!(said, "Let me look.");
        let read: Vec<_> = calls.iter().map(|c| (c.index, c.arguments.as_str())).collect();
        assert_eq!(read, [(0, r#"{"city":"Paris"}"#), (1, r#"{"city":"Lyon"}"#)]);
        assert_eq!(super::calls(r#"{"name": "other", "arguments": {}}"#, &tools), None);
        assert_eq!(super::calls("It is sunny.", &tools), None);
        assert_eq!(super::calls("<tool_call>{\"name\": \"get_wea", &tools), None);
    }

    #[test]
    fn auto_needs_a_template_that_calls_tools() {
        let shape = Shape { tools: vec![weather()], ..Shape::default() };
        let tagged = Some(CallFormat::Tagged);
        assert_eq!(Plan::of(&shape, tagged), Ok(Plan::Auto(vec![weather()], CallFormat::Tagged)));
        assert_eq!(Plan::of(&shape, None).unwrap_err().field, "tools");
        let json = Shape { response_format: Some(ResponseFormat::JsonObject), ..shape.clone() };
        assert_eq!(Plan::of(&json, tagged).unwrap_err().field, "response_format");
        let required = Shape { tool_choice: Some(ToolChoice::Required), ..shape.clone() };
        assert_eq!(Plan::of(&required, None), Ok(Plan::Call(vec![weather()])));
        let none = Shape { tool_choice: Some(ToolChoice::None), ..shape };
        assert_eq!(Plan::of(&none, None), Ok(Plan::Text));
    }

    #[test]
    fn auto_calls_name_their_arguments_as_the_template_does() {
        let shape =
            Shape { tools: vec![weather()], parallel_tool_calls: Some(false), ..Shape::default() };
        let calls = Plan::Auto(vec![weather()], CallFormat::Bare).calls(&shape).unwrap();
        assert!(!calls.parallel);
        assert_eq!(calls.schema["anyOf"][0]["required"], json!(["name", "parameters"]));
        assert_eq!(Plan::Call(vec![weather()]).calls(&shape), None);
    }
}
