//! Switchyard benchmarks and tools: the cluster simulator (`simulate`) that runs the router's
//! own routing policy against modelled GPU and wafer-scale workers on public request traces.
//! Each `switchyard-bench` subcommand lives in its own module.

pub mod simulate;
