//! A stopping router hands its files and batches, with its stored responses, to another
//! replica (see [`crate::response_store::handover`]): a batch still running goes on there from
//! where it got to (the requests answered are not sent again), and the files and batches are
//! read at the same ids, the receiver answering for the stopping replica's tag.
//!
//! The mirror of the stored responses to a standby replica carries the files and batches too,
//! in the same parts (see [`crate::response_store::mirror`]): a batch each time it moves on,
//! each answer as it comes, so the standby of a replica killed mid-batch goes on with it.
//!
//! Bytes go in pieces of at most [`PIECE_BYTES`], so no message nears gRPC's size limit
//! however large a file is.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use switchyard_proto::v1::{self, handover_item::Item};
use tonic::Status;

use super::{Answer, Batch, BatchStore, Progress, Status as BatchStatus, StoredFile};
use crate::dispatch::Dispatcher;

/// Largest piece of bytes one hand-over item carries.
pub const PIECE_BYTES: usize = 1 << 20;
/// Most answers one hand-over item carries.
const ANSWERS_PER_ITEM: usize = 256;

/// One piece of what goes to another replica, in a hand-over or a mirror.
#[derive(Debug, Clone)]
pub enum Part {
    File(v1::HandedFile),
    Batch(v1::HandedBatch),
    Bytes(v1::BytesPiece),
    Answers(v1::BatchAnswers),
}

impl Part {
    /// As a hand-over item.
    pub fn handed(self) -> v1::HandoverItem {
        let item = match self {
            Part::File(file) => Item::File(file),
            Part::Batch(batch) => Item::Batch(batch),
            Part::Bytes(piece) => Item::Bytes(piece),
            Part::Answers(answers) => Item::Answers(answers),
        };
        v1::HandoverItem { item: Some(item) }
    }

    /// As a mirror item.
    pub fn mirrored(self) -> v1::MirrorItem {
        use v1::mirror_item::Item as Mirrored;
        let item = match self {
            Part::File(file) => Mirrored::File(file),
            Part::Batch(batch) => Mirrored::Batch(batch),
            Part::Bytes(piece) => Mirrored::Bytes(piece),
            Part::Answers(answers) => Mirrored::Answers(answers),
        };
        v1::MirrorItem { item: Some(item) }
    }
}

fn pieces(id: &str, bytes: &Bytes, out: &mut Vec<Part>) {
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + PIECE_BYTES).min(bytes.len());
        out.push(Part::Bytes(v1::BytesPiece {
            id: id.to_string(),
            bytes: bytes.slice(start..end),
        }));
        start = end;
    }
}

/// `file`, then its bytes.
pub fn file_parts(file: &StoredFile, out: &mut Vec<Part>) {
    out.push(Part::File(v1::HandedFile {
        id: file.id.clone(),
        tenant: file.tenant.clone(),
        filename: file.filename.clone(),
        purpose: file.purpose.clone(),
        created_at: file.created_at,
    }));
    pieces(&file.id, &file.bytes, out);
}

/// `batch` as it now stands; `whole`: then, unless it has ended (its answers are in its
/// files), its input and its answers so far.
pub fn batch_parts(batch: &Batch, whole: bool, out: &mut Vec<Part>) {
    let progress = batch.progress.lock().expect("batch progress").clone();
    out.push(Part::Batch(v1::HandedBatch {
        id: batch.id.clone(),
        tenant: batch.tenant.clone(),
        endpoint: batch.endpoint.clone(),
        input_file_id: batch.input_file_id.clone(),
        completion_window: batch.window_text.clone(),
        metadata_json: batch.metadata.to_string(),
        created_at: batch.created_at,
        progress_json: serde_json::to_string(&progress).expect("progress serializes"),
    }));
    if !whole || progress.status.ended() {
        return;
    }
    pieces(&batch.id, &batch.input, out);
    let answers: Vec<v1::AnsweredRequest> = batch
        .answers
        .lock()
        .expect("batch answers")
        .iter()
        .map(|(index, answer)| answered(*index, answer))
        .collect();
    for chunk in answers.chunks(ANSWERS_PER_ITEM) {
        out.push(Part::Answers(v1::BatchAnswers {
            batch_id: batch.id.clone(),
            answered: chunk.to_vec(),
        }));
    }
}

