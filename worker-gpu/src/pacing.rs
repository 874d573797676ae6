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

/// How many prompts one prefill pass may pack (`--prefill-pack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPack {
    /// As many as get the joining prompts their first tokens soonest on average, from the
    /// engine's measured rates (see [`pack_size`]).
    Auto,
    /// Up to this many (at least 1), as many as the chunk holds.
    AtMost(usize),
}

impl std::str::FromStr for PrefillPack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Self::AtMost(n)),
                _ => Err(format!(
                    "{n:?}: expected `auto` or a number of prompts, at least 1"
                )),
            },
        }
    }
}

impl std::fmt::Display for PrefillPack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::AtMost(n) => write!(f, "{n}"),
        }
    }
}

/// How many of the `joining` prompts (each still needing `mean_remaining_tokens` of prefill on
/// average) one prefill pass packs, so that they get their first tokens soonest on average.
///
/// Passes of `g` prompts each cost `c + g·p`: `p` a prompt's own prefill
/// (`mean_remaining_tokens / prefill_tokens_per_s`), `c` what every pass costs besides
/// (`pass_cost_s`: its fixed cost, and the decode step that follows it while streams decode). The `j`-th pass's prompts get their first token at `j·(c + g·p)`, so over `n` prompts
/// the mean is `(n/g + 1)·(c + g·p)/2`, least at `g = √(n·c/p)`. Where prefill is
/// compute-bound and a pass costs little more than its tokens (a CPU) that is one or two
/// prompts a pass, and packing more only makes every prompt wait for the slowest; where a pass
/// costs about the same however few tokens it holds (a GPU, or a CPU with many streams
/// decoding between passes) it is most or all of them. An unmeasured prefill rate packs all.
pub fn pack_size(
    joining: usize,
    mean_remaining_tokens: f64,
    prefill_tokens_per_s: f64,
    pass_cost_s: f64,
) -> usize {
    let measured = prefill_tokens_per_s > 0.0 && prefill_tokens_per_s.is_finite();
    if joining <= 1 || !measured || mean_remaining_tokens <= 0.0 {
        return joining;
    }
    let own_s = mean_remaining_tokens / prefill_tokens_per_s;
    let best = (joining as f64 * pass_cost_s.max(0.0) / own_s)
        .sqrt()
        .ceil();
    // `best` is finite and non-negative; beyond usize it is "all of them".
    if best >= joining as f64 {
        joining
    } else {
        (best as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_packs_the_prompts_that_get_first_tokens_soonest_on_average() {
        // SmolLM2 on two CPU cores: 370 prompt tokens/s, a pass's fixed cost ~8.5 ms. Sixteen
        // 24-token prompts with nothing decoding: two a pass.
        assert_eq!(pack_size(16, 24.0, 370.0, 0.0085), 2);
        // Eight of them while eight streams decode (a 50 ms step after every pass): three.
        assert_eq!(pack_size(8, 24.0, 370.0, 0.050), 3);
        // Long prompts (embedding inputs of ~180 tokens): one a pass.
        assert_eq!(pack_size(8, 180.0, 370.0, 0.0085), 1);
        // The modelled 70B GPU node: 20 000 prompt tokens/s, a 27.8 ms step: all of them.
        assert_eq!(pack_size(16, 24.0, 20_000.0, 0.0278), 16);
    }

    #[test]
    fn the_flag_reads_auto_or_a_positive_count() {
        assert_eq!("auto".parse(), Ok(PrefillPack::Auto));
        assert_eq!("4".parse(), Ok(PrefillPack::AtMost(4)));
        for bad in ["0", "-1", "many", ""] {
            let error = bad.parse::<PrefillPack>().unwrap_err();
            assert!(error.contains("expected `auto`"), "{bad}: {error}");
        }
        for pack in [PrefillPack::Auto, PrefillPack::AtMost(3)] {
            assert_eq!(pack.to_string().parse(), Ok(pack));
        }
    }

    #[test]
    fn without_a_measured_rate_or_a_choice_all_are_packed() {
        assert_eq!(pack_size(5, 24.0, 0.0, 0.01), 5);
        assert_eq!(pack_size(5, 24.0, f64::NAN, 0.01), 5);
        assert_eq!(pack_size(1, 24.0, 370.0, 0.0), 1);
        assert_eq!(pack_size(0, 24.0, 370.0, 0.01), 0);
        // A free pass still prefills one prompt.
        assert_eq!(pack_size(5, 24.0, 370.0, 0.0), 1);
    }

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
