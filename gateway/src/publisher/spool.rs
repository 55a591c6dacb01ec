//! The on-disk spool: where message copies wait, fsync'ed, while the broker
//! is unreachable, to be replayed in order when it returns.
//!
//! Layout of `queue.spool_dir`:
//! - `spool.log`: records appended in arrival order. A record is a 4-byte
//!   little-endian body length, the body's 4-byte CRC-32, then the body
//!   (a [`QueueMessage`] as [`QueueMessage::encode`] writes it).
//! - `spool.head`: the offset of the first record the broker has not
//!   confirmed yet (8 bytes, little-endian). Records before it are done.
//! - `lock`: held exclusively while a gateway uses the directory.
//!
//! The directory is private to the gateway's user (0700) and so are its
//! files (0600): they hold every message body. A directory of another user
//! (say a volume's mount root) or one others may write to is refused, not
//! changed: `queue.spool_dir` is then to be a subdirectory, which the
//! gateway creates (see [`private_dir::prepare`]).
//!
//! Only records the broker has not confirmed, and room reserved for copies
//! published straight to it, count against `queue.spool_max_bytes`:
//! during a replay, new copies are taken (behind it) as soon as confirms
//! free room. Confirmed records stay in the file until every record is
//! confirmed and the log is emptied, so the file itself is bounded at
//! twice `queue.spool_max_bytes` ([`FILE_BOUND`]); past that, copies are
//! refused until the replay catches up.
//!
//! When every record is confirmed the log is truncated to zero, after the
//! head is saved as 0 (a crash in between only replays confirmed records
//! again; the reverse order could leave an old head pointing past new
//! records). While the head cannot be saved the log is not cut: new
//! records go after the confirmed ones. A head found past the end of the
//! log is not trusted: the whole log is replayed.
//!
//! A torn record at the end (a crash during a write, before its fsync, so
//! never acknowledged to a client) is cut off with a warning; a corrupt
//! record elsewhere is moved aside, with everything after it, into a
//! new `spool.corrupt.<time>[.<n>]` file (copied without being read into
//! memory, fsync'ed before the log is cut) and reported, never silently
//! dropped nor written over an earlier one.
//!
//! Records are stored in batches: appended, then written and fsync'ed by
//! [`Spool::sync`]. When a write or fsync fails (a full disk), the log is
//! cut back to its length after the last good sync and the whole batch is
//! refused, so no partial record is left to shift the framing of later
//! ones, and no refused record is ever replayed. The spool then counts as
//! not writable until a write succeeds: the next batch, or a probe
//! (`spool.probe`, written, fsync'ed and removed by [`Spool::retry`]).

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use runtime::private_dir::{self, PrivateDirError, Problem};

use super::message::QueueMessage;

/// Largest body a record may claim; anything larger is corruption.
const MAX_RECORD: u32 = 64 << 20;
const HEADER: u64 = 8;
/// Appended bytes held in memory before they are written to the log, so a
/// batch of small records costs few writes and a batch of large ones
/// little memory.
const WRITE_CHUNK: usize = 64 << 10;
/// Records confirmed between two saves of the head during a replay. The
/// head is also saved when the log is emptied and when the spool is
/// dropped; a gateway killed mid-replay publishes at most this many
/// confirmed records (plus those in flight) again after restart.
const HEAD_SAVE_EVERY: u64 = 256;
/// Bytes written and fsync'ed to a probe file to learn whether a disk that
/// refused a write takes writes again: a block, the least a write of a
/// record can need.
const PROBE_BYTES: usize = 4096;
/// The log file may grow to this many times `queue.spool_max_bytes`.
/// Confirmed records stay in the file until every record is confirmed and
/// it is truncated; only the unconfirmed ones count against the limit, so
/// that after an outage filled the spool, new copies are taken again as
/// its replay is confirmed (they must go to the spool behind it, to keep
/// the order). Bounding the file, rather than compacting it, keeps the log
/// append-only: once new copies come in faster than the replay, they are
/// refused until the replay catches up and the log is emptied.
const FILE_BOUND: u64 = 2;
/// The setting the spool directory comes from, named in its errors.
const SPOOL_DIR_KEY: &str = "queue.spool_dir";
/// Mode of the spool's files: the gateway's user only.
const FILE_MODE: u32 = 0o600;

/// Options to create or open a file of the spool, private to the
/// gateway's user.
fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Make sure a file made by an earlier version, or by hand, is private.
fn make_private(file: &File, mode: u32) -> io::Result<()> {
    if file.metadata()?.permissions().mode() & 0o777 != mode {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// fsync a directory: makes the creation, renaming and removal of its
/// entries durable (fsync of a file covers its data, not its name).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where the log's bytes go: the file, or in tests a disk that fills up.
pub(super) trait LogFile: Send {
    /// Append `bytes` at the end of the log. On error, part of them may
    /// have been written.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Make what was appended durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cut the log to `len` bytes, durably.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Write and fsync a small file at `path`, then remove it: whether the
    /// disk under the log takes writes again after one failed.
    fn probe(&mut self, path: &Path) -> io::Result<()> {
        write_probe(path)
    }
}

/// Write [`PROBE_BYTES`] to a new file at `path`, fsync it, and remove it
/// (also when the write fails, so no probe is left taking room).
fn write_probe(path: &Path) -> io::Result<()> {
    let written = private_file()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| {
            file.write_all(&[0; PROBE_BYTES])?;
            file.sync_all()
        });
    let removed = std::fs::remove_file(path);
    written.and(removed)
}

impl LogFile for File {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        // The file is opened in append mode: this writes at its end, also
        // right after a truncation.
        self.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        // A cut that is not durable could bring back, after a power loss,
        // bytes the spool no longer counts: refused records, or records
        // already confirmed by the broker.
        self.sync_all()
    }
}

/// What to add to a refusal of `queue.spool_dir` that says to point it at
/// a subdirectory: the default is one.
fn default_is_a_subdirectory(problem: &Problem) -> &'static str {
    match problem {
        Problem::Owner { .. } | Problem::WritableByOthers { .. } => {
            " (the default queue.spool_dir, <server.state_dir>/spool, is such a subdirectory)"
        }
        _ => "",
    }
}

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool has no room for this message (`queue.spool_max_bytes`).
    #[error(
        "the spool is full (queue.spool_max_bytes = {max_bytes} bytes waiting for the broker, \
         and the file at most twice that)"
    )]
    Full {
        /// The configured limit.
        max_bytes: u64,
    },
    /// `queue.spool_dir` cannot be the spool's private directory (see
    /// [`private_dir::prepare`]).
    #[error("{0}{hint}", hint = default_is_a_subdirectory(&.0.problem))]
    Dir(PrivateDirError),
    /// Another process holds the spool directory.
    #[error(
        "spool directory {0} is in use by another tidegate process; give each gateway its own queue.spool_dir"
    )]
    Locked(PathBuf),
    /// Reading or writing the spool failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The spool of one gateway.
