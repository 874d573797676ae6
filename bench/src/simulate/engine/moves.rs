//! Moves and hedges in the simulator, decided by `switchyard_policy::moves` exactly as the
//! router would call it, carried out on the modelled workers:
//!
//! - a moved generation leaves its source at once (slot and KV blocks freed) and continues on
//!   the target, which prefills its prompt plus the tokens generated so far, less the prompt
//!   blocks it has cached; output tokens are billed at the price of the worker that made them;
//! - a hedged request runs on two workers; the first token wins and the other copy is removed
//!   at that moment (within the engine step), what it had prefilled counted as waste and the
//!   hedge budget settled;
//! - preemption is tried when a latency-critical request's placement is predicted to miss its
//!   SLO; rebalancing of latency-critical generations on a GPU — waiting for their first token
//!   or decoding below their lane's minimum rate — whenever a WSE slot frees (the moment a
//!   faster worker appears). Nothing drains in the simulator, so drain hand-off never
//!   triggers here.

use switchyard_cluster::Pool;
use switchyard_policy::classify::Classification;
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_policy::moves::{self, MoveReason, Progress, Running};
use switchyard_policy::{Placement, RequestInfo, Route};

use super::{Kind, Race, Sim};

/// What was removed of a generation on a GPU.
struct Removed {
    /// Context tokens it prefilled there.
    prefilled: u32,
    /// Output tokens generated so far, over all its runs.
    generated: u32,
}

