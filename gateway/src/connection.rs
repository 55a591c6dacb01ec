//! One WebSocket connection after the upgrade.
//!
//! A reader and a writer run side by side in the connection's task. The
//! reader takes messages in order: it hands the copy to the publisher,
//! runs the function, and queues the replies with the copy's receipt. The
//! writer sends queued replies in order, each only once its copy is durable
//! (in receipt mode), so replies are pipelined yet never overtake a copy.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt};
use prometheus::IntCounter;
use runtime::{Context, Effect, Function, HandlerError, Payload, Priority};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::config::{OnError, QueueMode};
use crate::handshake::Accepted;
use crate::publisher::{QueueMessage, Receipt};
use crate::server::Shared;

/// The pause after a first failure in a row (see `Reader::penalty`).
const FIRST_PENALTY: Duration = Duration::from_millis(10);

/// How long to wait for the client's answer to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Close codes the gateway sends (RFC 6455, section 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// The client broke a policy (message rate).
    pub const POLICY: u16 = 1008;
    /// No close frame was received (reported to `on-disconnect` only).
    pub const ABNORMAL: u16 = 1006;
    /// A text message was not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A message or frame was larger than allowed.
    pub const TOO_BIG: u16 = 1009;
    /// The function failed on this message.
    pub const INTERNAL: u16 = 1011;
    /// The message could not be stored; try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// What the reader hands the writer, in order.
enum Outbound {
    /// A message to send once `receipt` (if any) resolves.
    Message {
        receipt: Option<Receipt>,
        message: Message,
    },
    /// A copy with no reply: wait for it only to notice a failure.
    Receipt(Receipt),
    /// Close the connection with this code and reason.
    Close(u16, String),
}

/// Per-route counters, resolved once per connection.
struct Counters {
    received: IntCounter,
    received_bytes: IntCounter,
    sent: IntCounter,
    sent_bytes: IntCounter,
}

/// Serve an upgraded connection until it closes.
pub async fn serve<S>(accepted: Box<Accepted<S>>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Accepted {
        ws,
        conn,
        function,
        route,
        effects,
    } = *accepted;
    // What every later call is told about the connection.
    let ctx = Arc::new(Context {
        id: conn.id,
        route: conn.route,
        claims: conn.claims,
        state: conn.state,
    });
    let metrics = &shared.metrics;
    metrics.connections.with_label_values(&[&route]).inc();
    let open = metrics.connections_open.with_label_values(&[&route]);
    open.inc();
    let counters = Counters {
        received: metrics.messages_received.with_label_values(&[&route]),
        received_bytes: metrics.bytes_received.with_label_values(&[&route]),
        sent: metrics.messages_sent.with_label_values(&[&route]),
        sent_bytes: metrics.bytes_sent.with_label_values(&[&route]),
    };

    let (sink, stream) = ws.split();
    // futures' channel allocates per message rather than a block of slots
    // up front, so an idle connection does not pay for its queue. One
    // sender: capacity = buffer + 1.
    let (outbound, queue) = mpsc::channel(shared.websocket.send_queue.get() - 1);
    // Cancelled by the writer when it can no longer send, so the reader
    // stops too.
    let writer_done = CancellationToken::new();
    let reader = Reader {
        ctx: &ctx,
        rate: governor::RateLimiter::direct(governor::Quota::per_second(
            shared.websocket.max_message_rate,
        )),
        penalty: Duration::ZERO,
        function: &function,
        route: &route,
        shared: &shared,
        counters: &counters,
        outbound,
    };
    let (client_close, (sink, sent_close, stalled)) = tokio::join!(
        reader.run(stream, effects, &writer_done),
        write(sink, queue, &counters, &writer_done, &shared)
    );

    // Complete the closing handshake: read until the client's close frame
    // (or give up after a short while). A client that stopped reading is
    // not waited for: its socket is dropped with what was queued for it.
    let (code, reason) = match (&client_close, &sent_close) {
        (ClientClose::Closed(code, reason), _) => (*code, reason.clone()),
        (_, Some((code, reason))) => (*code, reason.clone()),
        _ => (close_code::ABNORMAL, String::new()),
    };
    if let ClientClose::Open(stream) = client_close
        && !stalled
        && let Ok(ws) = sink.reunite(stream)
    {
        // Boxed: only needed once, at the end.
        Box::pin(finish_close(ws)).await;
    }
    open.dec();
    if let Err(e) = Box::pin(function.on_disconnect(ctx.clone(), code, reason)).await {
        tracing::debug!(connection = %ctx.id, "on-disconnect failed: {e}");
    }
}