pub struct Spool {
    /// The spool directory.
    dir: PathBuf,
    /// `spool.log`, for appending.
    log: Box<dyn LogFile>,
    /// Records appended and not yet written to the log (at most about
    /// [`WRITE_CHUNK`] bytes).
    pending: Vec<u8>,
    /// `spool.log`, for reading during replay.
    reader: File,
    /// Held for the spool's lifetime: the exclusive lock.
    _lock: File,
    /// End of the log, including records not yet synced.
    len: u64,
    /// End of the log after the last good [`Spool::sync`]: what replay
    /// reads, and where a failed write is cut back to.
    synced_len: u64,
    /// Records appended since the last good sync (counted in `messages`).
    unsynced: u64,
    /// A failed write could not be cut back: the log may end with bytes
    /// past `synced_len`, so nothing is appended until a cut succeeds.
    needs_cut: bool,
    /// The last write to the log failed (cleared by a good sync, or by a
    /// [`Spool::retry`] whose probe write succeeds).
    failing: bool,
    /// Offset of the first unconfirmed record.
    head: u64,
    /// Records confirmed since the head was last saved.
    unsaved_head: u64,
    /// Records between `head` and `len`.
    messages: u64,
    /// Most bytes of unconfirmed records (and reserved room) the log may
    /// hold: `queue.spool_max_bytes`.
    max_bytes: u64,
    /// Most bytes the log file may hold, confirmed records included:
    /// [`FILE_BOUND`] times `max_bytes`.
    max_file_bytes: u64,
    /// Room held for copies published straight to the broker and not yet
    /// confirmed: if the link drops, they are spooled into it, so that can
    /// never be refused (see [`Spool::reserve`]).
    reserved: u64,
    /// Whether the last append was refused for lack of room (cleared by a
    /// successful append, or when a confirm frees room).
    refused: bool,
}

