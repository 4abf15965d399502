//! The transport: accept loop, TLS, HTTP/1.1 and HTTP/2, connection and body limits, graceful
//! shutdown, the router, and response helpers. It knows nothing of accounts or chat: it hands
//! each request to a `Service` and writes back what it returns.

mod body;
mod response;
mod router;
mod server;
pub mod tls;

pub use body::{read_capped, BodyError};
pub use response::{bytes, empty, json, Body, BoxError};
pub use router::{Lookup, Params, Router};
pub use server::{serve, Limits, Service};
