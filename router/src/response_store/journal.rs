//! The journal of a replica's stored responses in its state directory (`--state-dir`, see
//! [`super::saved`]), kept while no standby replica mirrors it: the mirror a standby would be
//! sent (see [`super::mirror`]) — a snapshot, then each change as it happens — written to
//! disk, synced in the background at most the directory's sync interval behind, and at the
//! next start replayed into a standby copy and taken over as a standby takes over a replica
//! that died.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use switchyard_cluster::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::MirrorEvent;
use super::MirrorStart;
use super::mirror::{BACKLOG, LOOK_AGAIN, MirrorWriter, Standby, choose_standby, opening};
use super::saved::{FrameWriter, Journal, StateDir, StateDirError};
use crate::dispatch::Dispatcher;

/// How a journal of the mirror ended.
#[derive(Debug, PartialEq, Eq)]
enum JournalEnd {
    /// The mirror was ended (or let go, having fallen behind).
    Ended,
    /// It grew well past its snapshot: start afresh.
    Compact,
}

/// Writes a journal's snapshot in `dir` (see [`super::saved`]): the events of a mirror's
/// opening, committed once whole. Blocking (it may hold every batch file): run on a thread
/// that may block.
fn write_snapshot(
    epoch: u64,
    now: Vec<MirrorEvent>,
    dir: &StateDir,
) -> Result<(MirrorWriter, FrameWriter), StateDirError> {
    let mut writer = MirrorWriter::new(epoch);
    let mut journal = dir.begin_journal()?;
    for event in now {
        for item in writer.items(event) {
            journal.append(&item)?;
        }
    }
    journal.commit()?;
    Ok((writer, journal))
}

/// Journals `first` and every change waiting behind it, in one write: under load a write per
/// change would cost the most.
fn journal_changes(
    writer: &mut MirrorWriter,
    journal: &mut FrameWriter,
    first: MirrorEvent,
    events: &mut mpsc::Receiver<MirrorEvent>,
) -> Result<(), StateDirError> {
    let waiting = std::iter::from_fn(|| events.try_recv().ok());
    for event in std::iter::once(first).chain(waiting) {
        for item in writer.items(event) {
            journal.append(&item)?;
        }
    }
    journal.flush()
}

/// Writes mirror `start` to a journal in `dispatcher`'s state directory: the snapshot, then
/// each change as it comes (see [`journal_changes_as_they_come`]), until the mirror ends or
/// the journal wants compacting.
async fn write_journal(
    start: MirrorStart,
    dispatcher: Arc<Dispatcher>,
) -> Result<JournalEnd, StateDirError> {
    let epoch = start.epoch;
    let (now, events) = opening(start);
    let now: Vec<MirrorEvent> = now.collect();
    let dir = dispatcher.clone();
    let snapshot = tokio::task::spawn_blocking(move || write_snapshot(epoch, now, state_dir(&dir)));
    let (writer, journal) = match snapshot.await {
        Ok(written) => written?,
        Err(stopped) => return Err(StateDirError::Stopped(stopped.to_string())),
    };
    let interval = state_dir(&dispatcher).sync_interval();
    let metrics = &dispatcher.metrics;
    let progress =
        |journal: &FrameWriter| metrics.set_journal_bytes(journal.bytes(), journal.unsynced());
    let synced = |took: Duration| metrics.journal_sync.observe(took.as_secs_f64());
    journal_changes_as_they_come(writer, journal, events, interval, progress, synced).await
}

/// Journals each change of a mirror as it comes, until the mirror ends or the journal wants
/// compacting. What is written is synced to disk on a blocking thread at most `interval`
/// later, while changes go on being written; `progress` is told after each write and sync,
/// `synced` how long each sync took.
async fn journal_changes_as_they_come(
    mut writer: MirrorWriter,
    mut journal: FrameWriter,
    mut events: mpsc::Receiver<MirrorEvent>,
    interval: Duration,
    progress: impl Fn(&FrameWriter),
    synced: impl Fn(Duration),
) -> Result<JournalEnd, StateDirError> {
    progress(&journal);
    // When what is written but not yet synced must be synced by, and the sync under way.
    let mut sync_by: Option<tokio::time::Instant> = None;
    let mut syncing: Option<tokio::task::JoinHandle<Result<(u64, Duration), StateDirError>>> = None;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return Ok(JournalEnd::Ended) };
                // Changes are small: written from here, like any write to a socket.
                journal_changes(&mut writer, &mut journal, event, &mut events)?;
                sync_by.get_or_insert_with(|| tokio::time::Instant::now() + interval);
                if journal.wants_compaction() {
                    // The next journal starts with a synced snapshot.
                    return Ok(JournalEnd::Compact);
                }
            }
            () = async { tokio::time::sleep_until(sync_by.expect("due")).await },
                if sync_by.is_some() && syncing.is_none() =>
            {
                sync_by = None;
                let sync = journal.begin_sync()?;
                syncing = Some(tokio::task::spawn_blocking(move || sync.run()));
            }
            done = async { syncing.as_mut().expect("syncing").await }, if syncing.is_some() => {
                syncing = None;
                let (bytes, took) = match done {
                    Ok(done) => done?,
                    Err(stopped) => return Err(StateDirError::Stopped(stopped.to_string())),
                };
                journal.synced_to(bytes);
                synced(took);
            }
        }
        progress(&journal);
    }
}