impl Spool {
    /// Open (or create) the spool in `dir`, lock it, and check the records
    /// after the head.
    ///
    /// # Errors
    /// [`SpoolError::Locked`] when another process uses `dir`;
    /// [`SpoolError::Io`] when it cannot be created or read.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        Self::open_with(dir, max_bytes, |file| Box::new(file))
    }

    /// [`Spool::open`], writing the log through what `log` makes of the
    /// file.
    pub(super) fn open_with(
        dir: &Path,
        max_bytes: u64,
        log: impl FnOnce(File) -> Box<dyn LogFile>,
    ) -> Result<Self, SpoolError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io { path, source }
        };
        // Created 0700 when missing, and made so again when it is ours
        // but found wider. One another user owns (a volume's mount root,
        // root:<fsGroup> 2775) or that others may write to is refused, never
        // chmod'ed: it is not ours to change, and others may have planted
        // records in it that would be replayed into the queue.
        private_dir::prepare(SPOOL_DIR_KEY, dir).map_err(SpoolError::Dir)?;
        let lock_path = dir.join("lock");
        let lock = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.into())),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(SpoolError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        make_private(&lock, FILE_MODE).map_err(io(&lock_path))?;
        let log_path = dir.join("spool.log");
        let file = private_file()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        make_private(&file, FILE_MODE).map_err(io(&log_path))?;
        // The log may have just been created: without this its name could
        // vanish in a power loss, taking fsync'ed records with it.
        sync_dir(dir).map_err(io(dir))?;
        let reader = File::open(&log_path).map_err(io(&log_path))?;
        let len = file.metadata().map_err(io(&log_path))?.len();
        let mut spool = Self {
            dir: dir.to_path_buf(),
            log: log(file),
            pending: Vec::new(),
            reader,
            _lock: lock,
            len,
            synced_len: len,
            unsynced: 0,
            needs_cut: false,
            failing: false,
            head: 0,
            unsaved_head: 0,
            messages: 0,
            max_bytes,
            max_file_bytes: max_bytes.saturating_mul(FILE_BOUND),
            reserved: 0,
            refused: false,
        };
        let saved = spool.read_head();
        spool.head = if saved > len {
            // The head is made 0 on disk before the log is cut, so a head
            // past the end means the two disagree: replaying from the start
            // publishes confirmed records again (consumers drop them by
            // message_id), while trusting the head could skip records that
            // clients were told are stored.
            tracing::warn!(
                spool = %dir.display(),
                head = saved,
                log_bytes = len,
                "the spool's saved head is past the end of its log; replaying the whole log"
            );
            0
        } else {
            saved
        };
        spool.recover()?;
        if spool.messages == 0 && spool.len > 0 {
            // Every record was confirmed but the log was not truncated (a
            // crash in between): start empty, so its bytes do not count
            // against the limit while nothing waits.
            spool.head = spool.len;
            spool.empty_if_done()?;
        }
        Ok(spool)
    }

    /// Records waiting to be replayed.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Bytes the log file holds (confirmed records are counted until the
    /// log is truncated).
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Bytes of the records not confirmed yet: what counts against
    /// `queue.spool_max_bytes`.
    pub fn waiting_bytes(&self) -> u64 {
        // head <= synced_len <= len; saturating, should that ever not hold.
        self.len.saturating_sub(self.head)
    }

    /// Whether `bytes` more fit: the unconfirmed records and the reserved
    /// room stay within `queue.spool_max_bytes`, and the file within its
    /// bound.
    fn fits(&self, bytes: u64) -> bool {
        self.waiting_bytes() + self.reserved + bytes <= self.max_bytes
            && self.len + self.reserved + bytes <= self.max_file_bytes
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Whether the spool takes copies: it is under its limits (counting
    /// reserved room), did not just refuse one, and its last write did not
    /// fail.
    pub fn has_room(&self) -> bool {
        self.fits(1) && !self.refused && !self.failing
    }

    /// Hold `bytes` of room (a [`record_bound`]) for a copy that is being
    /// published straight to the broker, so that it can be spooled if the
    /// link drops before its confirm. Returns false, holding nothing, when
    /// the room is not there.
    pub fn reserve(&mut self, bytes: u64) -> bool {
        // Both limits: the copy must fit when it is spooled into this room.
        if !self.fits(bytes) {
            return false;
        }
        self.reserved += bytes;
        true
    }

    /// Give back room held by [`Spool::reserve`]: the copy was confirmed, or
    /// is about to be appended.
    pub fn release(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
    }

    /// Offset of the first unconfirmed record.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// End of the stored log (as of the last good [`Spool::sync`]).
    pub fn end(&self) -> u64 {
        self.synced_len
    }

    /// Append a record to the current batch; [`Spool::sync`] stores the
    /// batch, and only then may its clients be told.
    ///
    /// # Errors
    /// [`SpoolError::Full`] when it does not fit (nothing else changes);
    /// [`SpoolError::Io`] when the disk refuses: the whole batch, this
    /// record and those appended before it since the last sync, is then
    /// dropped, and none of them is stored.
    pub fn append(&mut self, message: &QueueMessage) -> Result<(), SpoolError> {
        let body = message
            .encode()
            .map_err(|e| self.io_error(io::Error::other(e)))?;
        let record_len = HEADER + body.len() as u64;
        if !self.fits(record_len) {
            self.refused = true;
            return Err(SpoolError::Full {
                max_bytes: self.max_bytes,
            });
        }
        self.cut_if_needed()?;
        // The record goes in whole (header and body) or not at all.
        self.pending.reserve(record_len as usize);
        self.pending
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        self.pending.extend_from_slice(&body);
        self.len += record_len;
        self.messages += 1;
        self.unsynced += 1;
        self.refused = false;
        if self.pending.len() >= WRITE_CHUNK {
            let written = self.log.append(&self.pending);
            self.pending.clear();
            if let Err(e) = written {
                return Err(self.roll_back(e));
            }
        }
        Ok(())
    }

    /// Write the batch and fsync it: after this returns its records
    /// survive a crash.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the disk refuses: the batch is dropped (the
    /// log is cut back to its last good length) and none of its records is
    /// stored.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced == 0 {
            return Ok(());
        }
        let written = if self.pending.is_empty() {
            Ok(())
        } else {
            self.log.append(&self.pending)
        };
        self.pending.clear();
        match written.and_then(|()| self.log.sync()) {
            Ok(()) => {
                self.synced_len = self.len;
                self.unsynced = 0;
                self.failing = false;
                Ok(())
            }
            Err(e) => Err(self.roll_back(e)),
        }
    }

    /// Drop the records appended since the last sync: none of them will be
    /// stored.
    pub fn drop_batch(&mut self) {
        if self.unsynced > 0 {
            self.cut_back();
        }
    }

    /// A write or fsync failed: drop the batch (see [`Spool::cut_back`]).
    fn roll_back(&mut self, cause: io::Error) -> SpoolError {
        self.failing = true;
        self.cut_back();
        self.io_error(cause)
    }

    /// Forget the batch and cut the log back to its last good length, so
    /// that no partial record shifts the framing of the next ones and no
    /// dropped record is ever replayed (after a failed fsync, even bytes
    /// that were written are not trusted).
    fn cut_back(&mut self) {
        self.pending.clear();
        self.messages -= self.unsynced;
        self.unsynced = 0;
        self.len = self.synced_len;
        self.needs_cut = true;
        if let Err(e) = self.cut_if_needed() {
            tracing::error!("{e}; nothing more is appended until it can be cut");
        }
    }

    /// Cut off what a failed write left past the last good length.
    fn cut_if_needed(&mut self) -> Result<(), SpoolError> {
        if self.needs_cut {
            self.log.truncate(self.synced_len).map_err(|e| {
                self.io_error(io::Error::new(
                    e.kind(),
                    format!("cutting back a failed write: {e}"),
                ))
            })?;
            self.needs_cut = false;
        }
        Ok(())
    }

    /// After a failed write: try the cut again, and learn from a probe
    /// write whether the disk takes writes again. Returns whether the
    /// spool may be written. Until then [`Spool::has_room`] stays false (so
    /// does readiness), also when no copy comes to try the disk.
    pub fn retry(&mut self) -> bool {
        if self.cut_if_needed().is_err() {
            return false;
        }
        if self.failing {
            // Without a real write, a disk still full would be reported
            // writable and refuse the next batch again.
            if let Err(e) = self.log.probe(&self.dir.join("spool.probe")) {
                tracing::debug!("the spool's disk still refuses writes: {e}");
                return false;
            }
            self.failing = false;
        }
        true
    }

    /// Read the record at `offset`; returns it and the next offset, or
    /// `None` at the end of the log.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the record cannot be read or is corrupt.
    pub fn read_at(&mut self, offset: u64) -> Result<Option<(QueueMessage, u64)>, SpoolError> {
        // Only synced records: those of a batch not yet stored may still
        // be refused.
        if offset >= self.synced_len {
            return Ok(None);
        }
        match read_record(&mut self.reader, offset) {
            Ok(Some((body, next))) => match QueueMessage::decode(&body) {
                Ok(message) => Ok(Some((message, next))),
                Err(e) => Err(self.io_error(io::Error::new(io::ErrorKind::InvalidData, e))),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Mark everything before `offset` as confirmed by the broker. When
    /// nothing is left, the log is truncated.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the head or the log cannot be written. The
    /// records are still marked confirmed; a log that could not be emptied
    /// keeps its confirmed records, new ones are appended after them, and
    /// [`Spool::empty_if_done`] tries again.
    pub fn confirm_until(&mut self, offset: u64, records: u64) -> Result<(), SpoolError> {
        let head = offset.min(self.synced_len);
        if head > self.head {
            // Confirmed records no longer count against the limit: a copy
            // refused a moment ago may fit now.
            self.refused = false;
        }
        self.head = head;
        self.messages = self.messages.saturating_sub(records);
        self.unsaved_head += records;
        if self.head == self.len {
            return self.empty_if_done();
        }
        if self.unsaved_head >= HEAD_SAVE_EVERY {
            return self.write_head(self.head);
        }
        Ok(())
    }

    /// When every record is confirmed, truncate the log to zero, so its
    /// bytes no longer take room. Nothing to do otherwise, or when the log
    /// is already empty.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the head or the log cannot be written; the
    /// log is then left as it is, and new records go after its end.
    pub fn empty_if_done(&mut self) -> Result<(), SpoolError> {
        if self.head != self.len || self.len == 0 {
            return Ok(());
        }
        // The head is 0 on disk before the log is cut. Cut first, a head
        // that then failed to save would stay on disk pointing past the new
        // records appended from offset 0, and after a crash they would be
        // skipped although their clients were told they are stored. This
        // way a crash between the two only replays confirmed records again
        // (consumers drop them by message_id). If the head cannot be saved
        // the log is not cut: new records are appended after the confirmed
        // ones, where the head on disk, however old, still finds them.
        self.write_head(0)?;
        // Durable (the cut is fsync'ed): otherwise confirmed records could
        // come back after a power loss.
        if let Err(e) = self.log.truncate(0) {
            // The head on disk (0) is behind the one here: save it again
            // on the way out.
            self.unsaved_head = self.unsaved_head.max(1);
            return Err(self.io_error(e));
        }
        self.len = 0;
        self.synced_len = 0;
        self.head = 0;
        self.messages = 0;
        self.needs_cut = false;
        self.refused = false;
        Ok(())
    }

    fn read_head(&self) -> u64 {
        let mut bytes = [0u8; 8];
        match File::open(self.dir.join("spool.head")).and_then(|mut f| f.read_exact(&mut bytes)) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => 0,
        }
    }

    /// Save `head` as the head: write a temporary file, fsync it, rename
    /// it over `spool.head`, fsync the directory.
    fn write_head(&mut self, head: u64) -> Result<(), SpoolError> {
        let tmp = self.dir.join("spool.head.tmp");
        let path = self.dir.join("spool.head");
        let write = || {
            let mut file = private_file()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all(&head.to_le_bytes())?;
            // Before the rename: a renamed file whose bytes did not reach
            // the disk could read as a head in the middle of a record, and
            // everything from there would be moved aside as corrupt.
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself: the head must be 0 on disk before the log
            // is cut (see empty_if_done).
            sync_dir(&self.dir)
        };
        write().map_err(|source| SpoolError::Io { path, source })?;
        self.unsaved_head = 0;
        Ok(())
    }

    /// Count the records after the head; cut a torn tail; move a corrupt
    /// remainder aside.
    fn recover(&mut self) -> Result<(), SpoolError> {
        let mut offset = self.head;
        let mut messages = 0;
        let bad = loop {
            if offset >= self.len {
                break None;
            }
            match read_record(&mut self.reader, offset) {
                Ok(Some((body, next))) if QueueMessage::decode(&body).is_ok() => {
                    offset = next;
                    messages += 1;
                }
                Ok(Some(_)) => break Some("a record that does not decode"),
                Ok(None) => break Some("a torn record at the end"),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    break Some("a torn record at the end");
                }
                Err(_) => break Some("a corrupt record"),
            }
        };
        self.messages = messages;
        if let Some(what) = bad {
            let cut = self.len - offset;
            let (aside, file) = self.create_aside()?;
            let keep = |mut file: File| {
                // Streamed, never read into memory: the remainder can be
                // most of a large spool, and a gateway under a memory
                // limit would be killed on every start.
                let mut reader = &self.reader;
                reader.seek(SeekFrom::Start(offset))?;
                let copied = io::copy(&mut reader.take(cut), &mut file)?;
                if copied != cut {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("copied {copied} of {cut} bytes"),
                    ));
                }
                // The bytes moved aside are durable before they are cut
                // from the log, so a power loss in between loses nothing.
                file.sync_all()?;
                sync_dir(&self.dir)
            };
            if let Err(source) = keep(file) {
                // The log keeps every byte; a partial copy would mislead.
                let _ = std::fs::remove_file(&aside);
                return Err(SpoolError::Io {
                    path: aside,
                    source,
                });
            }
            self.log.truncate(offset).map_err(|e| self.io_error(e))?;
            self.len = offset;
            self.synced_len = offset;
            tracing::error!(
                spool = %self.dir.display(),
                offset,
                bytes = cut,
                kept_in = %aside.display(),
                "the spool holds {what}; {messages} good records before it will be replayed, \
                 the remaining bytes were moved aside for inspection"
            );
        }
        if self.messages > 0 {
            tracing::info!(
                spool = %self.dir.display(),
                messages = self.messages,
                "the spool holds copies from an earlier run; they will be replayed when the broker is reachable"
            );
        }
        Ok(())
    }

    /// Create the file a corrupt remainder is moved into:
    /// `spool.corrupt.<seconds>`, or with a counter after it when that name
    /// is taken (two recoveries in one second). Created new, so bytes moved
    /// aside before are never overwritten.
    fn create_aside(&self) -> Result<(PathBuf, File), SpoolError> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut n = 0u32;
        loop {
            let name = match n {
                0 => format!("spool.corrupt.{secs}"),
                n => format!("spool.corrupt.{secs}.{n}"),
            };
            let path = self.dir.join(name);
            match private_file().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                // Bounded, in case something other than an existing file
                // makes every name look taken.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(source) => return Err(SpoolError::Io { path, source }),
            }
        }
    }

    fn io_error(&self, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.dir.join("spool.log"),
            source,
        }
    }
}

