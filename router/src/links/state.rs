//! What placement reads of a link without waiting for its task: connected or not, the
//! worker's last load report, the starts no report has counted yet, the slots held for
//! placed requests — and the worker's state for the policy made from them.

use std::collections::VecDeque;

use switchyard_cluster::WorkerRecord;
use switchyard_proto::v1;

use crate::policy::WorkerState;

/// Starts counted against a worker's slots and queue on top of its last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Starts {
    pub(super) count: u32,
    pub(super) prompt_tokens: u64,
    /// Of `prompt_tokens`, those of latency-critical starts.
    pub(super) latency_critical_prompt_tokens: u64,
}

impl Starts {
    pub(super) fn add(&mut self, start: Charge) {
        self.count = self.count.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(start.prompt_tokens);
        if start.latency_critical {
            self.latency_critical_prompt_tokens = self
                .latency_critical_prompt_tokens
                .saturating_add(start.prompt_tokens);
        }
    }

    pub(super) fn remove(&mut self, start: Charge) {
        self.count = self.count.saturating_sub(1);
        self.prompt_tokens = self.prompt_tokens.saturating_sub(start.prompt_tokens);
        if start.latency_critical {
            self.latency_critical_prompt_tokens = self
                .latency_critical_prompt_tokens
                .saturating_sub(start.prompt_tokens);
        }
    }
}

/// What one start weighs on its worker until a load report counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Charge {
    pub(super) prompt_tokens: u64,
    pub(super) latency_critical: bool,
}

impl Charge {
    pub(super) fn of(start: &v1::WorkerStart) -> Self {
        // Exact when the router tokenized the prompt, else estimated at 4 bytes per token.
        let prompt_tokens = if start.prompt_token_ids.is_empty() {
            let prompt_bytes = start.prompt.len()
                + start
                    .messages
                    .iter()
                    .map(|m| m.content.len())
                    .sum::<usize>();
            prompt_bytes.div_ceil(4)
        } else {
            start.prompt_token_ids.len()
        };
        Self {
            prompt_tokens: prompt_tokens as u64,
            latency_critical: start.lane == v1::Lane::LatencyCritical as i32,
        }
    }
}

/// Starts sent to a worker on the current stream that its load reports have not counted yet:
/// they hold its slots as much as the ones it reported. Each report says how many starts the
/// worker had taken from the stream, so exactly the rest stay counted here. Owned by the
/// link's task; placement sees its [`Starts`] total.
#[derive(Debug, Default)]
pub(super) struct InTransit {
    pub(super) sent: u64,
    /// Each start not yet counted by a report, oldest first.
    pub(super) starts: VecDeque<Charge>,
    pub(super) total: Starts,
}

impl InTransit {
    pub(super) fn sent(&mut self, start: Charge) {
        self.sent += 1;
        self.starts.push_back(start);
        self.total.add(start);
    }

    /// A load report that had seen `seen` starts of this stream (`None`: a worker that does
    /// not say, so everything sent so far is assumed counted).
    pub(super) fn reported(&mut self, seen: Option<u64>) {
        let left = seen.map_or(0, |seen| self.sent.saturating_sub(seen));
        while self.starts.len() as u64 > left {
            let Some(start) = self.starts.pop_front() else {
                break;
            };
            self.total.remove(start);
        }
    }

    pub(super) fn total(&self) -> Starts {
        self.total
    }
}

/// What placement sees of a link. The link's task writes the stream's part; a placement
/// holding a slot and a dispatcher handing a start to the task write `reserved`, so a decision
/// made before the task has caught up still sees the slot taken. Every write is one
/// [`StateCell::update`], so a reader never sees half of one.
#[derive(Debug, Clone, Copy)]
pub(super) struct LinkState {
    pub(super) connected: bool,
    /// Whether the worker's record is in the membership view. An unlisted link lives only as
    /// long as its stream: it is not redialled.
    pub(super) listed: bool,
    /// The worker's last load report on the current stream.
    pub(super) load: Option<v1::Load>,
    /// The current stream sent a KV snapshot: the worker publishes its cache.
    pub(super) publishes_kv: bool,
    /// Starts sent on the current stream that no load report has counted yet.
    pub(super) in_transit: Starts,
    /// Generations of the current stream that finished since the last load report: their
    /// slots are free though that report (or [`Self::in_transit`]) still counts them.
    pub(super) finished_since_report: u32,
    /// Slots held by placements whose start is not handed to the link yet ([`SlotHold`]).
    pub(super) held: u32,
    /// Starts handed to the link's task that it has not sent yet.
    pub(super) queued: Starts,
    /// Consecutive failed dials (or streams that did not stay up long).
    pub(super) failures: u32,
    /// Mean time from a start sent to its generation's last frame ([`turnover_ewma`]); 0
    /// until one finished. Kept across streams: it describes the worker, not the stream.
    pub(super) slot_turnover_ms: f64,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            connected: false,
            listed: true,
            load: None,
            publishes_kv: false,
            in_transit: Starts::default(),
            finished_since_report: 0,
            held: 0,
            queued: Starts::default(),
            failures: 0,
            slot_turnover_ms: 0.0,
        }
    }
}