/// Complete the closing handshake after our close frame: read until the
/// client's (or give up after a short while), then close the socket.
async fn finish_close<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let answered = loop {
            match ws.next().await {
                Some(Ok(message)) if message.is_close() => break true,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break false,
            }
        };
        // Without the client's close frame the stream may be unusable (for
        // example mid-way through a message over the limit): discard what
        // the client still sends, so closing the socket does not reset it
        // before the client has read our close frame.
        if !answered {
            linger(ws.get_mut()).await;
        }
    })
    .await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
}

/// Most bytes read and discarded while lingering before closing.
const MAX_LINGER_BYTES: u64 = 1 << 20;

/// Read and discard until the client closes (or sends too much).
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::io::copy(&mut stream.take(MAX_LINGER_BYTES), &mut tokio::io::sink()).await;
}

/// How the reader ended.
enum ClientClose<T> {
    /// The client sent a close frame (or the socket ended).
    Closed(u16, String),
    /// The gateway is closing; the stream is handed back to read the
    /// client's answer.
    Open(T),
}

struct Reader<'a> {
    ctx: &'a Arc<Context>,
    rate: governor::DefaultDirectRateLimiter,
    /// Pause after the function failed on this connection's last message:
    /// doubled at each failure in a row (up to `runtime.fault_backoff`),
    /// cleared by a success, so one client cannot keep a function failing
    /// (and burning CPU) back to back.
    penalty: Duration,
    function: &'a Arc<Function>,
    route: &'a str,
    shared: &'a Shared,
    counters: &'a Counters,
    outbound: mpsc::Sender<Outbound>,
}

/// Why the function failed on a message.
struct Failure {
    /// Metric label.
    kind: &'static str,
    /// All instances busy and the queue full (1013 rather than 1011).
    overloaded: bool,
    /// For the error reply.
    message: String,
}

/// What to do after a message.
enum Next {
    Continue,
    Close(u16, String),
    Stop,
}

