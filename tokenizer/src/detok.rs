//! Streaming detokenization: generated ids in, complete UTF-8 text out.

use crate::GgufTokenizer;

/// Streaming detokenizer: feed ids one at a time, get back only complete UTF-8 text (one
/// byte-level token can hold half of a character).
#[derive(Debug, Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// Adds one token and returns the text it completes (possibly empty while a multi-byte
    /// character is split across tokens).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Adds raw bytes; returns every complete character now available. Bytes that can never
    /// become valid UTF-8 are replaced by U+FFFD so the stream cannot stall on them.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held at the end of a generation, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenizer_holds_split_characters() {
        let mut d = Detokenizer::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push_bytes(&euro[..1]), "");
        assert_eq!(d.push_bytes(&euro[1..2]), "");
        assert_eq!(d.push_bytes(&[euro[2], b'a']), "€a");
        assert_eq!(d.push_bytes(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(d.push_bytes(&[0xe2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
