//! The spool's on-disk format. Two ways in:
//!
//! - any bytes as `spool.log` (and a head offset): opening never panics,
//!   and every byte after the head is either kept as records or moved into
//!   a `spool.corrupt.*` file: nothing is dropped silently;
//! - good records written by the spool, then one byte flipped or the file
//!   cut: the records before the damage are still replayed, unchanged and
//!   in order, and the rest is moved aside.

#![no_main]

use std::path::Path;

use gateway::publisher::QueueMessage;
use gateway::publisher::spool::Spool;
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: u64 = 1 << 30;

/// Every record from the head on.
fn replay(spool: &mut Spool) -> Vec<QueueMessage> {
    let mut records = Vec::new();
    let mut offset = spool.head();
    while let Some((message, next)) = spool.read_at(offset).expect("reading a recovered spool") {
        assert!(next > offset);
        records.push(message);
        offset = next;
    }
    assert_eq!(offset, spool.end(), "the recovered log ends after its last record");
    assert_eq!(records.len() as u64, spool.messages());
    records
}

/// Bytes moved aside into `spool.corrupt.*` files.
fn moved_aside(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("spool.corrupt."))
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

fuzz_target!(|data: &[u8]| {
    let Some((control, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spool.log");
    if control[0] & 1 == 0 {
        // Arbitrary bytes, with a head somewhere in them.
        let head = u64::from(u16::from_le_bytes([control[1], control[2]])) % (rest.len() as u64 + 1);
        std::fs::write(&log, rest).unwrap();
        std::fs::write(dir.path().join("spool.head"), head.to_le_bytes()).unwrap();
        let mut spool = Spool::open(dir.path(), MAX_BYTES).expect("a damaged spool still opens");
        replay(&mut spool);
        let kept = spool.end() - spool.head();
        assert_eq!(
            kept + moved_aside(dir.path()),
            rest.len() as u64 - head,
            "every byte after the head is kept or moved aside"
        );
        return;
    }
    // Good records, then damage.
    let size = usize::from(control[1] % 64) + 1;
    let written: Vec<QueueMessage> = rest
        .chunks(size)
        .take(64)
        .enumerate()
        .map(|(i, body)| {
            QueueMessage::new(i % 2 == 0, body.to_vec(), "node.conn", "/", "echo", "0123456789abcdef", "node")
        })
        .collect();
    {
        let mut spool = Spool::open(dir.path(), MAX_BYTES).unwrap();
        for message in &written {
            spool.append(message).unwrap();
        }
        spool.sync().unwrap();
    }
    let mut bytes = std::fs::read(&log).unwrap();
    if bytes.is_empty() {
        return;
    }
    let at = usize::from(u16::from_le_bytes([control[2], control[3]])) % bytes.len();
    if control[0] & 2 == 0 {
        bytes.truncate(at);
    } else {
        bytes[at] ^= control[1] | 1;
    }
    std::fs::write(&log, &bytes).unwrap();
    let mut spool = Spool::open(dir.path(), MAX_BYTES).expect("a damaged spool still opens");
    let replayed = replay(&mut spool);
    assert!(
        replayed.len() <= written.len() && replayed[..] == written[..replayed.len()],
        "the records before the damage are replayed unchanged, in order"
    );
    assert_eq!(
        spool.end() + moved_aside(dir.path()),
        bytes.len() as u64,
        "what is not replayed is moved aside"
    );
});
