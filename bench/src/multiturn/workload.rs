//! The multi-turn workload: one shared system prompt and, per conversation, a sequence of user
//! turns drawn deterministically from a seed — the same seed gives every server under test the
//! same conversations, so their figures compare.
//!
//! Conversations share only the system prompt: each opens with a different task (a shuffled
//! pool, tagged with a seeded ticket number and the conversation's index so two conversations
//! never share a first turn, even past the pool's size), then asks follow-ups about its own earlier answers. A prefix cache can
//! therefore reuse the system prompt across conversations and each conversation's whole history
//! across its own turns, nothing else.

/// A realistic coding-assistant system prompt (about 300 tokens in a llama-family tokenizer).
pub const DEFAULT_SYSTEM_PROMPT: &str = include_str!("../../prompts/coding-assistant-system.txt");

/// Opening requests, each about one concrete piece of code.
const OPENERS: &[&str] = &[
    "Here is my Rust function that parses `key=value` lines from a config file. It panics on a line without `=`. Make it return a proper error instead and keep the API small:\n```rust\nfn parse(text: &str) -> HashMap<String, String> {\n    text.lines().map(|l| { let (k, v) = l.split_once('=').unwrap(); (k.trim().into(), v.trim().into()) }).collect()\n}\n```",
    "I need a Python function that merges overlapping intervals given as a list of (start, end) tuples. Inputs can be unsorted and can touch at the ends. Write it with type hints.",
    "My Go HTTP handler leaks goroutines when clients disconnect early. It starts a worker goroutine per request that writes results to an unbuffered channel. How do I fix this with context cancellation?",
    "Write a TypeScript function that debounces an async function so that only the last call within 300 ms runs, and every caller gets the result of that last call.",
    "This bash script is supposed to back up every `.conf` file under /etc into a tarball named with today's date, but it breaks on file names with spaces:\n```sh\nfor f in $(find /etc -name '*.conf'); do tar rf backup-$(date +%F).tar $f; done\n```",
    "In Rust, I have a `Vec<Order>` and need the total amount per customer id, sorted by total descending. `Order` has `customer: u64` and `amount_cents: i64`. What is the idiomatic way?",
    "Explain why this Python code is slow for large inputs and rewrite it:\n```python\ndef dedupe(items):\n    out = []\n    for x in items:\n        if x not in out:\n            out.append(x)\n    return out\n```",
    "I want a small LRU cache in Go with a fixed capacity, safe for concurrent use, with Get and Put. No external packages.",
    "Write a SQL query (PostgreSQL) that returns, for each user, their most recent order and its total, from tables `users(id, name)` and `orders(id, user_id, created_at, total)`.",
    "My TypeScript React component re-renders on every keystroke in a sibling input and it is slow. The component receives a large list and a filter string as props. How do I stop the unnecessary renders?",
    "Implement a token bucket rate limiter in Rust: capacity N, refill R tokens per second, `try_acquire(&mut self, now: Instant) -> bool`. No threads needed.",
    "In Python, how do I read a 20 GB CSV file and compute the mean of one numeric column without loading the whole file into memory?",
    "Review this Rust code for a ring buffer and point out bugs:\n```rust\nstruct Ring { buf: Vec<u8>, head: usize, len: usize }\nimpl Ring { fn push(&mut self, b: u8) { let i = self.head + self.len; self.buf[i] = b; self.len += 1; } }\n```",
    "Write a Go function that walks a directory tree and returns the 10 largest files with their sizes, skipping symlinks.",
    "I keep getting `RecursionError` in my Python JSON flattener for deeply nested documents. Rewrite it iteratively:\n```python\ndef flatten(d, prefix=''):\n    out = {}\n    for k, v in d.items():\n        if isinstance(v, dict): out.update(flatten(v, prefix + k + '.'))\n        else: out[prefix + k] = v\n    return out\n```",
    "Write a shell one-liner or short script that prints the 5 most frequent IP addresses in an nginx access log, with counts.",
    "In TypeScript, define types for a discriminated union of API responses (`ok` with data, `error` with code and message, `loading`) and a function that renders each case exhaustively.",
    "My Rust async service holds a `std::sync::Mutex` guard across an `.await` and the compiler complains the future is not `Send`. What are my options?",
    "Write a Python generator that yields sliding windows of size k over any iterable, without copying the whole iterable into a list.",
    "How should I structure retries with exponential backoff and jitter for an HTTP client in Go, so retries stop when the request context is cancelled?",
    "Write a binary search in Rust that returns the index of the first element greater than or equal to a target in a sorted slice, and explain the loop invariant.",
    "In Python with asyncio, I need to fetch 500 URLs with at most 20 requests in flight at once and collect the results in input order. Show the code.",
    "Write a TypeScript utility type `DeepReadonly<T>` that makes nested objects and arrays read-only, and show an example where it catches a mutation.",
    "My Go program's memory grows steadily under load. How do I find out what is allocating, using only the standard toolchain?",
];