impl Reader<'_> {
    async fn run<T>(
        mut self,
        mut stream: T,
        effects: Vec<Effect>,
        writer_done: &CancellationToken,
    ) -> ClientClose<T>
    where
        T: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let mut next = self.apply(effects, None).await;
        let limits = &self.shared.websocket;
        let opened = Instant::now();
        let expires = opened + limits.max_duration;
        let mut last_frame = opened;
        // One timer for the idle timeout and the maximum duration; a frame
        // only notes the time, the timer is moved when it fires.
        let timer = tokio::time::sleep_until((opened + limits.idle_timeout).min(expires));
        // Created once: registering a waiter per message costs.
        let shutdown = self.shared.shutdown.cancelled();
        let writer_gone = writer_done.cancelled();
        tokio::pin!(shutdown, writer_gone, timer);
        while let Next::Continue = next {
            let frame = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    next = Next::Close(close_code::GOING_AWAY, "server shutting down".into());
                    break;
                }
                _ = &mut writer_gone => {
                    next = Next::Stop;
                    break;
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    let idle_until = last_frame + limits.idle_timeout;
                    if now >= expires {
                        next = Next::Close(close_code::GOING_AWAY, format!(
                            "connection reached its maximum duration of {} (websocket.max_duration)",
                            humantime::format_duration(limits.max_duration)
                        ));
                        break;
                    }
                    if now < idle_until {
                        timer.as_mut().reset(idle_until.min(expires));
                        continue;
                    }
                    // A frame that came in while this task waited for the
                    // CPU is activity, not idleness. The timer can be seen
                    // before the socket's readiness is: yielding first
                    // gives the runtime a chance to poll for I/O (a best
                    // effort: another worker may hold the I/O driver).
                    tokio::task::yield_now().await;
                    match std::future::poll_fn(|cx| Poll::Ready(stream.poll_next_unpin(cx))).await {
                        Poll::Ready(frame) => {
                            timer
                                .as_mut()
                                .reset((Instant::now() + limits.idle_timeout).min(expires));
                            frame
                        }
                        Poll::Pending => {
                            next = Next::Close(close_code::GOING_AWAY, format!(
                                "idle for {} (websocket.idle_timeout)",
                                humantime::format_duration(limits.idle_timeout)
                            ));
                            break;
                        }
                    }
                }
                frame = stream.next() => frame,
            };
            last_frame = Instant::now();
            if let Some(Ok(message)) = &frame
                && !message.is_close()
                && self.rate.check().is_err()
            {
                next = Next::Close(
                    close_code::POLICY,
                    format!(
                        "more than {} messages per second (websocket.max_message_rate)",
                        limits.max_message_rate
                    ),
                );
                break;
            }
            next = match frame {
                None => return ClientClose::Closed(close_code::ABNORMAL, String::new()),
                Some(Ok(Message::Text(text))) => {
                    // Without a copy when the frame's buffer is not shared.
                    let bytes = Vec::from(bytes::Bytes::from(text));
                    match String::from_utf8(bytes) {
                        Ok(text) => self.on_message(Payload::Text(text)).await,
                        Err(_) => Next::Close(
                            close_code::INVALID_DATA,
                            "text message is not valid UTF-8".into(),
                        ),
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    self.on_message(Payload::Binary(Vec::from(data))).await
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                        .unwrap_or((close_code::NORMAL, String::new()));
                    return ClientClose::Closed(code, reason);
                }
                Some(Ok(_)) => Next::Continue, // ping, pong: answered by tungstenite
                Some(Err(error)) => match close_for(&error, &self.shared.websocket) {
                    Some((code, reason)) => Next::Close(code, reason),
                    None => return ClientClose::Closed(close_code::ABNORMAL, String::new()),
                },
            };
        }
        if let Next::Close(code, reason) = next {
            let _ = self.outbound.send(Outbound::Close(code, reason)).await;
        }
        // Dropping the sender lets the writer finish what is queued.
        drop(self.outbound);
        ClientClose::Open(stream)
    }

    async fn on_message(&mut self, payload: Payload) -> Next {
        let len = match &payload {
            Payload::Text(text) => text.len(),
            Payload::Binary(data) => data.len(),
        };
        self.counters.received.inc();
        self.counters.received_bytes.inc_by(len as u64);
        let receipt = match self.copy(&payload).await {
            Ok(receipt) => receipt,
            Err(next) => return next,
        };
        // Boxed, like every function call here: the call's state is large
        // and only lives while it runs, so it should not be part of every
        // idle connection's task.
        // A client whose messages keep failing has its calls run at the
        // lowest priority from the start.
        let priority = if self.penalty.is_zero() {
            Priority::Normal
        } else {
            Priority::Low
        };
        match Box::pin(
            self.function
                .on_message(self.ctx.clone(), payload, priority),
        )
        .await
        {
            Ok(Ok(effects)) => match self.oversized_reply(&effects) {
                None => {
                    self.penalty = Duration::ZERO;
                    self.apply(effects, receipt).await
                }
                Some(failure) => self.fail(failure, receipt).await,
            },
            Ok(Err(error)) => {
                let (kind, message) = match error {
                    HandlerError::BadRequest(m) => ("bad-request", m),
                    HandlerError::Internal(m) => ("internal", m),
                };
                let body = serde_json::json!({ "error": kind, "message": message }).to_string();
                self.send(Outbound::Message {
                    receipt,
                    message: Message::Text(body.into()),
                })
                .await
            }
            Err(error) => {
                let failure = Failure {
                    kind: error.kind(),
                    overloaded: matches!(error, runtime::InvokeError::Overloaded { .. }),
                    message: error.to_string(),
                };
                self.fail(failure, receipt).await
            }
        }
    }

    /// A reply larger than `websocket.max_message_size` fails the message:
    /// the client could not be sent it.
    fn oversized_reply(&self, effects: &[Effect]) -> Option<Failure> {
        let limit = self.shared.websocket.max_message_size;
        effects.iter().find_map(|effect| {
            let Effect::Reply(payload) = effect else {
                return None;
            };
            let len = match payload {
                Payload::Text(text) => text.len(),
                Payload::Binary(data) => data.len(),
            };
            (len > limit).then(|| Failure {
                kind: "reply_too_large",
                overloaded: false,
                message: format!(
                    "function {:?} replied with {len} bytes, over the limit of {limit} (websocket.max_message_size)",
                    self.function.name()
                ),
            })
        })
    }

    /// The function failed on this message: count it, and tell the client
    /// with an error reply or a close, as `runtime.on_error` says. The
    /// copy's receipt still orders what the client sees.
    async fn fail(&mut self, failure: Failure, receipt: Option<Receipt>) -> Next {
        self.shared
            .metrics
            .message_failures
            .with_label_values(&[self.route, failure.kind])
            .inc();
        let next = self.tell_failure(failure, receipt).await;
        if let Next::Continue = next {
            // Read this client's next message only after a pause.
            let limit = self.shared.fault_backoff;
            self.penalty = (self.penalty * 2).clamp(FIRST_PENALTY.min(limit), limit);
            tokio::time::sleep(self.penalty).await;
        }
        next
    }

    async fn tell_failure(&mut self, failure: Failure, receipt: Option<Receipt>) -> Next {
        match self.shared.on_error {
            OnError::Reply => {
                let error = if failure.overloaded {
                    "overloaded"
                } else {
                    "function-failed"
                };
                let body = serde_json::json!({
                    "error": error,
                    "kind": failure.kind,
                    "message": failure.message,
                })
                .to_string();
                self.send(Outbound::Message {
                    receipt,
                    message: Message::Text(body.into()),
                })
                .await
            }
            OnError::Close => {
                if let Some(receipt) = receipt
                    && let Next::Stop = self.send(Outbound::Receipt(receipt)).await
                {
                    return Next::Stop;
                }
                if failure.overloaded {
                    Next::Close(
                        close_code::TRY_AGAIN_LATER,
                        "function overloaded; try again later".into(),
                    )
                } else {
                    Next::Close(
                        close_code::INTERNAL,
                        format!("function error: {}", failure.kind),
                    )
                }
            }
        }
    }

    /// Hand the message's copy to the publisher. Returns the receipt the
    /// reply must wait for: the copy durable in receipt mode, accepted
    /// (spooled, or published with spool room reserved) in async mode.
    async fn copy(&self, payload: &Payload) -> Result<Option<Receipt>, Next> {
        let mode = self.shared.queue_mode;
        let Some(publisher) = &self.shared.publisher else {
            return Ok(None);
        };
        let (body, text) = match payload {
            Payload::Text(text) => (text.as_bytes().to_vec(), true),
            Payload::Binary(data) => (data.clone(), false),
        };
        if mode == QueueMode::Async && !publisher.is_ready() {
            return Err(Next::Close(
                close_code::TRY_AGAIN_LATER,
                "message not stored: broker unreachable and spool full".into(),
            ));
        }
        let copy = QueueMessage::new(
            text,
            body,
            &self.ctx.id,
            self.route,
            self.function.name(),
            self.function.version(),
            &self.shared.node_id,
        );
        match publisher.publish(copy).await {
            Ok(receipt) => Ok(Some(receipt)),
            Err(_) => Err(Next::Close(
                close_code::GOING_AWAY,
                "server shutting down".into(),
            )),
        }
    }

    /// Carry out a function's effects, in order. The copy's receipt goes
    /// with the first reply (or alone, if there is none).
    async fn apply(&mut self, effects: Vec<Effect>, mut receipt: Option<Receipt>) -> Next {
        let mut next = Next::Continue;
        for effect in effects {
            match effect {
                Effect::Reply(payload) => {
                    let message = match payload {
                        Payload::Text(text) => Message::Text(text.into()),
                        Payload::Binary(data) => Message::Binary(data.into()),
                    };
                    if let Next::Stop = self
                        .send(Outbound::Message {
                            receipt: receipt.take(),
                            message,
                        })
                        .await
                    {
                        return Next::Stop;
                    }
                }
                Effect::Close((code, reason)) => {
                    let code = if code == close_code::NORMAL || (3000..=4999).contains(&code) {
                        code
                    } else {
                        tracing::warn!(
                            function = self.function.name(),
                            code,
                            "a function may close with 1000 or 3000-4999; using 1000"
                        );
                        close_code::NORMAL
                    };
                    next = Next::Close(code, reason);
                    break;
                }
                other => {
                    let name = effect_name(&other);
                    self.shared
                        .metrics
                        .effects_unsupported
                        .with_label_values(&[name])
                        .inc();
                    tracing::debug!(
                        function = self.function.name(),
                        effect = name,
                        "effect not supported on this node yet; ignored"
                    );
                }
            }
        }
        if let Some(receipt) = receipt
            && let Next::Stop = self.send(Outbound::Receipt(receipt)).await
        {
            return Next::Stop;
        }
        next
    }

    async fn send(&mut self, outbound: Outbound) -> Next {
        match self.outbound.send(outbound).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }
}

