//! Which provider answers a model name: the local model's own name, then the configured rules
//! in order (`*` matches any run of characters).

use crate::config::{ProviderName, RouteRule};

/// The provider for `model`, or `None` when nothing is configured to answer it.
pub fn provider_for(model: &str, local_name: &str, rules: &[RouteRule]) -> Option<ProviderName> {
    if model.eq_ignore_ascii_case(local_name) || model == "local" {
        return Some(ProviderName::Local);
    }
    rules.iter().find(|r| glob(&r.model, model)).map(|r| r.provider)
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
    fn the_local_name_wins_then_the_first_rule() {
        let rules = crate::config::RoutingConfig::default().rules;
        let p = |m| provider_for(m, "SmolLM2", &rules);
        assert_eq!(p("smollm2"), Some(ProviderName::Local));
        assert_eq!(p("local"), Some(ProviderName::Local));
        assert_eq!(p("gpt-3.5-turbo"), Some(ProviderName::Openai));
        assert_eq!(p("o3-mini"), Some(ProviderName::Openai));
        assert_eq!(p("Qwen/Qwen2.5-7B-Instruct"), Some(ProviderName::Huggingface));
        assert_eq!(p("claude-3"), None);
    }
}
