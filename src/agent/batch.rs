//! Accumulating what the readers and the sampler send into batches for the sink: at most
//! `max_records` log rows, and no read record waits longer than `max_wait`.
//!
//! Pure bookkeeping plus one channel receive: no file or database I/O.

use crate::agent::copyrow::EncodedRow;
use crate::model::{EventRow, MetricRow, ProgressRow};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A file position to commit together with the rows read before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub daemon: String,
    pub fingerprint: String,
    /// The path the file was opened at.
    pub path: String,
    /// Byte offset after the last line whose rows are in the same batch.
    pub position: u64,
    /// Checksum of the first bytes of the file up to `position` (see `identity`).
    pub head_hash: Option<String>,
    pub tail_hash: Option<String>,
    /// Sticky rule values in force at `position`.
    pub sticky: Value,
}

impl Checkpoint {
    /// The position as the reader's catalog keeps it.
    pub fn mark(&self) -> crate::agent::identity::Mark {
        crate::agent::identity::Mark {
            key: self.fingerprint.clone(),
            path: self.path.clone(),
            position: self.position,
            head_hash: self.head_hash.clone(),
            tail_hash: self.tail_hash.clone(),
            sticky: self.sticky.clone(),
        }
    }
}

/// What readers send: the rows of consecutive records of one file and the position after them.
#[derive(Debug, Clone)]
pub struct FileChunk {
    /// `pipeline_logs` rows, already encoded for COPY.
    pub logs: Vec<EncodedRow>,
    pub events: Vec<EventRow>,
    pub progress: Vec<ProgressRow>,
    pub checkpoint: Checkpoint,
}

/// One message to the batcher. Chunks are nearly every message: boxing them would cost an
/// allocation each for nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Item {
    Chunk(FileChunk),
    /// Rows that belong to no file: metrics and the agent's own events.
    Rows {
        metrics: Vec<MetricRow>,
        events: Vec<EventRow>,
    },
    /// Answered once everything sent before it is committed (used when a reader is replaced).
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Batch {
    pub logs: Vec<EncodedRow>,
    pub events: Vec<EventRow>,
    pub progress: Vec<ProgressRow>,
    pub metrics: Vec<MetricRow>,
    /// The latest position per (daemon, fingerprint).
    pub checkpoints: Vec<Checkpoint>,
    /// To answer once this batch is committed.
    pub barriers: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
            && self.events.is_empty()
            && self.progress.is_empty()
            && self.metrics.is_empty()
            && self.checkpoints.is_empty()
    }

    /// Number of rows of all kinds.
    pub fn rows(&self) -> usize {
        self.logs.len() + self.events.len() + self.progress.len() + self.metrics.len()
    }

    fn add(&mut self, item: Item, index: &mut HashMap<(String, String), usize>) {
        match item {
            Item::Chunk(c) => {
                self.logs.extend(c.logs);
                self.events.extend(c.events);
                self.progress.extend(c.progress);
                let key = (
                    c.checkpoint.daemon.clone(),
                    c.checkpoint.fingerprint.clone(),
                );
                match index.get(&key) {
                    Some(&i) => self.checkpoints[i] = c.checkpoint,
                    None => {
                        index.insert(key, self.checkpoints.len());
                        self.checkpoints.push(c.checkpoint);
                    }
                }
            }
            Item::Rows { metrics, events } => {
                self.metrics.extend(metrics);
                self.events.extend(events);
            }
            Item::Barrier(tx) => self.barriers.push(tx),
        }
    }
}

/// Receives items and hands out batches: a batch closes when it holds `max_records` log rows or
/// when its first item has waited `max_wait`.
pub struct Batcher {
    rx: mpsc::Receiver<Item>,
    max_records: usize,
    max_wait: Duration,
    /// An item received that did not fit the previous batch.
    carry: Option<Item>,
}

impl Batcher {
    pub fn new(rx: mpsc::Receiver<Item>, max_records: usize, max_wait: Duration) -> Batcher {
        Batcher {
            rx,
            max_records,
            max_wait,
            carry: None,
        }
    }

    /// The next batch; `None` once every sender is gone and nothing is left. A barrier closes
    /// the batch it arrives in.
    pub async fn next(&mut self) -> Option<Batch> {
        let first = match self.carry.take() {
            Some(item) => item,
            None => self.rx.recv().await?,
        };
        let deadline = Instant::now() + self.max_wait;
        let mut batch = Batch::default();
        let mut index = HashMap::new();
        batch.add(first, &mut index);
        while batch.logs.len() < self.max_records && batch.barriers.is_empty() {
            let item = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) | Err(_) => break,
            };
            if let Item::Chunk(c) = &item {
                if batch.logs.len() + c.logs.len() > self.max_records {
                    self.carry = Some(item);
                    break;
                }
            }
            batch.add(item, &mut index);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::copyrow::encode;
    use crate::model::{Level, LogRow};
    use chrono::Utc;

    fn chunk(fp: &str, n: usize, pos: u64) -> Item {
        let row = LogRow {
            ts: Utc::now(),
            level: Level::Info,
            message: "m".into(),
            logger: None,
            experiment_id: None,
            node_id: None,
            stage: None,
            context: Value::Object(Default::default()),
            traceback: None,
            metrics: None,
            host: "h".into(),
            daemon: "d".into(),
            source: None,
        };
        Item::Chunk(FileChunk {
            logs: vec![encode(&row); n],
            events: vec![],
            progress: vec![],
            checkpoint: Checkpoint {
                daemon: "d".into(),
                fingerprint: fp.into(),
                path: "/p".into(),
                position: pos,
                head_hash: None,
                tail_hash: None,
                sticky: Value::Null,
            },
        })
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_records_and_keeps_the_latest_position() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = Batcher::new(rx, 5, Duration::from_millis(200));
        tx.send(chunk("a", 2, 10)).await.unwrap();
        tx.send(chunk("a", 3, 20)).await.unwrap();
        tx.send(chunk("b", 2, 5)).await.unwrap();
        drop(tx);
        let first = b.next().await.unwrap();
        assert_eq!(first.logs.len(), 5);
        assert_eq!(first.checkpoints.len(), 1);
        assert_eq!(first.checkpoints[0].position, 20);
        let second = b.next().await.unwrap();
        assert_eq!(second.logs.len(), 2);
        assert_eq!(second.checkpoints[0].fingerprint, "b");
        assert!(b.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_barrier_closes_the_batch() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = Batcher::new(rx, 1000, Duration::from_millis(200));
        let (btx, _brx) = tokio::sync::oneshot::channel();
        tx.send(chunk("a", 1, 10)).await.unwrap();
        tx.send(Item::Barrier(btx)).await.unwrap();
        tx.send(chunk("a", 1, 20)).await.unwrap();
        let first = b.next().await.unwrap();
        assert_eq!((first.logs.len(), first.barriers.len()), (1, 1));
        let second = b.next().await.unwrap();
        assert_eq!((second.logs.len(), second.barriers.len()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_max_wait() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = Batcher::new(rx, 1000, Duration::from_millis(200));
        tx.send(chunk("a", 1, 10)).await.unwrap();
        let started = Instant::now();
        let batch = b.next().await.unwrap();
        assert_eq!(batch.logs.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        drop(tx);
    }
}
