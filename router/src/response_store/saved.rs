//! A router with nobody to hand its stored responses to keeps them on disk for its next start
//! (`--state-dir`): a single replica restarted — an upgrade, a configuration change, a host
//! reboot — still answers for the conversations, files and batches it had, and a batch that was
//! running goes on from where it got to.
//!
//! What is saved is exactly what a stopping replica streams to another (its hand-over, see
//! [`super::handover`]), and it is taken back the same way, so a replica restored from disk
//! holds what one handed the responses over would. The file is written only at the end of a
//! drain, when no other replica took them; a replica killed without its drain keeps nothing
//! here (its standby mirror, with two replicas or more, is what covers a kill).
//!
//! The directory belongs to one replica at a time: it holds a lock on it while it runs.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Buf;
use prost::Message;
use switchyard_proto::v1;

use super::handover::Taking;
use crate::dispatch::Dispatcher;

/// The saved hand-over's file in the state directory.
const SAVED: &str = "stored-responses.pb";
/// What a saved hand-over's file starts with: its format, so a file of another kind or version
/// is refused rather than misread.
const MAGIC: &[u8] = b"switchyard stored responses v1\n";
/// Held locked while a replica runs on the directory.
const LOCK: &str = "lock";

/// A replica's state directory, locked for it.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
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
    #[error("{path} is not a saved hand-over of this version: {why}")]
    Unreadable { path: PathBuf, why: String },
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
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `frames` (a hand-over) for the next start, replacing what was saved before:
    /// written aside, flushed to disk, then renamed into place, so a crash mid-write leaves the
    /// previous file or none, never half of one. Returns the bytes written.
    pub fn save(&self, frames: &[v1::HandoverItem]) -> Result<u64, StateDirError> {
        let io = |source| StateDirError::Io {
            path: self.path.clone(),
            source,
        };
        let partial = self.path.join(format!("{SAVED}.partial"));
        let mut out = BufWriter::new(File::create(&partial).map_err(io)?);
        out.write_all(MAGIC).map_err(io)?;
        let mut written = MAGIC.len() as u64;
        let mut buf = Vec::new();
        for frame in frames {
            buf.clear();
            frame
                .encode_length_delimited(&mut buf)
                .map_err(|e| io(io::Error::other(e)))?;
            out.write_all(&buf).map_err(io)?;
            written += buf.len() as u64;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&partial, self.path.join(SAVED)).map_err(io)?;
        // The rename itself is durable once the directory is.
        File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
        Ok(written)
    }

    /// The hand-over saved by the last run, if any. It stays on disk until [`Self::taken`]
    /// (it was taken back whole) or [`Self::set_aside`] (it could not be). A file that cannot
    /// even be read is set aside here, and the error says where and why; the router then
    /// starts without it rather than not at all.
    pub fn saved(&self) -> Result<Option<Vec<v1::HandoverItem>>, StateDirError> {
        let path = self.path.join(SAVED);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateDirError::Io { path, source }),
        };
        match decode(&bytes) {
            Ok(frames) => Ok(Some(frames)),
            Err(why) => Err(StateDirError::Unreadable {
                path: self.set_aside()?,
                why,
            }),
        }
    }

    /// The saved hand-over was taken back: it is removed, so it is taken once.
    pub fn taken(&self) -> Result<(), StateDirError> {
        let path = self.path.join(SAVED);
        std::fs::remove_file(&path).map_err(|source| StateDirError::Io { path, source })
    }

    /// Moves the saved hand-over aside (`….unreadable`, for an operator to look at, replacing
    /// one set aside before); where it went.
    pub fn set_aside(&self) -> Result<PathBuf, StateDirError> {
        let path = self.path.join(SAVED);
        let aside = self.path.join(format!("{SAVED}.unreadable"));
        std::fs::rename(&path, &aside).map_err(|source| StateDirError::Io { path, source })?;
        Ok(aside)
    }
}

/// Takes back what the last run saved in `dispatcher`'s state directory, as a hand-over from
/// another replica is taken; run before the router serves. What cannot be taken is set aside
/// and logged: the router starts without it.
pub fn restore(dispatcher: &Arc<Dispatcher>) {
    let Some(dir) = &dispatcher.state_dir else {
        return;
    };
    let frames = match dir.saved() {
        Ok(Some(frames)) => frames,
        Ok(None) => return,
        Err(error) => {
            tracing::error!("starting without the last run's stored responses: {error}");
            return;
        }
    };
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
                .set_aside()
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

/// The hand-over frames of a saved file's `bytes`.
fn decode(bytes: &[u8]) -> Result<Vec<v1::HandoverItem>, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("it does not start with this format's header")?;
    let mut frames = Vec::new();
    while rest.has_remaining() {
        let frame = v1::HandoverItem::decode_length_delimited(&mut rest)
            .map_err(|e| format!("frame {}: {e}", frames.len()))?;
        frames.push(frame);
    }
    Ok(frames)
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
            std::fs::metadata(dir.path().join(SAVED)).unwrap().len()
        );
        // The last save replaced the first, and stays until it is taken.
        assert_eq!(state.saved().unwrap(), Some(frames.clone()));
        assert_eq!(state.saved().unwrap(), Some(frames));
        state.taken().unwrap();
        assert_eq!(state.saved().unwrap(), None);
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
        let path = dir.path().join(SAVED);
        let mut bytes = std::fs::read(&path).unwrap();
        // Cut in the middle of its frame.
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();
        let error = state.saved().unwrap_err();
        assert!(error.to_string().contains("frame 0"), "{error}");
        assert!(!path.exists());
        assert!(dir.path().join(format!("{SAVED}.unreadable")).exists());
        assert_eq!(state.saved().unwrap(), None);

        std::fs::write(&path, b"{\"not\": \"ours\"}").unwrap();
        let error = state.saved().unwrap_err();
        assert!(error.to_string().contains("header"), "{error}");
    }
}
