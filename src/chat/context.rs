//! Fitting a conversation into a model's context window: system messages and this turn stay,
//! the oldest earlier messages go first.

use crate::message::{Message, Role};

/// `history` followed by `turn`, with the fewest oldest non-system history messages dropped
/// that bring `tokens` of the whole to at most `budget` (all of them when even that is not
/// enough). `tokens` may be exact or an estimate; it is called O(log n) times.
pub fn fit(
    history: Vec<Message>,
    turn: &[Message],
    budget: usize,
    mut tokens: impl FnMut(&[Message]) -> usize,
) -> Vec<Message> {
    // The whole without the `k` oldest non-system history messages.
    let without = |k: usize| -> Vec<Message> {
        let mut dropped = 0;
        let kept = history.iter().filter(|m| {
            let drop = m.role != Role::System && dropped < k;
            dropped += usize::from(drop);
            !drop
        });
        kept.chain(turn).cloned().collect()
    };
    let (mut lo, mut hi) = (0, history.iter().filter(|m| m.role != Role::System).count());
    if tokens(&without(hi)) > budget {
        return without(hi);
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if tokens(&without(mid)) <= budget {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    without(lo)
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
