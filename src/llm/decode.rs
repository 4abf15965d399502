//! What a wire dialect implements for the shared client (`remote.rs`): reading its stream's
//! events. Kept apart so that the dialect modules depend on this, not on the client that
//! dispatches to them.

use super::Event;
use std::collections::VecDeque;

/// Why a chunk could not be read; the shared stream turns both into `Protocol` errors, logging
/// an error event's body (redacted) but never returning it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DecodeError {
    /// The chunk is not the dialect's JSON.
    Malformed(String),
    /// The upstream reported an error in the stream.
    ErrorEvent,
}

/// Reads one dialect's SSE events into generation events.
pub(super) trait Decode: Send {
    /// Queues what `data` means; `Ok(true)` once it was the stream's last event (the decoder has
    /// then queued the `Finish`).
    fn decode(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, DecodeError>;
}
