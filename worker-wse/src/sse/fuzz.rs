//! Property harness over the SSE parser (issue 12, fuzzing on stable Rust): any byte stream,
//! cut into chunks at any points (empty chunks included, as a body stream may yield them),
//! parses to exactly the events, error and leftover state of the same bytes in one chunk, and
//! never panics.
//!
//! The checked-in streams in `tests/fuzz_seeds/sse/` are replayed first, at every single and
//! every pair of cut points. `PROPTEST_CASES` raises the case count (scripts/fuzz.sh).

use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(256)
    }
}

/// What a parser made of a stream: the events, the first error, whether bytes are left over.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<SseEvent>,
    error: Option<SseError>,
    partial: bool,
}

/// Feeds `bytes` cut at `cuts` (sorted offsets, repeats allowed); stops at the first error.
/// Events of the chunk that failed are not counted: `push` returns an error, not them.
fn feed(bytes: &[u8], cuts: &[usize], max_line: usize) -> Outcome {
    let mut parser = SseParser::new(max_line);
    let mut events = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        match parser.push(&bytes[start..end]) {
            Ok(more) => events.extend(more),
            Err(error) => {
                return Outcome {
                    events,
                    error: Some(error),
                    partial: parser.has_partial(),
                };
            }
        }
        start = end;
    }
    Outcome {
        events,
        partial: parser.has_partial(),
        error: None,
    }
}

fn check(bytes: &[u8], cuts: &[usize], max_line: usize) -> Result<(), String> {
    let whole = feed(bytes, &[], max_line);
    let split = feed(bytes, cuts, max_line);
    for event in &whole.events {
        if event.event.contains(['\r', '\n'])
            || event
                .id
                .as_ref()
                .is_some_and(|id| id.contains(['\r', '\n']))
        {
            return Err(format!("a field holds a line end: {event:?}"));
        }
        if event.data.contains('\r') {
            return Err(format!("data holds a carriage return: {event:?}"));
        }
    }
    match (&whole.error, &split.error) {
        (None, None) if whole == split => Ok(()),
        // A chunk that fails hides the events it completed, so the split feed may return
        // more events than the whole one; they must be the stream's own events before the
        // failure, which a byte-at-a-time feed returns all of.
        (Some(a), Some(b)) if a == b => {
            let every: Vec<usize> = (0..bytes.len()).collect();
            let bytewise = feed(bytes, &every, max_line);
            if bytewise.error.as_ref() == Some(a) && bytewise.events.starts_with(&split.events) {
                Ok(())
            } else {
                Err(format!(
                    "cut at {cuts:?}, {bytes:?}:\nbyte-wise {bytewise:?}\nsplit {split:?}"
                ))
            }
        }
        _ => Err(format!(
            "cut at {cuts:?}, {bytes:?}:\nwhole {whole:?}\nsplit {split:?}"
        )),
    }
}

/// Cut points: sorted offsets into `len`, repeats allowed (empty chunks).
fn cuts_for(len: usize, raw: &[prop::sample::Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// Bytes that look like an event stream: field names, separators, line ends, multi-byte and
/// broken UTF-8, with arbitrary bytes mixed in.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"data".to_vec()),
        Just(b"event: ".to_vec()),
        Just(b"id: ".to_vec()),
        Just(b"retry: 5".to_vec()),
        Just(b": comment".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just("é🦀".as_bytes().to_vec()),
        Just(vec![0xf0, 0x9f]),
        Just(vec![0xff]),
        Just(vec![0]),
        "[a-z {}\":,]{1,8}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn seed_files() -> Vec<(String, Vec<u8>)> {
    switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "sse")
}

#[test]
fn fuzz_seeds_replay_at_every_cut() {
    let seeds = seed_files();
    assert!(seeds.len() >= 8, "seed corpus is missing: {}", seeds.len());
    for (name, bytes) in &seeds {
        for max_line in [DEFAULT_MAX_LINE, 8] {
            for a in 0..=bytes.len() {
                for b in a..=bytes.len() {
                    // Three cut points with `a` twice: an empty chunk at every position.
                    check(bytes, &[a, a, b], max_line)
                        .unwrap_or_else(|e| panic!("seed {name}: {e}"));
                }
            }
        }
    }
}

/// Regression (found by this harness): a chunk ending in `\r`, then an empty chunk, then one
/// starting with `\n` read the `\n` as a second, blank line and dispatched the event early.
#[test]
fn an_empty_chunk_between_cr_and_lf_is_not_a_blank_line() {
    let mut parser = SseParser::default();
    let mut events = parser.push(b"data: a\r").expect("valid");
    events.extend(parser.push(b"").expect("valid"));
    events.extend(parser.push(b"\ndata: b\n\n").expect("valid"));
    let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, vec!["a\nb"]);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_sse_chunk_boundaries(
        bytes in stream(),
        raw in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        max_line in prop_oneof![Just(DEFAULT_MAX_LINE), 1usize..24],
    ) {
        let cuts = cuts_for(bytes.len(), &raw);
        check(&bytes, &cuts, max_line).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_sse_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        raw in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let cuts = cuts_for(bytes.len(), &raw);
        check(&bytes, &cuts, DEFAULT_MAX_LINE).map_err(TestCaseError::fail)?;
    }

    /// Seeds cut at random points with random bytes flipped.
    #[test]
    fn fuzz_sse_mutated_seeds(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        raw in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let seeds = seed_files();
        let mut bytes = seeds[pick.index(seeds.len())].1.clone();
        for (at, value) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
        }
        let cuts = cuts_for(bytes.len(), &raw);
        check(&bytes, &cuts, DEFAULT_MAX_LINE).map_err(TestCaseError::fail)?;
    }
}