/// Follow-ups that refer back to the conversation so far.
const FOLLOW_UPS: &[&str] = &[
    "Now add unit tests for that, including the edge cases.",
    "What is the time and space complexity of your solution?",
    "Can you make it generic so it works for other element types too?",
    "Add error handling for invalid input and show how a caller would handle the error.",
    "Rewrite it without any external dependencies.",
    "How would you benchmark this to know whether it is fast enough?",
    "Please add doc comments explaining the non-obvious parts.",
    "Is it safe to call this from several threads at once? If not, make it so.",
    "Simplify it: I prefer fewer lines even if it is slightly slower.",
    "What would break if the input were ten times larger?",
    "Show how you would log what it does without making it noisy.",
    "Refactor it into two smaller functions with clear names.",
    "Can you explain the second half of your answer in more detail?",
    "Write a short example of calling it from a main function.",
    "Which edge case did you not handle yet?",
    "Convert the final version to Python so I can compare.",
];

/// One conversation's user turns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub user_turns: Vec<String>,
}

/// The whole workload: shared system prompt plus every conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub system_prompt: String,
    pub conversations: Vec<Conversation>,
}

/// SplitMix64: a tiny, well-known deterministic generator; the workload only needs a
/// reproducible shuffle, not statistical quality.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Builds `conversations` conversations of `turns` user turns each from `seed`.
pub fn build(system_prompt: String, conversations: usize, turns: usize, seed: u64) -> Workload {
    let mut rng = SplitMix64(seed);
    let mut openers: Vec<usize> = (0..OPENERS.len()).collect();
    rng.shuffle(&mut openers);
    let conversations = (0..conversations)
        .map(|c| {
            let ticket = 1000 + rng.below(9000);
            let mut user_turns = Vec::with_capacity(turns);
            user_turns.push(format!(
                "Ticket #{ticket}-{}. {}",
                c + 1,
                OPENERS[openers[c % openers.len()]]
            ));
            // Follow-ups without repetition inside one conversation (the pool is reshuffled
            // when a very long conversation exhausts it).
            let mut follow: Vec<usize> = Vec::new();
            for _ in 1..turns {
                if follow.is_empty() {
                    follow = (0..FOLLOW_UPS.len()).collect();
                    rng.shuffle(&mut follow);
                }
                let pick = follow.pop().expect("refilled above");
                user_turns.push(FOLLOW_UPS[pick].to_string());
            }
            Conversation { user_turns }
        })
        .collect();
    Workload {
        system_prompt,
        conversations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload_other_seed_other_workload() {
        let a = build("s".into(), 8, 4, 7);
        assert_eq!(a, build("s".into(), 8, 4, 7));
        assert_ne!(a, build("s".into(), 8, 4, 8));
    }

    #[test]
    fn shape_and_distinct_openers() {
        let w = build(DEFAULT_SYSTEM_PROMPT.into(), 40, 20, 1);
        assert_eq!(w.conversations.len(), 40);
        let firsts: std::collections::HashSet<_> = w
            .conversations
            .iter()
            .map(|c| {
                assert_eq!(c.user_turns.len(), 20);
                c.user_turns[0].clone()
            })
            .collect();
        // More conversations than openers: the ticket still tells them apart.
        assert_eq!(firsts.len(), 40);
    }

    #[test]
    fn follow_ups_do_not_repeat_within_the_pool_size() {
        let w = build("s".into(), 3, 1 + FOLLOW_UPS.len(), 3);
        for c in &w.conversations {
            let set: std::collections::HashSet<_> = c.user_turns[1..].iter().collect();
            assert_eq!(set.len(), FOLLOW_UPS.len());
        }
    }
}
