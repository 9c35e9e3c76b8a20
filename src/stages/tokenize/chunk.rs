//! Chunks: the unit of work between the reader thread and the tokenizing workers. The
//! reader fills a chunk with records until it holds about [`CHUNK_BYTES`] of text, then
//! hands it over a bounded channel, which bounds memory whatever the corpus size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;

use super::record::Body;

/// About how many bytes of record text one chunk holds.
pub(crate) const CHUNK_BYTES: usize = 4 << 20;

/// One record as read, before parsing and tokenization.
#[derive(Debug)]
pub(crate) struct RawRecord {
    /// 0-based index of the record among all records of all input files, in input order
    /// (blank lines are not records; bad records are). This is the `example_id`.
    pub index: u64,
    /// Index of the file in the resolved input list.
    pub file: usize,
    /// 1-based line (text, JSONL: the first line of the record) or row (Parquet).
    pub number: u64,
    pub body: Body,
}

/// What the reader reports, in input order.
#[derive(Debug)]
pub(crate) enum Event {
    Record(RawRecord),
    /// The file with this index yielded no record at all.
    EmptyFile(usize),
}

/// A batch of events plus the input bytes consumed to produce them.
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    pub events: Vec<Event>,
    pub bytes_read: u64,
}

/// The reader was told to stop: the run was cancelled or the consumer went away.
#[derive(Debug)]
pub(crate) struct Stopped;

/// Collects events into chunks and sends each full chunk down the channel.
pub(crate) struct ChunkSink<'a> {
    tx: SyncSender<Chunk>,
    cancel: &'a AtomicBool,
    current: Chunk,
    payload: usize,
    next_index: u64,
}

impl<'a> ChunkSink<'a> {
    pub(crate) fn new(tx: SyncSender<Chunk>, cancel: &'a AtomicBool) -> Self {
        ChunkSink {
            tx,
            cancel,
            current: Chunk::default(),
            payload: 0,
            next_index: 0,
        }
    }

    /// Adds a record of about `size` bytes; sends the chunk when it is full.
    pub(crate) fn record(
        &mut self,
        file: usize,
        number: u64,
        body: Body,
        size: usize,
    ) -> Result<(), Stopped> {
        let index = self.next_index;
        self.next_index += 1;
        self.current.events.push(Event::Record(RawRecord {
            index,
            file,
            number,
            body,
        }));
        self.payload += size.max(1);
        if self.payload >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Notes that `file` held no record.
    pub(crate) fn empty_file(&mut self, file: usize) {
        self.current.events.push(Event::EmptyFile(file));
    }

    /// Counts input bytes consumed.
    pub(crate) fn bytes(&mut self, n: u64) {
        self.current.bytes_read += n;
    }

    /// Sends what is collected (if anything); fails when the run is cancelled or the
    /// receiver is gone.
    pub(crate) fn flush(&mut self) -> Result<(), Stopped> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Stopped);
        }
        if self.current.events.is_empty() && self.current.bytes_read == 0 {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.current);
        self.payload = 0;
        self.tx.send(chunk).map_err(|_| Stopped)
    }
}