/// The answer to `batch`'s request `index`, if it has one.
pub fn answer_part(batch: &Batch, index: usize) -> Option<Part> {
    let answers = batch.answers.lock().expect("batch answers");
    let answer = answers.get(&index)?;
    Some(Part::Answers(v1::BatchAnswers {
        batch_id: batch.id.clone(),
        answered: vec![answered(index, answer)],
    }))
}

fn answered(index: usize, answer: &Answer) -> v1::AnsweredRequest {
    v1::AnsweredRequest {
        index: index as u64,
        succeeded: answer.succeeded,
        line_json: answer.line.clone(),
    }
}

/// The hand-over of every file and batch `store` keeps.
pub fn frames(store: &BatchStore) -> Vec<v1::HandoverItem> {
    let (files, batches) = store.export();
    let mut parts = Vec::new();
    for file in files {
        file_parts(&file, &mut parts);
    }
    for batch in batches {
        batch_parts(&batch, true, &mut parts);
    }
    parts.into_iter().map(Part::handed).collect()
}

/// Files and batches being received from another replica: its hand-over, or its mirror
/// (where a batch comes again each time it changes).
#[derive(Default)]
pub struct Receiving {
    files: HashMap<String, (v1::HandedFile, BytesMut)>,
    batches: HashMap<String, (v1::HandedBatch, BytesMut, BTreeMap<usize, Answer>)>,
}

