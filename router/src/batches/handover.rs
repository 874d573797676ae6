//! A stopping router hands its files and batches, with its stored responses, to another
//! replica (see [`crate::response_store::handover`]): a batch still running goes on there from
//! where it got to (the requests answered are not sent again), and the files and batches are
//! read at the same ids, the receiver answering for the stopping replica's tag.
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

fn item(item: Item) -> v1::HandoverItem {
    v1::HandoverItem { item: Some(item) }
}

fn pieces(id: &str, bytes: &Bytes, out: &mut Vec<v1::HandoverItem>) {
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + PIECE_BYTES).min(bytes.len());
        out.push(item(Item::Bytes(v1::BytesPiece {
            id: id.to_string(),
            bytes: bytes.slice(start..end),
        })));
        start = end;
    }
}

/// The hand-over of every file and batch `store` keeps.
pub fn frames(store: &BatchStore) -> Vec<v1::HandoverItem> {
    let (files, batches) = store.export();
    let mut out = Vec::new();
    for file in files {
        out.push(item(Item::File(v1::HandedFile {
            id: file.id.clone(),
            tenant: file.tenant.clone(),
            filename: file.filename.clone(),
            purpose: file.purpose.clone(),
            created_at: file.created_at,
        })));
        pieces(&file.id, &file.bytes, &mut out);
    }
    for batch in batches {
        let progress = batch.progress.lock().expect("batch progress").clone();
        out.push(item(Item::Batch(v1::HandedBatch {
            id: batch.id.clone(),
            tenant: batch.tenant.clone(),
            endpoint: batch.endpoint.clone(),
            input_file_id: batch.input_file_id.clone(),
            completion_window: batch.window_text.clone(),
            metadata_json: batch.metadata.to_string(),
            created_at: batch.created_at,
            progress_json: serde_json::to_string(&progress).expect("progress serializes"),
        })));
        // An ended batch's answers are in its files already.
        if progress.status.ended() {
            continue;
        }
        pieces(&batch.id, &batch.input, &mut out);
        let answers: Vec<v1::AnsweredRequest> = batch
            .answers
            .lock()
            .expect("batch answers")
            .iter()
            .map(|(index, answer)| v1::AnsweredRequest {
                index: *index as u64,
                succeeded: answer.succeeded,
                line_json: answer.line.clone(),
            })
            .collect();
        for chunk in answers.chunks(ANSWERS_PER_ITEM) {
            out.push(item(Item::Answers(v1::BatchAnswers {
                batch_id: batch.id.clone(),
                answered: chunk.to_vec(),
            })));
        }
    }
    out
}

/// Files and batches being received from a stopping replica.
#[derive(Default)]
pub struct Receiving {
    files: HashMap<String, (v1::HandedFile, BytesMut)>,
    batches: HashMap<String, (v1::HandedBatch, BytesMut, BTreeMap<usize, Answer>)>,
}

impl Receiving {
    /// Takes `item` if it is a file's or batch's; gives it back otherwise.
    pub fn push(&mut self, item: Item) -> Result<Option<Item>, Status> {
        match item {
            Item::File(file) => {
                self.files.insert(file.id.clone(), (file, BytesMut::new()));
            }
            Item::Batch(batch) => {
                self.batches
                    .insert(batch.id.clone(), (batch, BytesMut::new(), BTreeMap::new()));
            }
            Item::Bytes(piece) => {
                let bytes = match (
                    self.files.get_mut(&piece.id),
                    self.batches.get_mut(&piece.id),
                ) {
                    (Some((_, bytes)), _) | (None, Some((_, bytes, _))) => bytes,
                    (None, None) => return Err(not_sent(&piece.id)),
                };
                bytes.extend_from_slice(&piece.bytes);
            }
            Item::Answers(answers) => {
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
            }
            other => return Ok(Some(other)),
        }
        Ok(None)
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
    let progress: Progress =
        serde_json::from_str(&handed.progress_json).map_err(|e| invalid("progress", &e))?;
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
    use crate::batches::{BatchLimits, Usage};
    use serde_json::json;

    #[test]
    fn a_running_batch_and_the_files_go_over_whole_in_pieces() {
        let store = BatchStore::new("0123456789ab", BatchLimits::default());
        let big = Bytes::from(vec![b'x'; PIECE_BYTES * 2 + 7]);
        let file = store
            .upload(Some("acme".into()), "in.jsonl".into(), big.clone())
            .unwrap();
        let mut progress = Progress::new();
        progress.status = BatchStatus::InProgress;
        progress.total = 300;
        progress.completed = 300;
        progress.usage = Usage {
            input_tokens: 9,
            cached_tokens: 0,
            output_tokens: 4,
        };
        let answers: BTreeMap<usize, Answer> = (0..300)
            .map(|i| {
                let answer = Answer {
                    succeeded: i % 2 == 0,
                    line: format!("{{\"n\":{i}}}"),
                };
                (i, answer)
            })
            .collect();
        let batch = Batch {
            id: store.new_id(super::super::BATCH_PREFIX),
            tenant: Some("acme".into()),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: file.id.clone(),
            window_text: "24h".into(),
            window: std::time::Duration::from_secs(86_400),
            metadata: json!({"job": "x"}),
            created_at: 7,
            progress: std::sync::Mutex::new(progress),
            cancel: Default::default(),
            input: big.clone(),
            answers: std::sync::Mutex::new(answers.clone()),
        };
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
        let progress = received.progress.lock().unwrap().clone();
        assert_eq!((progress.total, progress.completed), (300, 300));
        assert_eq!(progress.usage.input_tokens, 9);
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
