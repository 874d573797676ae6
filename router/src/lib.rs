//! The Switchyard router: the client-facing `Inference` API (gRPC, and OpenAI-compatible HTTP
//! in [`openai`]), tenant quotas, the policy watch, persistent multiplexed links to workers,
//! and the per-request dispatcher (cancel, interrupt-and-redirect, failover with token resume).
//! Classification and placement are the pure `switchyard-policy` crate's.

pub mod affinity;
pub mod anthropic;
pub mod auth;
pub mod batches;
pub mod changes;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod links;
pub mod metrics;
pub mod openai;
pub mod placer;
pub mod policy_watch;
pub mod prefix_index;
pub mod readiness;
pub mod report;
pub mod response_store;
pub mod server;
pub mod service;
mod session;
pub mod tenant_quota;
pub mod tokenizers;

// The routing brain is its own pure crate (switchyard-policy); these private aliases keep the
// router's `crate::policy::…` and `crate::classify::…` paths, while other crates name it
// directly.
use switchyard_policy as policy;
use switchyard_policy::classify;

pub use config::RouterConfig;
pub use server::{RouterEndpoints, run_router, run_router_with_endpoints};
