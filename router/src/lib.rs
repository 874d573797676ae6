//! The Switchyard router: the client-facing `Inference` API (gRPC, and OpenAI-compatible HTTP
//! in [`openai`]), request classification, the pure placement policy, persistent multiplexed
//! links to workers, and the per-request dispatcher (cancel, interrupt-and-redirect, failover
//! with token resume).

pub mod affinity;
pub mod auth;
pub mod classify;
pub mod config;
pub mod dispatch;
pub mod error;
#[cfg(test)]
mod fuzz_support;
pub mod links;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod policy_watch;
pub mod prefix_index;
pub mod readiness;
pub mod report;
pub mod server;
pub mod service;
mod session;
pub mod tenant_quota;
pub mod tokenizers;

pub use config::RouterConfig;
pub use server::{RouterEndpoints, run_router, run_router_with_endpoints};
