//! Accumulating what the readers and the sampler send into batches for the sink: at most
//! `max_records` log rows and about `max_bytes` of encoded rows, and no read record waits
//! longer than `max_wait`.
//!
//! Memory is bounded in bytes: every item the batcher takes from the channel holds byte
//! permits of one shared [`Budget`] until the batch it went into is committed (the sink drops
//! the batch). When the budget is spent the batcher stops receiving, the bounded channel fills
//! and the readers block in `blocking_send`: the files are the buffer.
//!
//! Pure bookkeeping plus one channel receive: no file or database I/O.

use crate::agent::copyrow::EncodedRow;
use crate::model::{EventRow, MetricRow, ProgressRow};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Bytes counted for a row whose size is not measured (events, progress, metrics, positions):
/// a rough upper estimate of its in-memory size.
const ROW_OVERHEAD: usize = 256;

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
    /// Rows that belong to no file: metrics and the agent's own events. They close their
    /// batch at once: nothing more of theirs comes within `max_wait` (a metrics tick sends
    /// its rows together), so an idle agent's tick commits without waiting for a timer.
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
    /// The approximate bytes of the items in this batch (see [`item_bytes`]).
    pub bytes: usize,
    /// The byte permits this batch holds; returned to the [`Budget`] when the batch is dropped,
    /// i.e. once the sink is done with it.
    pub reserved: Option<OwnedSemaphorePermit>,
    /// Closed by `max_records` or `max_bytes` rather than by `max_wait`: a backlog, so the
    /// sink may stream it on a second connection while the batch before it commits.
    pub full: bool,
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

    fn add(
        &mut self,
        item: Item,
        bytes: usize,
        permit: OwnedSemaphorePermit,
        index: &mut HashMap<(String, String), usize>,
    ) {
        self.bytes += bytes;
        match &mut self.reserved {
            Some(held) => held.merge(permit),
            None => self.reserved = Some(permit),
        }
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

/// The approximate memory an item holds: the encoded log rows exactly, everything else
/// estimated (an event counts its message plus `ROW_OVERHEAD`).
pub fn item_bytes(item: &Item) -> usize {
    let event = |e: &EventRow| ROW_OVERHEAD + e.message.as_ref().map_or(0, String::len);
    match item {
        Item::Chunk(c) => {
            c.logs.iter().map(|r| r.0.len()).sum::<usize>()
                + c.events.iter().map(event).sum::<usize>()
                + c.progress.len() * ROW_OVERHEAD
                + ROW_OVERHEAD
                + c.checkpoint.path.len()
        }
        Item::Rows { metrics, events } => {
            metrics.len() * ROW_OVERHEAD + events.iter().map(event).sum::<usize>()
        }
        Item::Barrier(_) => 0,
    }
}

/// The bytes that may be held between the batcher's receive and the sink's commit, shared by
/// the batch being filled, the one waiting for the sink and the one being committed.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total: u32,
}

impl Budget {
    /// A budget of `bytes` (at most `u32::MAX`; more is clamped).
    pub fn new(bytes: usize) -> Budget {
        let total = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        Budget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Bytes not held by any batch right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total as usize
    }

    /// What an item of `bytes` asks for: its size, but never more than the whole budget, so a
    /// single item larger than the budget still passes (alone) instead of waiting forever.
    fn ask(&self, bytes: usize) -> u32 {
        u32::try_from(bytes).unwrap_or(u32::MAX).min(self.total)
    }

    /// Waits for the permits of an item. Called only when the item and the permits the caller
    /// holds for its unsent batch together fit in half the budget, so the sink's commits of
    /// the batches it already has always make room.
    async fn acquire(&self, bytes: usize) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_many_owned(self.ask(bytes))
            .await
            .expect("the budget's semaphore is never closed")
    }

    fn try_acquire(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits)
            .try_acquire_many_owned(self.ask(bytes))
            .ok()
    }
}

/// When a batch closes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Log rows per batch, at most.
    pub max_records: usize,
    /// Approximate bytes per batch: an item that would pass it goes to the next batch (an item
    /// larger than this on its own makes a batch by itself).
    pub max_bytes: usize,
    /// The longest the first item of a batch waits.
    pub max_wait: Duration,
}

