//! Switchyard benchmarks. `engine`: the native model engine measured in-process.

pub mod engine;
