//! The configuration loader: any TOML (or not) gives settings or an error
//! that names a key, never a panic.

#![no_main]

use gateway::config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let dev = flags & 1 == 1;
    if let Err(error) = Settings::from_toml(text, Vec::new(), dev) {
        assert!(!error.to_string().is_empty());
    }
});