/// Why a write did not complete.
enum WriteFailure {
    /// The socket is closing or gone.
    Gone,
    /// The client did not take the bytes within `websocket.send_timeout`.
    Stalled,
}

/// Flush the sink, or give up on a client that stopped reading.
async fn flush<K>(sink: &mut K, limit: Duration) -> Result<(), WriteFailure>
where
    K: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    match tokio::time::timeout(limit, sink.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFailure::Gone),
        Err(_) => Err(WriteFailure::Stalled),
    }
}

/// Send queued messages in order, each after its copy is durable. Returns
/// the sink, the close frame sent, if any, and whether the client stopped
/// reading (a slow consumer, dropped without a closing handshake).
async fn write<K>(
    mut sink: K,
    mut queue: mpsc::Receiver<Outbound>,
    counters: &Counters,
    done: &CancellationToken,
    shared: &Shared,
) -> (K, Option<(u16, String)>, bool)
where
    K: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let send_timeout = shared.websocket.send_timeout;
    let mut failure = None;
    let mut sent_close = None;
    // Replies fed to the sink but not yet written to the socket. They are
    // flushed when nothing else is ready, so replies to a batch of
    // messages leave in one write, and before waiting on anything.
    let mut unflushed = false;
    loop {
        let outbound = match queue.try_recv() {
            Ok(outbound) => outbound,
            Err(mpsc::TryRecvError::Closed) => break,
            Err(mpsc::TryRecvError::Empty) => {
                if unflushed {
                    if let Err(e) = flush(&mut sink, send_timeout).await {
                        failure = Some(e);
                        break;
                    }
                    unflushed = false;
                }
                match queue.next().await {
                    Some(outbound) => outbound,
                    None => break,
                }
            }
        };
        let (receipt, message) = match outbound {
            Outbound::Message { receipt, message } => (receipt, Some(message)),
            Outbound::Receipt(receipt) => (Some(receipt), None),
            Outbound::Close(code, reason) => {
                sent_close = Some((code, reason));
                break;
            }
        };
        let durable = match receipt {
            None => Ok(()),
            Some(mut receipt) => match receipt.try_ready() {
                Some(result) => result,
                None => {
                    // Do not hold earlier replies back while waiting.
                    if unflushed {
                        if let Err(e) = flush(&mut sink, send_timeout).await {
                            failure = Some(e);
                            break;
                        }
                        unflushed = false;
                    }
                    receipt.ready().await
                }
            },
        };
        if let Err(error) = durable {
            let code = match error {
                crate::publisher::PublishError::Closed => close_code::GOING_AWAY,
                _ => close_code::TRY_AGAIN_LATER,
            };
            sent_close = Some((code, format!("message not stored: {error}")));
            break;
        }
        let Some(message) = message else { continue };
        let len = message.len() as u64;
        // A failed send means the socket is closing or gone; what is left
        // (a pending close answer) is flushed below. Feeding writes out
        // once the write buffer is full, so it too can stall.
        match tokio::time::timeout(send_timeout, sink.feed(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                failure = Some(WriteFailure::Gone);
                break;
            }
            Err(_) => {
                failure = Some(WriteFailure::Stalled);
                break;
            }
        }
        counters.sent.inc();
        counters.sent_bytes.inc_by(len);
        unflushed = true;
    }
    let stalled = matches!(failure, Some(WriteFailure::Stalled));
    if stalled {
        shared
            .metrics
            .closes
            .with_label_values(&["slow_consumer"])
            .inc();
        tracing::debug!(
            "client did not read for {send_timeout:?} (websocket.send_timeout): connection dropped"
        );
    } else if let Some((code, reason)) = &sent_close {
        shared
            .metrics
            .closes
            .with_label_values(&[&code.to_string()])
            .inc();
        let frame = CloseFrame {
            code: CloseCode::from(*code),
            reason: clip_reason(reason).into(),
        };
        let _ = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some(frame)))).await;
    } else {
        let _ = flush(&mut sink, send_timeout).await;
    }
    done.cancel();
    (sink, sent_close, stalled)
}

