//! The transport: accept loop, TLS, HTTP/1.1 and HTTP/2, connection and body limits, graceful
//! shutdown, the router, and response helpers. It knows nothing of accounts or chat: it hands
//! each request to a `Service` and writes back what it returns.

mod body;
mod conns;
mod response;
mod router;
mod server;
mod stream;
pub mod tls;

pub use body::{read_capped, BodyError};
pub use conns::{stats as connection_stats, Stats as ConnectionStats};
pub use response::{bytes, empty, json, Body, BoxError};
pub use router::{Lookup, Params, Router};
pub use server::{serve, Limits, Service};

/// File descriptors the transport may hold at `max_connections`: the connections, and the
/// refused ones it holds before closing them.
pub fn descriptors_needed(max_connections: usize) -> u64 {
    (max_connections * (1 + conns::TARPIT_FACTOR)) as u64
}
