//! Switchyard benchmarks and tools. Each `switchyard-bench` subcommand lives in its own module:
//! `simulate`, the cluster simulator that runs the router's own routing policy against modelled
//! GPU and wafer-scale workers on public request traces; `engine`, the native model engine
//! measured in-process; `router`, the router's overhead over talking to a worker directly.

pub mod engine;
pub mod router;
pub mod simulate;
