//! Switchyard benchmarks and tools. Each `switchyard-bench` subcommand lives in its own module:
//! `simulate`, the cluster simulator that runs the router's own routing policy against modelled
//! GPU and wafer-scale workers on public request traces; `engine`, the native model engine
//! measured in-process.

pub mod engine;
pub mod simulate;
