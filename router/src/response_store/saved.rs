//! A router with nobody to hand its stored responses to keeps them on disk for its next start
//! (`--state-dir`): a single replica restarted — an upgrade, a configuration change, a host
//! reboot — still answers for the conversations, files and batches it had, and a batch that was
//! running goes on from where it got to.
//!
//! Two files, each in a format the replicas already speak to each other:
//!
//! - **the hand-over** (`stored-responses.pb`), written at the end of a drain when no other
//!   replica took them: exactly what a stopping replica streams to another (see
//!   [`super::handover`]), taken back the same way;
//! - **the journal** (`journal.pb`), kept while no standby replica mirrors this one, so that a
//!   router *killed* without its drain (OOM, a crash) loses nothing either: the mirror a standby
//!   would be sent (see [`super::mirror`]; written by [`super::journal`]) — what the store
//!   keeps, then every change as it happens — appended as it goes. Each journal starts with
//!   a snapshot and replaces the last once that is on disk; it starts afresh (compacted) when
//!   it has grown well past its snapshot. Each change is written to the file as soon as no
//!   other is waiting (changes arriving together are written together), so a killed process
//!   loses none it had time to write; what was written is synced to disk in the background
//!   at most `--state-sync-interval` later (1 s by default; zero: after each write), so a host
//!   that crashes loses at most that interval's changes and what one sync takes. While a
//!   standby mirrors the replica there is no journal: the standby answers for a killed
//!   replica's ids at once.
//!
//! At start the hand-over is taken back if there is one (it is newer than any journal), else
//! the journal is replayed into a standby copy, which is taken over as a standby takes over
//! the copy of a replica that died. The directory belongs to one replica at a time: it holds
//! a lock on it while it runs.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use prost::Message;
use switchyard_proto::v1;

use super::handover::Taking;
use crate::dispatch::Dispatcher;

/// One of the directory's files: its name, and the header it starts with (its format, so a
/// file of another kind or version is refused rather than misread).
#[derive(Debug, Clone, Copy)]
struct Kind {
    name: &'static str,
    header: &'static [u8],
}

/// The hand-over saved at the end of a drain.
const SAVED: Kind = Kind {
    name: "stored-responses.pb",
    header: b"switchyard stored responses v1\n",
};
/// The journal of the store's mirror while no standby keeps one.
const JOURNAL: Kind = Kind {
    name: "journal.pb",
    header: b"switchyard journal of stored responses v1\n",
};
/// Held locked while a replica runs on the directory.
const LOCK: &str = "lock";
/// A journal starts afresh once it holds this much more than its snapshot, or twice it.
const JOURNAL_SLACK: u64 = 64 << 20;
/// How long a journal's changes may stay written but not synced, unless configured.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// A replica's state directory, locked for it.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Longest a journal's written changes wait to be synced to disk.
    sync_interval: Duration,
    /// Its lock is held as long as this is open.
    _lock: File,
}

/// Why a state directory could not be used or read.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {0} is in use by another router (each replica needs its own \
         --state-dir)"
    )]
    InUse(PathBuf),
    #[error("writing the journal stopped: {0}")]
    Stopped(String),
    #[error("{path} cannot be taken back: {why}")]
    Unreadable { path: PathBuf, why: String },
}

/// A file of frames read back: its frames, and why it ended early, when it did.
#[derive(Debug)]
pub struct Frames<M> {
    pub items: Vec<M>,
    /// A last frame cut short (the process was killed while writing it) or unreadable.
    pub torn: Option<String>,
}

/// A journal read back.
pub type Journal = Frames<v1::MirrorItem>;

/// A file of frames being written beside the one it replaces once committed (see
/// [`FrameWriter::commit`]).
#[derive(Debug)]
pub struct FrameWriter {
    file: BufWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    bytes: u64,
    /// Its size when committed.
    committed: Option<u64>,
    /// How much of it is known to be on disk.
    synced: u64,
    buf: Vec<u8>,
}

/// A sync of a [`FrameWriter`]'s file, to run on a thread that may block (see
/// [`FrameWriter::begin_sync`]) while the writer goes on appending.
#[derive(Debug)]
pub struct PendingSync {
    file: File,
    path: PathBuf,
    /// The bytes written when it began: on disk once it is done.
    bytes: u64,
}

