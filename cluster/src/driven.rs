//! A channel receiver that drives the future producing into it.
//!
//! A stream served by a future of its own (a request's run, a worker's router stream) usually
//! gets a task of its own, and every frame it produces then crosses from that task to the
//! reader's: a wake-up, and on a busy machine a wait in the scheduler's queue, per frame. A
//! [`DrivenReceiver`] instead polls the producer from the reader's task whenever no frame is
//! waiting, so producer and reader share one task and a frame is read in the same poll that
//! made it. Producers outside that future (other tasks sending on the same channel) are read
//! as usual.
//!
//! Dropped before its producer ends, the receiver closes the channel and either hands the
//! producer to a task of its own ([`DrivenReceiver::new`]: it finishes exactly as it would
//! have if it had had its own task from the start and its reader had gone — its sends fail,
//! `closed()` fires) or drops it where it stands ([`DrivenReceiver::abandoning`]: for work
//! that is pointless without its reader and stops when dropped).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

/// After this many frames read in a row, the producer is polled before the next frame: frames
/// sent by other tasks must not starve what the producer does between its own sends.
const READS_BETWEEN_DRIVES: u32 = 16;

type Producer = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A receiver that polls its producer whenever it has nothing to give (see the module docs).
pub struct DrivenReceiver<T> {
    rx: mpsc::Receiver<T>,
    producer: Option<Producer>,
    reads_since_drive: u32,
    /// Whether a producer still running when the receiver is dropped finishes on a task.
    finish_when_dropped: bool,
}

enum Drive {
    /// No producer (any more).
    Idle,
    Pending,
    /// The producer just ended.
    Finished,
}

impl<T> DrivenReceiver<T> {
    /// `rx`, with `producer` polled from the reader's task.
    pub fn new(rx: mpsc::Receiver<T>, producer: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            rx,
            producer: Some(Box::pin(producer)),
            reads_since_drive: 0,
            finish_when_dropped: true,
        }
    }

    /// Like [`DrivenReceiver::new`], but a producer still running when the receiver is
    /// dropped is dropped with it.
    pub fn abandoning(
        rx: mpsc::Receiver<T>,
        producer: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let mut receiver = Self::new(rx, producer);
        receiver.finish_when_dropped = false;
        receiver
    }

    /// A plain receiver: whatever fills `rx` runs elsewhere.
    pub fn undriven(rx: mpsc::Receiver<T>) -> Self {
        Self {
            rx,
            producer: None,
            reads_since_drive: 0,
            finish_when_dropped: false,
        }
    }

    /// Items sent and not yet read.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Whether a producer is still being driven.
    pub fn is_driven(&self) -> bool {
        self.producer.is_some()
    }

    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item; `None` once every sender (the producer's included) is gone.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.reads_since_drive >= READS_BETWEEN_DRIVES {
            self.drive(cx);
        }
        loop {
            if let Poll::Ready(item) = self.rx.poll_recv(cx) {
                self.reads_since_drive += 1;
                return Poll::Ready(item);
            }
            match self.drive(cx) {
                Drive::Idle => return Poll::Pending,
                // Its sender is dropped with it: what it queued is read, then the end.
                Drive::Finished => continue,
                // It may have queued something just now.
                Drive::Pending => {
                    let polled = self.rx.poll_recv(cx);
                    if polled.is_ready() {
                        self.reads_since_drive = 1;
                    }
                    return polled;
                }
            }
        }
    }

    fn drive(&mut self, cx: &mut Context<'_>) -> Drive {
        self.reads_since_drive = 0;
        let Some(producer) = self.producer.as_mut() else {
            return Drive::Idle;
        };
        match producer.as_mut().poll(cx) {
            Poll::Pending => Drive::Pending,
            Poll::Ready(()) => {
                self.producer = None;
                Drive::Finished
            }
        }
    }
}

impl<T> Stream for DrivenReceiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().poll_recv(cx)
    }
}

impl<T> Drop for DrivenReceiver<T> {
    fn drop(&mut self) {
        let Some(producer) = self.producer.take() else {
            return;
        };
        if !self.finish_when_dropped {
            return;
        }
        self.rx.close();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(producer);
            }
            // No runtime left to finish it on: it is dropped where it stands.
            Err(_) => drop(producer),
        }
    }
}

impl<T> std::fmt::Debug for DrivenReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrivenReceiver")
            .field("buffered", &self.rx.len())
            .field("driven", &self.producer.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn the_producer_runs_only_when_its_reader_polls_and_its_frames_come_in_order() {
        let (tx, rx) = mpsc::channel(2);
        let mut rx = DrivenReceiver::new(rx, async move {
            for i in 0..10 {
                tx.send(i).await.expect("reader alive");
            }
        });
        let mut read = Vec::new();
        while let Some(i) = rx.recv().await {
            read.push(i);
        }
        assert_eq!(read, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn frames_from_other_tasks_do_not_starve_the_producer() {
        const CAPACITY: usize = 64;
        let (tx, rx) = mpsc::channel(CAPACITY);
        let (ran_tx, mut ran_rx) = oneshot::channel();
        let flood = tx.clone();
        // Full before the first read, and kept full: the channel is never empty to read.
        for _ in 0..CAPACITY {
            flood.try_send(0u32).expect("room");
        }
        let mut rx = DrivenReceiver::new(rx, async move {
            let _ = ran_tx.send(());
            drop(tx);
        });
        let flooding = tokio::spawn(async move { while flood.send(0).await.is_ok() {} });
        for _ in 0..CAPACITY {
            rx.recv().await.expect("flooded");
        }
        assert!(ran_rx.try_recv().is_ok(), "the producer never ran");
        drop(rx);
        flooding
            .await
            .expect("the flood ends once the receiver is gone");
    }

    #[tokio::test]
    async fn a_dropped_reader_lets_its_producer_finish_on_a_task_of_its_own() {
        let (tx, rx) = mpsc::channel::<u32>(1);
        let (ended_tx, ended_rx) = oneshot::channel();
        let (started_tx, started_rx) = oneshot::channel();
        let mut rx = DrivenReceiver::new(rx, async move {
            let _ = started_tx.send(());
            // Seen as a reader that went away: the producer's cleanup runs.
            tx.closed().await;
            let _ = ended_tx.send("saw its reader go");
        });
        // Polled once, so the producer has started and waits.
        assert!(
            futures::poll!(std::pin::pin!(rx.recv())).is_pending(),
            "nothing sent yet"
        );
        started_rx.await.expect("the producer started");
        drop(rx);
        assert_eq!(ended_rx.await, Ok("saw its reader go"));
    }

    #[tokio::test]
    async fn an_abandoning_reader_drops_its_producer_with_it() {
        let (tx, rx) = mpsc::channel::<u32>(1);
        let (finished_tx, finished_rx) = oneshot::channel();
        let mut rx = DrivenReceiver::abandoning(rx, async move {
            tx.closed().await;
            let _ = finished_tx.send("finished");
        });
        assert!(futures::poll!(std::pin::pin!(rx.recv())).is_pending());
        assert!(rx.is_driven());
        drop(rx);
        // Dropped with its sender unsent: it never ran on.
        assert!(finished_rx.await.is_err(), "the producer finished");
    }
}