/// The policy's fixed TTFT overhead for a worker that reports a fixed first-token delay
/// (`Load.first_token_delay_ms`, first decode step included): the policy adds one decode step
/// of its own, so the overhead is the delay less that step (never negative).
pub fn first_token_overhead_ms(delay_ms: f64, decode_tokens_per_s: f64) -> f64 {
    if !delay_ms.is_finite() || delay_ms <= 0.0 {
        return 0.0;
    }
    let step_ms = if decode_tokens_per_s > 0.0 {
        1000.0 / decode_tokens_per_s
    } else {
        0.0
    };
    (delay_ms - step_ms).max(0.0)
}

/// The policy's view of a worker from its record and its link's state.
pub(super) fn worker_state(record: &WorkerRecord, link: &LinkState) -> WorkerState {
    let load = link.load;
    let reported = load.map(|l| l.active + l.queued).unwrap_or(0);
    let draining = load.is_some_and(|l| l.draining);
    let unreported = link
        .in_transit
        .count
        .saturating_add(link.queued.count)
        .saturating_add(link.held);
    let outstanding = reported
        .saturating_add(unreported)
        .saturating_sub(link.finished_since_report);
    let unreported_prompt_tokens = link.in_transit.prompt_tokens + link.queued.prompt_tokens;
    let unreported_lc_prompt_tokens =
        link.in_transit.latency_critical_prompt_tokens + link.queued.latency_critical_prompt_tokens;
    // Per-stream decode rate: measured total over active streams, else the advertised one.
    let decode = load
        .filter(|l| l.active > 0 && l.tokens_per_s > 0.0)
        .map(|l| l.tokens_per_s / f64::from(l.active))
        .unwrap_or(record.capacity.tokens_per_s);
    WorkerState {
        available: record.is_ready() && !draining && link.connected,
        outstanding,
        max_concurrent: load
            .map(|l| l.max_concurrent)
            .filter(|m| *m > 0)
            .unwrap_or(record.capacity.max_concurrent),
        // Reported by the worker (0 = not reported) plus what was sent since; a rate of 0
        // makes the policy assume its default.
        queued_prompt_tokens: load.map_or(0, |l| l.queued_prompt_tokens) + unreported_prompt_tokens,
        // Only a worker that reports its lanes apart prefills latency-critical prompts first
        // as far as the router knows.
        queued_latency_critical_prompt_tokens: load
            .and_then(|l| l.queued_latency_critical_prompt_tokens)
            .map(|lc| lc + unreported_lc_prompt_tokens),
        prefill_tokens_per_s: load
            .map(|l| l.prefill_tokens_per_s)
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0),
        decode_tokens_per_s: decode,
        ttft_overhead_ms: load
            .and_then(|l| l.first_token_delay_ms)
            .map_or(0.0, |delay| first_token_overhead_ms(delay, decode)),
        prefill_chunk_tokens: load.and_then(|l| l.prefill_chunk_tokens).unwrap_or(0),
        cost_per_mtok: record.capacity.cost_per_mtok,
        prefix_cache: link.publishes_kv,
        slot_turnover_ms: link.slot_turnover_ms,
        id: record.id.clone(),
        pool: record.pool,
        models: record.models.clone(),
    }
}

/// A link's [`LinkState`] behind a lock. Not a `watch`: nothing waits for a link's state to
/// change (placement hears of changes on the [`ChangeFeed`]), and a `watch` wakes its
/// receivers' notifiers on every write — a request makes about five.
#[derive(Default)]
pub(super) struct StateCell(std::sync::Mutex<LinkState>);

impl StateCell {
    pub(super) fn get(&self) -> LinkState {
        *self.0.lock().expect("link state lock")
    }

    pub(super) fn update<R>(&self, write: impl FnOnce(&mut LinkState) -> R) -> R {
        write(&mut self.0.lock().expect("link state lock"))
    }
}
