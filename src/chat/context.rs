//! Fitting a conversation into a model's context window: system messages and this turn stay,
//! the oldest earlier messages go first.

use crate::message::{Message, Role};

/// `history` followed by `turn`, with the oldest non-system history messages dropped until
/// `tokens` of the whole is at most `budget`. `tokens` may be exact or an estimate.
pub fn fit(
    history: Vec<Message>,
    turn: &[Message],
    budget: usize,
    mut tokens: impl FnMut(&[Message]) -> usize,
) -> Vec<Message> {
    let mut all = history;
    let mut kept_history = all.len();
    all.extend_from_slice(turn);
    while tokens(&all) > budget {
        let Some(i) = all[..kept_history].iter().position(|m| m.role != Role::System) else {
            break;
        };
        all.remove(i);
        kept_history -= 1;
    }
    all
}

/// A rough token count for providers whose tokenizer we do not have: about three characters
/// per token (errs on the long side for English) plus a few tokens of framing per message.
pub fn estimate_tokens(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.content.chars().count().div_ceil(3) + 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: Role, text: &str) -> Message {
        Message::new(role, text)
    }

    #[test]
    fn drops_oldest_history_but_keeps_system_and_the_turn() {
        let history = vec![
            m(Role::System, "sys"),
            m(Role::User, "one"),
            m(Role::Assistant, "two"),
            m(Role::User, "three"),
        ];
        let turn = [m(Role::User, "now")];
        let count = |ms: &[Message]| ms.len();
        let out = fit(history.clone(), &turn, 3, count);
        let texts: Vec<&str> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["sys", "three", "now"]);
        let out = fit(history.clone(), &turn, 100, count);
        assert_eq!(out.len(), 5);
        // Even when nothing fits, the turn itself is never cut.
        let out = fit(history, &turn, 0, count);
        let texts: Vec<&str> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["sys", "now"]);
    }
}
