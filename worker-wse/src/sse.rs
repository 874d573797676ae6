//! An incremental Server-Sent Events parser (the WHATWG `text/event-stream` format), fed the
//! body bytes as they arrive in chunks of any size. Events are split on `\n`, `\r\n` or `\r`
//! line ends, `data:` lines of one event are joined with `\n`, comments (`:`) are skipped.
//!
//! Malformed input is an error, not a guess: a line that is not UTF-8, or one that grows past
//! the size limit without ending (an upstream that never frames its events).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; empty means the default type, `message`.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("malformed event stream: a line is not valid UTF-8")]
    NotUtf8,
    #[error("malformed event stream: a line exceeds {limit} bytes without ending")]
    LineTooLong { limit: usize },
}

/// Largest line accepted by default (an OpenAI chunk is well under 1 KiB; usage and
/// tool-call chunks stay far below this).
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    data: Option<String>,
    event: String,
    id: Option<String>,
    max_line: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl SseParser {
    pub fn new(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            data: None,
            event: String::new(),
            id: None,
            max_line,
        }
    }

    /// Feeds the next body chunk; returns the events it completed, in order.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        // An empty chunk must not forget a `\r` that ended the previous one: the `\n` of that
        // `\r\n` may come in the next chunk.
        if chunk.is_empty() {
            return Ok(events);
        }
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..end]);
            self.check_len()?;
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.on_line(&line)? {
                events.push(event);
            }
            let crlf = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if crlf {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(chunk);
        self.check_len()?;
        Ok(events)
    }

    /// True when bytes of an unfinished line or event are buffered (an upstream that stopped
    /// here was cut off midway).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.data.is_some()
    }

    fn check_len(&self) -> Result<(), SseError> {
        if self.line.len() > self.max_line {
            return Err(SseError::LineTooLong {
                limit: self.max_line,
            });
        }
        Ok(())
    }

    fn on_line(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            // Blank line: dispatch. An event without data is dropped, as the spec says.
            let event = std::mem::take(&mut self.event);
            let id = self.id.take();
            return Ok(self.data.take().map(|data| SseEvent { event, data, id }));
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = value.to_string(),
            "id" => self.id = Some(value.to_string()),
            // `retry` and unknown fields are ignored.
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn whole_stream_in_one_chunk() {
        let mut p = SseParser::default();
        let events = p
            .push(b": keep-alive\n\ndata: {\"a\":1}\n\nevent: x\nid: 7\ndata: [DONE]\n\n")
            .expect("valid");
        assert_eq!(data(&events), vec!["{\"a\":1}", "[DONE]"]);
        assert_eq!(events[1].event, "x");
        assert_eq!(events[1].id.as_deref(), Some("7"));
        assert!(!p.has_partial());
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let stream = "data: one\r\n\r\ndata: tw\u{e9}\ndata: lines\n\ndata:three\r\rdata: 4\n\n";
        let expected = vec!["one", "tw\u{e9}\nlines", "three", "4"];
        let bytes = stream.as_bytes();
        for split in 0..=bytes.len() {
            for second in split..=bytes.len() {
                let mut p = SseParser::default();
                let mut events = p.push(&bytes[..split]).expect("valid");
                events.extend(p.push(&bytes[split..second]).expect("valid"));
                events.extend(p.push(&bytes[second..]).expect("valid"));
                assert_eq!(data(&events), expected, "split at {split} and {second}");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut p = SseParser::default();
        let mut events = Vec::new();
        for b in b"data: a\r\n\r\ndata: b\n\n" {
            events.extend(p.push(std::slice::from_ref(b)).expect("valid"));
        }
        assert_eq!(data(&events), vec!["a", "b"]);
    }

    #[test]
    fn a_cut_off_event_is_partial() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"cho").expect("valid").is_empty());
        assert!(p.has_partial());
        let mut p = SseParser::default();
        assert!(p.push(b"data: x\n").expect("valid").is_empty());
        assert!(p.has_partial());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut p = SseParser::default();
        assert_eq!(p.push(b"data: \xff\xfe\n\n"), Err(SseError::NotUtf8));
        let mut p = SseParser::new(16);
        assert_eq!(
            p.push(b"data: 0123456789abcdef"),
            Err(SseError::LineTooLong { limit: 16 })
        );
    }

    #[test]
    fn data_without_space_and_field_without_colon() {
        let mut p = SseParser::default();
        let events = p.push(b"data\n\ndata:x\n\n").expect("valid");
        assert_eq!(data(&events), vec!["", "x"]);
    }
}