fn state_dir(dispatcher: &Dispatcher) -> &StateDir {
    dispatcher
        .state_dir
        .as_ref()
        .expect("journaled with a state dir")
}

/// Journals the store's mirror in the state directory until `stop`, or until a replica that
/// could keep a standby copy appears (looked for in `registry`, when there are peers). False
/// when the journal could not be written.
pub async fn run(
    dispatcher: &Arc<Dispatcher>,
    me: &str,
    registry: Option<&Arc<dyn Registry>>,
    stop: &CancellationToken,
) -> bool {
    let store = &dispatcher.responses;
    let mut start = store.begin_mirror(BACKLOG);
    start.beside = dispatcher.batches.mirror_events();
    let epoch = start.epoch;
    let writing = tokio::spawn(write_journal(start, dispatcher.clone()));
    tokio::pin!(writing);
    let ended = loop {
        tokio::select! {
            ended = &mut writing => break ended,
            () = stop.cancelled() => {
                store.end_mirror(epoch);
                break (&mut writing).await;
            }
            () = tokio::time::sleep(LOOK_AGAIN), if registry.is_some() => {
                let Some(registry) = registry else { continue };
                let found = match registry.list_routers().await {
                    Ok(routers) => choose_standby(me, &store.tags(), routers).is_some(),
                    Err(_) => false,
                };
                if found {
                    store.end_mirror(epoch);
                    break (&mut writing).await;
                }
            }
        }
    };
    store.end_mirror(epoch);
    dispatcher.metrics.set_journal_bytes(0, 0);
    match ended {
        Ok(Ok(JournalEnd::Ended)) => true,
        Ok(Ok(JournalEnd::Compact)) => {
            tracing::debug!("the journal of stored responses starts afresh");
            true
        }
        Ok(Err(error)) => {
            tracing::warn!("cannot journal stored responses: {error}");
            false
        }
        Err(error) => {
            tracing::warn!("the journal of stored responses stopped: {error}");
            false
        }
    }
}

