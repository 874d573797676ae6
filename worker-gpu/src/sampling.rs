//! Token sampling (penalties, temperature, min-p, top-k, top-p, seed) and stop-sequence
//! matching.
//!
//! Pure code over plain data: the scheduler hands in a logits row and gets an id back. The PRNG
//! is a small SplitMix64 owned by each sequence, so the same seed and prompt give the same
//! text no matter which other sequences share the batch.

use crate::penalties::{History, Penalties};

/// Validated sampling settings of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or absent) means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// Keep only tokens at least this fraction as likely as the most likely one, after
    /// temperature (vLLM's order: penalties, temperature, min-p, then top-k and top-p over
    /// what is left). 0 = off.
    pub min_p: f32,
    pub seed: u64,
    /// Adjustments to the logits before any of the above.
    pub penalties: Penalties,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            penalties: Penalties::default(),
        }
    }

    /// Checks ranges against a vocabulary of `vocab` tokens, naming the field at fault.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        self.penalties.validate(vocab)?;
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "sampling.temperature: {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(format!("sampling.top_p: {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("sampling.min_p: {} must be in [0, 1]", self.min_p));
        }
        Ok(())
    }
}

/// SplitMix64's increment: its state after n draws is the seed plus n of these.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Per-sequence sampler state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    state: u64,
    /// Reused (index, prob) buffer: no allocation per token after the first.
    scratch: Vec<(u32, f32)>,
    /// What the penalties count; `None` when there are none.
    history: Option<History>,
    /// Reused copy of the logits row the penalties adjust.
    adjusted: Vec<f32>,
    /// Reused weights of a whole row.
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let state = params.seed;
        Self {
            params,
            state,
            scratch: Vec::new(),
            history: None,
            adjusted: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Tells the sampler what the sequence holds before its first sampled token: the prompt
    /// and any tokens generated before a move or a failover. A resumed generation goes on with
    /// its seed's stream where it left off (each token it sampled took one draw), so a seeded
    /// request says the same whichever workers it ran on.
    pub fn start_after(&mut self, prompt: &[u32], output: &[u32]) {
        self.state = self
            .params
            .seed
            .wrapping_add(SPLITMIX_GAMMA.wrapping_mul(output.len() as u64));
        if !self.params.penalties.is_none() {
            self.history = Some(History::new(&self.params.penalties, prompt, output));
        }
    }

    /// Picks the next token from a logits row, after the penalties, and remembers it for them.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let Some(history) = &mut self.history else {
            return self.choose(logits);
        };
        let mut adjusted = std::mem::take(&mut self.adjusted);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        history.apply(&self.params.penalties, &mut adjusted);
        let id = self.choose(&adjusted);
        self.adjusted = adjusted;
        if let Some(history) = &mut self.history {
            history.record(id);
        }
        id
    }

    /// One draw of the stream; every non-greedy token takes exactly one.
    fn next_f32(&mut self) -> f32 {
        // SplitMix64.
        self.state = self.state.wrapping_add(SPLITMIX_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from a (penalized) logits row.
    ///
    /// Only a nucleus (`top_p` < 1) needs the candidates in order, and then only as far as it
    /// reaches: the largest ones are selected and sorted in growing prefixes until the prefix
    /// holds `top_p` of the mass (sorting a whole 49 152-token row took ~1 ms a token).
    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return crate::model::argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let k = self.params.top_k;
        // The min-p cut in logit space: p_i >= min_p * p_max after temperature is
        // l_i >= max + T * ln(min_p). Exact for the most likely tokens whatever the rounding
        // of the exponentials, so min_p = 1 keeps them (and only them).
        let min_p = self.params.min_p;
        let temperature = self.params.temperature;
        let min_p_floor = |max: f32| (min_p > 0.0).then(|| max + temperature * min_p.ln());
        let sum = if k > 0 && k < logits.len() {
            // A top-k cut: the k largest first, then their few weights.
            self.scratch.clear();
            self.scratch
                .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
            self.scratch.select_nth_unstable_by(k - 1, by_weight_desc);
            self.scratch.truncate(k);
            let max = self
                .scratch
                .iter()
                .fold(f32::NEG_INFINITY, |m, e| m.max(e.1));
            // The k largest hold the row's maximum: the same cut as over the whole row.
            if let Some(floor) = min_p_floor(max) {
                self.scratch.retain(|e| e.1 >= floor);
            }
            let mut sum = 0.0f32;
            for e in self.scratch.iter_mut() {
                e.1 = ((e.1 - max) * inv_t).exp();
                sum += e.1;
            }
            sum
        } else {
            // The whole row's weights, eight at a time (the row's exponentials were most of
            // a draw's cost).
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            self.weights.resize(logits.len(), 0.0);
            let mut sum = crate::vexp::exp_shifted(logits, max, inv_t, &mut self.weights);
            let floor = min_p_floor(max);
            if let Some(floor) = floor {
                // Below the cut weighs nothing: the draws below skip zero weights.
                sum = 0.0;
                for (w, &l) in self.weights.iter_mut().zip(logits) {
                    if l < floor {
                        *w = 0.0;
                    }
                    sum += *w;
                }
            }
            if self.params.top_p >= 1.0 {
                // No nucleus: drawn in row order, straight from the weights.
                let mut r = self.next_f32() * sum;
                // Rounding may leave `r` above 0 at the end: then the last token that had
                // any weight (never one a bias banned).
                let mut last = 0;
                for (id, &w) in self.weights.iter().enumerate() {
                    if w > 0.0 {
                        last = id;
                    }
                    r -= w;
                    if r <= 0.0 && w > 0.0 {
                        return id as u32;
                    }
                }
                return last as u32;
            }
            self.scratch.clear();
            let candidates = self.weights.iter().enumerate().map(|(i, &w)| (i as u32, w));
            match floor {
                // Only what the cut kept: often a handful, so the nucleus sorts little.
                Some(floor) => self
                    .scratch
                    .extend(candidates.filter(|&(i, _)| logits[i as usize] >= floor)),
                None => self.scratch.extend(candidates),
            }
            sum
        };
        let keep = if self.params.top_p < 1.0 {
            nucleus(&mut self.scratch, self.params.top_p * sum)
        } else {
            self.scratch.len()
        };
        let kept_sum: f32 = self.scratch[..keep].iter().map(|e| e.1).sum();
        let mut r = self.next_f32() * kept_sum;
        for e in &self.scratch[..keep] {
            r -= e.1;
            if r <= 0.0 {
                return e.0;
            }
        }
        self.scratch[keep - 1].0
    }
}

