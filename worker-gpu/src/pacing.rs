//! Decode pacing for chunked prefill: how many prompt tokens one scheduler iteration may
//! prefill without slowing the sequences decoding meanwhile below the rate their lane
//! promises.
//!
//! An iteration prefills one chunk (of one prompt, or of several packed together) and then
//! decodes one token for every running sequence, so each decoding stream gets one token per
//! iteration: a full chunk on a busy engine can push the iteration past `1 / min_tokens_per_s`
//! and every latency-critical stream there misses its decode rate (chunked-prefill engines such as Sarathi-Serve size the step's token budget from
//! the decode-latency target for the same reason). The simulator sizes its GPU steps with the
//! same function.
//!
//! The engine's step target (`--step-target`) is such a pace too, kept whether or not anything
//! decodes: a request that arrives while a prompt is being prefilled waits for the chunk in
//! progress, and on a CPU a 512-token chunk takes seconds.

/// The iteration is sized to this share of `1 / min_tokens_per_s`: measured step times
/// wander, and a stream that only just keeps pace misses on the next slow step.
pub const PACE_HEADROOM: f64 = 0.98;

/// Fewest prompt tokens an iteration prefills while pacing (one KV block): prefill must
/// progress even when the decode step alone already takes the whole budget.
pub const MIN_PACED_CHUNK: usize = 32;

/// Prompt tokens one iteration may prefill: `chunk`, cut so that the iteration (the measured
/// decode step plus the prefill at the measured rate) fits within the step that
/// `min_tokens_per_s` allows, never below [`MIN_PACED_CHUNK`]. A `min_tokens_per_s` of 0 (no
/// sequence decoding with a promised rate) or an unmeasured prefill rate leaves `chunk` as it
/// is.
pub fn paced_chunk(
    chunk: usize,
    min_tokens_per_s: f64,
    decode_step_s: f64,
    prefill_tokens_per_s: f64,
) -> usize {
    if min_tokens_per_s <= 0.0 || prefill_tokens_per_s <= 0.0 || !prefill_tokens_per_s.is_finite() {
        return chunk;
    }
    let room_s = PACE_HEADROOM / min_tokens_per_s - decode_step_s.max(0.0);
    let fits = (room_s * prefill_tokens_per_s).floor().max(0.0);
    // `fits` is finite and non-negative here; beyond usize it is "no limit".
    let fits = if fits >= chunk as f64 {
        chunk
    } else {
        fits as usize
    };
    fits.max(MIN_PACED_CHUNK.min(chunk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_promised_rate_or_no_measured_prefill_leaves_the_chunk() {
        assert_eq!(paced_chunk(512, 0.0, 0.030, 20_000.0), 512);
        assert_eq!(paced_chunk(512, 20.0, 0.030, 0.0), 512);
    }

    #[test]
    fn the_chunk_shrinks_to_what_fits_beside_the_decode_step() {
        // 20 tok/s → 49 ms a step; a 27.8 ms decode step leaves 21.2 ms = 424 tokens.
        assert_eq!(paced_chunk(512, 20.0, 0.0278, 20_000.0), 424);
        // A light batch leaves room for the whole chunk.
        assert_eq!(paced_chunk(512, 20.0, 0.016, 20_000.0), 512);
        // A looser promise (cost-sensitive, 5 tok/s) never binds here.
        assert_eq!(paced_chunk(512, 5.0, 0.0278, 20_000.0), 512);
    }

    #[test]
    fn prefill_always_progresses() {
        // The decode step alone takes longer than the budget.
        assert_eq!(paced_chunk(512, 20.0, 0.060, 20_000.0), MIN_PACED_CHUNK);
        // A chunk smaller than the floor is kept as configured.
        assert_eq!(paced_chunk(16, 20.0, 0.060, 20_000.0), 16);
    }
}
