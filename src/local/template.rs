//! The chat template: the GGUF's `tokenizer.chat_template` (Jinja, as Hugging Face writes them)
//! rendered with minijinja; when the file has none, Gemma's turn format for a vocabulary with
//! Gemma's turn markers, else ChatML.

use super::LocalError;
use minijinja::{Environment, Error, ErrorKind};

/// Used when a model carries no template; ChatML is what most small instruct models expect.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n\
{{ message.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Gemma's turn format, for Gemma files without a template (Google's pretrained checkpoints
/// converted to GGUF often carry none): a system message opens the first user turn, the
/// assistant's role is called `model`, and turns must alternate, as in Gemma's own template.
pub const GEMMA: &str = r#"{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception('Invalid content type') }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"#;

/// The template for a file that carries none, chosen by the tokens its vocabulary has.
pub fn fallback(has_token: impl Fn(&str) -> bool) -> &'static str {
    if has_token("<start_of_turn>") && has_token("<end_of_turn>") {
        GEMMA
    } else {
        CHATML
    }
}

use crate::message::Tool;
pub use crate::message::{Message, Role};
use serde_json::{json, Value};

/// A compiled template; rendering is cheap and thread-safe.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the template teaches the model to call the tools it renders, if it renders them.
    calls: Option<CallFormat>,
}

/// How a chat template teaches the model to call a tool, so that a call can be recognised as it
/// opens and held to the tools' schemas from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>`, anywhere in the answer, as often as
    /// needed (Qwen2.5, Qwen3, Hermes and SmolLM3 templates).
    Tagged,
    /// The whole answer is `{"name": …, "parameters": …}` (Llama 3.x templates).
    Bare,
}

impl CallFormat {
    /// What opens a tagged call.
    pub const TAG: &'static str = "<tool_call>";

    /// The key the template names a call's arguments with.
    pub fn arguments_key(self) -> &'static str {
        match self {
            CallFormat::Tagged => "arguments",
            CallFormat::Bare => "parameters",
        }
    }

    /// The format `source` teaches, if it renders tools in a format we know.
    fn of(source: &str) -> Option<CallFormat> {
        if !source.contains("tools") {
            None
        } else if source.contains(CallFormat::TAG) {
            Some(CallFormat::Tagged)
        } else if source.contains("\"parameters\"") {
            Some(CallFormat::Bare)
        } else {
            None
        }
    }
}

impl ChatTemplate {
    /// Compiles `source`, failing now rather than at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, LocalError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Hugging Face renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_owned()).map_err(describe)?;
        let calls = CallFormat::of(source);
        let (bos_token, eos_token) = (bos_token.into(), eos_token.into());
        Ok(ChatTemplate { env, bos_token, eos_token, calls })
    }

    /// How the model calls tools, when the template offers it tools in a format we know (a
    /// template that renders tools in another format is treated as one without tools).
    pub fn call_format(&self) -> Option<CallFormat> {
        self.calls
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, LocalError> {
        self.render_with_tools(messages, &[])
    }

    /// `render`, with `tools` offered (templates that do not know tools leave them out).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[Tool],
    ) -> Result<String, LocalError> {
        let template = self.env.get_template("chat").map_err(describe)?;
        let messages: Vec<Value> = messages.iter().map(hf_message).collect();
        let tools: Option<Vec<Value>> = (!tools.is_empty())
            .then(|| tools.iter().map(|t| json!({"type": "function", "function": t})).collect());
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(describe)
    }
}

/// A message as Hugging Face templates read it: tool calls as `{type, function: {name,
/// arguments}}`, their arguments as an object where they parse as one.
fn hf_message(m: &Message) -> Value {
    let mut out = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = c.to_openai();
                if let Ok(object) = serde_json::from_str::<Value>(&c.arguments) {
                    call["function"]["arguments"] = object;
                }
                call
            })
            .collect();
        out["tool_calls"] = calls.into();
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = id.as_str().into();
    }
    out
}

fn describe(e: Error) -> LocalError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    LocalError::Template(text)
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Llama 3 templates print today's date; a fixed format of the current UTC day is enough.
fn strftime_now(_format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!("{d:02} {} {y}", MONTHS[(m - 1) as usize])
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_every_turn_and_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t
            .render(&[Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi")])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{{ messages[0].content.strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('only one') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new(Role::User, "  hi ")]).unwrap(), "HI");
        let two = [Message::new(Role::User, "a"), Message::new(Role::User, "b")];
        assert!(t.render(&two).unwrap_err().to_string().contains("only one"));
    }

    #[test]
    fn gemma_folds_the_system_message_into_the_first_turn() {
        let t = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
        let out = t
            .render(&[
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, " Hi "),
                Message::new(Role::Assistant, "Hello."),
                Message::new(Role::User, "Capital of France?"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
        let plain = t.render(&[Message::new(Role::User, "Hi")]).unwrap();
        assert_eq!(plain, "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
        let twice = [Message::new(Role::User, "a"), Message::new(Role::User, "b")];
        assert!(t.render(&twice).unwrap_err().to_string().contains("must alternate"));
    }

    #[test]
    fn the_fallback_follows_the_vocabulary() {
        let gemma = |t: &str| t == "<start_of_turn>" || t == "<end_of_turn>";
        assert_eq!(fallback(gemma), GEMMA);
        assert_eq!(fallback(|t: &str| t == "<|im_start|>"), CHATML);
    }

    #[test]
    fn tools_and_tool_calls_render_in_hugging_faces_shape() {
        let source = "{# calls: <tool_call> #}{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}\
            {% for m in messages %}{{ m.role }}:{{ m.content }}\
            {% for c in m.tool_calls or [] %}({{ c.function.name }} {{ c.function.arguments.city }}){% endfor %}\
            {% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(t.call_format(), Some(CallFormat::Tagged));
        let tool =
            Tool { name: "get_weather".into(), description: None, parameters: None, strict: None };
        let call = crate::message::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        };
        let messages = [
            Message::new(Role::User, "hi"),
            Message { tool_calls: vec![call], ..Message::new(Role::Assistant, "") },
            Message { tool_call_id: Some("call_1".into()), ..Message::new(Role::Tool, "21") },
        ];
        assert_eq!(
            t.render_with_tools(&messages, &[tool]).unwrap(),
            "[get_weather]user:hi;assistant:(get_weather Paris);tool:21#call_1;"
        );
    }

    #[test]
    fn the_call_format_is_read_from_the_template() {
        let format = |source: &str| ChatTemplate::new(source, "", "").unwrap().call_format();
        assert_eq!(format(CHATML), None);
        let llama =
            "{% if tools %}Respond with {\"name\": function name, \"parameters\": …}{% endif %}";
        assert_eq!(format(llama), Some(CallFormat::Bare));
        assert_eq!(format("{% if tools %}[TOOL_CALLS]{% endif %}"), None);
    }

    #[test]
    fn a_broken_template_is_an_error_at_load() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
