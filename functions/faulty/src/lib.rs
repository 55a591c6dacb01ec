//! A function that misbehaves when asked to, for testing that a fault
//! affects only the message that caused it. Text messages are commands:
//!
//! - `loop`: print `spinning`, then spin forever (the time limit must stop it);
//! - `spin N`: spin for N milliseconds (wall clock), then echo;
//! - `sleep N`: sleep N milliseconds in a WASI call (a poll on a clock:
//!   the guest waits in the host, where no epoch deadline reaches it), then
//!   echo;
//! - `alloc`: allocate until memory runs out (the memory limit must stop it);
//! - `panic`: panic (a trap);
//! - `recurse`: recurse without end (stack overflow, a trap);
//! - `big`: reply with 256 KiB of text (over the default message limit);
//! - `claims`: reply with the connection's claims, `name=value` lines, sorted;
//! - `bad`: return a `bad-request` handler error;
//! - `silent`: return no effect at all (no reply);
//! - `log`: print a line to stdout and log one through the logging import;
//! - `forge`: try to forge gateway log lines: a newline through the logging
//!   import, a carriage return and ANSI escapes on stdout;
//! - `flood N`: print N lines to stdout;
//! - `print TEXT`: print TEXT to stdout as it is, with no line end added
//!   (a line a call leaves unfinished), then echo;
//! - `publish KEY BODY`: publish BODY with routing key KEY, then echo;
//! - anything else (and every binary message) is echoed.
//!
//! A client that connects with `?show=remote-addr` gets the claim
//! `remote-addr` = the address the gateway saw it connect from.
//!
//! `on-connect` sleeps N milliseconds (as `sleep N` does) when the query
//! has `sleep=N`, and `on-disconnect` when the close reason is `sleep N`.

use tidegate_sdk::{
    ConnectDecision, Connection, Context, Effect, Function, HandlerError, Level, Payload, log,
};

struct Faulty;

impl Function for Faulty {
    fn on_connect(conn: Connection) -> ConnectDecision {
        if let Some((_, millis)) = conn.query.iter().find(|(name, _)| name == "sleep") {
            sleep(millis);
        }
        let show_remote = conn
            .query
            .iter()
            .any(|(name, value)| name == "show" && value == "remote-addr");
        let claims = match show_remote {
            true => vec![("remote-addr".into(), conn.remote_addr)],
            false => Vec::new(),
        };
        ConnectDecision::accept().with_claims(claims)
    }

    fn on_disconnect(_ctx: Context, _code: u16, reason: String) -> Vec<Effect> {
        if let Some(millis) = reason.strip_prefix("sleep ") {
            sleep(millis);
        }
        Vec::new()
    }

    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        if let Payload::Text(command) = &message {
            match command.as_str() {
                "loop" => {
                    // Tests wait for this line to know the instance is busy.
                    println!("spinning");
                    spin()
                }
                "alloc" => hoard(),
                "panic" => panic!("asked to panic"),
                "recurse" => {
                    recurse(1);
                }
                "big" => return Ok(vec![Effect::Reply(Payload::Text("x".repeat(256 << 10)))]),
                "claims" => {
                    let mut lines: Vec<String> = ctx
                        .claims
                        .iter()
                        .map(|(name, value)| format!("{name}={value}"))
                        .collect();
                    lines.sort();
                    return Ok(vec![Effect::Reply(Payload::Text(lines.join("\n")))]);
                }
                "bad" => return Err(HandlerError::BadRequest("asked to refuse".into())),
                "silent" => return Ok(Vec::new()),
                "log" => {
                    println!("a line on stdout");
                    log(Level::Warn, "a line through the logging import");
                }
                "forge" => {
                    log(
                        Level::Info,
                        "harmless\n1999-12-31T23:59:59.999999Z  INFO tidegate: forged by log",
                    );
                    println!(
                        "harmless\r\u{1b}[2K1999-12-31T23:59:59.999999Z  INFO tidegate: forged by stdout"
                    );
                }
                other => {
                    if let Some((key, body)) = other
                        .strip_prefix("publish ")
                        .and_then(|rest| rest.split_once(' '))
                    {
                        return Ok(vec![
                            Effect::Publish((key.to_owned(), body.as_bytes().to_vec())),
                            Effect::Reply(message),
                        ]);
                    } else if let Some(millis) =
                        other.strip_prefix("spin ").and_then(|n| n.parse().ok())
                    {
                        spin_for(std::time::Duration::from_millis(millis));
                    } else if let Some(text) = other.strip_prefix("print ") {
                        use std::io::Write as _;
                        let mut stdout = std::io::stdout();
                        let _ = stdout.write_all(text.as_bytes());
                        let _ = stdout.flush();
                    } else if let Some(millis) = other.strip_prefix("sleep ") {
                        sleep(millis);
                    } else if let Some(lines) = other
                        .strip_prefix("flood ")
                        .and_then(|n| n.parse::<u32>().ok())
                    {
                        for line in 0..lines {
                            println!("flood line {line}");
                        }
                    }
                }
            }
        }
        Ok(vec![Effect::Reply(message)])
    }
}

#[inline(never)]
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

#[inline(never)]
fn spin_for(duration: std::time::Duration) {
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        std::hint::black_box(());
    }
}

/// Sleep `millis` (a number of milliseconds; nothing if it is not one):
/// on wasm32-wasip2, `std::thread::sleep` waits on a `wasi:clocks` pollable,
/// that is, in the host.
fn sleep(millis: &str) {
    if let Ok(millis) = millis.parse() {
        std::thread::sleep(std::time::Duration::from_millis(millis));
    }
}

#[inline(never)]
fn hoard() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        kept.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&kept);
    }
}

/// Recursion whose frames live on the WebAssembly call stack (values in
/// locals, nothing in linear memory), so it overflows that stack: the
/// runtime's stack-overflow trap, not a shadow-stack memory fault.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    // Never true (the stack runs out long before), but it keeps the
    // compiler from calling this a function that cannot return.
    if std::hint::black_box(depth) == u64::MAX {
        return depth;
    }
    recurse(depth + 1).wrapping_mul(depth | 1)
}

tidegate_sdk::export!(Faulty);