impl PendingSync {
    /// Syncs the file's data to disk; the bytes it covered, and how long it took.
    pub fn run(self) -> Result<(u64, Duration), StateDirError> {
        let began = std::time::Instant::now();
        self.file
            .sync_data()
            .map(|()| (self.bytes, began.elapsed()))
            .map_err(|source| StateDirError::Io {
                path: self.path,
                source,
            })
    }
}

impl FrameWriter {
    /// Appends `frame`; it reaches the file at the next [`Self::flush`] or [`Self::commit`].
    pub fn append(&mut self, frame: &impl Message) -> Result<(), StateDirError> {
        self.buf.clear();
        frame
            .encode_length_delimited(&mut self.buf)
            .map_err(|e| self.error(io::Error::other(e)))?;
        self.file.write_all(&self.buf).map_err(|e| self.error(e))?;
        self.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Writes what was appended to the file (so a process killed after this loses none of
    /// it; the kernel has it).
    pub fn flush(&mut self) -> Result<(), StateDirError> {
        self.file.flush().map_err(|e| self.error(e))
    }

    /// What was written is synced to disk and replaces the file before it: a crash before
    /// this leaves the previous file, never half of this one. What is appended afterwards
    /// goes on in the same file.
    pub fn commit(&mut self) -> Result<(), StateDirError> {
        self.flush()?;
        self.file.get_ref().sync_data().map_err(|e| self.error(e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| self.error(e))?;
        // The rename itself is durable once the directory is.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| self.error(e))?;
        self.committed = Some(self.bytes);
        self.synced = self.bytes;
        Ok(())
    }

    /// Flushes what was appended and returns a sync of it to run elsewhere: a sync can take
    /// as long as the disk likes, and appending need not wait for it.
    pub fn begin_sync(&mut self) -> Result<PendingSync, StateDirError> {
        self.flush()?;
        let file = self.file.get_ref().try_clone().map_err(|e| self.error(e))?;
        Ok(PendingSync {
            file,
            path: self.path.clone(),
            bytes: self.bytes,
        })
    }

    /// A [`PendingSync`] of this file finished: its `bytes` are on disk.
    pub fn synced_to(&mut self, bytes: u64) {
        self.synced = self.synced.max(bytes);
    }

    /// How much was written that a host crash could still lose.
    pub fn unsynced(&self) -> u64 {
        self.bytes - self.synced
    }

    /// Whether a journal has grown enough past its snapshot (what it held when committed)
    /// to start afresh.
    pub fn wants_compaction(&self) -> bool {
        self.committed
            .is_some_and(|snapshot| self.bytes > (2 * snapshot).max(snapshot + JOURNAL_SLACK))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn error(&self, source: io::Error) -> StateDirError {
        StateDirError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl StateDir {
    /// Opens (creating it if needed) and locks `path`.
    pub fn open(path: &Path) -> Result<Self, StateDirError> {
        let io = |source| StateDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateDirError::InUse(path.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        Ok(Self {
            path: path.to_path_buf(),
            sync_interval: DEFAULT_SYNC_INTERVAL,
            _lock: lock,
        })
    }

    /// Syncs a journal's changes to disk at most `interval` after they are written (zero:
    /// after each write).
    pub fn with_sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sync_interval(&self) -> Duration {
        self.sync_interval
    }

    /// Starts writing a file of `kind` beside the current one.
    fn begin(&self, kind: Kind) -> Result<FrameWriter, StateDirError> {
        let path = self.path.join(kind.name);
        let partial = self.path.join(format!("{}.partial", kind.name));
        let mut file = File::create(&partial).map_err(|source| StateDirError::Io {
            path: partial.clone(),
            source,
        })?;
        file.write_all(kind.header)
            .map_err(|source| StateDirError::Io {
                path: partial.clone(),
                source,
            })?;
        Ok(FrameWriter {
            file: BufWriter::new(file),
            partial,
            path,
            bytes: kind.header.len() as u64,
            committed: None,
            synced: 0,
            buf: Vec::new(),
        })
    }

    /// The file of `kind`, if there is one. One that is not of its format is set aside
    /// (`….unreadable`, for an operator to look at) and the error says so.
    fn read<M: Message + Default>(&self, kind: Kind) -> Result<Option<Frames<M>>, StateDirError> {
        let path = self.path.join(kind.name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateDirError::Io { path, source }),
        };
        let Some(mut rest) = bytes.strip_prefix(kind.header) else {
            return Err(StateDirError::Unreadable {
                path: self.set_aside(kind)?,
                why: "it does not start with its format's header".into(),
            });
        };
        let mut items = Vec::new();
        let mut torn = None;
        while rest.has_remaining() {
            match M::decode_length_delimited(&mut rest) {
                Ok(item) => items.push(item),
                Err(e) => {
                    torn = Some(format!("frame {}: {e}", items.len()));
                    break;
                }
            }
        }
        Ok(Some(Frames { items, torn }))
    }

    /// Moves the file of `kind` aside (replacing one set aside before); where it went.
    fn set_aside(&self, kind: Kind) -> Result<PathBuf, StateDirError> {
        let path = self.path.join(kind.name);
        let aside = self.path.join(format!("{}.unreadable", kind.name));
        std::fs::rename(&path, &aside).map_err(|source| StateDirError::Io { path, source })?;
        Ok(aside)
    }

    /// Removes the file of `kind`, if there is one.
    fn remove(&self, kind: Kind) -> Result<(), StateDirError> {
        let path = self.path.join(kind.name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StateDirError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Writes `frames` (a hand-over) for the next start, replacing what was saved before
    /// (see [`FrameWriter::commit`]). Returns the bytes written.
    pub fn save(&self, frames: &[v1::HandoverItem]) -> Result<u64, StateDirError> {
        let mut file = self.begin(SAVED)?;
        for frame in frames {
            file.append(frame)?;
        }
        file.commit()?;
        Ok(file.bytes())
    }

    /// The hand-over saved by the last run, if any. It stays on disk until [`Self::taken`]
    /// (it was taken back whole) or [`Self::set_aside_saved`] (it could not be). One that
    /// cannot even be read whole is set aside here, and the error says where and why; the
    /// router then starts without it rather than not at all.
    pub fn saved(&self) -> Result<Option<Vec<v1::HandoverItem>>, StateDirError> {
        match self.read(SAVED)? {
            None => Ok(None),
            Some(Frames { items, torn: None }) => Ok(Some(items)),
            Some(Frames {
                torn: Some(why), ..
            }) => Err(StateDirError::Unreadable {
                path: self.set_aside(SAVED)?,
                why,
            }),
        }
    }

    /// The saved hand-over was taken back: it is removed, so it is taken once.
    pub fn taken(&self) -> Result<(), StateDirError> {
        self.remove(SAVED)
    }

    /// Moves the saved hand-over aside (`….unreadable`); where it went.
    pub fn set_aside_saved(&self) -> Result<PathBuf, StateDirError> {
        self.set_aside(SAVED)
    }

    /// Starts a journal beside the current one, which it replaces once committed.
    pub fn begin_journal(&self) -> Result<FrameWriter, StateDirError> {
        self.begin(JOURNAL)
    }

    /// The journal of the last run, if there is one; a last frame cut short (a kill while
    /// writing it) is left out and said in `torn`.
    pub fn journal(&self) -> Result<Option<Journal>, StateDirError> {
        self.read(JOURNAL)
    }

    /// Removes the journal: a standby holds the copy now, or a hand-over supersedes it.
    pub fn discard_journal(&self) -> Result<(), StateDirError> {
        self.remove(JOURNAL)
    }
}

/// Takes back what the last run left in `dispatcher`'s state directory — its hand-over if it
/// drained, else its journal — before the router serves. What cannot be taken is set aside
/// and logged: the router starts without it.
pub fn restore(dispatcher: &Arc<Dispatcher>) {
    let Some(dir) = &dispatcher.state_dir else {
        return;
    };
    match dir.saved() {
        Ok(Some(frames)) => {
            take_back(dispatcher, dir, frames);
            // The hand-over is newer than any journal the last run left.
            if let Err(error) = dir.discard_journal() {
                tracing::error!("{error}");
            }
            return;
        }
        Ok(None) => {}
        Err(error) => tracing::error!("the last run's hand-over: {error}"),
    }
    match dir.journal() {
        Ok(Some(journal)) => super::journal::take_journal_over(dispatcher, journal),
        Ok(None) => {}
        Err(error) => tracing::error!("starting without the last run's journal: {error}"),
    }
}

/// Takes back the hand-over the last run saved, as one from another replica is taken.
fn take_back(dispatcher: &Arc<Dispatcher>, dir: &StateDir, frames: Vec<v1::HandoverItem>) {
    let mut taking = Taking::new(&dispatcher.responses);
    let taken = frames
        .into_iter()
        .try_for_each(|frame| taking.push(frame))
        .and_then(|()| taking.finish(dispatcher));
    match taken {
        Ok(taken) => {
            tracing::info!(
                dir = %dir.path().display(),
                tags = ?taken.tags,
                kept = taken.kept,
                files = taken.files,
                batches = taken.batches,
                "stored responses, files and batches taken back from this router's last run"
            );
            if let Err(error) = dir.taken() {
                tracing::error!("the last run's stored responses were taken back: {error}");
            }
        }
        Err(status) => {
            let aside = dir
                .set_aside_saved()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|e| e.to_string());
            tracing::error!(
                set_aside = aside,
                "the last run's stored responses taken back only in part: {}",
                status.message()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::handover_item::Item;

    fn tag(t: &str) -> v1::HandoverItem {
        v1::HandoverItem {
            item: Some(Item::Tag(t.into())),
        }
    }

    #[test]
    fn what_is_saved_is_taken_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.saved().unwrap(), None);
        state.save(&[tag("a1b2c3d4e5f6")]).unwrap();
        let frames = vec![tag("0123456789ab"), tag("ba9876543210")];
        let written = state.save(&frames).unwrap();
        assert_eq!(
            written,
            std::fs::metadata(dir.path().join(SAVED.name))
                .unwrap()
                .len()
        );
        // The last save replaced the first, and stays until it is taken.
        assert_eq!(state.saved().unwrap(), Some(frames.clone()));
        assert_eq!(state.saved().unwrap(), Some(frames));
        state.taken().unwrap();
        assert_eq!(state.saved().unwrap(), None);
    }

    fn item(tag: &str) -> v1::MirrorItem {
        v1::MirrorItem {
            item: Some(v1::mirror_item::Item::Tag(tag.into())),
        }
    }

    /// A journal replaces the last only once its snapshot is committed, and a last item cut
    /// short (a kill mid-write) costs that item alone.
    #[test]
    fn a_journal_replaces_the_last_once_committed_and_survives_a_torn_end() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.journal().unwrap().is_none());
        let mut first = state.begin_journal().unwrap();
        first.append(&item("000000000001")).unwrap();
        assert!(state.journal().unwrap().is_none(), "not committed yet");
        first.commit().unwrap();
        first.append(&item("000000000002")).unwrap();
        first.flush().unwrap();
        let mut second = state.begin_journal().unwrap();
        second.append(&item("000000000003")).unwrap();
        let read = state.journal().unwrap().unwrap();
        assert_eq!(read.items, [item("000000000001"), item("000000000002")]);
        second.commit().unwrap();
        second.append(&item("000000000004")).unwrap();
        second.flush().unwrap();
        assert_eq!(
            state.journal().unwrap().unwrap().items,
            [item("000000000003"), item("000000000004")]
        );

        let path = dir.path().join(JOURNAL.name);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let torn = state.journal().unwrap().unwrap();
        assert_eq!(torn.items, [item("000000000003")]);
        assert!(torn.torn.unwrap().contains("frame 1"));

        state.discard_journal().unwrap();
        assert!(state.journal().unwrap().is_none());
        state.discard_journal().unwrap();
    }

    #[test]
    fn a_journal_wants_compacting_once_well_past_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut journal = state.begin_journal().unwrap();
        assert!(!journal.wants_compaction(), "no snapshot yet");
        journal.commit().unwrap();
        let snapshot = journal.bytes();
        let big = item(&"x".repeat(1 << 20));
        while journal.bytes() < snapshot + JOURNAL_SLACK {
            assert!(!journal.wants_compaction(), "{}", journal.bytes());
            journal.append(&big).unwrap();
        }
        assert!(journal.wants_compaction());
    }

    #[test]
    fn a_directory_serves_one_replica_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::open(dir.path()).unwrap();
        let second = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(second, StateDirError::InUse(_)), "{second}");
        drop(first);
        StateDir::open(dir.path()).unwrap();
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save(&[tag("0123456789ab")]).unwrap();
        let path = dir.path().join(SAVED.name);
        let mut bytes = std::fs::read(&path).unwrap();
        // Cut in the middle of its frame.
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();
        let error = state.saved().unwrap_err();
        assert!(error.to_string().contains("frame 0"), "{error}");
        assert!(!path.exists());
        assert!(
            dir.path()
                .join(format!("{}.unreadable", SAVED.name))
                .exists()
        );
        assert_eq!(state.saved().unwrap(), None);

        std::fs::write(&path, b"{\"not\": \"ours\"}").unwrap();
        let error = state.saved().unwrap_err();
        assert!(error.to_string().contains("header"), "{error}");
    }
}
