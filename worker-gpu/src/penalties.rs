//! Logit adjustments made before a token is chosen: a caller's `logit_bias`, the repetition
//! penalty over prompt and output, and OpenAI's presence and frequency penalties over the
//! output. They change which token wins, so they apply to greedy decoding as much as to
//! sampling.
//!
//! The order is vLLM's (bias, then repetition, then presence/frequency), so a request gives the
//! same logits on either engine family. Only the tokens a sequence has seen are touched: the
//! work per token is the size of the history's distinct ids, not of the vocabulary.

use std::collections::HashMap;

/// A sequence's adjustments, as requested. The default adjusts nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token the output holds.
    pub presence: f32,
    /// Subtracted once per time a token occurs in the output.
    pub frequency: f32,
    /// A seen token's positive logit is divided by it, a negative one multiplied; 1 = none.
    pub repetition: f32,
    /// (token id, bias) added to the logits, ids ascending and distinct.
    pub logit_bias: Vec<(u32, f32)>,
    /// Tokens never chosen (their logits set to −∞): the end-of-sequence tokens of a request
    /// that asked to `ignore_eos`, as llama.cpp bans them.
    pub banned: Vec<u32>,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
            logit_bias: Vec::new(),
            banned: Vec::new(),
        }
    }
}

impl Penalties {
    /// True when applying them would change nothing: the logits row is used as it is.
    pub fn is_none(&self) -> bool {
        self.presence == 0.0
            && self.frequency == 0.0
            && self.repetition == 1.0
            && self.logit_bias.is_empty()
            && self.banned.is_empty()
    }

    /// Checks ranges (the router checks them too; an engine checks its own input), naming the
    /// field at fault.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        for (name, value) in [
            ("presence_penalty", self.presence),
            ("frequency_penalty", self.frequency),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("sampling.{name}: {value} must be between -2 and 2"));
            }
        }
        if !(self.repetition > 0.0 && self.repetition <= 10.0) {
            return Err(format!(
                "sampling.repetition_penalty: {} must be greater than 0 and at most 10",
                self.repetition
            ));
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab {
                return Err(format!(
                    "sampling.logit_bias[{id}]: token id outside the vocabulary of {vocab}"
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!(
                    "sampling.logit_bias[{id}]: {bias} must be between -100 and 100"
                ));
            }
        }
        Ok(())
    }
}

/// What a sequence has seen, as far as its penalties need to know.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Times each id occurs in the output (resumed tokens included).
    output: HashMap<u32, u32>,
    /// Distinct prompt ids; kept only when the repetition penalty needs them.
    prompt: Vec<u32>,
}

impl History {
    /// The history of a sequence whose context is `prompt` followed by `output` (tokens an
    /// earlier worker generated before a failover count as output: the resumed generation is
    /// penalized as the unbroken one would have been).
    pub fn new(penalties: &Penalties, prompt: &[u32], output: &[u32]) -> Self {
        let mut history = Self::default();
        if penalties.repetition != 1.0 {
            history.prompt = prompt.to_vec();
            history.prompt.sort_unstable();
            history.prompt.dedup();
        }
        for &id in output {
            history.record(id);
        }
        history
    }

    pub fn record(&mut self, id: u32) {
        *self.output.entry(id).or_default() += 1;
    }

