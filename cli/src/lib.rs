//! The `switchyard` command's library: the Rust client for `Inference.Session`, the interactive
//! chat, the one-command local cluster, and the component subcommands.

pub mod chat;
pub mod client;
pub mod components;
pub mod tls;
pub mod up;

pub use client::{ClientError, Completion, RequestStream, SessionClient};
