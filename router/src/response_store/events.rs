//! The events of a streamed background response (`background: true, stream: true`), kept so
//! that a client whose stream broke can pick it up again: `GET /v1/responses/{id}?stream=true
//! &starting_after=N` replays the events after sequence number `N`, then follows the run live
//! until its last event. Event `i` of a log is the one numbered `i` (`sequence_number`).
//!
//! A log is written by its run's task only, and read by any number of followers. Its bytes
//! count against the response store's, for as long as it lives (with its stored response,
//! once the run has ended). A drain hands it over with its response; a mirror does not send
//! it (a standby's copy is read whole).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use futures::Stream;
use tokio::sync::watch;

use super::{Ledger, Lookup, ResponseStore};

/// Bytes counted per event besides its text (its slot and the `Bytes` around it).
const EVENT_OVERHEAD: usize = 48;

/// The events of one streamed background response, in sequence order.
pub struct EventLog {
    events: Mutex<Vec<Bytes>>,
    /// How many events there are, and whether the last has come: what followers wait on.
    written: watch::Sender<Written>,
    ledger: Arc<Ledger>,
    bytes: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Written {
    count: usize,
    closed: bool,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let written = *self.written.borrow();
        f.debug_struct("EventLog")
            .field("events", &written.count)
            .field("closed", &written.closed)
            .finish()
    }
}

/// Why a log cannot be followed from where the client asked.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "starting_after is {asked}, but the response's stream ended with event {last}; \
     resume after a sequence_number the stream sent"
)]
pub struct PastTheEnd {
    pub asked: u64,
    pub last: u64,
}

impl ResponseStore {
    /// A new, empty event log counted against this store.
    pub fn event_log(&self) -> Arc<EventLog> {
        Arc::new(EventLog {
            events: Mutex::default(),
            written: watch::Sender::new(Written::default()),
            ledger: self.ledger.clone(),
            bytes: Default::default(),
        })
    }
}

impl ResponseStore {
    /// The events of response `id` (stored or running) for `tenant`: `Found(None)` for a
    /// response whose events this replica does not keep (not a streamed background one, or
    /// handed to this replica without them).
    pub fn events_of(&self, id: &str, tenant: Option<&str>) -> Lookup<Option<Arc<EventLog>>> {
        // Looked up directly: a running response is not described (its object made) only to
        // be dropped.
        let kept = self.look_up(id, |inner| {
            inner
                .by_id
                .get(id)
                .filter(|r| r.tenant.as_deref() == tenant)
                .map(|r| r.events.clone())
        });
        match kept {
            Lookup::Missing => match self.run(id, tenant) {
                Some(run) => Lookup::Found(run.events.clone()),
                None => Lookup::Missing,
            },
            kept => kept,
        }
    }
}

/// The log of response `id` when this replica keeps one (`log`), or why there is none to
/// follow, as a status.
pub fn followable(id: &str, log: Option<Arc<EventLog>>) -> Result<Arc<EventLog>, tonic::Status> {
    log.ok_or_else(|| {
        tonic::Status::failed_precondition(format!(
            "response {id:?} has no stream to follow: only a response made with background and \
             stream both true has one, kept by the router replica that ran it; read it whole \
             (GET /v1/responses/{{id}} without stream)"
        ))
    })
}

/// What a run's task writes its events with: however the task ends, the log is closed.
pub struct LogWriter(pub Arc<EventLog>);

