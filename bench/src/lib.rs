//! Switchyard benchmarks and tools. Each `switchyard-bench` subcommand lives in its own module:
//! `simulate`, the cluster simulator that runs the router's own routing policy against modelled
//! GPU and wafer-scale workers on public request traces; `engine`, the native model engine
//! measured in-process; `router`, the router's overhead over talking to a worker directly (and
//! `stalled-readers`, what clients that stop reading cost it); `noisy_neighbour`, one tenant
//! flooding another without and with tenant quotas; `streams`, many concurrent streams through one
//! router process;
//! `multiturn`, multi-turn conversations against any OpenAI-compatible endpoint (prefix reuse);
//! `batch`, a batch next to the same requests sent straight; `embeddings`, `/v1/embeddings`
//! throughput next to llama.cpp's;
//! `http_overhead`, what Switchyard and SMG add to time to first token in front of one
//! OpenAI-compatible backend, and `openai_backend`, the load-test backend it uses.

pub mod batch;
pub mod doors;
pub mod embeddings;
pub mod engine;
pub mod http_overhead;
pub mod long_prompts;
pub mod multiturn;
pub mod noisy_neighbour;
pub mod openai_backend;
pub mod relay;
pub mod router;
pub mod sessions;
pub mod simulate;
pub mod stored_responses;
pub mod streams;
