//! The worker's Prometheus metrics, shared by both pools: per-generation TTFT,
//! inter-token latency and tokens (labels `pool`, `lane` as the router classified the request,
//! `model`), the load gauges (active sequences, queue depth, KV bytes) from the same
//! snapshot the worker streams to routers, and the engine's prefix-cache counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use switchyard_cluster::Pool;
use switchyard_cluster::telemetry::metrics::{ITL_BUCKETS, Metrics, TTFT_BUCKETS};
use switchyard_proto::v1;
use tokio::time::Instant;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    pub pool: &'static str,
    pub lane: &'static str,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockLabels {
    pub pool: &'static str,
    /// `cached` (reusable, no sequence uses it), `active` (held by sequences), `free`.
    pub state: &'static str,
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}

fn itl_histogram() -> Histogram {
    Histogram::new(ITL_BUCKETS)
}

type Histograms = Family<GenerationLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct WorkerMetrics {
    pool: &'static str,
    pub ttft: Histograms,
    pub inter_token: Histograms,
    pub tokens: Family<GenerationLabels, Counter>,
    pub active: Family<PoolLabels, Gauge>,
    pub queued: Family<PoolLabels, Gauge>,
    pub kv_used_bytes: Family<PoolLabels, Gauge>,
    pub prefix_lookups: Family<PoolLabels, Counter>,
    pub prefix_lookup_tokens: Family<PoolLabels, Counter>,
    pub prefix_hit_tokens: Family<PoolLabels, Counter>,
    pub kv_blocks: Family<BlockLabels, Gauge>,
    pub kv_evictions: Family<PoolLabels, Counter>,
    pub prefill_passes: Family<PoolLabels, Counter>,
    pub prefill_sequences: Family<PoolLabels, Counter>,
    pub prefill_tokens: Family<PoolLabels, Counter>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// The `pool` label value.
fn pool_label(pool: Pool) -> &'static str {
    match pool {
        Pool::Gpu => "gpu",
        Pool::Wse => "wse",
    }
}

/// The `lane` label value of a `Start` frame's lane (`unspecified` from older routers).
fn lane_label(lane: i32) -> &'static str {
    match v1::Lane::try_from(lane) {
        Ok(v1::Lane::LatencyCritical) => "latency_critical",
        Ok(v1::Lane::CostSensitive) => "cost_sensitive",
        _ => "unspecified",
    }
}

impl WorkerMetrics {
    pub fn register(metrics: &Metrics, pool: Pool) -> Self {
        let this = Self {
            pool: pool_label(pool),
            ttft: Family::new_with_constructor(ttft_histogram),
            inter_token: Family::new_with_constructor(itl_histogram),
            tokens: Family::default(),
            active: Family::default(),
            queued: Family::default(),
            kv_used_bytes: Family::default(),
            prefix_lookups: Family::default(),
            prefix_lookup_tokens: Family::default(),
            prefix_hit_tokens: Family::default(),
            kv_blocks: Family::default(),
            kv_evictions: Family::default(),
            prefill_passes: Family::default(),
            prefill_sequences: Family::default(),
            prefill_tokens: Family::default(),
        };
        metrics.register(|r| {
            r.register(
                "switchyard_worker_ttft_seconds",
                "Time from a Start frame to the generation's first token",
                this.ttft.clone(),
            );
            r.register(
                "switchyard_worker_inter_token_seconds",
                "Gap between consecutive generated tokens",
                this.inter_token.clone(),
            );
            r.register(
                "switchyard_worker_tokens_generated",
                "Tokens generated",
                this.tokens.clone(),
            );
            r.register(
                "switchyard_worker_active_sequences",
                "Generations running in the engine",
                this.active.clone(),
            );
            r.register(
                "switchyard_worker_queue_depth",
                "Generations admitted but waiting for an engine slot",
                this.queued.clone(),
            );
            r.register(
                "switchyard_worker_kv_used_bytes",
                "KV cache bytes in use",
                this.kv_used_bytes.clone(),
            );
            r.register(
                "switchyard_engine_prefix_lookups",
                "Prompts looked up in the engine's prefix cache",
                this.prefix_lookups.clone(),
            );
            r.register(
                "switchyard_engine_prefix_lookup_tokens",
                "Prompt tokens looked up in the engine's prefix cache",
                this.prefix_lookup_tokens.clone(),
            );
            r.register(
                "switchyard_engine_prefix_hit_tokens",
                "Prompt tokens found in the engine's prefix cache (reused, not computed)",
                this.prefix_hit_tokens.clone(),
            );
            r.register(
                "switchyard_engine_kv_blocks",
                "KV blocks by state: cached (reusable), active (held by sequences), free",
                this.kv_blocks.clone(),
            );
            r.register(
                "switchyard_engine_kv_evictions",
                "Cached KV blocks dropped to make room",
                this.kv_evictions.clone(),
            );
            r.register(
                "switchyard_engine_prefill_passes",
                "Prefill passes (forwards over prompt tokens) the engine ran",
                this.prefill_passes.clone(),
            );
            r.register(
                "switchyard_engine_prefill_pass_sequences",
                "Prompts' chunks prefilled, summed over passes (over passes: prompts a pass packs)",
                this.prefill_sequences.clone(),
            );
            r.register(
                "switchyard_engine_prefill_tokens",
                "Prompt tokens prefilled (computed, not found cached)",
                this.prefill_tokens.clone(),
            );
        });
        // Show the gauges at zero before the first load report.
        this.observe_load(&v1::Load::default());
        this
    }