impl Drop for Spool {
    /// Save the head on the way out, so confirmed records are not
    /// replayed again after a clean stop.
    fn drop(&mut self) {
        if self.unsaved_head > 0
            && let Err(e) = self.write_head(self.head)
        {
            tracing::warn!("{e}; some confirmed copies may be published again after restart");
        }
    }
}

/// The most bytes `message` can take in the log, without encoding it: a
/// header, and per field its bytes and a length of at most 10 bytes (a
/// postcard varint of a `u64`).
pub fn record_bound(message: &QueueMessage) -> u64 {
    // Named field by field so that a new field cannot be forgotten here.
    let QueueMessage {
        message_id,
        timestamp: _,
        text: _,
        body,
        connection_id,
        route,
        function,
        function_version,
        node,
        routing_key,
    } = message;
    const VARINT: u64 = 10;
    // The version byte, the timestamp (a varint), the text flag and the
    // routing key's tag (one byte each).
    let fixed = 1 + VARINT + 1 + 1;
    let variable = [
        message_id.len(),
        body.len(),
        connection_id.len(),
        route.len(),
        function.len(),
        function_version.len(),
        node.len(),
        routing_key.as_ref().map_or(0, String::len),
    ]
    .iter()
    .map(|len| VARINT + *len as u64)
    .sum::<u64>();
    HEADER + fixed + variable
}

