//! Log output kept in memory, for tests that check what a subscriber writes: pass
//! `move || captured.clone()` as a `fmt` layer's writer, then read [`CapturedLogs::text`].

use std::io::Write;
use std::sync::{Arc, Mutex};

/// What the writers cloned from it wrote, shared.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
