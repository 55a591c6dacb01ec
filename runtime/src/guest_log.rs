//! Guest log lines (stdout, stderr and the `logging` import) into the
//! gateway's log, so that a function can neither forge gateway log lines
//! nor flood the log:
//!
//! - one guest line is one log record, cut to `runtime.max_log_line` bytes,
//!   with control characters (newlines, carriage returns, ANSI escapes, ...)
//!   and line or direction overrides escaped visibly (`\n`, `\u{1b}`), and
//!   backslashes doubled so an escape cannot be faked;
//! - at most `runtime.max_log_lines_per_second` lines per function per
//!   second; further lines are dropped, counted in
//!   `tidegate_function_log_lines_dropped_total`, and the log says once per
//!   spell of dropping that it happens.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;

use crate::clock::Clock;

/// How important a guest line is (stdout and stderr lines are `Info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// The log of one function, shared by all its instances.
pub(crate) struct GuestLog {
    /// The function's name, on every record.
    function: Arc<str>,
    /// The function's version, on every record.
    version: Arc<str>,
    /// Longest line kept, in bytes (before escaping).
    max_line: usize,
    /// The engine's coarse clock, for the per-second budget.
    clock: Arc<Clock>,
    /// Lines left this second, and whether the function is dropping lines.
    budget: Mutex<Budget>,
    /// Lines dropped over the budget.
    dropped: IntCounter,
}

impl GuestLog {
    /// The log of `function`: lines cut at `max_line` bytes, at most
    /// `per_second` lines a second, drops counted in `dropped`.
    pub(crate) fn new(
        function: Arc<str>,
        version: Arc<str>,
        max_line: usize,
        per_second: NonZeroU32,
        clock: Arc<Clock>,
        dropped: IntCounter,
    ) -> Self {
        Self {
            function,
            version,
            max_line,
            clock,
            budget: Mutex::new(Budget::new(per_second)),
            dropped,
        }
    }

    /// Longest line kept, in bytes.
    pub(crate) fn max_line(&self) -> usize {
        self.max_line
    }

    /// Log one guest line (from `stream`: `stdout`, `stderr` or `log`)
    /// written during a call about `connection` (empty between calls), or
    /// drop it when the function is over its budget for this second.
    pub(crate) fn line(
        &self,
        level: Level,
        stream: &'static str,
        connection: &str,
        route: &str,
        line: &str,
    ) {
        let second = self.clock.now_millis() / 1_000;
        let verdict = self
            .budget
            .lock()
            // A panic while holding the lock cannot leave the budget in a
            // state that matters (it is a count), so a poisoned lock is used.
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take(second);
        match verdict {
            Verdict::Log => {}
            Verdict::Drop { first_of_spell } => {
                self.dropped.inc();
                if first_of_spell {
                    tracing::warn!(
                        function = &*self.function,
                        "the function writes more than runtime.max_log_lines_per_second log \
                         lines: further lines are dropped (counted in \
                         tidegate_function_log_lines_dropped_total)"
                    );
                }
                return;
            }
        }
        let line = escape(clip(line, self.max_line));
        let (function, version) = (&*self.function, &*self.version);
        macro_rules! record {
            ($level:ident) => {
                tracing::$level!(
                    target: "tidegate::function",
                    function,
                    version,
                    connection,
                    route,
                    stream,
                    "{line}"
                )
            };
        }
        match level {
            Level::Debug => record!(debug),
            Level::Info => record!(info),
            Level::Warn => record!(warn),
            Level::Error => record!(error),
        }
    }
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Log,
    /// Drop it; `first_of_spell` when lines were not being dropped in this
    /// second or the one before (so the log says it once per spell).
    Drop {
        first_of_spell: bool,
    },
}

/// Lines allowed per second, counted in whole seconds of the clock.
#[derive(Debug)]
struct Budget {
    per_second: u32,
    /// The second being counted.
    second: u64,
    /// Lines logged in it.
    used: u32,
    /// The last second in which a line was dropped.
    last_drop: Option<u64>,
}

impl Budget {
    fn new(per_second: NonZeroU32) -> Self {
        Self {
            per_second: per_second.get(),
            second: 0,
            used: 0,
            last_drop: None,
        }
    }

    fn take(&mut self, second: u64) -> Verdict {
        if second != self.second {
            self.second = second;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            return Verdict::Log;
        }
        let first_of_spell = self
            .last_drop
            .is_none_or(|last| second > last.saturating_add(1));
        self.last_drop = Some(second);
        Verdict::Drop { first_of_spell }
    }
}

/// Cut `line` to at most `max` bytes, on a char boundary.
fn clip(line: &str, max: usize) -> &str {
    if line.len() <= max {
        return line;
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// `line` with every character that could end, rewrite or reorder a log
/// line shown visibly: control characters (C0, DEL, C1: newlines, carriage
/// returns, ANSI escapes), the Unicode line and paragraph separators and
/// the bidirectional overrides. Backslashes are doubled, so `\n` in the
/// output is always an escaped newline, never one the guest typed.
fn escape(line: &str) -> Cow<'_, str> {
    if !line.chars().any(needs_escape) {
        return Cow::Borrowed(line);
    }
    let mut escaped = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if needs_escape(c) => {
                // Writing to a String cannot fail.
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_lines_and_cuts_on_char_boundaries() {
        assert_eq!(clip("hello", 10), "hello");
        assert_eq!(clip("hello", 3), "hel");
        assert_eq!(clip("héllo", 2), "h");
    }

    #[test]
    fn control_characters_are_escaped_visibly() {
        assert_eq!(escape("plain text, ünïcode ✓"), "plain text, ünïcode ✓");
        assert_eq!(
            escape("one\n2026-01-01T00:00:00Z  INFO tidegate: forged"),
            "one\\n2026-01-01T00:00:00Z  INFO tidegate: forged"
        );
        assert_eq!(escape("a\rb\tc"), "a\\rb\\tc");
        assert_eq!(escape("\u{1b}[31mred\u{1b}[0m"), "\\u{1b}[31mred\\u{1b}[0m");
        assert_eq!(escape("\u{85}\u{7f}\0"), "\\u{85}\\u{7f}\\u{0}");
        assert_eq!(escape("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
        // A typed backslash cannot pass for an escape.
        assert_eq!(escape("typed \\n"), "typed \\\\n");
    }

    #[test]
    fn lines_over_the_budget_are_dropped_and_the_first_drop_of_a_spell_is_told() {
        let mut budget = Budget::new(NonZeroU32::new(2).expect("2"));
        assert_eq!(budget.take(10), Verdict::Log);
        assert_eq!(budget.take(10), Verdict::Log);
        assert_eq!(
            budget.take(10),
            Verdict::Drop {
                first_of_spell: true
            }
        );
        assert_eq!(
            budget.take(10),
            Verdict::Drop {
                first_of_spell: false
            }
        );
        // A new second has a new budget; dropping again right after is the
        // same spell.
        assert_eq!(budget.take(11), Verdict::Log);
        assert_eq!(budget.take(11), Verdict::Log);
        assert_eq!(
            budget.take(11),
            Verdict::Drop {
                first_of_spell: false
            }
        );
        // After a second without drops, a new spell is told again.
        assert_eq!(budget.take(13), Verdict::Log);
        assert_eq!(budget.take(13), Verdict::Log);
        assert_eq!(
            budget.take(13),
            Verdict::Drop {
                first_of_spell: true
            }
        );
    }
}