/// The model's log probability of token `chosen` in a logits row, and the `top` most likely
/// tokens with theirs, most likely first: a log-softmax over the whole row (the raw logits, so
/// what the model itself predicted, before penalties and temperature).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let log_normalizer = max + crate::vexp::sum_exp_shifted(logits, max).ln();
    // The `top` largest by one pass, kept sorted: most logits fall below the smallest kept.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &logit) in logits.iter().enumerate() {
            if best.len() == top && logit <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, kept)| kept >= logit);
            best.insert(at, (id as u32, logit));
            best.truncate(top);
        }
    }
    for entry in &mut best {
        entry.1 -= log_normalizer;
    }
    let chosen = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |l| l - log_normalizer);
    (chosen, best)
}

/// Larger weight first.
fn by_weight_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1)
}

/// Orders the front of `candidates` (token, weight) by descending weight until it holds
/// `mass` of weight, and returns how many that takes: the smallest such prefix.
fn nucleus(candidates: &mut [(u32, f32)], mass: f32) -> usize {
    /// Candidates sorted first; most nuclei of a trained model's row fit in it.
    const FIRST: usize = 64;
    let mut sorted = FIRST.min(candidates.len());
    loop {
        if sorted < candidates.len() {
            candidates.select_nth_unstable_by(sorted - 1, by_weight_desc);
        }
        candidates[..sorted].sort_unstable_by(by_weight_desc);
        let mut acc = 0.0f32;
        for (i, e) in candidates[..sorted].iter().enumerate() {
            acc += e.1;
            if acc >= mass {
                return i + 1;
            }
        }
        if sorted == candidates.len() {
            // Rounding left the whole row just short of `mass`.
            return sorted;
        }
        sorted = (sorted * 8).min(candidates.len());
    }
}

/// Matches stop sequences over the text stream, across token boundaries: text that could still
/// be the start of a stop sequence is held back until it is decided.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop sequence that matched, once one has.
    matched: Option<String>,
}