impl Sim<'_> {
    /// Runs `f` with the moves policy (present whenever this is called).
    fn with_policy<T>(&mut self, f: impl FnOnce(&mut Self, &PolicyDocument) -> T) -> T {
        let policy = self.moves_policy.take().expect("moves are enabled");
        let out = f(self, &policy);
        self.moves_policy = Some(policy);
        out
    }

    /// Starts a placed request under the move and hedge decisions: a latency-critical
    /// request predicted to miss may take a borrowed WSE slot (its holder moves to a GPU);
    /// one predicted close to its SLO may run on a second worker too.
    pub(super) fn start_with_moves(&mut self, r: u32, p: Placement, now: f64) {
        self.with_policy(|sim, policy| sim.start_under(r, p, now, policy));
    }

    fn start_under(&mut self, r: u32, p: Placement, now: f64, policy: &PolicyDocument) {
        let (requests, profiles) = (self.requests, self.profiles);
        let request = &requests[r as usize];
        let class = request.classification();
        let mut hits = Vec::new();
        self.kv.lookup(request.full_blocks(), &mut hits);
        let info = RequestInfo {
            model: &profiles.model,
            prompt_tokens: request.prompt_tokens,
            affinity: request.affinity,
            seed: u64::from(r),
            prefix: Some(&hits),
        };
        let mut primary = p;
        if request.lane == LaneName::LatencyCritical
            && policy.migration.enabled
            && p.predicted_ttft_ms > class.ttft_slo_ms
            && let Some((slot, predicted)) = self.preempt_for(&class, &info, now, policy)
        {
            primary = Placement {
                worker: slot,
                pool: Pool::Wse,
                route: Route::Home,
                affinity: false,
                predicted_ttft_ms: predicted,
                cached_tokens: info.cached_tokens(slot),
                ..p
            };
        }
        let spilled = primary.pool != switchyard_policy::home_pool(request.lane);
        let second = moves::should_hedge(
            &self.view,
            &class,
            &info,
            &primary,
            None,
            &self.budget,
            policy,
        );
        let charged = second.and_then(|s| {
            let cost = u64::from(s.prompt_tokens.saturating_sub(s.cached_tokens));
            self.budget
                .charge(request.lane, None, cost, policy)
                .then_some((s, cost))
        });
        match charged {
            None => self.dispatch(r, &primary, spilled, now),
            Some((second, charged)) => {
                self.races.insert(
                    r,
                    Race {
                        primary: primary.worker as u32,
                        second: second.worker as u32,
                        charged,
                    },
                );
                self.stats.hedges += 1;
                self.outcomes[r as usize].hedged = true;
                self.dispatch(r, &primary, spilled, now);
                self.run_on(r, second.worker, 0, now);
            }
        }
    }

    /// Asks the policy for a borrowed WSE slot for a latency-critical request and moves its
    /// holder away; the slot's worker and the request's predicted TTFT there.
    fn preempt_for(
        &mut self,
        class: &Classification,
        info: &RequestInfo<'_>,
        now: f64,
        policy: &PolicyDocument,
    ) -> Option<(usize, f64)> {
        let (requests, profiles) = (self.requests, self.profiles);
        // Cost-sensitive generations on WSE slots: (request, worker, context, left, moves).
        let mut holders = Vec::new();
        for (w, worker) in self.workers.iter().enumerate() {
            let Kind::Wse { runs, .. } = &worker.kind else {
                continue;
            };
            for &v in runs {
                let victim = &requests[v as usize];
                if victim.lane != LaneName::CostSensitive || self.races.contains_key(&v) {
                    continue;
                }
                let generated = self.wse_generated(v, w, now);
                if generated >= victim.output_tokens {
                    continue;
                }
                holders.push((
                    v,
                    w,
                    victim.prompt_tokens + generated,
                    victim.output_tokens - generated,
                    self.outcomes[v as usize].moves,
                ));
            }
        }
        if holders.is_empty() {
            return None;
        }
        let classes: Vec<Classification> = holders
            .iter()
            .map(|h| requests[h.0 as usize].classification())
            .collect();
        let hits: Vec<Vec<(usize, u32)>> = holders
            .iter()
            .map(|h| {
                let mut out = Vec::new();
                self.kv
                    .lookup(requests[h.0 as usize].full_blocks(), &mut out);
                out
            })
            .collect();
        let running: Vec<Running<'_>> = holders
            .iter()
            .zip(&classes)
            .zip(&hits)
            .map(|((&(v, w, context, left, moves), class), hits)| Running {
                worker: w,
                class,
                continuation: RequestInfo {
                    model: &profiles.model,
                    prompt_tokens: context,
                    affinity: requests[v as usize].affinity,
                    seed: u64::from(v),
                    prefix: Some(hits),
                },
                remaining_tokens: left,
                moves: u32::from(moves),
            })
            .collect();
        let p = moves::preemption_victim(&self.view, class, info, &running, policy)?;
        let (victim, from) = (holders[p.victim].0, holders[p.victim].1);
        drop(running);
        self.move_generation(
            victim,
            from,
            p.victim_move.to.worker,
            MoveReason::Preempt,
            now,
        );
        Some((p.slot, p.predicted_ttft_ms))
    }

    /// Output tokens request `r` has generated by `now`, running on WSE worker `w`.
    fn wse_generated(&self, r: u32, w: usize, now: f64) -> u32 {
        let run = &self.wse_runs[&(r, w as u32)];
        if now < run.first_ms {
            return run.done;
        }
        let rate = self.profiles.wse.decode_tokens_per_s;
        let decoded = ((now - run.first_ms) * rate / 1000.0).floor() as u32;
        (run.done + 1 + decoded).min(self.requests[r as usize].output_tokens)
    }

    /// Moves generation `r` from worker `from` to `to`: the source frees its slot at once,
    /// the target prefills the context (prompt + output so far) less its cached prefix.
    fn move_generation(&mut self, r: u32, from: usize, to: usize, reason: MoveReason, now: f64) {
        let request = &self.requests[r as usize];
        let (generated, lost) = match &self.workers[from].kind {
            Kind::Wse { .. } => {
                let generated = self.wse_generated(r, from, now);
                let run = self.leave_wse(from, r, now);
                let lost = if now < run.first_ms {
                    self.wse_prefilled(&run, now)
                } else {
                    0
                };
                (generated, lost)
            }
            Kind::Gpu(_) => {
                let removed = self
                    .remove_from_gpu(r, from, now)
                    .expect("the generation runs on its worker");
                let lost = if removed.generated == 0 {
                    removed.prefilled
                } else {
                    0
                };
                (removed.generated, lost)
            }
        };
        let price = self.view.worker(from).cost_per_mtok;
        let outcome = &mut self.outcomes[r as usize];
        outcome.billed_cost += f64::from(generated - outcome.billed_tokens) * price;
        outcome.billed_tokens = generated;
        outcome.moves += 1;
        outcome.worker = to as u32;
        outcome.spilled = self.view.worker(to).pool != switchyard_policy::home_pool(request.lane);
        self.stats.lost_prefill_tokens += u64::from(lost);
        match reason {
            MoveReason::Preempt => self.stats.preempt += 1,
            MoveReason::Rebalance => self.stats.rebalance += 1,
            MoveReason::Drain => self.stats.drain += 1,
        }
        let before = self.stats.prefill_tokens;
        self.run_on(r, to, generated, now);
        self.stats.reprefill_tokens += self.stats.prefill_tokens - before;
    }

    /// Context tokens a WSE run had prefilled by `now`.
    fn wse_prefilled(&self, run: &super::WseRun, now: f64) -> u32 {
        let wse = &self.profiles.wse;
        let ms = (now - run.start_ms - wse.ttft_overhead_ms).max(0.0);
        ((ms * wse.prefill_tokens_per_s / 1000.0) as u32).min(run.uncached)
    }

    /// Removes request `r` from GPU `w` (pending or running) at `now`, freeing its slot and
    /// blocks.
    fn remove_from_gpu(&mut self, r: u32, w: usize, now: f64) -> Option<Removed> {
        let request = &self.requests[r as usize];
        let lc = request.lane == LaneName::LatencyCritical;
        let worker = &mut self.workers[w];
        let Kind::Gpu(g) = &mut worker.kind else {
            unreachable!("a gpu removal on a wse worker")
        };
        let removed = if let Some(i) = g.pending.iter().position(|p| p.0 == r) {
            let (_, uncached, done) = g.pending.remove(i);
            g.unprefilled -= u64::from(uncached);
            if lc {
                g.unprefilled_latency_critical -= u64::from(uncached);
            }
            Removed {
                prefilled: 0,
                generated: done,
            }
        } else {
            let i = g.running.iter().position(|s| s.request == r)?;
            let in_segment = g.decoded_in_segment(now);
            let seq = g.running.remove(i);
            if !seq.prefilled {
                g.unprefilled -= u64::from(seq.prefill_left);
                if lc {
                    g.unprefilled_latency_critical -= u64::from(seq.prefill_left);
                }
            }
            Removed {
                prefilled: seq.uncached - seq.prefill_left,
                generated: if seq.prefilled {
                    (request.output_tokens - seq.remaining + in_segment).min(request.output_tokens)
                } else {
                    seq.done
                },
            }
        };
        worker
            .cache
            .release(request.full_blocks(), request.anonymous_blocks());
        let (outstanding, queued, queued_lc) = (
            (g.running.len() + g.pending.len()) as u32,
            g.unprefilled,
            g.unprefilled_latency_critical,
        );
        self.view.update(w, |s| {
            s.outstanding = outstanding;
            s.queued_prompt_tokens = queued;
            s.queued_latency_critical_prompt_tokens = Some(queued_lc);
        });
        Some(removed)
    }

    /// A hedged copy's first token on WSE worker `w`: it wins if the race is still open.
    pub(super) fn wse_first(&mut self, w: usize, r: u32, now: f64) {
        let Some(run) = self.wse_runs.get(&(r, w as u32)).copied() else {
            return; // it lost
        };
        if run.first_ms.to_bits() != now.to_bits() || !self.races.contains_key(&r) {
            return;
        }
        let outcome = &mut self.outcomes[r as usize];
        outcome.first_token_ms = run.first_ms;
        outcome.finish_ms = run.finish_ms;
        self.win(r, w as u32, now);
    }

    /// Copy `winner` of hedged request `r` produced the first token: the other is cancelled.
    pub(super) fn win(&mut self, r: u32, winner: u32, now: f64) {
        let race = self.races.remove(&r).expect("an open race");
        let loser = if winner == race.primary {
            race.second
        } else {
            race.primary
        };
        let wasted = match &self.workers[loser as usize].kind {
            Kind::Wse { .. } => {
                let run = self.leave_wse(loser as usize, r, now);
                self.wse_prefilled(&run, now)
            }
            Kind::Gpu(_) => self
                .remove_from_gpu(r, loser as usize, now)
                .map_or(0, |removed| removed.prefilled),
        };
        self.stats.hedge_wasted_tokens += u64::from(wasted);
        let lane = self.requests[r as usize].lane;
        let outcome = &mut self.outcomes[r as usize];
        outcome.worker = winner;
        outcome.spilled =
            self.view.worker(winner as usize).pool != switchyard_policy::home_pool(lane);
        if winner == race.second {
            outcome.hedge_won = true;
            self.stats.hedge_wins += 1;
        }
        self.with_policy(|sim, policy| {
            sim.budget
                .settle(lane, None, race.charged, u64::from(wasted), policy)
        });
    }

    /// A WSE slot freed: latency-critical generations on GPUs, oldest first, ask the policy
    /// whether to move — those still waiting for their first token and those decoding below
    /// their lane's minimum rate (the moment a faster worker appears).
    pub(super) fn rebalance_waiting(&mut self, now: f64) {
        self.with_policy(|sim, policy| sim.rebalance_under(now, policy));
    }

    fn rebalance_under(&mut self, now: f64, policy: &PolicyDocument) {
        if !policy.migration.enabled || !policy.migration.rebalance {
            return;
        }
        let (requests, profiles) = (self.requests, self.profiles);
        let on_gpus = std::mem::take(&mut self.lc_on_gpus);
        let mut kept = Vec::with_capacity(on_gpus.len());
        let mut hits = Vec::new();
        for (r, w) in on_gpus {
            let o = &self.outcomes[r as usize];
            if o.worker != w || o.finish_ms > 0.0 || self.races.contains_key(&r) {
                continue;
            }
            let request = &requests[r as usize];
            let elapsed_ms = now - request.arrival_ms;
            let moves = u32::from(o.moves);
            if moves >= policy.migration.max_moves_per_generation {
                continue;
            }
            let (progress, generated) = if o.first_token_ms > 0.0 {
                let Some(generated) = self.gpu_generated(r, w as usize, now) else {
                    continue;
                };
                let since_first_s = (now - o.first_token_ms) / 1000.0;
                if generated <= moves::MIN_TOKENS_MEASURED || since_first_s <= 0.0 {
                    kept.push((r, w));
                    continue;
                }
                let progress = Progress {
                    elapsed_ms,
                    first_token: true,
                    first_token_in_ms: 0.0,
                    measured_tokens_per_s: f64::from(generated - 1) / since_first_s,
                    predicted_tokens_per_s: switchyard_policy::decode_rate(
                        self.view.worker(w as usize),
                        policy,
                    ),
                };
                // The policy decides; this only skips asking it about generations on pace.
                if !progress.decoding_behind(&request.classification(), policy) {
                    kept.push((r, w));
                    continue;
                }
                (progress, generated)
            } else {
                let Some(first_token_in_ms) = self.first_token_in_ms(r, w as usize, now) else {
                    continue;
                };
                if elapsed_ms + first_token_in_ms <= request.ttft_slo_ms {
                    kept.push((r, w));
                    continue;
                }
                let progress = Progress {
                    elapsed_ms,
                    first_token: false,
                    first_token_in_ms,
                    measured_tokens_per_s: 0.0,
                    predicted_tokens_per_s: 0.0,
                };
                (progress, 0)
            };
            self.kv.lookup(request.full_blocks(), &mut hits);
            let class = request.classification();
            let generation = Running {
                worker: w as usize,
                class: &class,
                continuation: RequestInfo {
                    model: &profiles.model,
                    prompt_tokens: request.prompt_tokens + generated,
                    affinity: request.affinity,
                    seed: u64::from(r),
                    prefix: Some(&hits),
                },
                remaining_tokens: request.output_tokens - generated,
                moves,
            };
            match moves::rebalance_target(&self.view, &generation, &progress, policy) {
                Some(m) => {
                    self.move_generation(r, w as usize, m.to.worker, MoveReason::Rebalance, now)
                }
                None => kept.push((r, w)),
            }
        }
        kept.append(&mut self.lc_on_gpus);
        self.lc_on_gpus = kept;
    }

    /// Output tokens request `r` has generated by `now` (over all its runs), decoding on GPU
    /// `w`: the steps of a decode-only run in flight count as they complete. `None` when it
    /// is not decoding there.
    fn gpu_generated(&self, r: u32, w: usize, now: f64) -> Option<u32> {
        let Kind::Gpu(g) = &self.workers[w].kind else {
            return None;
        };
        let seq = g.running.iter().find(|s| s.request == r && s.prefilled)?;
        let output = self.requests[r as usize].output_tokens;
        Some((output - seq.remaining + g.decoded_in_segment(now)).min(output))
    }

    /// The GPU's own estimate of when request `r` gets its first token: the latency-critical
    /// prompt tokens ahead of it and its own, in prefill chunks, after the step in flight.
    /// `None` when it is not waiting there.
    fn first_token_in_ms(&self, r: u32, w: usize, now: f64) -> Option<f64> {
        let Kind::Gpu(g) = &self.workers[w].kind else {
            return None;
        };
        let lc = |q: u32| self.requests[q as usize].lane == LaneName::LatencyCritical;
        let mut tokens = 0u64;
        let mut found = false;
        for s in &g.running {
            if s.request == r {
                if s.prefilled {
                    return None;
                }
                tokens += u64::from(s.prefill_left);
                found = true;
                break;
            }
            if s.latency_critical && !s.prefilled {
                tokens += u64::from(s.prefill_left);
            }
        }
        if !found {
            for &(q, uncached, _) in &g.pending {
                if q == r || lc(q) {
                    tokens += u64::from(uncached);
                }
                if q == r {
                    found = true;
                    break;
                }
            }
        }
        if !found {
            return None;
        }
        let gpu = &self.profiles.gpu;
        let in_flight = if g.stepping {
            (g.seg_start + g.seg_step_ms - now).max(0.0)
        } else {
            0.0
        };
        let batch = (g.running.len() + g.pending.len()) as f64;
        let base = gpu.step_base_ms + gpu.step_per_seq_ms * batch;
        let chunk = u64::from(gpu.prefill_chunk_tokens);
        let rest = if tokens == 0 {
            0.0
        } else if chunk == 0 {
            base + 1000.0 * tokens as f64 / gpu.prefill_tokens_per_s
        } else {
            let steps = tokens.div_ceil(chunk) as f64;
            steps * (base + 1000.0 * chunk as f64 / gpu.prefill_tokens_per_s)
        };
        Some(in_flight + rest)
    }
}
