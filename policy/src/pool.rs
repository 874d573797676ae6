//! The hardware pools placement chooses between.

use serde::{Deserialize, Serialize};

/// Hardware pool a worker belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// GPU (or CPU-fallback) workers running the native engine: cheap, high throughput.
    Gpu,
    /// Gateways to a wafer-scale engine: very low latency, scarce.
    Wse,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::Gpu, Pool::Wse];

    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Gpu => "gpu",
            Pool::Wse => "wse",
        }
    }

    /// The pool this one spills to.
    pub fn other(self) -> Pool {
        match self {
            Pool::Gpu => Pool::Wse,
            Pool::Wse => Pool::Gpu,
        }
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Pool {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gpu" => Ok(Pool::Gpu),
            "wse" => Ok(Pool::Wse),
            other => Err(format!("unknown pool {other:?}, expected gpu or wse")),
        }
    }
}
