//! The measurements. Each runs against any `ws://` or `wss://` URL and
//! returns [`crate::figures::Figures`].
//!
//! - [`echo`]: throughput with C connections, S-byte messages and a
//!   pipelining window W, every reply verified byte for byte.
//! - [`latency`]: percentiles at a fixed offered rate.
//! - [`connect`]: new connections per second (TLS + WebSocket handshake).
//! - [`idle`]: server memory per idle connection.
//! - [`cold`]: time to the reply from a function scaled to zero, and warm.
//! - [`publish`]: the broker's own confirmed publish ceiling.
//! - [`instantiate`]: the runtime alone: reload, instantiate and call.
//! - [`isolation`]: latency of well-behaved clients while a function misbehaves.
//! - [`cluster`]: three nodes: cross-node sends, broadcasts, registry
//!   propagation.

pub mod cluster;
pub mod cold;
pub mod connect;
pub mod echo;
pub mod idle;
pub mod instantiate;
pub mod isolation;
pub mod latency;
pub mod publish;

use std::time::Duration;

/// A payload of `size` bytes that starts with `seq` and is otherwise a
/// pattern derived from it, so every reply can be checked byte for byte.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size.max(8)];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, byte) in bytes.iter_mut().enumerate().skip(8) {
        *byte = (seq as usize).wrapping_add(i) as u8;
    }
    bytes.truncate(size.max(8));
    bytes
}

/// Whether `bytes` is exactly `payload(seq, size)`, checked in place.
pub fn matches(bytes: &[u8], seq: u64, size: usize) -> bool {
    bytes.len() == size.max(8)
        && sequence(bytes) == Some(seq)
        && bytes
            .iter()
            .enumerate()
            .skip(8)
            .all(|(i, byte)| *byte == (seq as usize).wrapping_add(i) as u8)
}

/// The sequence number at the start of a payload.
pub fn sequence(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Per-second rate of `count` over `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_sequence_and_differ() {
        let a = payload(7, 64);
        assert_eq!(a.len(), 64);
        assert_eq!(sequence(&a), Some(7));
        assert_ne!(payload(8, 64)[8..], a[8..]);
        assert_eq!(payload(7, 64), a);
        assert!(matches(&a, 7, 64));
        assert!(!matches(&a, 8, 64));
        let mut b = a.clone();
        b[40] ^= 1;
        assert!(!matches(&b, 7, 64));
    }
}