impl Limits {
    /// The in-flight budget these limits call for: one batch committing and one filling.
    pub fn budget(&self) -> Budget {
        Budget::new(self.max_bytes.saturating_mul(2))
    }
}

/// How often a reader reads a steadily written file (and how long it waits after a
/// notification, at most): 90 % of `max_wait`, at most 250 ms. A line may wait that long
/// before it is read, so a batch waits for more items only for the rest of `max_wait`
/// ([`batch_wait`]): a line is still committed within `max_wait` (plus the commit) of being
/// written. Every reader reads on one shared grid of this period ([`until_next_read`]), so
/// the chunks of all the files written at once arrive together and make one batch: at the
/// default 200 ms, one read of each busy file and one commit every 180 ms, each batch waiting
/// 20 ms for the other readers' chunks.
pub fn read_debounce(max_wait: Duration) -> Duration {
    (max_wait * 9 / 10).min(Duration::from_millis(250))
}

/// How long a batch waits for more items after its first: `max_wait` less the readers'
/// [`read_debounce`].
pub fn batch_wait(max_wait: Duration) -> Duration {
    max_wait.saturating_sub(read_debounce(max_wait))
}

/// How long until the next read of the readers' shared grid (period [`read_debounce`],
/// counted from the first call in this process): at most one period.
pub fn until_next_read(max_wait: Duration) -> Duration {
    static GRID: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let period = read_debounce(max_wait).as_nanos().max(1);
    let into = GRID
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos()
        % period;
    Duration::from_nanos(u64::try_from(period - into).unwrap_or(u64::MAX))
}

/// Receives items and hands out batches: a batch closes when it holds `max_records` log rows,
/// about `max_bytes`, or when its first item has waited `max_wait`. While the byte budget is
/// spent it waits for the sink to finish a batch (and receives nothing meanwhile).
pub struct Batcher {
    rx: mpsc::Receiver<Item>,
    limits: Limits,
    budget: Budget,
    /// An item received that did not fit the previous batch, with its size.
    carry: Option<(Item, usize)>,
}

impl Batcher {
    pub fn new(rx: mpsc::Receiver<Item>, limits: Limits, budget: Budget) -> Batcher {
        Batcher {
            rx,
            limits,
            budget,
            carry: None,
        }
    }

