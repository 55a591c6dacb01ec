//! A token as the client sends it, straight to validation.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        // Nothing built from fuzzed bytes may verify.
        assert!(common::VERIFIER.verify(token).is_err());
    }
});