/// Read one record's body at `offset`. `Ok(None)` when the header or body
/// runs past the end of the file (a torn write); an error when the length
/// is absurd or the CRC does not match.
fn read_record(file: &mut File, offset: u64) -> io::Result<Option<(Vec<u8>, u64)>> {
    let file_len = file.metadata()?.len();
    if offset + HEADER > file_len {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut header = [0u8; HEADER as usize];
    file.read_exact(&mut header)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record length out of range",
        ));
    }
    let next = offset + HEADER + u64::from(len);
    if next > file_len {
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact(&mut body)?;
    if crc32fast::hash(&body) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record checksum mismatch",
        ));
    }
    Ok(Some((body, next)))
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;

    /// A disk with little room: a write that does not fit writes what fits
    /// and fails, as on a full filesystem, and a cut frees room. Clones
    /// share the disk, so a test can free room while a spool uses it.
    #[derive(Clone, Default)]
    pub struct SmallDisk {
        /// Bytes that can still be written.
        free: Arc<AtomicU64>,
        /// Whether fsync fails.
        fail_syncs: Arc<AtomicBool>,
    }

    impl SmallDisk {
        /// A disk with `free` bytes left.
        pub fn new(free: u64) -> Self {
            let disk = Self::default();
            disk.set_free(free);
            disk
        }

        /// Make `free` bytes available.
        pub fn set_free(&self, free: u64) {
            self.free.store(free, Ordering::SeqCst);
        }

        /// Make fsync fail, or work again.
        pub fn fail_syncs(&self, fail: bool) {
            self.fail_syncs.store(fail, Ordering::SeqCst);
        }

        /// The log `file`, written through this disk.
        pub fn wrap(&self, file: File) -> SmallDiskLog {
            SmallDiskLog {
                file,
                disk: self.clone(),
            }
        }
    }

    /// A log file on a [`SmallDisk`].
    pub struct SmallDiskLog {
        file: File,
        disk: SmallDisk,
    }

    impl LogFile for SmallDiskLog {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            let fits = bytes
                .len()
                .min(self.disk.free.load(Ordering::SeqCst) as usize);
            self.file.write_all(&bytes[..fits])?;
            self.disk.free.fetch_sub(fits as u64, Ordering::SeqCst);
            if fits < bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (small test disk)",
                ));
            }
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            if self.disk.fail_syncs.load(Ordering::SeqCst) {
                return Err(io::Error::other("fsync failed (small test disk)"));
            }
            self.file.sync_data()
        }

        fn probe(&mut self, path: &Path) -> io::Result<()> {
            if self.disk.free.load(Ordering::SeqCst) < PROBE_BYTES as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (small test disk)",
                ));
            }
            if self.disk.fail_syncs.load(Ordering::SeqCst) {
                return Err(io::Error::other("fsync failed (small test disk)"));
            }
            write_probe(path)
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let before = self.file.metadata()?.len();
            self.file.set_len(len)?;
            self.disk
                .free
                .fetch_add(before.saturating_sub(len), Ordering::SeqCst);
            self.file.sync_all()
        }
    }

    fn message(n: u32) -> QueueMessage {
        QueueMessage::new(
            n.is_multiple_of(2),
            format!("message {n}").into_bytes(),
            "node.conn",
            "/",
            "echo",
            "v1",
            "node",
        )
    }

    /// Open a spool with `open`, again while it is `Locked`, for a while: a
    /// spool just closed may still be locked by a process another test
    /// spawns (`mount`, `umount`), which holds a copy of every descriptor
    /// from its fork until its exec.
    pub fn unlocked(mut open: impl FnMut() -> Result<Spool, SpoolError>) -> Spool {
        let start = std::time::Instant::now();
        loop {
            match open() {
                Err(SpoolError::Locked(_))
                    if start.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                opened => return opened.unwrap(),
            }
        }
    }

    /// [`Spool::open`], through [`unlocked`].
    fn open_spool(dir: &Path, max_bytes: u64) -> Spool {
        unlocked(|| Spool::open(dir, max_bytes))
    }

    /// A spool directory holding `count` synced records.
    fn spooled(count: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open_spool(dir.path(), 1 << 20);
        for n in 0..count {
            spool.append(&message(n)).unwrap();
        }
        spool.sync().unwrap();
        dir
    }

    fn replay(spool: &mut Spool) -> Vec<QueueMessage> {
        let mut offset = spool.head();
        let mut out = Vec::new();
        while let Some((message, next)) = spool.read_at(offset).unwrap() {
            out.push(message);
            offset = next;
        }
        out
    }

    #[test]
    fn records_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sent: Vec<_> = (0..100).map(message).collect();
        {
            let mut spool = open_spool(dir.path(), 1 << 20);
            for m in &sent {
                spool.append(m).unwrap();
            }
            spool.sync().unwrap();
        }
        let mut spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.messages(), 100);
        assert_eq!(replay(&mut spool), sent);
    }

    #[test]
    fn confirmed_records_are_not_replayed_and_a_drained_log_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open_spool(dir.path(), 1 << 20);
        for n in 0..10 {
            spool.append(&message(n)).unwrap();
        }
        spool.sync().unwrap();
        let (_, after_first) = spool.read_at(0).unwrap().unwrap();
        let (_, after_second) = spool.read_at(after_first).unwrap().unwrap();
        spool.confirm_until(after_second, 2).unwrap();
        drop(spool);
        let mut spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.messages(), 8);
        let rest = replay(&mut spool);
        assert_eq!(rest.first().unwrap().body, b"message 2");
        let end = spool.end();
        spool.confirm_until(end, 8).unwrap();
        assert!(spool.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("spool.log"))
                .unwrap()
                .len(),
            0
        );
    }

    /// A log that notes the head saved on disk each time it is emptied.
    struct HeadAtCut {
        file: File,
        head: PathBuf,
        seen: Arc<std::sync::Mutex<Vec<u64>>>,
    }

    impl LogFile for HeadAtCut {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.file.append(bytes)
        }

        fn sync(&mut self) -> io::Result<()> {
            LogFile::sync(&mut self.file)
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            if len == 0 {
                let bytes = std::fs::read(&self.head)?;
                let head = bytes.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
                self.seen.lock().unwrap().push(head);
            }
            LogFile::truncate(&mut self.file, len)
        }
    }

    /// A spool at `dir` whose head was saved after its first two records.
    fn confirmed_two(dir: &Path) -> u64 {
        let mut spool = open_spool(dir, 1 << 20);
        let (_, first) = spool.read_at(0).unwrap().unwrap();
        let (_, second) = spool.read_at(first).unwrap().unwrap();
        spool.confirm_until(second, 2).unwrap();
        // Dropping saves the head.
        drop(spool);
        second
    }

    #[test]
    fn the_head_is_zero_on_disk_before_the_log_is_emptied() {
        let dir = spooled(5);
        confirmed_two(dir.path());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let head = dir.path().join("spool.head");
        let watch = seen.clone();
        let mut spool = unlocked(|| {
            Spool::open_with(dir.path(), 1 << 20, |file| {
                Box::new(HeadAtCut {
                    file,
                    head: head.clone(),
                    seen: watch.clone(),
                })
            })
        });
        let end = spool.end();
        spool.confirm_until(end, 3).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [0],
            "the head on disk when the log was cut"
        );
    }

    #[test]
    fn a_head_that_cannot_be_saved_when_the_spool_empties_loses_no_record() {
        let dir = spooled(5);
        let second = confirmed_two(dir.path());
        let mut spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.head(), second);
        // Something in the way of every save of the head.
        let obstacle = dir.path().join("spool.head.tmp");
        std::fs::create_dir(&obstacle).unwrap();
        let end = spool.end();
        let error = spool.confirm_until(end, 3).unwrap_err();
        assert!(error.to_string().contains("spool.head"), "{error}");
        assert!(spool.is_empty());
        // New copies are stored, and told so.
        spool.append(&message(5)).unwrap();
        spool.sync().unwrap();
        // Gone without saving the head, as in a crash.
        drop(spool);
        std::fs::remove_dir(&obstacle).unwrap();
        // The confirmed records after the old head are published again
        // (with their message_id); the new one is not lost.
        let (replayed, moved_aside) = reopened(dir.path());
        assert_eq!(replayed, bodies(2..6));
        assert!(!moved_aside);
    }

    #[test]
    fn a_log_left_full_of_confirmed_records_is_emptied_once_the_head_can_be_saved() {
        let dir = spooled(3);
        let mut spool = open_spool(dir.path(), 1 << 20);
        let obstacle = dir.path().join("spool.head.tmp");
        std::fs::create_dir(&obstacle).unwrap();
        let end = spool.end();
        assert!(spool.confirm_until(end, 3).is_err());
        assert_eq!(spool.bytes(), end);
        std::fs::remove_dir(&obstacle).unwrap();
        spool.empty_if_done().unwrap();
        assert_eq!(spool.bytes(), 0);
        spool.append(&message(7)).unwrap();
        spool.sync().unwrap();
        drop(spool);
        assert_eq!(reopened(dir.path()).0, bodies(7..8));
    }

    #[test]
    fn a_saved_head_past_the_end_of_the_log_replays_the_whole_log() {
        let dir = spooled(3);
        std::fs::write(dir.path().join("spool.head"), 1_000_000u64.to_le_bytes()).unwrap();
        let (replayed, moved_aside) = reopened(dir.path());
        assert_eq!(replayed, bodies(0..3));
        assert!(!moved_aside);
    }

    #[test]
    fn a_full_spool_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open_spool(dir.path(), 1 << 20);
        let big = QueueMessage {
            body: vec![7; 300 << 10],
            ..message(0)
        };
        for _ in 0..3 {
            spool.append(&big).unwrap();
        }
        assert!(spool.has_room());
        assert!(matches!(spool.append(&big), Err(SpoolError::Full { .. })));
        assert_eq!(spool.messages(), 3);
        assert!(!spool.has_room());
    }

    #[test]
    fn only_unconfirmed_records_count_and_the_file_stays_within_twice_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        // Every record of a 1000-byte body has the same size.
        let copy = |n: u32| QueueMessage {
            body: vec![7; 1000],
            ..message(n)
        };
        let record = {
            let scratch = tempfile::tempdir().unwrap();
            let mut spool = open_spool(scratch.path(), 1 << 20);
            spool.append(&copy(0)).unwrap();
            spool.bytes()
        };
        // Room for three records waiting; the file may hold six.
        let mut spool = open_spool(dir.path(), 3 * record + 10);
        let mut next = 0;
        let mut append = |spool: &mut Spool| {
            let appended = spool.append(&copy(next));
            next += 1;
            spool.sync().unwrap();
            appended
        };
        for _ in 0..3 {
            append(&mut spool).unwrap();
        }
        assert!(matches!(append(&mut spool), Err(SpoolError::Full { .. })));
        assert!(!spool.has_room());
        // Two confirmed: room for two more, while the replay goes on.
        spool.confirm_until(2 * record, 2).unwrap();
        assert!(spool.has_room(), "confirms freed room");
        append(&mut spool).unwrap();
        append(&mut spool).unwrap();
        assert!(matches!(append(&mut spool), Err(SpoolError::Full { .. })));
        // Two more confirmed: two records wait, five are in the file; one
        // more makes six, the file's bound.
        spool.confirm_until(4 * record, 2).unwrap();
        assert_eq!(spool.waiting_bytes(), record);
        append(&mut spool).unwrap();
        assert_eq!(spool.bytes(), 6 * record);
        // Two records wait, room for a third, but the file is at its bound.
        let refused = append(&mut spool);
        assert!(
            matches!(refused, Err(SpoolError::Full { .. })),
            "{refused:?}"
        );
        assert_eq!(spool.waiting_bytes(), 2 * record);
        assert!(!spool.has_room());
        // Reserved room must fit in the file too.
        assert!(!spool.reserve(record));
        // Once all is confirmed the log is emptied, and takes copies again.
        let end = spool.end();
        spool.confirm_until(end, 2).unwrap();
        assert_eq!(spool.bytes(), 0);
        append(&mut spool).unwrap();
        assert!(spool.has_room());
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_good_records_are_kept() {
        let dir = spooled(5);
        let log = dir.path().join("spool.log");
        let len = std::fs::metadata(&log).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.messages(), 4);
        assert_eq!(replay(&mut spool).len(), 4);
    }

    #[test]
    fn a_corrupt_record_is_moved_aside_not_dropped() {
        let dir = spooled(5);
        let log = dir.path().join("spool.log");
        let mut bytes = std::fs::read(&log).unwrap();
        // Every test record has the same size.
        let second = open_spool(spooled(1).path(), 1 << 20).end();
        // Flip a byte in the body of the third record.
        let third = (second * 2) as usize;
        bytes[third + HEADER as usize + 2] ^= 0xff;
        std::fs::write(&log, &bytes).unwrap();
        let mut spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.messages(), 2);
        assert_eq!(replay(&mut spool).len(), 2);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("spool.corrupt.")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::metadata(aside[0].path()).unwrap().len(),
            bytes.len() as u64 - second * 2
        );
        assert_eq!(mode(&aside[0].path()), "600");
    }

    /// The `spool.corrupt.*` files in `dir`, and what each holds.
    fn moved_aside(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("spool.corrupt.")
            })
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_corrupt_remainder_never_overwrites_bytes_moved_aside_before() {
        let dir = spooled(6);
        let log = dir.path().join("spool.log");
        // Every test record has the same size.
        let record = open_spool(spooled(1).path(), 1 << 20).end() as usize;
        // Bytes moved aside by an earlier recovery in this second (or the
        // next, should the clock tick during the test).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut expected = std::collections::BTreeMap::new();
        for secs in [now, now + 1] {
            let name = format!("spool.corrupt.{secs}");
            std::fs::write(dir.path().join(&name), b"moved aside earlier").unwrap();
            expected.insert(name, b"moved aside earlier".to_vec());
        }
        let mut kept = Vec::new();
        // Two recoveries in a row: the fifth record, then the third.
        for bad in [4, 2] {
            let mut bytes = std::fs::read(&log).unwrap();
            kept.push(bytes[bad * record..].to_vec());
            bytes[bad * record + HEADER as usize + 2] ^= 0xff;
            std::fs::write(&log, &bytes).unwrap();
            let (replayed, _) = reopened(dir.path());
            assert_eq!(replayed, bodies(0..bad as u32));
        }
        let aside = moved_aside(dir.path());
        assert_eq!(aside.len(), 4, "{:?}", aside.keys());
        for (name, bytes) in &expected {
            assert_eq!(&aside[name], bytes, "{name} was overwritten");
        }
        // Each new one holds the bytes cut at its recovery: the corrupt
        // record (compared by length, it was flipped) and all after it.
        let shape = |bytes: &[u8]| (bytes.len(), bytes[record..].to_vec());
        let mut new: Vec<_> = aside
            .iter()
            .filter(|(name, _)| !expected.contains_key(*name))
            .map(|(_, bytes)| shape(bytes))
            .collect();
        let mut want: Vec<_> = kept.iter().map(|bytes| shape(bytes)).collect();
        new.sort();
        want.sort();
        assert_eq!(new, want);
    }

    /// The permission bits of `path` (setgid included), in octal.
    fn mode(path: &Path) -> String {
        format!(
            "{:o}",
            std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
        )
    }

    #[test]
    fn the_spool_directory_and_its_files_are_private_to_the_gateway_user() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("spool");
        let mut spool = open_spool(&dir, 1 << 20);
        spool.append(&message(0)).unwrap();
        spool.sync().unwrap();
        // Emptying the log saves the head.
        let end = spool.end();
        spool.confirm_until(end, 1).unwrap();
        spool.append(&message(1)).unwrap();
        spool.sync().unwrap();
        drop(spool);
        assert_eq!(mode(&dir), "700");
        for file in ["lock", "spool.log", "spool.head"] {
            assert_eq!(mode(&dir.join(file)), "600", "{file}");
        }
    }

    #[test]
    fn a_spool_left_readable_by_others_is_made_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        for file in ["lock", "spool.log"] {
            std::fs::write(dir.join(file), b"").unwrap();
            std::fs::set_permissions(dir.join(file), Permissions::from_mode(0o644)).unwrap();
        }
        drop(open_spool(&dir, 1 << 20));
        assert_eq!(mode(&dir), "700");
        for file in ["lock", "spool.log"] {
            assert_eq!(mode(&dir.join(file)), "600", "{file}");
        }
    }

    #[test]
    fn a_spool_directory_of_another_user_is_refused_and_left_as_it_is() {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: giving a directory to another user needs root");
            return;
        }
        // A volume's mount root with an fsGroup: another owner, 2775.
        let parent = tempfile::tempdir().unwrap();
        let volume = parent.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::os::unix::fs::chown(&volume, Some(65534), Some(65532)).unwrap();
        std::fs::set_permissions(&volume, Permissions::from_mode(0o2775)).unwrap();
        let error = Spool::open(&volume, 1 << 20).err().unwrap();
        let message = error.to_string();
        assert!(matches!(error, SpoolError::Dir(_)), "{message}");
        for part in [
            "queue.spool_dir",
            "subdirectory",
            "<server.state_dir>/spool",
        ] {
            assert!(message.contains(part), "{message}");
        }
        assert_eq!(
            mode(&volume),
            "2775",
            "chmod'ed a directory of another user"
        );
        assert!(!volume.join("lock").exists());
        // A subdirectory, which the gateway creates, is its own.
        let dir = volume.join("spool");
        drop(open_spool(&dir, 1 << 20));
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&dir).unwrap()),
            rustix::process::geteuid().as_raw()
        );
        assert_eq!(mode(&dir), "2700", "private, with the volume's setgid bit");
    }

    #[test]
    fn a_spool_directory_others_may_write_to_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        let error = Spool::open(&dir, 1 << 20).err().unwrap();
        let message = error.to_string();
        assert!(matches!(error, SpoolError::Dir(_)), "{message}");
        assert!(message.contains("queue.spool_dir"), "{message}");
        assert!(message.contains("subdirectory"), "{message}");
        assert_eq!(mode(&dir), "777");
    }

    #[test]
    fn the_head_is_saved_in_batches_during_a_replay_and_when_the_spool_closes() {
        let dir = spooled(2 * HEAD_SAVE_EVERY as u32);
        let saved = || {
            let bytes = std::fs::read(dir.path().join("spool.head")).unwrap_or_default();
            bytes.try_into().map(u64::from_le_bytes).unwrap_or(0)
        };
        let mut spool = open_spool(dir.path(), 1 << 20);
        let mut offset = spool.head();
        let mut offsets = Vec::new();
        while let Some((_, next)) = spool.read_at(offset).unwrap() {
            offsets.push(next);
            offset = next;
        }
        for (n, &next) in offsets
            .iter()
            .take(HEAD_SAVE_EVERY as usize + 1)
            .enumerate()
        {
            spool.confirm_until(next, 1).unwrap();
            if n + 1 < HEAD_SAVE_EVERY as usize {
                assert_eq!(saved(), 0, "saved after {} records", n + 1);
            }
        }
        assert_eq!(saved(), offsets[HEAD_SAVE_EVERY as usize - 1]);
        drop(spool);
        assert_eq!(saved(), offsets[HEAD_SAVE_EVERY as usize]);
        let spool = open_spool(dir.path(), 1 << 20);
        assert_eq!(spool.messages(), HEAD_SAVE_EVERY - 1);
    }

    #[test]
    fn record_bound_is_never_below_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open_spool(dir.path(), 64 << 20);
        for size in [0, 1, 127, 128, 300, 16_384, 1 << 20] {
            let copy = QueueMessage {
                body: vec![1; size],
                ..message(0)
            };
            let before = spool.bytes();
            spool.append(&copy).unwrap();
            let actual = spool.bytes() - before;
            let bound = record_bound(&copy);
            assert!(bound >= actual, "{bound} < {actual} for {size} bytes");
            assert!(bound - actual <= 80, "{bound} is far above {actual}");
        }
    }

    #[test]
    fn reserved_room_is_kept_for_the_copies_it_was_reserved_for() {
        let dir = tempfile::tempdir().unwrap();
        let copy = QueueMessage {
            body: vec![7; 1000],
            ..message(0)
        };
        let bound = record_bound(&copy);
        let mut spool = open_spool(dir.path(), 3 * bound);
        assert!(spool.reserve(bound) && spool.reserve(bound));
        spool.append(&copy).unwrap();
        // The third slot is taken: no more room to reserve or append.
        assert!(!spool.reserve(bound));
        assert!(matches!(spool.append(&copy), Err(SpoolError::Full { .. })));
        assert!(!spool.has_room());
        // The reserved copies fit once their room is released.
        spool.release(2 * bound);
        spool.append(&copy).unwrap();
        spool.append(&copy).unwrap();
        assert_eq!(spool.messages(), 3);
    }

    /// The bodies of the records a fresh [`Spool::open`] of `dir` replays,
    /// and whether it found anything to move aside.
    fn reopened(dir: &Path) -> (Vec<String>, bool) {
        let mut spool = open_spool(dir, 64 << 20);
        let bodies = replay(&mut spool)
            .into_iter()
            .map(|m| String::from_utf8(m.body).unwrap())
            .collect();
        let moved_aside = std::fs::read_dir(dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("spool.corrupt.")
        });
        (bodies, moved_aside)
    }

    fn bodies(range: impl Iterator<Item = u32>) -> Vec<String> {
        range.map(|n| format!("message {n}")).collect()
    }

    #[test]
    fn a_full_disk_refuses_whole_batches_and_keeps_the_framing() {
        let dir = tempfile::tempdir().unwrap();
        // Every record of messages 10 to 99 has the same size.
        let record = {
            let scratch = tempfile::tempdir().unwrap();
            let mut spool = open_spool(scratch.path(), 1 << 20);
            spool.append(&message(10)).unwrap();
            spool.bytes()
        };
        let disk = SmallDisk::new(3 * record + record / 2);
        let mut spool =
            Spool::open_with(dir.path(), 1 << 20, |file| Box::new(disk.wrap(file))).unwrap();
        for n in 10..13 {
            spool.append(&message(n)).unwrap();
            spool.sync().unwrap();
        }
        // Half of the next record fits: the write fails part way.
        spool.append(&message(13)).unwrap();
        assert!(matches!(spool.sync(), Err(SpoolError::Io { .. })));
        assert_eq!(spool.messages(), 3);
        assert_eq!(spool.end(), 3 * record);
        assert_eq!(
            std::fs::metadata(dir.path().join("spool.log"))
                .unwrap()
                .len(),
            3 * record,
            "the partial record is cut off"
        );
        assert!(!spool.has_room(), "a failing spool takes no copies");
        spool.append(&message(14)).unwrap();
        assert!(spool.sync().is_err());
        // Room again, but fsync fails: the batch is dropped whole.
        disk.set_free(1 << 20);
        assert!(spool.retry());
        assert!(spool.has_room());
        disk.fail_syncs(true);
        spool.append(&message(15)).unwrap();
        spool.append(&message(16)).unwrap();
        assert!(spool.sync().is_err());
        assert_eq!(spool.messages(), 3);
        disk.fail_syncs(false);
        spool.append(&message(17)).unwrap();
        spool.sync().unwrap();
        assert!(spool.has_room());
        assert_eq!(replay(&mut spool).len(), 4);
        drop(spool);
        let (replayed, moved_aside) = reopened(dir.path());
        assert_eq!(replayed, bodies([10, 11, 12, 17].into_iter()));
        assert!(!moved_aside, "the log's framing broke");
    }

    #[test]
    fn a_failing_disk_is_not_reported_writable_until_a_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(100);
        let mut spool =
            Spool::open_with(dir.path(), 1 << 20, |file| Box::new(disk.wrap(file))).unwrap();
        for n in 0..3 {
            spool.append(&message(n)).unwrap();
        }
        assert!(spool.sync().is_err());
        assert!(!spool.has_room());
        // Still full: retrying changes nothing.
        assert!(!spool.retry());
        assert!(!spool.has_room());
        // Room again, but fsync fails.
        disk.set_free(1 << 20);
        disk.fail_syncs(true);
        assert!(!spool.retry());
        assert!(!spool.has_room());
        disk.fail_syncs(false);
        assert!(spool.retry());
        assert!(spool.has_room());
        assert!(!dir.path().join("spool.probe").exists());
    }

    #[test]
    fn a_batch_larger_than_a_write_is_dropped_whole_when_the_disk_fills_mid_batch() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(50 << 10);
        let mut spool =
            Spool::open_with(dir.path(), 64 << 20, |file| Box::new(disk.wrap(file))).unwrap();
        spool.append(&message(0)).unwrap();
        spool.sync().unwrap();
        let big = |n: u32| QueueMessage {
            body: vec![b'x'; 30 << 10],
            ..message(n)
        };
        // Written in chunks as the batch grows: the disk fills part way.
        let failed = (1..6).find_map(|n| spool.append(&big(n)).err());
        assert!(matches!(failed, Some(SpoolError::Io { .. })), "{failed:?}");
        assert!(spool.sync().is_ok(), "nothing is left to sync");
        assert_eq!(spool.messages(), 1);
        drop(spool);
        let (replayed, moved_aside) = reopened(dir.path());
        assert_eq!(replayed, bodies(0..1));
        assert!(!moved_aside);
    }

    /// A tmpfs of `size` mounted on a temporary directory, unmounted when
    /// dropped (also when a test fails).
    struct SmallFilesystem {
        dir: Option<tempfile::TempDir>,
    }

    impl SmallFilesystem {
        /// `None` when mounting needs privileges this process lacks.
        fn mount(size: &str) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(dir.path())
                .status();
            match status {
                Ok(status) if status.success() => Some(Self { dir: Some(dir) }),
                other => {
                    println!("skipped: cannot mount a tmpfs ({other:?}); run as root to test");
                    None
                }
            }
        }

        fn path(&self) -> &Path {
            self.dir.as_ref().map(|d| d.path()).unwrap()
        }
    }

    impl Drop for SmallFilesystem {
        fn drop(&mut self) {
            if let Some(dir) = self.dir.take() {
                let _ = std::process::Command::new("umount")
                    .arg(dir.path())
                    .status();
                drop(dir);
            }
        }
    }

    #[test]
    fn on_a_real_full_filesystem_nothing_stored_is_lost_and_nothing_refused_is_replayed() {
        // Mounting needs root (as here and in CI).
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
        if !root {
            println!("skipped: mounting a small filesystem needs root");
            return;
        }
        let Some(fs) = SmallFilesystem::mount("256k") else {
            return;
        };
        let spool_dir = fs.path().join("spool");
        let mut spool = open_spool(&spool_dir, 64 << 20);
        // Fill the filesystem, then free a little room for the spool.
        let ballast_path = fs.path().join("ballast");
        let mut ballast = File::create(&ballast_path).unwrap();
        while ballast.write_all(&[0; 4096]).is_ok() {}
        let full = ballast.metadata().unwrap().len();
        ballast.set_len(full - 10_000).unwrap();
        let copy = |n: u32| QueueMessage {
            body: format!("message {n} {}", "x".repeat(900)).into_bytes(),
            ..message(n)
        };
        let mut stored = Vec::new();
        let mut refused = 0;
        let mut n = 0;
        while refused < 5 {
            spool.append(&copy(n)).unwrap();
            match spool.sync() {
                Ok(()) => stored.push(n),
                Err(e) => {
                    assert!(matches!(e, SpoolError::Io { .. }), "{e}");
                    refused += 1;
                }
            }
            n += 1;
        }
        assert!(
            stored.len() >= 5,
            "{} records fit in about 10 KB",
            stored.len()
        );
        // Still full: a probe write fails, so the spool is not taken for
        // writable.
        assert!(!spool.retry(), "a full filesystem was taken for writable");
        assert!(!spool.has_room());
        // Room again: the spool takes records where it left off.
        drop(ballast);
        std::fs::remove_file(&ballast_path).unwrap();
        assert!(spool.retry());
        for _ in 0..5 {
            spool.append(&copy(n)).unwrap();
            spool.sync().unwrap();
            stored.push(n);
            n += 1;
        }
        drop(spool);
        let mut spool = open_spool(&spool_dir, 64 << 20);
        let replayed: Vec<_> = replay(&mut spool).into_iter().map(|m| m.body).collect();
        let expected: Vec<_> = stored.iter().map(|&n| copy(n).body).collect();
        assert_eq!(replayed.len(), expected.len(), "stored {stored:?}");
        assert!(replayed == expected, "replayed other records than stored");
        let moved_aside = std::fs::read_dir(&spool_dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("spool.corrupt.")
        });
        assert!(!moved_aside, "the log's framing broke");
    }

    #[test]
    fn a_second_gateway_cannot_share_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open_spool(dir.path(), 1 << 20);
        let error = Spool::open(dir.path(), 1 << 20).err().unwrap();
        assert!(matches!(error, SpoolError::Locked(_)), "{error}");
        assert!(error.to_string().contains("queue.spool_dir"));
    }
}