    /// Adjusts `logits` in place.
    pub fn apply(&self, penalties: &Penalties, logits: &mut [f32]) {
        for &(id, bias) in &penalties.logit_bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
        if penalties.repetition != 1.0 {
            // Once per token: an id in both the prompt and the output is in `prompt` only.
            let output_only = self
                .output
                .keys()
                .filter(|id| self.prompt.binary_search(id).is_err());
            for &id in self.prompt.iter().chain(output_only) {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / penalties.repetition
                    } else {
                        *logit * penalties.repetition
                    };
                }
            }
        }
        if penalties.presence != 0.0 || penalties.frequency != 0.0 {
            for (&id, &count) in &self.output {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit -= penalties.presence + penalties.frequency * count as f32;
                }
            }
        }
        for &id in &penalties.banned {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(penalties: &Penalties, prompt: &[u32], output: &[u32], logits: &[f32]) -> Vec<f32> {
        let mut row = logits.to_vec();
        History::new(penalties, prompt, output).apply(penalties, &mut row);
        row
    }

    #[test]
    fn presence_counts_once_and_frequency_per_occurrence() {
        let penalties = Penalties {
            presence: 0.5,
            frequency: 0.25,
            ..Penalties::default()
        };
        // Token 1 was produced three times, token 3 once; the prompt does not count.
        let row = applied(&penalties, &[0, 2], &[1, 3, 1, 1], &[1.0; 5]);
        assert_eq!(row, vec![1.0, 1.0 - 0.5 - 0.75, 1.0, 1.0 - 0.5 - 0.25, 1.0]);
    }

    #[test]
    fn repetition_shrinks_a_seen_tokens_logit_toward_unlikely_once() {
        let penalties = Penalties {
            repetition: 2.0,
            ..Penalties::default()
        };
        // 1 is in the prompt and the output: penalized once, not twice.
        let row = applied(&penalties, &[1, 2, 1], &[1, 4], &[3.0, 3.0, -3.0, 3.0, 0.5]);
        assert_eq!(row, vec![3.0, 1.5, -6.0, 3.0, 0.25]);
    }

    #[test]
    fn a_bias_moves_only_its_token_and_can_ban_it() {
        let penalties = Penalties {
            logit_bias: vec![(0, -100.0), (2, 5.0)],
            ..Penalties::default()
        };
        let row = applied(&penalties, &[], &[], &[10.0, 1.0, 1.0]);
        assert_eq!(row, vec![-90.0, 1.0, 6.0]);
        assert_eq!(crate::model::argmax(&row), 2);
    }

    #[test]
    fn a_banned_token_is_never_the_most_likely() {
        let penalties = Penalties {
            banned: vec![0, 3],
            logit_bias: vec![(0, 100.0)],
            ..Penalties::default()
        };
        assert!(!penalties.is_none());
        let row = applied(&penalties, &[], &[], &[50.0, 1.0, 2.0, 40.0]);
        assert_eq!(row[0], f32::NEG_INFINITY);
        assert_eq!(row[3], f32::NEG_INFINITY);
        assert_eq!(crate::model::argmax(&row), 2);
    }

    #[test]
    fn defaults_change_nothing_and_say_so() {
        let penalties = Penalties::default();
        assert!(penalties.is_none());
        let logits = [0.5, -1.0, 2.0];
        assert_eq!(applied(&penalties, &[0, 1], &[2, 2], &logits), logits);
    }

    #[test]
    fn validate_names_the_field_and_the_token() {
        let vocab = 10;
        let bad = [
            (
                Penalties {
                    presence: 2.5,
                    ..Penalties::default()
                },
                "sampling.presence_penalty",
            ),
            (
                Penalties {
                    frequency: f32::NAN,
                    ..Penalties::default()
                },
                "sampling.frequency_penalty",
            ),
            (
                Penalties {
                    repetition: 0.0,
                    ..Penalties::default()
                },
                "sampling.repetition_penalty",
            ),
            (
                Penalties {
                    logit_bias: vec![(10, 1.0)],
                    ..Penalties::default()
                },
                "sampling.logit_bias[10]: token id outside",
            ),
            (
                Penalties {
                    logit_bias: vec![(3, -101.0)],
                    ..Penalties::default()
                },
                "sampling.logit_bias[3]: -101",
            ),
        ];
        for (penalties, message) in bad {
            let error = penalties.validate(vocab).unwrap_err();
            assert!(error.starts_with(message), "{error}");
        }
        let fine = Penalties {
            presence: -2.0,
            frequency: 2.0,
            repetition: 10.0,
            logit_bias: vec![(0, -100.0), (9, 100.0)],
            banned: vec![2],
        };
        assert_eq!(fine.validate(vocab), Ok(()));
    }
}
