//! The PROXY protocol (v1 text and v2 binary): a load balancer in front of
//! the gateway begins each connection with a header that gives the real
//! client's address. Read only from peers in `server.proxy_protocol_from`,
//! where it is required; anyone else's connection is taken as it comes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header taken. A v1 header is at most 107 bytes; a v2 header is
/// 16 bytes and its addresses plus TLVs, which balancers keep well under
/// this.
pub const MAX_HEADER: usize = 4096;

/// Pauses between looks at a header that has not fully arrived (it almost
/// always comes in the connection's first segment).
const FIRST_WAIT: Duration = Duration::from_millis(1);
const LONGEST_WAIT: Duration = Duration::from_millis(50);

/// Why a PROXY header was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection did not start with a valid header.
    #[error("expected a PROXY protocol header (server.proxy_protocol_from): {0}")]
    Malformed(String),
    /// The header did not end within [`MAX_HEADER`] bytes.
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// The peer closed before the header ended.
    #[error("connection closed in the PROXY protocol header")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// Whether `peer` must send a PROXY header.
pub fn required_from(peer: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|net| net.contains(&peer))
}

/// Read the header at the start of `tcp`, taking exactly its bytes, so
/// what follows (the TLS handshake) is read as if it came first. Returns
/// the client's address, or `None` when the header names none (a v2
/// `LOCAL` health check, v1 `UNKNOWN`): the peer's own address stands.
///
/// The header is looked at with `peek` until it is whole, so no byte after
/// it is consumed.
///
/// # Errors
/// A [`ProxyHeaderError`]; the caller closes the connection.
pub async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut wait = FIRST_WAIT;
    loop {
        let seen = tcp.peek(&mut buf).await?;
        if seen == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let parsed = parse(&buf[..seen]);
        match parsed {
            Parsed::Header { len, client } => {
                tcp.read_exact(&mut buf[..len]).await?;
                return Ok(client);
            }
            Parsed::Incomplete if seen == MAX_HEADER => return Err(ProxyHeaderError::TooLong),
            Parsed::Incomplete => {
                // Peeking again at once would return the same bytes: wait
                // for more to arrive.
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
            }
            Parsed::Invalid(reason) => return Err(ProxyHeaderError::Malformed(reason)),
        }
    }
}

/// What the bytes seen so far hold.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Header {
        /// The header's length: the bytes to take before the TLS handshake.
        len: usize,
        /// The client it names, if any.
        client: Option<SocketAddr>,
    },
    /// The start of a header.
    Incomplete,
    /// Not a header.
    Invalid(String),
}

/// Look at the first bytes of a connection (public for the fuzz target).
pub fn parse(bytes: &[u8]) -> Parsed {
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(header)) => Parsed::Header {
            len: header.header.len(),
            client: match header.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(header)) => Parsed::Header {
            len: header.len(),
            client: match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        },
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.push(0x20 | command);
        header.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(addresses);
        header.extend_from_slice(tlvs);
        header
    }

    #[test]
    fn v1_headers_give_the_client_address_and_their_length() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01 TLS follows");
        assert_eq!(
            parse(&bytes),
            Parsed::Header {
                len: header.len(),
                client: Some("203.0.113.7:51234".parse().unwrap()),
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        assert_eq!(
            parse(v6),
            Parsed::Header {
                len: v6.len(),
                client: Some("[2001:db8::7]:51234".parse().unwrap()),
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn v2_headers_give_the_client_address_and_their_length() {
        let addresses = [203, 0, 113, 7, 10, 0, 0, 1, 0xc8, 0x22, 1, 0xbb];
        let tlvs = [0x04, 0, 1, 42]; // a NOOP TLV
        let header = v2(1, 0x11, &addresses, &tlvs);
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&bytes),
            Parsed::Header {
                len: header.len(),
                client: Some("203.0.113.7:51234".parse().unwrap()),
            }
        );
        // LOCAL: a health check from the balancer itself.
        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
    }

    #[test]
    fn partial_headers_wait_and_other_bytes_are_refused() {
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7"), Parsed::Incomplete);
        let header = v2(1, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0, 1, 0, 2], &[]);
        assert_eq!(parse(&header[..20]), Parsed::Incomplete);
        // A TLS ClientHello, or an HTTP request, where a header should be.
        assert!(matches!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xaa\xbb\xcc\xdd\xee"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn only_configured_peers_must_send_a_header() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(required_from("10.1.2.3".parse().unwrap(), &trusted));
        assert!(required_from("::ffff:10.1.2.3".parse().unwrap(), &trusted));
        assert!(required_from("::1".parse().unwrap(), &trusted));
        assert!(!required_from("192.0.2.1".parse().unwrap(), &trusted));
        assert!(!required_from("10.1.2.3".parse().unwrap(), &[]));
    }
}
