//! The worker runtime shared by both pools: the [`Engine`] trait every backend implements, the
//! `Worker.Serve` gRPC service (one persistent multiplexed stream per router), per-request
//! cancellation, token coalescing, load reports, registration and graceful drain, metrics and
//! trace spans, and the
//! synthetic load-test engine (and, with the `fault-engine` feature, the scripted fault engine
//! of the in-process dispatcher tests).

pub mod coalesce;
pub mod credit;
pub mod engine;
#[cfg(feature = "fault-engine")]
pub mod fault;
pub mod kv_events;
pub mod kv_feed;
pub mod load;
pub mod metrics;
pub mod server;
pub mod service;
pub mod synthetic;

pub use coalesce::CoalesceConfig;
pub use engine::{
    Engine, EngineError, EngineEvent, EngineRequest, EngineStream, Message, PrefillStats,
    PrefixCacheStats, Prompt, Sampling, StopReason, Tools,
};
pub use kv_events::{KvBatch, KvPublisher};
pub use load::RateMeter;
pub use server::{HostedBy, WorkerConfig, run_hosted_worker, run_member_worker, run_worker};
pub use synthetic::{SyntheticConfig, SyntheticEngine};

/// Most sequences a worker may serve at once (`--max-concurrent`): a worker advertises its
/// slots to the routers, which place up to that many requests on it, so a mistyped huge value
/// would have them pile every request onto one worker.
pub const MAX_SLOTS: i64 = 65_536;
