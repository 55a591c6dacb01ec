//! The on-disk spool: where message copies wait, fsync'ed, while the broker
//! is unreachable, to be replayed in order when it returns.
//!
//! Layout of `queue.spool_dir`:
//! - `spool.log`: records appended in arrival order. A record is a 4-byte
//!   little-endian body length, the body's 4-byte CRC-32, then the body
//!   (a postcard-encoded [`QueueMessage`]).
//! - `spool.head`: the offset of the first record the broker has not
//!   confirmed yet (8 bytes, little-endian). Records before it are done.
//! - `lock`: held exclusively while a gateway uses the directory.
//!
//! When every record is confirmed the log is truncated to zero. A torn
//! record at the end (a crash during a write, before its fsync, so never
//! acknowledged to a client) is cut off with a warning; a corrupt record
//! elsewhere is moved aside, with everything after it, into a
//! `spool.corrupt.<time>` file and reported, never silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::message::QueueMessage;

/// Largest body a record may claim; anything larger is corruption.
const MAX_RECORD: u32 = 64 << 20;
const HEADER: u64 = 8;

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool has no room for this message (`queue.spool_max_bytes`).
    #[error("the spool is full ({max_bytes} bytes, queue.spool_max_bytes)")]
    Full {
        /// The configured limit.
        max_bytes: u64,
    },
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
    /// `spool.log`, for appending (buffered until [`Spool::sync`]).
    writer: BufWriter<File>,
    /// `spool.log`, for reading during replay.
    reader: File,
    /// Held for the spool's lifetime: the exclusive lock.
    _lock: File,
    /// End of the log, including buffered records.
    len: u64,
    /// Offset of the first unconfirmed record.
    head: u64,
    /// Records between `head` and `len`.
    messages: u64,
    /// Most bytes the log may hold.
    max_bytes: u64,
    /// Room held for copies published straight to the broker and not yet
    /// confirmed: if the link drops, they are spooled into it, so that can
    /// never be refused (see [`Spool::reserve`]).
    reserved: u64,
    /// Whether the last append was refused for lack of room (cleared by a
    /// successful append or a truncation).
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
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
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
        let log_path = dir.join("spool.log");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let reader = File::open(&log_path).map_err(io(&log_path))?;
        let len = file.metadata().map_err(io(&log_path))?.len();
        let mut spool = Self {
            dir: dir.to_path_buf(),
            writer: BufWriter::with_capacity(64 << 10, file),
            reader,
            _lock: lock,
            len,
            head: 0,
            messages: 0,
            max_bytes,
            reserved: 0,
            refused: false,
        };
        spool.head = spool.read_head().min(len);
        spool.recover()?;
        if spool.messages == 0 && spool.len > 0 {
            // Every record was confirmed but the log was not truncated (a
            // crash in between): start empty, so its bytes do not count
            // against the limit while nothing waits.
            let end = spool.len;
            spool.confirm_until(end, 0)?;
        }
        Ok(spool)
    }

    /// Records waiting to be replayed.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Bytes the log holds (confirmed records are counted until the log is
    /// truncated).
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Whether the spool takes copies: it is under its limit (counting
    /// reserved room) and did not just refuse one.
    pub fn has_room(&self) -> bool {
        self.len + self.reserved < self.max_bytes && !self.refused
    }

    /// Hold `bytes` of room (a [`record_bound`]) for a copy that is being
    /// published straight to the broker, so that it can be spooled if the
    /// link drops before its confirm. Returns false, holding nothing, when
    /// the room is not there.
    pub fn reserve(&mut self, bytes: u64) -> bool {
        if self.len + self.reserved + bytes > self.max_bytes {
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

    /// End of the log.
    pub fn end(&self) -> u64 {
        self.len
    }

    /// Append a record (buffered; call [`Spool::sync`] before
    /// acknowledging it).
    ///
    /// # Errors
    /// [`SpoolError::Full`] when it does not fit; [`SpoolError::Io`].
    pub fn append(&mut self, message: &QueueMessage) -> Result<(), SpoolError> {
        let body = postcard::to_stdvec(message).map_err(|e| self.io_error(io::Error::other(e)))?;
        let record_len = HEADER + body.len() as u64;
        if self.len + self.reserved + record_len > self.max_bytes {
            self.refused = true;
            return Err(SpoolError::Full {
                max_bytes: self.max_bytes,
            });
        }
        let mut header = [0u8; HEADER as usize];
        header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let write = self
            .writer
            .write_all(&header)
            .and_then(|()| self.writer.write_all(&body));
        write.map_err(|e| self.io_error(e))?;
        self.len += record_len;
        self.messages += 1;
        self.refused = false;
        Ok(())
    }

    /// Write buffered records and fsync them: after this returns they
    /// survive a crash.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the disk refuses.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.writer.flush().map_err(|e| self.io_error(e))?;
        self.writer
            .get_ref()
            .sync_data()
            .map_err(|e| self.io_error(e))
    }

    /// Read the record at `offset`; returns it and the next offset, or
    /// `None` at the end of the log.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the record cannot be read or is corrupt.
    pub fn read_at(&mut self, offset: u64) -> Result<Option<(QueueMessage, u64)>, SpoolError> {
        if offset >= self.len {
            return Ok(None);
        }
        self.writer.flush().map_err(|e| self.io_error(e))?;
        match read_record(&mut self.reader, offset) {
            Ok(Some((body, next))) => match postcard::from_bytes(&body) {
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
    /// [`SpoolError::Io`] when the head or the log cannot be written.
    pub fn confirm_until(&mut self, offset: u64, records: u64) -> Result<(), SpoolError> {
        self.head = offset.min(self.len);
        self.messages = self.messages.saturating_sub(records);
        if self.head == self.len {
            self.writer.flush().map_err(|e| self.io_error(e))?;
            self.writer
                .get_ref()
                .set_len(0)
                .map_err(|e| self.io_error(e))?;
            self.writer
                .get_ref()
                .sync_all()
                .map_err(|e| self.io_error(e))?;
            self.len = 0;
            self.head = 0;
            self.messages = 0;
            self.refused = false;
        }
        self.write_head()
    }

    fn read_head(&self) -> u64 {
        let mut bytes = [0u8; 8];
        match File::open(self.dir.join("spool.head")).and_then(|mut f| f.read_exact(&mut bytes)) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => 0,
        }
    }

    /// Persist the head (write and rename). Not fsync'ed: losing it only
    /// replays confirmed records again, which consumers deduplicate by
    /// message id.
    fn write_head(&self) -> Result<(), SpoolError> {
        let tmp = self.dir.join("spool.head.tmp");
        let path = self.dir.join("spool.head");
        std::fs::write(&tmp, self.head.to_le_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| SpoolError::Io { path, source })
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
                Ok(Some((body, next))) if postcard::from_bytes::<QueueMessage>(&body).is_ok() => {
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
            let aside = self.dir.join(format!(
                "spool.corrupt.{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default()
            ));
            let mut rest = Vec::new();
            self.reader
                .seek(SeekFrom::Start(offset))
                .and_then(|_| (&self.reader).take(cut).read_to_end(&mut rest))
                .map_err(|e| self.io_error(e))?;
            std::fs::write(&aside, &rest).map_err(|source| SpoolError::Io {
                path: aside.clone(),
                source,
            })?;
            self.writer
                .get_ref()
                .set_len(offset)
                .map_err(|e| self.io_error(e))?;
            self.len = offset;
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

    fn io_error(&self, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.dir.join("spool.log"),
            source,
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
    } = message;
    const VARINT: u64 = 10;
    // The timestamp (a varint) and the text flag (one byte).
    let fixed = VARINT + 1;
    let variable = [
        message_id.len(),
        body.len(),
        connection_id.len(),
        route.len(),
        function.len(),
        function_version.len(),
        node.len(),
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
mod tests {
    use super::*;

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

    /// A spool directory holding `count` synced records.
    fn spooled(count: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            for m in &sent {
                spool.append(m).unwrap();
            }
            spool.sync().unwrap();
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.messages(), 100);
        assert_eq!(replay(&mut spool), sent);
    }

    #[test]
    fn confirmed_records_are_not_replayed_and_a_drained_log_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for n in 0..10 {
            spool.append(&message(n)).unwrap();
        }
        spool.sync().unwrap();
        let (_, after_first) = spool.read_at(0).unwrap().unwrap();
        let (_, after_second) = spool.read_at(after_first).unwrap().unwrap();
        spool.confirm_until(after_second, 2).unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
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

    #[test]
    fn a_full_spool_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.messages(), 4);
        assert_eq!(replay(&mut spool).len(), 4);
    }

    #[test]
    fn a_corrupt_record_is_moved_aside_not_dropped() {
        let dir = spooled(5);
        let log = dir.path().join("spool.log");
        let mut bytes = std::fs::read(&log).unwrap();
        // Every test record has the same size.
        let second = Spool::open(spooled(1).path(), 1 << 20).unwrap().end();
        // Flip a byte in the body of the third record.
        let third = (second * 2) as usize;
        bytes[third + HEADER as usize + 2] ^= 0xff;
        std::fs::write(&log, &bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
    }

    #[test]
    fn record_bound_is_never_below_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 64 << 20).unwrap();
        for size in [0, 1, 127, 128, 300, 16_384, 1 << 20] {
            let copy = QueueMessage {
                body: vec![1; size],
                ..message(0)
            };
            let before = spool.end();
            spool.append(&copy).unwrap();
            let actual = spool.end() - before;
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
        let mut spool = Spool::open(dir.path(), 3 * bound).unwrap();
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

    #[test]
    fn a_second_gateway_cannot_share_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path(), 1 << 20).unwrap();
        let error = Spool::open(dir.path(), 1 << 20).err().unwrap();
        assert!(matches!(error, SpoolError::Locked(_)), "{error}");
        assert!(error.to_string().contains("queue.spool_dir"));
    }
}
