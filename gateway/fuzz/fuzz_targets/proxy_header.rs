//! The PROXY protocol header a load balancer sends first: any bytes are
//! a whole header no longer than what was seen, the start of one, or
//! refused; never a panic.

#![no_main]

use gateway::proxy_protocol::{MAX_HEADER, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let seen = &data[..data.len().min(MAX_HEADER)];
    match parse(seen) {
        Parsed::Header { len, .. } => assert!(len > 0 && len <= seen.len()),
        Parsed::Incomplete | Parsed::Invalid(_) => {}
    }
});
