//! Cluster membership for Switchyard: the etcd key schema, worker records, registration under
//! a lease with keepalive, the live membership view routers consume, router replicas' presence
//! records (how a replica finds another by id), an in-memory registry for single-process mode,
//! and tracing initialisation shared by every binary.

#[cfg(feature = "jemalloc")]
mod allocator;
pub mod backoff;
pub mod credential;
pub mod deadline;
pub mod driven;
pub mod etcd;
mod etcd_channel;
pub mod grpc_server;
pub mod identity;
pub mod in_process;
pub mod lease;
pub mod listen;
pub mod membership;
pub mod memory;
pub mod registry;
pub mod schema;
pub mod telemetry;
pub mod tls;

pub use etcd::{EtcdRegistry, EtcdSecurity};
pub use membership::{Membership, MembershipView};
pub use memory::MemoryRegistry;
pub use registry::{Fence, Registration, Registry, RegistryError, RouterPresence};
pub use schema::{Capacity, Pool, RouterRecord, WorkerRecord, WorkerState};