impl Receiving {
    /// Takes `item` if it is a file's or batch's; gives it back otherwise.
    pub fn push(&mut self, item: Item) -> Result<Option<Item>, Status> {
        match item {
            Item::File(file) => self.file(file),
            Item::Batch(batch) => self.batch(batch),
            Item::Bytes(piece) => self.bytes(piece)?,
            Item::Answers(answers) => self.answers(answers)?,
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    pub fn file(&mut self, file: v1::HandedFile) {
        self.files.insert(file.id.clone(), (file, BytesMut::new()));
    }

    /// A batch new, or as it now stands (its input and answers so far stay).
    pub fn batch(&mut self, batch: v1::HandedBatch) {
        match self.batches.get_mut(&batch.id) {
            Some((kept, _, _)) => *kept = batch,
            None => {
                let id = batch.id.clone();
                self.batches
                    .insert(id, (batch, BytesMut::new(), BTreeMap::new()));
            }
        }
    }

    pub fn bytes(&mut self, piece: v1::BytesPiece) -> Result<(), Status> {
        let bytes = match (
            self.files.get_mut(&piece.id),
            self.batches.get_mut(&piece.id),
        ) {
            (Some((_, bytes)), _) | (None, Some((_, bytes, _))) => bytes,
            (None, None) => return Err(not_sent(&piece.id)),
        };
        bytes.extend_from_slice(&piece.bytes);
        Ok(())
    }

    pub fn answers(&mut self, answers: v1::BatchAnswers) -> Result<(), Status> {
        let (_, _, kept) = self
            .batches
            .get_mut(&answers.batch_id)
            .ok_or_else(|| not_sent(&answers.batch_id))?;
        for answered in answers.answered {
            let answer = Answer {
                succeeded: answered.succeeded,
                line: answered.line_json,
            };
            kept.insert(answered.index as usize, answer);
        }
        Ok(())
    }

    /// Drops file `id`; whether it was one.
    pub fn forget(&mut self, id: &str) -> bool {
        self.files.remove(id).is_some()
    }

    /// The ids of the files and batches held.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.files
            .keys()
            .chain(self.batches.keys())
            .map(String::as_str)
    }

    /// Batches held.
    pub fn batch_count(&self) -> usize {
        self.batches.len()
    }

    /// Whether file `id` is held.
    pub fn holds_file(&self, id: &str) -> bool {
        self.files.contains_key(id)
    }

    /// The answers held of batch `id`.
    pub fn answers_of(&self, id: &str) -> Option<&BTreeMap<usize, Answer>> {
        self.batches.get(id).map(|(_, _, answers)| answers)
    }

    /// Keeps what was received in `dispatcher`'s store and goes on with the batches still
    /// running; how many files and batches it kept.
    pub fn finish(self, dispatcher: &Arc<Dispatcher>) -> Result<(usize, usize), Status> {
        let store = &dispatcher.batches;
        let files = self.files.len();
        for (_, (file, bytes)) in self.files {
            store.adopt_file(StoredFile {
                id: file.id,
                tenant: file.tenant,
                filename: file.filename,
                purpose: file.purpose,
                created_at: file.created_at,
                bytes: bytes.freeze(),
            });
        }
        let mut batches = Vec::with_capacity(self.batches.len());
        for (_, (handed, input, answers)) in self.batches {
            batches.push(Arc::new(received_batch(handed, input.freeze(), answers)?));
        }
        let count = batches.len();
        for batch in batches {
            store.add_batch(batch.clone());
            match batch.status() {
                ended if ended.ended() => {}
                status => {
                    if status == BatchStatus::Cancelling {
                        batch.cancel.cancel();
                    }
                    super::run::start(dispatcher.clone(), batch);
                }
            }
        }
        Ok((files, count))
    }
}

fn not_sent(id: &str) -> Status {
    Status::invalid_argument(format!("{id:?} was not handed over before its pieces"))
}

fn received_batch(
    handed: v1::HandedBatch,
    input: Bytes,
    answers: BTreeMap<usize, Answer>,
) -> Result<Batch, Status> {
    let invalid = |what: &str, why: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("batch {:?}: {what}: {why}", handed.id))
    };
    let mut progress: Progress =
        serde_json::from_str(&handed.progress_json).map_err(|e| invalid("progress", &e))?;
    if !progress.status.ended() {
        super::run::recount(&mut progress, &answers);
    }
    let metadata =
        serde_json::from_str(&handed.metadata_json).map_err(|e| invalid("metadata", &e))?;
    let window = super::calls::window(&handed.completion_window)
        .ok_or_else(|| invalid("completion window", &handed.completion_window))?;
    Ok(Batch {
        id: handed.id,
        tenant: handed.tenant,
        endpoint: handed.endpoint,
        input_file_id: handed.input_file_id,
        window_text: handed.completion_window,
        window,
        metadata,
        created_at: handed.created_at,
        progress: std::sync::Mutex::new(progress),
        cancel: tokio_util::sync::CancellationToken::new(),
        input,
        answers: std::sync::Mutex::new(answers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::BatchLimits;
    use serde_json::json;

    #[test]
    fn a_running_batch_and_the_files_go_over_whole_in_pieces() {
        let store = BatchStore::new("0123456789ab", BatchLimits::default());
        let big = Bytes::from(vec![b'x'; PIECE_BYTES * 2 + 7]);
        let file = store
            .upload(Some("acme".into()), "in.jsonl".into(), big.clone())
            .unwrap();
        let batch = crate::batches::batch_in_progress(&store, big.clone());
        {
            let mut progress = batch.progress.lock().unwrap();
            progress.total = 300;
            progress.completed = 290;
        }
        let answers: BTreeMap<usize, Answer> = (0..300)
            .map(|i| {
                let answer = Answer {
                    succeeded: i % 2 == 0,
                    line: format!("{{\"n\":{i}}}"),
                };
                (i, answer)
            })
            .collect();
        *batch.answers.lock().unwrap() = answers.clone();
        store.add_batch(Arc::new(batch));
        let frames = frames(&store);
        assert!(frames.iter().all(|f| match &f.item {
            Some(Item::Bytes(piece)) => piece.bytes.len() <= PIECE_BYTES,
            _ => true,
        }));

        let mut receiving = Receiving::default();
        for frame in frames {
            assert!(receiving.push(frame.item.unwrap()).unwrap().is_none());
        }
        let (handed_file, file_bytes) = &receiving.files[&file.id];
        assert_eq!(handed_file.filename, "in.jsonl");
        assert_eq!(file_bytes.as_ref(), big.as_ref());
        let (handed, input, kept) = receiving.batches.values().next().unwrap();
        assert_eq!(input.as_ref(), big.as_ref());
        assert_eq!(*kept, answers);
        let received =
            received_batch(handed.clone(), input.clone().freeze(), kept.clone()).unwrap();
        assert_eq!(received.status(), BatchStatus::InProgress);
        assert_eq!(received.metadata, json!({"job": "x"}));
        // Its counts are what the answers hold (a mirror may send answers after counts).
        let progress = received.progress.lock().unwrap().clone();
        assert_eq!(
            (progress.total, progress.completed, progress.failed),
            (300, 150, 150)
        );
    }

    #[test]
    fn pieces_of_nothing_sent_before_are_refused() {
        let mut receiving = Receiving::default();
        let piece = Item::Bytes(v1::BytesPiece {
            id: "file-x".into(),
            bytes: Bytes::from_static(b"x"),
        });
        assert!(receiving.push(piece).is_err());
        let tag = Item::Tag("t".into());
        assert!(matches!(receiving.push(tag), Ok(Some(Item::Tag(_)))));
    }
}
