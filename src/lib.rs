//! edgechat: one binary that turns a VM or an edge box into a complete AI chat service.
//!
//! The modules follow ARCHITECTURE.md's table; dependencies point one way:
//! `cli` → `server` → `api` → (`auth`, `store`, `ratelimit`) and `http` (transport only);
//! `llm` (remote providers) and `local` (the in-process model) stand alone for the chat service.

pub mod api;
pub mod auth;
pub mod chat;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod http;
pub mod jobs;
pub mod llm;
pub mod local;
pub mod logmask;
pub mod message;
pub mod metrics;
pub mod ratelimit;
pub mod secret;
pub mod server;
pub mod signals;
pub mod store;
pub mod systemd;