/// The close code and reason for a read error, or `None` when the socket
/// is simply gone.
fn close_for(error: &WsError, limits: &crate::config::WebSocketSettings) -> Option<(u16, String)> {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some((
            close_code::TOO_BIG,
            format!("message of {size} bytes is over the limit of {max_size}"),
        )),
        WsError::Capacity(_) => Some((
            close_code::TOO_BIG,
            format!("frame over the limit of {} bytes", limits.max_frame_size),
        )),
        WsError::Utf8(_) => Some((
            close_code::INVALID_DATA,
            "text message is not valid UTF-8".into(),
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_) => None,
        WsError::Protocol(e) => Some((close_code::PROTOCOL, format!("protocol error: {e}"))),
        _ => None,
    }
}

/// A close reason fits in 123 bytes.
fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn effect_name(effect: &Effect) -> &'static str {
    match effect {
        Effect::Reply(_) => "reply",
        Effect::Send(_) => "send",
        Effect::Join(_) => "join",
        Effect::Leave(_) => "leave",
        Effect::Broadcast(_) => "broadcast",
        Effect::Publish(_) => "publish",
        Effect::SetState(_) => "set-state",
        Effect::Close(_) => "close",
    }
}

#[cfg(test)]
mod tests {
    use super::clip_reason;

    #[test]
    fn close_reasons_fit_the_frame() {
        assert_eq!(clip_reason("short"), "short");
        let long = "é".repeat(100);
        let clipped = clip_reason(&long);
        assert!(clipped.len() <= 123);
        assert!(long.starts_with(&clipped));
    }
}