    /// Sets the load gauges from a load snapshot.
    pub fn observe_load(&self, load: &v1::Load) {
        let labels = PoolLabels { pool: self.pool };
        self.active
            .get_or_create(&labels)
            .set(i64::from(load.active));
        self.queued
            .get_or_create(&labels)
            .set(i64::from(load.queued));
        self.kv_used_bytes
            .get_or_create(&labels)
            .set(i64::try_from(load.kv_used_bytes).unwrap_or(i64::MAX));
    }

    /// Sets the prefill metrics from the engine's counters (monotonic, as the prefix cache's).
    pub fn observe_prefill(&self, stats: &crate::engine::PrefillStats) {
        let labels = PoolLabels { pool: self.pool };
        for (family, total) in [
            (&self.prefill_passes, stats.passes),
            (&self.prefill_sequences, stats.sequences),
            (&self.prefill_tokens, stats.tokens),
        ] {
            let counter = family.get_or_create(&labels);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Sets the prefix-cache metrics from the engine's counters (monotonic: each counter
    /// advances by what the engine's grew since the last call).
    pub fn observe_prefix_cache(&self, stats: &crate::engine::PrefixCacheStats) {
        let labels = PoolLabels { pool: self.pool };
        let advance = |family: &Family<PoolLabels, Counter>, total: u64| {
            let counter = family.get_or_create(&labels);
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        advance(&self.prefix_lookups, stats.lookups);
        advance(&self.prefix_lookup_tokens, stats.lookup_tokens);
        advance(&self.prefix_hit_tokens, stats.hit_tokens);
        advance(&self.kv_evictions, stats.evictions);
        for (state, blocks) in [
            ("cached", stats.cached_blocks),
            ("active", stats.active_blocks),
            ("free", stats.free_blocks),
        ] {
            self.kv_blocks
                .get_or_create(&BlockLabels {
                    pool: self.pool,
                    state,
                })
                .set(i64::try_from(blocks).unwrap_or(i64::MAX));
        }
    }

    /// A clock for one generation's tokens. Its series are looked up once here: looking the
    /// labels up for every token (hashing the model name under the family's lock) cost more
    /// than the counting.
    pub fn generation(&self, lane: i32, model: &str) -> TokenClock {
        let labels = GenerationLabels {
            pool: self.pool,
            lane: lane_label(lane),
            model: model.to_string(),
        };
        TokenClock {
            series: Some(GenerationSeries {
                tokens: self.tokens.get_or_create(&labels).clone(),
                ttft: self.ttft.get_or_create(&labels).clone(),
                inter_token: self.inter_token.get_or_create(&labels).clone(),
            }),
            started: Instant::now(),
            last: None,
        }
    }
}

/// One generation's token series (handles on the families' shared metrics).
struct GenerationSeries {
    tokens: Counter,
    ttft: Histogram,
    inter_token: Histogram,
}

/// Times one generation's tokens as the engine emits them.
pub struct TokenClock {
    series: Option<GenerationSeries>,
    started: Instant,
    last: Option<Instant>,
}

impl TokenClock {
    /// A clock that records nothing (tests of the forwarding alone).
    pub fn unrecorded() -> Self {
        Self {
            series: None,
            started: Instant::now(),
            last: None,
        }
    }

    /// One token came out of the engine now.
    pub fn token(&mut self) {
        let now = Instant::now();
        let previous = self.last.replace(now);
        let Some(series) = &self.series else {
            return;
        };
        series.tokens.inc();
        match previous {
            None => series.ttft.observe((now - self.started).as_secs_f64()),
            Some(previous) => series.inter_token.observe((now - previous).as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_feed_ttft_then_inter_token_latency() {
        let metrics = Metrics::new();
        let worker = WorkerMetrics::register(&metrics, Pool::Wse);
        let mut clock = worker.generation(v1::Lane::LatencyCritical as i32, "m");
        for _ in 0..3 {
            clock.token();
        }
        worker.observe_load(&v1::Load {
            active: 2,
            queued: 1,
            kv_used_bytes: 4096,
            ..Default::default()
        });
        let series = "{pool=\"wse\",lane=\"latency_critical\",model=\"m\"}";
        worker.observe_prefix_cache(&crate::engine::PrefixCacheStats {
            block_tokens: 32,
            lookups: 2,
            lookup_tokens: 700,
            hit_tokens: 480,
            cached_blocks: 15,
            active_blocks: 7,
            free_blocks: 100,
            evictions: 3,
        });
        worker.observe_prefix_cache(&crate::engine::PrefixCacheStats {
            lookups: 3,
            lookup_tokens: 900,
            hit_tokens: 480,
            cached_blocks: 15,
            active_blocks: 7,
            free_blocks: 100,
            evictions: 3,
            ..Default::default()
        });
        worker.observe_prefill(&crate::engine::PrefillStats {
            passes: 2,
            sequences: 5,
            tokens: 120,
        });
        worker.observe_prefill(&crate::engine::PrefillStats {
            passes: 3,
            sequences: 6,
            tokens: 150,
        });
        let text = metrics.encode();
        for expected in [
            "switchyard_engine_prefill_passes_total{pool=\"wse\"} 3",
            "switchyard_engine_prefill_pass_sequences_total{pool=\"wse\"} 6",
            "switchyard_engine_prefill_tokens_total{pool=\"wse\"} 150",
            "switchyard_engine_prefix_lookups_total{pool=\"wse\"} 3",
            "switchyard_engine_prefix_lookup_tokens_total{pool=\"wse\"} 900",
            "switchyard_engine_prefix_hit_tokens_total{pool=\"wse\"} 480",
            "switchyard_engine_kv_evictions_total{pool=\"wse\"} 3",
            "switchyard_engine_kv_blocks{pool=\"wse\",state=\"cached\"} 15",
            "switchyard_engine_kv_blocks{pool=\"wse\",state=\"active\"} 7",
            "switchyard_engine_kv_blocks{pool=\"wse\",state=\"free\"} 100",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
        for expected in [
            format!("switchyard_worker_tokens_generated_total{series} 3"),
            format!("switchyard_worker_ttft_seconds_count{series} 1"),
            format!("switchyard_worker_inter_token_seconds_count{series} 2"),
            "switchyard_worker_active_sequences{pool=\"wse\"} 2".into(),
            "switchyard_worker_queue_depth{pool=\"wse\"} 1".into(),
            "switchyard_worker_kv_used_bytes{pool=\"wse\"} 4096".into(),
        ] {
            assert!(text.contains(&expected), "missing {expected} in\n{text}");
        }
    }
}
