//! Who answers a model name: a local model's own name (or `local`, the fallback model), then
//! the configured rules in order (`*` matches any run of characters).

use crate::config::{ProviderName, RouteRule};

/// Who answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Remote providers in the order they are asked: the rule's, then its fallbacks.
    Remote(Vec<ProviderName>),
    /// The local model of this name; empty means the fallback model (`local`).
    Local(String),
}

/// The target for `model`, or `None` when nothing is configured to answer it. `local_names`
/// are the configured local models' names.
pub fn target_for<'a>(
    model: &str,
    mut local_names: impl Iterator<Item = &'a str>,
    rules: &[RouteRule],
) -> Option<Target> {
    if model == "local" {
        return Some(Target::Local(String::new()));
    }
    if let Some(name) = local_names.find(|n| model.eq_ignore_ascii_case(n)) {
        return Some(Target::Local(name.to_owned()));
    }
    let rule = rules.iter().find(|r| glob(&r.model, model))?;
    Some(match rule.provider {
        ProviderName::LOCAL => Target::Local(rule.local_model.clone()),
        remote => Target::Remote(std::iter::once(remote).chain(rule.fallback.clone()).collect()),
    })
}

/// Whether `text` matches `pattern`, where `*` stands for any (possibly empty) run.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        assert!(glob("gpt-*", "gpt-4o-mini"));
        assert!(!glob("gpt-*", "xgpt-4"));
        assert!(glob("*/*", "meta-llama/Llama-3.1-8B-Instruct"));
        assert!(!glob("*/*", "gpt-4o"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
        assert!(glob("a*b*c", "a-b-b-c") && !glob("a*b*c", "a-c-b"));
        assert!(glob("*", "") && glob("ab*ab", "abab") && !glob("ab*ab", "aba"));
    }

    #[test]
    fn a_local_name_wins_then_the_first_rule() {
        let mut rules = crate::config::RoutingConfig::default().rules;
        let local = |pattern: &str, name: &str| RouteRule {
            local_model: name.into(),
            ..RouteRule::new(pattern, ProviderName::LOCAL)
        };
        rules.insert(0, local("fast-*", "Qwen"));
        rules.insert(1, local("gpt-4o-mini", ""));
        let vllm = ProviderName::parse("vllm").unwrap();
        let chain =
            RouteRule { fallback: vec![ProviderName::OPENAI], ..RouteRule::new("llama-*", vllm) };
        rules.insert(2, chain);
        let p = |m| target_for(m, ["SmolLM2", "Qwen"].into_iter(), &rules);
        let to = |name: &str| Some(Target::Local(name.into()));
        assert_eq!(p("smollm2"), to("SmolLM2"));
        assert_eq!(p("QWEN"), to("Qwen"));
        assert_eq!(p("local"), to(""));
        assert_eq!(p("fast-chat"), to("Qwen"));
        assert_eq!(p("gpt-4o-mini"), to(""));
        let openai = Some(Target::Remote(vec![ProviderName::OPENAI]));
        assert_eq!(p("gpt-3.5-turbo"), openai);
        assert_eq!(p("o3-mini"), openai);
        assert_eq!(p("llama-3"), Some(Target::Remote(vec![vllm, ProviderName::OPENAI])));
        let hf = Some(Target::Remote(vec![ProviderName::HUGGINGFACE]));
        assert_eq!(p("Qwen/Qwen2.5-7B-Instruct"), hf);
        assert_eq!(p("claude-3"), None);
    }
}