impl LogWriter {
    pub fn push(&self, event: Bytes) {
        self.0.push(event);
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl EventLog {
    /// Appends the next event (a whole `event: …\ndata: …\n\n` block).
    pub fn push(&self, event: Bytes) {
        let bytes = EVENT_OVERHEAD + event.len();
        self.ledger
            .alive
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let count = {
            let mut events = self.events.lock().expect("event log");
            events.push(event);
            events.len()
        };
        self.written.send_modify(|w| w.count = count);
    }

    /// No event comes after those written: followers end once they have sent them.
    pub fn close(&self) {
        self.written.send_modify(|w| w.closed = true);
    }

    pub fn is_closed(&self) -> bool {
        self.written.borrow().closed
    }

    /// Every event written so far.
    pub fn events(&self) -> Vec<Bytes> {
        self.events.lock().expect("event log").clone()
    }

    /// The events after sequence number `after` (all of them without), those written then
    /// those to come, ending after the last. Asking past the end of a closed log is refused.
    pub fn follow(
        self: &Arc<Self>,
        after: Option<u64>,
    ) -> Result<impl Stream<Item = Bytes> + Send + 'static, PastTheEnd> {
        let written = *self.written.borrow();
        if let Some(asked) = after
            && written.closed
            && asked >= written.count as u64
        {
            return Err(PastTheEnd {
                asked,
                last: (written.count as u64).saturating_sub(1),
            });
        }
        let next = after.map_or(0, |n| {
            usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1)
        });
        let follower = Follower {
            log: self.clone(),
            written: self.written.subscribe(),
            next,
            ready: std::collections::VecDeque::new(),
        };
        Ok(futures::stream::unfold(
            follower,
            |mut follower| async move {
                let event = follower.next().await?;
                Some((event, follower))
            },
        ))
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.ledger
            .alive
            .fetch_sub(*self.bytes.get_mut(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// One reader of a log.
struct Follower {
    log: Arc<EventLog>,
    written: watch::Receiver<Written>,
    /// The index of the next event to send.
    next: usize,
    /// Events taken from the log, not sent yet.
    ready: std::collections::VecDeque<Bytes>,
}

impl Follower {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let written = *self.written.borrow_and_update();
            if self.next < written.count {
                let events = self.log.events.lock().expect("event log");
                self.ready
                    .extend(events[self.next..written.count].iter().cloned());
                self.next = written.count;
                continue;
            }
            if written.closed {
                return None;
            }
            // The run's task closes the log however it ends (its `LogWriter`).
            self.written.changed().await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::StoreLimits;
    use futures::StreamExt as _;

    fn event(n: u32) -> Bytes {
        Bytes::from(format!("event: e\ndata: {{\"sequence_number\":{n}}}\n\n"))
    }

    #[tokio::test]
    async fn a_follower_gets_what_was_written_then_what_comes_until_the_close() {
        let store = ResponseStore::new(StoreLimits::default());
        let log = store.event_log();
        log.push(event(0));
        log.push(event(1));
        let mut from_start = Box::pin(log.follow(None).expect("open"));
        let mut resumed = Box::pin(log.follow(Some(0)).expect("open"));
        assert_eq!(from_start.next().await, Some(event(0)));
        assert_eq!(from_start.next().await, Some(event(1)));
        assert_eq!(resumed.next().await, Some(event(1)));
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                log.push(event(2));
                log.close();
            })
        };
        assert_eq!(from_start.next().await, Some(event(2)));
        assert_eq!(from_start.next().await, None);
        assert_eq!(resumed.collect::<Vec<_>>().await, [event(2)]);
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn resuming_past_the_end_of_an_ended_stream_is_refused() {
        let store = ResponseStore::new(StoreLimits::default());
        let log = store.event_log();
        log.push(event(0));
        log.close();
        let at_the_end = log.follow(Some(0)).expect("at the end");
        assert!(Box::pin(at_the_end).next().await.is_none());
        assert_eq!(
            log.follow(Some(5)).err(),
            Some(PastTheEnd { asked: 5, last: 0 })
        );
    }

    #[tokio::test]
    async fn a_log_counts_its_bytes_while_it_lives() {
        let store = ResponseStore::new(StoreLimits::default());
        let before = store.usage().1;
        let log = store.event_log();
        log.push(event(0));
        assert_eq!(store.usage().1, before + EVENT_OVERHEAD + event(0).len());
        drop(log);
        assert_eq!(store.usage().1, before);
    }
}