    /// The next batch; `None` once every sender is gone and nothing is left. A barrier closes
    /// the batch it arrives in. Cancel-safe: an item received is never lost.
    pub async fn next(&mut self) -> Option<Batch> {
        let size = match &self.carry {
            Some((_, size)) => *size,
            None => {
                let item = self.rx.recv().await?;
                let size = item_bytes(&item);
                // Kept in `carry` while waiting for permits, so a cancelled call loses nothing.
                self.carry = Some((item, size));
                size
            }
        };
        // This batcher holds no permits of its own here (every earlier batch was handed out),
        // so the wait ends when the sink finishes a batch.
        let permit = self.budget.acquire(size).await;
        let (first, size) = self.carry.take().expect("the first item is in carry");
        let deadline = Instant::now() + batch_wait(self.limits.max_wait);
        let mut batch = Batch::default();
        let mut index = HashMap::new();
        let mut closed = matches!(first, Item::Rows { .. });
        batch.add(first, size, permit, &mut index);
        while !closed
            && batch.logs.len() < self.limits.max_records
            && batch.bytes < self.limits.max_bytes
            && batch.barriers.is_empty()
        {
            let item = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) | Err(_) => break,
            };
            let size = item_bytes(&item);
            let too_many = match &item {
                Item::Chunk(c) => batch.logs.len() + c.logs.len() > self.limits.max_records,
                _ => false,
            };
            if too_many || batch.bytes + size > self.limits.max_bytes {
                self.carry = Some((item, size));
                batch.full = true;
                break;
            }
            // This batch and the item fit in `max_bytes`, half the budget; the other half is
            // held only by batches already handed to the sink, which commits them without us,
            // so this wait ends. It ends at the batch's deadline too: the item then starts the
            // next batch.
            let acquired = match self.budget.try_acquire(size) {
                Some(permit) => Some(permit),
                None => tokio::time::timeout_at(deadline, self.budget.acquire(size))
                    .await
                    .ok(),
            };
            match acquired {
                Some(permit) => {
                    closed = matches!(item, Item::Rows { .. });
                    batch.add(item, size, permit, &mut index);
                }
                None => {
                    self.carry = Some((item, size));
                    break;
                }
            }
        }
        batch.full |=
            batch.logs.len() >= self.limits.max_records || batch.bytes >= self.limits.max_bytes;
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::copyrow::encode;
    use crate::model::{Level, LogRow};
    use chrono::Utc;

    /// A chunk of `n` log rows whose messages are `len` bytes each.
    fn sized_chunk(fp: &str, n: usize, pos: u64, len: usize) -> Item {
        let row = LogRow {
            ts: Utc::now(),
            level: Level::Info,
            message: "m".repeat(len),
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

    fn chunk(fp: &str, n: usize, pos: u64) -> Item {
        sized_chunk(fp, n, pos, 1)
    }

    fn batcher(rx: mpsc::Receiver<Item>, max_records: usize, max_bytes: usize) -> Batcher {
        let limits = Limits {
            max_records,
            max_bytes,
            max_wait: Duration::from_millis(200),
        };
        Batcher::new(rx, limits, limits.budget())
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_records_and_keeps_the_latest_position() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = batcher(rx, 5, 1 << 20);
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
        let mut b = batcher(rx, 1000, 1 << 20);
        let (btx, _brx) = tokio::sync::oneshot::channel();
        tx.send(chunk("a", 1, 10)).await.unwrap();
        tx.send(Item::Barrier(btx)).await.unwrap();
        tx.send(chunk("a", 1, 20)).await.unwrap();
        let first = b.next().await.unwrap();
        assert_eq!((first.logs.len(), first.barriers.len()), (1, 1));
        let second = b.next().await.unwrap();
        assert_eq!((second.logs.len(), second.barriers.len()), (1, 0));
    }

    #[test]
    fn readers_read_on_one_grid() {
        // Two readers asking at different moments are told the same next read (or one a whole
        // period later), never a moment of their own.
        let max_wait = Duration::from_millis(200);
        let period = read_debounce(max_wait);
        let first = std::time::Instant::now() + until_next_read(max_wait);
        std::thread::sleep(Duration::from_millis(37));
        let wait = until_next_read(max_wait);
        assert!(wait <= period);
        let second = std::time::Instant::now() + wait;
        let apart = second.saturating_duration_since(first).as_secs_f64();
        let periods = apart / period.as_secs_f64();
        assert!(
            (periods - periods.round()).abs() < 0.02,
            "next reads {apart:.4} s apart, not a whole number of {period:?} periods"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rows_that_belong_to_no_file_close_their_batch_at_once() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = batcher(rx, 1000, 1 << 20);
        let rows = || Item::Rows {
            metrics: vec![MetricRow::default()],
            events: vec![],
        };
        // Alone: no wait for more items.
        tx.send(rows()).await.unwrap();
        let started = Instant::now();
        let batch = b.next().await.unwrap();
        assert_eq!(
            (batch.metrics.len(), started.elapsed()),
            (1, Duration::ZERO)
        );
        // Behind a chunk: they close the chunk's batch; what follows starts the next one.
        tx.send(chunk("a", 1, 10)).await.unwrap();
        tx.send(rows()).await.unwrap();
        tx.send(chunk("a", 1, 20)).await.unwrap();
        let batch = b.next().await.unwrap();
        assert_eq!((batch.logs.len(), batch.metrics.len()), (1, 1));
        assert_eq!(started.elapsed(), Duration::ZERO);
        let batch = b.next().await.unwrap();
        assert_eq!((batch.logs.len(), batch.metrics.len()), (1, 0));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_max_wait() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = batcher(rx, 1000, 1 << 20);
        tx.send(chunk("a", 1, 10)).await.unwrap();
        let started = Instant::now();
        let batch = b.next().await.unwrap();
        assert_eq!(batch.logs.len(), 1);
        // 200 ms less the readers' 180 ms between reads: a line waits at most 200 ms in all.
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_bytes_before_max_records() {
        let (tx, rx) = mpsc::channel(16);
        let one = item_bytes(&sized_chunk("a", 1, 0, 10_000));
        // Room for three such chunks, not four.
        let mut b = batcher(rx, 1000, one * 3 + one / 2);
        for pos in 1..=7 {
            tx.send(sized_chunk("a", 1, pos, 10_000)).await.unwrap();
        }
        drop(tx);
        let first = b.next().await.unwrap();
        assert_eq!(first.logs.len(), 3);
        assert_eq!(first.bytes, one * 3);
        assert_eq!(first.checkpoints[0].position, 3);
        drop(first);
        let second = b.next().await.unwrap();
        assert_eq!((second.logs.len(), second.checkpoints[0].position), (3, 6));
        drop(second);
        let third = b.next().await.unwrap();
        assert_eq!((third.logs.len(), third.checkpoints[0].position), (1, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_larger_than_the_whole_budget_passes_alone() {
        let (tx, rx) = mpsc::channel(16);
        let mut b = batcher(rx, 1000, 1000);
        tx.send(chunk("a", 1, 1)).await.unwrap();
        tx.send(sized_chunk("a", 1, 2, 50_000)).await.unwrap();
        tx.send(chunk("a", 1, 3)).await.unwrap();
        drop(tx);
        let small = b.next().await.unwrap();
        assert_eq!(small.checkpoints[0].position, 1);
        drop(small);
        let big = b.next().await.unwrap();
        assert_eq!((big.logs.len(), big.checkpoints[0].position), (1, 2));
        assert!(big.bytes > 50_000);
        drop(big);
        let last = b.next().await.unwrap();
        assert_eq!(last.checkpoints[0].position, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_room_instead_of_closing_small() {
        let (tx, rx) = mpsc::channel(16);
        let one = item_bytes(&sized_chunk("a", 1, 0, 10_000));
        let limits = Limits {
            max_records: 1000,
            max_bytes: 2 * one,
            max_wait: Duration::from_millis(200),
        };
        let budget = limits.budget();
        let mut b = Batcher::new(rx, limits, budget.clone());
        tx.send(sized_chunk("a", 1, 1, 10_000)).await.unwrap();
        tx.send(sized_chunk("a", 1, 2, 10_000)).await.unwrap();
        let committing = b.next().await.unwrap();
        tx.send(sized_chunk("a", 1, 3, 10_000)).await.unwrap();
        let waiting = b.next().await.unwrap();
        assert_eq!((committing.logs.len(), waiting.logs.len()), (2, 1));
        // Three of the four units are held: the next batch has room for one item only, until
        // the sink finishes the first batch halfway through the batch's wait.
        tx.send(sized_chunk("a", 1, 4, 10_000)).await.unwrap();
        tx.send(sized_chunk("a", 1, 5, 10_000)).await.unwrap();
        let next = tokio::spawn(async move { b.next().await.map(|batch| batch.logs.len()) });
        tokio::time::sleep(batch_wait(Duration::from_millis(200)) / 2).await;
        drop(committing);
        assert_eq!(next.await.unwrap(), Some(2));
        drop(waiting);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_holds_the_next_batch_until_one_is_committed() {
        let (tx, rx) = mpsc::channel(16);
        let one = item_bytes(&sized_chunk("a", 1, 0, 10_000));
        let limits = Limits {
            max_records: 1000,
            max_bytes: one,
            max_wait: Duration::from_millis(200),
        };
        let budget = limits.budget();
        let mut b = Batcher::new(rx, limits, budget.clone());
        for pos in 1..=3 {
            tx.send(sized_chunk("a", 1, pos, 10_000)).await.unwrap();
        }
        // Two batches in flight (one committing, one waiting) spend the budget.
        let first = b.next().await.unwrap();
        let second = b.next().await.unwrap();
        assert_eq!(budget.available(), budget.total() - 2 * one);
        assert!(budget.available() < one);
        let waiting = tokio::time::timeout(Duration::from_secs(3600), b.next()).await;
        assert!(waiting.is_err(), "a third batch must wait for a commit");
        // The sink drops a committed batch: its bytes return and the third batch forms.
        drop(first);
        let third = b.next().await.unwrap();
        assert_eq!(third.checkpoints[0].position, 3);
        drop((second, third));
        assert_eq!(budget.available(), budget.total());
    }
}