/// Outcome of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now (may be empty).
    Emit(String),
    /// A stop sequence matched: emit this text (what preceded the stop) and end.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// The stop sequence that ended the text, once one has.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Emit(text.to_string());
        }
        self.held.push_str(text);
        // The earliest match; of two at one place, the one listed first.
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| Some((self.held.find(s.as_str())?, s)))
            .min_by_key(|(at, _)| *at)
        {
            let out = self.held[..at].to_string();
            self.matched = Some(stop.clone());
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Hold the longest suffix that is a proper prefix of some stop sequence.
        let mut hold_from = self.held.len();
        for (i, _) in self.held.char_indices() {
            let suffix = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                hold_from = i;
                break;
            }
        }
        let out = self.held[..hold_from].to_string();
        self.held.drain(..hold_from);
        StopOutcome::Emit(out)
    }

    /// Text still held when the generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
            min_p: 0.0,
            seed: 42,
            penalties: Penalties::default(),
        };
        let logits: Vec<f32> = vec![1.0, 1.1, 0.9, 5.0, 4.9, -3.0];
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        assert!(
            a.iter().all(|id| *id == 3 || *id == 4),
            "top_k=2 kept others"
        );
        assert!(a.contains(&3) && a.contains(&4), "sampling never varied");
        let other = SamplingParams { seed: 7, ..params };
        assert_ne!(a, run(&other));
    }

    /// A generation resumed after k tokens (a move, a failover) samples what the unmoved one
    /// sampled from token k on, with or without a nucleus.
    #[test]
    fn a_resumed_seeded_sampler_continues_the_same_stream() {
        let rows: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                (0..8)
                    .map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.3)
                    .collect()
            })
            .collect();
        for top_p in [1.0, 0.8] {
            let params = SamplingParams {
                temperature: 1.0,
                top_p,
                top_k: 0,
                min_p: 0.0,
                seed: 42,
                penalties: Penalties::default(),
            };
            let mut whole = Sampler::new(params.clone());
            whole.start_after(&[1, 2], &[]);
            let unmoved: Vec<u32> = rows.iter().map(|row| whole.sample(row)).collect();
            for k in [1, 17, 39] {
                let mut resumed = Sampler::new(params.clone());
                resumed.start_after(&[1, 2], &unmoved[..k]);
                let rest: Vec<u32> = rows[k..].iter().map(|row| resumed.sample(row)).collect();
                assert_eq!(rest, unmoved[k..], "top_p {top_p}, resumed after {k}");
            }
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            min_p: 0.0,
            seed: 1,
            penalties: Penalties::default(),
        };
        let mut s = Sampler::new(params);
        // Token 0 has ~88% of the mass: the 0.5 nucleus is token 0 alone.
        for _ in 0..100 {
            assert_eq!(s.sample(&[4.0, 1.0, 1.0, 0.0]), 0);
        }
    }

    #[test]
    fn draws_follow_the_softmax_without_a_nucleus() {
        // 10 tokens at logit 2 among 990 at 0: the 10 hold e²·10 / (e²·10 + 990) ≈ 6.94 %.
        let logits: Vec<f32> = (0..1000)
            .map(|i| if i % 100 == 3 { 2.0 } else { 0.0 })
            .collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 3,
            penalties: Penalties::default(),
        });
        let draws = 20_000;
        let high = (0..draws).filter(|_| s.sample(&logits) % 100 == 3).count();
        let p = 10.0 * 2f64.exp() / (10.0 * 2f64.exp() + 990.0);
        let sigma = (draws as f64 * p * (1.0 - p)).sqrt();
        let expected = draws as f64 * p;
        assert!(
            (high as f64 - expected).abs() < 5.0 * sigma,
            "{high} high draws, expected {expected:.0} ± {:.0}",
            5.0 * sigma
        );
    }

    #[test]
    fn a_nucleus_wider_than_the_first_sorted_prefix_is_found_whole() {
        // Nearly flat and descending by index: a 0.5 nucleus is the first few hundred tokens,
        // far beyond the 64 sorted first.
        let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.001).collect();
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l.exp()))
            .collect();
        let sum: f32 = candidates.iter().map(|e| e.1).sum();
        // Reference: the whole row sorted, then the shortest prefix holding half the mass.
        let mut acc = 0.0;
        let want = 1 + logits
            .iter()
            .position(|l| {
                acc += l.exp();
                acc >= 0.5 * sum
            })
            .expect("the row holds its mass");
        assert!(want > 256, "nucleus of {want}");
        assert_eq!(nucleus(&mut candidates, 0.5 * sum), want);
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            min_p: 0.0,
            seed: 9,
            penalties: Penalties::default(),
        });
        let drawn: Vec<u32> = (0..5_000).map(|_| s.sample(&logits)).collect();
        assert!(
            drawn.iter().all(|&id| (id as usize) < want),
            "drew outside the nucleus"
        );
        assert!(
            drawn.iter().any(|&id| id as usize >= want - 50),
            "never drew from the nucleus' far end"
        );
    }

    #[test]
    fn penalties_steer_greedy_decoding_and_count_resumed_tokens() {
        let logits = [2.0, 1.9, 0.0];
        let greedy = |penalties: Penalties, resumed: &[u32]| {
            let mut s = Sampler::new(SamplingParams {
                penalties,
                ..SamplingParams::greedy()
            });
            s.start_after(&[2, 2], resumed);
            (0..4).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(greedy(Penalties::default(), &[]), vec![0, 0, 0, 0]);
        let frequency = Penalties {
            frequency: 0.5,
            ..Penalties::default()
        };
        // 0 (1.5 after), 1 (1.4 after), 0 (1.0), 1 (0.9).
        assert_eq!(greedy(frequency.clone(), &[]), vec![0, 1, 0, 1]);
        // A failover's resumed 0 was already produced: the resumed sequence starts at 1.
        assert_eq!(greedy(frequency, &[0]), vec![1, 0, 1, 0]);
        let ban = Penalties {
            logit_bias: vec![(0, -100.0)],
            ..Penalties::default()
        };
        assert_eq!(greedy(ban, &[]), vec![1, 1, 1, 1]);
    }

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_are_the_most_likely_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let normalizer = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        let (chosen, top) = logprobs(&logits, 2, 3);
        assert!((chosen - (2.0 - normalizer)).abs() < 1e-5, "{chosen}");
        // Ties keep row order; the probabilities of the whole row sum to 1.
        let ids: Vec<u32> = top.iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((top[0].1 - (3.0 - normalizer)).abs() < 1e-5);
        let total: f32 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| logprobs(&logits, i as u32, 0).0.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(logprobs(&logits, 0, 0).1.is_empty());
        assert_eq!(logprobs(&logits, 0, 9).1.len(), logits.len());
    }

    #[test]
    fn a_banned_token_is_never_drawn() {
        // The banned token is the row's last: where rounding would leave a draw that ran past
        // every weight.
        let logits = vec![0.0f32; 1000];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 5,
            penalties: Penalties {
                logit_bias: vec![(999, -100.0)],
                ..Penalties::default()
            },
            ..SamplingParams::greedy()
        });
        s.start_after(&[1], &[]);
        assert!((0..20_000).all(|_| s.sample(&logits) != 999));
    }

    #[test]
    fn validate_names_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(p.validate(8).unwrap_err().contains("sampling.top_p"));
        for min_p in [-0.5, 1.5, f32::NAN] {
            let p = SamplingParams {
                min_p,
                ..SamplingParams::greedy()
            };
            assert!(p.validate(8).unwrap_err().contains("sampling.min_p"));
        }
    }

    /// How often each token of `logits` is drawn in `draws` draws.
    fn frequencies(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits) as usize] += 1;
        }
        counts
    }

    /// The logits are half the logs of `relative`, so at temperature 0.5 the probabilities
    /// are in its ratios: at min_p 0.1 the tokens at 0.09 and 0.05 of the top one go, the one
    /// at 0.11 stays, and the kept are drawn in their old proportions. (A cut before the
    /// temperature would see square roots, 0.3 and 0.22, and keep them.) The same through each
    /// of the sampler's paths: the whole row, a top-k cut wider than what min-p keeps, and a
    /// nucleus that holds it all.
    #[test]
    fn min_p_removes_exactly_the_tokens_below_the_threshold_and_keeps_the_rest_in_proportion() {
        let relative = [0.2f32, 1.0, 0.09, 0.5, 0.11, 0.05, 0.3, 0.0001];
        let logits: Vec<f32> = relative.iter().map(|w| 0.5 * w.ln() + 3.0).collect();
        let kept_sum: f32 = relative.iter().filter(|&&w| w >= 0.1).sum();
        let draws = 40_000;
        for (top_k, top_p) in [(0, 1.0), (7, 1.0), (0, 0.99999)] {
            let counts = frequencies(
                SamplingParams {
                    temperature: 0.5,
                    top_p,
                    top_k,
                    min_p: 0.1,
                    seed: 11,
                    penalties: Penalties::default(),
                },
                &logits,
                draws,
            );
            for (id, (&w, &count)) in relative.iter().zip(&counts).enumerate() {
                if w < 0.1 {
                    assert_eq!(count, 0, "token {id} (at {w} of the top) drawn, k {top_k}");
                    continue;
                }
                let p = f64::from(w / kept_sum);
                let expected = draws as f64 * p;
                let sigma = (draws as f64 * p * (1.0 - p)).sqrt();
                assert!(
                    (count as f64 - expected).abs() < 5.0 * sigma,
                    "token {id}: {count} draws, expected {expected:.0} ± {:.0} (k {top_k}, p \
                     {top_p})",
                    5.0 * sigma
                );
            }
        }
        // Off (0), the same row draws the cut tokens too.
        let counts = frequencies(
            SamplingParams {
                temperature: 0.5,
                seed: 11,
                ..SamplingParams::greedy()
            },
            &logits,
            draws,
        );
        assert!(counts[2] > 0 && counts[5] > 0, "{counts:?}");
    }

    /// vLLM's order: the nucleus is taken over what min-p left, renormalized. Token 0 holds
    /// 1.0 / 1.6 of what min_p 0.1 keeps, so a 0.5 nucleus is token 0 alone; without the cut
    /// the 100 tokens at 0.05 of it would hold most of the mass and widen the nucleus.
    #[test]
    fn the_nucleus_is_taken_over_what_min_p_kept() {
        let mut logits = vec![0.0f32, 0.6f32.ln()];
        logits.extend(std::iter::repeat_n(0.05f32.ln(), 100));
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            min_p: 0.1,
            seed: 4,
            ..SamplingParams::greedy()
        };
        let counts = frequencies(params.clone(), &logits, 2_000);
        assert_eq!(counts[0], 2_000, "{counts:?}");
        let without = frequencies(
            SamplingParams {
                min_p: 0.0,
                ..params
            },
            &logits,
            2_000,
        );
        assert!(without[2..].iter().sum::<usize>() > 0, "{without:?}");
    }

    /// min_p 1 keeps only the most likely token: at any temperature, with any seed, the greedy
    /// choice. Greedy decoding itself ignores min_p.
    #[test]
    fn min_p_of_one_is_greedy_and_greedy_ignores_min_p() {
        let logits = [0.1f32, 3.0, -1.0, 2.99, 2.5];
        for seed in 0..20 {
            for (temperature, top_k) in [(2.0, 0), (1.0, 3), (0.7, 0)] {
                let mut s = Sampler::new(SamplingParams {
                    temperature,
                    top_k,
                    min_p: 1.0,
                    seed,
                    ..SamplingParams::greedy()
                });
                assert!((0..50).all(|_| s.sample(&logits) == 1), "seed {seed}");
            }
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn stop_sequence_across_tokens_is_not_emitted() {
        let mut m = StopMatcher::new(vec!["</end>".into()]);
        assert_eq!(m.push("Hello <"), StopOutcome::Emit("Hello ".into()));
        assert_eq!(m.push("/en"), StopOutcome::Emit(String::new()));
        assert_eq!(m.push("d> tail"), StopOutcome::Stopped("".into()));
        assert_eq!(m.matched(), Some("</end>"));
        // The earliest of several matches ends the text, whatever the order listed.
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("Hello world"), StopOutcome::Stopped("Hel".into()));
        assert_eq!(m.matched(), Some("lo"));
        let mut m = StopMatcher::new(vec!["xy".into()]);
        assert_eq!(m.push("ax"), StopOutcome::Emit("a".into()));
        assert_eq!(m.push("z"), StopOutcome::Emit("xz".into()));
        assert_eq!(m.push("x"), StopOutcome::Emit(String::new()));
        assert_eq!(m.finish(), "x");
    }
}