/// Takes over the copy `journal` (the last run's, replayed into a standby copy) into
/// `dispatcher`'s store, as a standby takes over a replica that died.
pub fn take_journal_over(dispatcher: &Arc<Dispatcher>, journal: Journal) {
    let mut standby = Standby::new(dispatcher.responses.limits(), Gauge::default());
    let mut replayed = 0usize;
    let mut stopped = journal.torn;
    for item in journal.items {
        if let Err(status) = standby.apply(item) {
            stopped = Some(format!("item {replayed}: {}", status.message()));
            break;
        }
        replayed += 1;
    }
    if let Some(why) = stopped {
        // A last item cut short is what a kill mid-write leaves: all before it stands.
        tracing::info!("the journal of the last run ends early: {why}");
    }
    let (tags, kept, batches) = standby.take_over(&dispatcher.responses);
    let (files, batches) = batches.finish(dispatcher).unwrap_or_else(|status| {
        tracing::error!("the last run's batches: {}", status.message());
        (0, 0)
    });
    tracing::info!(
        ?tags,
        kept,
        files,
        batches,
        replayed,
        "stored responses, files and batches taken back from the last run's journal"
    );
    for tag in tags {
        dispatcher.peers.announce_adopted(tag);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::response_store::mirror::tests::keep;
    use crate::response_store::{Lookup, ResponseStore, StoreLimits};

    /// Journals `sender`'s changes into a fresh journal in `dir`, syncing at most `interval`
    /// after a write; the journal's (written, unsynced) bytes after each write and sync, and
    /// the syncs done.
    fn journaling(
        sender: &ResponseStore,
        dir: &StateDir,
        interval: Duration,
    ) -> (tokio::sync::watch::Receiver<(u64, u64)>, Arc<AtomicUsize>) {
        let start = sender.begin_mirror(1024);
        let epoch = start.epoch;
        let (now, events) = opening(start);
        let (writer, journal) = write_snapshot(epoch, now.collect(), dir).unwrap();
        let (tx, rx) = tokio::sync::watch::channel((journal.bytes(), journal.unsynced()));
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        tokio::spawn(journal_changes_as_they_come(
            writer,
            journal,
            events,
            interval,
            move |journal| {
                tx.send_replace((journal.bytes(), journal.unsynced()));
            },
            move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
            },
        ));
        (rx, syncs)
    }

    /// A host crash loses at most the sync interval's changes: what is written is synced
    /// once the interval is up, not before (the disk is not asked at every change).
    #[tokio::test(start_paused = true)]
    async fn a_journal_syncs_what_it_wrote_once_its_interval_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let sender = ResponseStore::new(StoreLimits::default());
        let (mut progress, syncs) = journaling(&sender, &state, Duration::from_secs(10));
        let (snapshot, unsynced) = *progress.borrow();
        assert_eq!(unsynced, 0, "a snapshot is committed synced");

        let began = tokio::time::Instant::now();
        keep(&sender, &[], "one");
        let (written, unsynced) = *progress.wait_for(|&(w, _)| w > snapshot).await.unwrap();
        assert_eq!(unsynced, written - snapshot, "written, not yet synced");
        let synced = progress.wait_for(|&(_, u)| u == 0);
        tokio::time::timeout(Duration::from_secs(60), synced)
            .await
            .expect("synced")
            .unwrap();
        assert_eq!(began.elapsed(), Duration::from_secs(10));
        assert_eq!(
            syncs.load(Ordering::Relaxed),
            1,
            "one sync for what was written"
        );
    }

    /// With no interval, each write is synced as soon as it is written; changes made while a
    /// sync runs are synced by the next.
    #[tokio::test(start_paused = true)]
    async fn a_journal_with_no_sync_interval_syncs_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let sender = ResponseStore::new(StoreLimits::default());
        let (mut progress, syncs) = journaling(&sender, &state, Duration::ZERO);
        let began = tokio::time::Instant::now();
        for turn in ["one", "two", "three"] {
            let (before, _) = *progress.borrow();
            keep(&sender, &[], turn);
            let synced = progress.wait_for(|&(w, u)| w > before && u == 0);
            tokio::time::timeout(Duration::from_secs(60), synced)
                .await
                .expect("synced")
                .unwrap();
        }
        assert_eq!(began.elapsed(), Duration::ZERO);
        assert_eq!(syncs.load(Ordering::Relaxed), 3, "a sync for each write");
    }

    /// The journal a router keeps with no standby is the mirror a standby would be sent:
    /// replayed after the router is gone, it is the same copy, taken over the same way — what
    /// was kept at the start (the snapshot) and what changed after it.
    #[test]
    fn a_journal_replayed_is_the_copy_a_standby_would_keep() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let sender = ResponseStore::new(StoreLimits::default());
        let first = keep(&sender, &[], "one");
        let start = sender.begin_mirror(1024);
        let epoch = start.epoch;
        let (now, mut events) = opening(start);
        let (mut writer, mut journal) = write_snapshot(epoch, now.collect(), &state).unwrap();
        let second = keep(&sender, &first.conversation, "two");
        let gone = keep(&sender, &[], "gone");
        assert!(sender.delete(&gone.id, Some("acme")));
        sender.end_mirror(epoch);
        while let Ok(event) = events.try_recv() {
            journal_changes(&mut writer, &mut journal, event, &mut events).unwrap();
        }

        let journal = state.journal().unwrap().expect("a journal");
        assert_eq!(journal.torn, None);
        let mut standby = Standby::new(StoreLimits::default(), Gauge::default());
        for item in journal.items {
            standby.apply(item).expect("a valid mirror");
        }
        let survivor = ResponseStore::new(StoreLimits::default());
        let (tags, kept, _) = standby.take_over(&survivor);
        assert_eq!((tags, kept), (vec![sender.owner().to_string()], 2));
        let Lookup::Found(taken) = survivor.get(&second.id, Some("acme")) else {
            panic!("taken over");
        };
        assert_eq!(
            taken.messages().map(|m| m.content).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(matches!(
            survivor.get(&first.id, Some("acme")),
            Lookup::Found(_)
        ));
        assert!(!matches!(
            survivor.get(&gone.id, Some("acme")),
            Lookup::Found(_)
        ));
    }
}
