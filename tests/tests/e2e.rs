//! The end-to-end tests, one module per file, in one test binary: real etcd and real
//! Switchyard processes on loopback (see each module's docs). `cargo nextest run -p
//! switchyard-tests -E 'test(/^tls::/)'` runs one file's tests.

mod auth;
mod burst;
mod cluster;
mod control_plane;
mod deploy_manifests;
mod failover_and_tools;
mod hygiene;
mod moves;
mod observability;
mod openai;
mod policy;
mod prefix_reuse;
mod quotas;
mod real_model;
mod reliability;
mod security;
mod tls;
