//! The `switchyard` command's library: the interactive chat, the admin commands, the one-command
//! local cluster, and the component subcommands. The Rust client for `Inference.Session` is
//! `switchyard-client`.

pub mod admin;
pub mod chat;
pub mod components;
pub mod tls;
pub mod up;
