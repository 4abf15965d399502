//! The wire form of what shapes an answer — OpenAI's `tools`, `tool_choice`,
//! `response_format` and an assistant message's `tool_calls` — checked and turned into the
//! chat vocabulary (`message::Shape`). Both faces take `response_format`; tools are the OpenAI
//! face's.

use super::extract::Checks;
use crate::message::{JsonSchema, ResponseFormat, Shape, Tool, ToolCall, ToolChoice};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

/// Most tools one request may offer, as OpenAI allows.
const MAX_TOOLS: usize = 128;

/// `function`, the only kind of tool there is.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    Function,
}

/// A tool the model may call.
#[derive(Deserialize, ToSchema)]
pub struct ToolIn {
    /// Checked by deserializing.
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: FunctionKind,
    function: FunctionIn,
}

/// The function: its name, what it does, and the JSON schema of its arguments.
#[derive(Deserialize, ToSchema)]
pub struct FunctionIn {
    #[schema(pattern = "^[a-zA-Z0-9_-]{1,64}$")]
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// A JSON schema (an object); omitted means no arguments.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

/// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": …}}`.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(ToolMode),
    Named(NamedTool),
}

/// Whether the model may, must or must not call a tool.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    None,
    Auto,
    Required,
}

/// Call exactly this function.
#[derive(Deserialize, ToSchema)]
pub struct NamedTool {
    /// Checked by deserializing.
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: FunctionKind,
    function: FunctionName,
}

/// A function's name.
#[derive(Deserialize, ToSchema)]
pub struct FunctionName {
    name: String,
}

/// `text`, `json_object`, or `json_schema` with the schema.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormatIn {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaIn },
}

/// A named JSON schema the answer must validate against.
#[derive(Deserialize, ToSchema)]
pub struct JsonSchemaIn {
    #[schema(pattern = "^[a-zA-Z0-9_-]{1,64}$")]
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

/// A call an earlier assistant message made.
#[derive(Deserialize, ToSchema)]
pub struct ToolCallIn {
    id: String,
    /// Checked by deserializing.
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: FunctionKind,
    function: FunctionCallIn,
}

/// The function called and its arguments (JSON text).
#[derive(Deserialize, ToSchema)]
pub struct FunctionCallIn {
    name: String,
    arguments: String,
}

impl ToolCallIn {
    /// The call in the chat vocabulary.
    pub fn call(&self) -> ToolCall {
        let f = &self.function;
        ToolCall { id: self.id.clone(), name: f.name.clone(), arguments: f.arguments.clone() }
    }
}

/// The request's shape fields, as given.
pub struct ShapeIn<'a> {
    pub tools: Option<&'a [ToolIn]>,
    pub tool_choice: Option<&'a ToolChoiceIn>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<&'a ResponseFormatIn>,
}

impl ShapeIn<'_> {
    /// The shape, with each problem reported against its field.
    pub fn check(&self, checks: &mut Checks) -> Shape {
        let tools: Vec<Tool> = self.tools.unwrap_or_default().iter().map(tool).collect();
        checks.field("tools", check_tools(&tools));
        let tool_choice = self.tool_choice.map(|c| match c {
            ToolChoiceIn::Mode(ToolMode::None) => ToolChoice::None,
            ToolChoiceIn::Mode(ToolMode::Auto) => ToolChoice::Auto,
            ToolChoiceIn::Mode(ToolMode::Required) => ToolChoice::Required,
            ToolChoiceIn::Named(n) => ToolChoice::Function(n.function.name.clone()),
        });
        checks.field("tool_choice", check_choice(tool_choice.as_ref(), &tools));
        let response_format = self.response_format.map(format);
        checks.field("response_format", check_format(response_format.as_ref()));
        // Without tools, `none`, `auto` and `parallel_tool_calls` change nothing (and OpenAI
        // would refuse them there): they are not sent on.
        let (tool_choice, parallel_tool_calls) = match tools.is_empty() {
            true => (None, None),
            false => (tool_choice, self.parallel_tool_calls),
        };
        Shape { tools, tool_choice, parallel_tool_calls, response_format }
    }
}

fn tool(t: &ToolIn) -> Tool {
    let f = &t.function;
    Tool {
        name: f.name.clone(),
        description: f.description.clone(),
        parameters: f.parameters.clone(),
        strict: f.strict,
    }
}

fn format(f: &ResponseFormatIn) -> ResponseFormat {
    match f {
        ResponseFormatIn::Text => ResponseFormat::Text,
        ResponseFormatIn::JsonObject => ResponseFormat::JsonObject,
        ResponseFormatIn::JsonSchema { json_schema: s } => ResponseFormat::JsonSchema {
            json_schema: JsonSchema {
                name: s.name.clone(),
                description: s.description.clone(),
                schema: s.schema.clone(),
                strict: s.strict,
            },
        },
    }
}

/// OpenAI's rule for function and schema names.
fn good_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_tools(tools: &[Tool]) -> Result<(), &'static str> {
    const _: () = assert!(MAX_TOOLS == 128, "the message below names the limit");
    if tools.len() > MAX_TOOLS {
        return Err("must have at most 128 tools");
    }
    if tools.iter().any(|t| !good_name(&t.name)) {
        return Err("function names must be 1 to 64 letters, digits, `_` or `-`");
    }
    match tools.iter().any(|t| t.parameters.as_ref().is_some_and(|p| !p.is_object())) {
        true => Err("function parameters must be a JSON schema object"),
        false => Ok(()),
    }
}

fn check_choice(choice: Option<&ToolChoice>, tools: &[Tool]) -> Result<(), &'static str> {
    match choice {
        None | Some(ToolChoice::None | ToolChoice::Auto) => Ok(()),
        Some(_) if tools.is_empty() => Err("is only allowed when tools are given"),
        Some(ToolChoice::Function(name)) if !tools.iter().any(|t| &t.name == name) => {
            Err("names a function that is not among the tools")
        }
        Some(_) => Ok(()),
    }
}

fn check_format(format: Option<&ResponseFormat>) -> Result<(), &'static str> {
    let Some(ResponseFormat::JsonSchema { json_schema: s }) = format else { return Ok(()) };
    if !good_name(&s.name) {
        return Err("json_schema.name must be 1 to 64 letters, digits, `_` or `-`");
    }
    match &s.schema {
        Some(schema) if !schema.is_object() => Err("json_schema.schema must be a JSON object"),
        _ => Ok(()),
    }
}
