//! One WebSocket connection after the upgrade: reading, writing and the
//! closing handshake. What happens to each message is the
//! [`Dispatcher`]'s.
//!
//! A reader and a writer run side by side in the connection's task. The
//! reader takes messages in order and hands each to the dispatcher, which
//! queues what the client gets with the copy's receipt. The writer sends
//! queued replies in order, each only once its copy is durable (in receipt
//! mode), so replies are pipelined yet never overtake a copy.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt};
use prometheus::IntCounter;
use runtime::{Context, Effect, Payload};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::close::{self, Close};
use crate::dispatch::{
    self, ByteBudget, DispatchSettings, Dispatcher, Functions, Handler, Next, Outbound, Wiring,
    not_stored_close,
};
use crate::hub::{Handle, Registering, Registration};
use crate::metrics::Metrics;
use crate::router::Route;

/// How long to wait for the client's answer to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What every connection needs, the same for all of them.
pub struct ConnectionSettings {
    /// Close after this long without a frame (`websocket.idle_timeout`).
    pub idle_timeout: Duration,
    /// Close after this long open (`websocket.max_duration`).
    pub max_duration: Duration,
    /// Most messages per second, also the burst
    /// (`websocket.max_message_rate`).
    pub max_message_rate: NonZeroU32,
    /// Replies queued before the reader waits (`websocket.send_queue`).
    pub send_queue: std::num::NonZeroUsize,
    /// A client that takes nothing for this long is dropped
    /// (`websocket.send_timeout`).
    pub send_timeout: Duration,
    /// Largest frame, for the reason of a 1009 close.
    pub max_frame_size: usize,
    /// How each message is handled.
    pub dispatch: Arc<DispatchSettings>,
    /// Connection and message counters.
    pub metrics: Metrics,
    /// Cancelled once, when the gateway starts shutting down.
    pub shutdown: CancellationToken,
}

/// A connection the upgrade admitted: its route, and what its `connect`
/// function decided.
pub struct Opened<R: Functions> {
    /// What every later call is told about the connection.
    pub ctx: Context,
    /// Where the live version of each of the route's functions is found.
    pub functions: Arc<R>,
    /// The route: which function serves each event.
    pub route: Arc<Route>,
    /// The request path.
    pub path: String,
    /// The client's address.
    pub remote_addr: String,
    /// The `connect` function that admitted it, if the route has one.
    pub connected_by: Option<Arc<R::Handler>>,
    /// Effects `on-connect` asked for, to carry out once open.
    pub effects: Vec<Effect>,
    /// When the client's token stops being accepted: the connection is
    /// closed with 1008 then (`auth.jwt.close_on_expiry`).
    pub expires_at: Option<std::time::Instant>,
}

/// A WebSocket and what its upgrade decided: handed on boxed, so that an
/// async fn taking it keeps a pointer, not the stream, for its whole life.
pub struct Upgraded<S, R: Functions> {
    /// The WebSocket, ready for frames.
    pub ws: WebSocketStream<S>,
    /// What the upgrade decided, for the connection.
    pub opened: Opened<R>,
}

/// Move a value out of its box and free the box at once (a box moved out
/// of in place stays allocated until its binding goes out of scope).
#[expect(
    clippy::boxed_local,
    reason = "taking the box by value is the point: it is freed on return"
)]
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Per-route counters, resolved once per connection.
struct Counters {
    received: IntCounter,
    received_bytes: IntCounter,
    sent: IntCounter,
    sent_bytes: IntCounter,
}

/// Serve an upgraded connection until it closes.
pub async fn serve<S, R>(upgraded: Box<Upgraded<S, R>>, settings: Arc<ConnectionSettings>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: Functions,
{
    // Taken out of its box, which is freed here and not held for the
    // connection's life.
    let Upgraded { ws, opened } = unbox(upgraded);
    let (sink, stream) = ws.split();
    // Set up in a plain function: what it takes apart is not kept in this
    // task's state for the connection's life.
    let Parts {
        counters,
        open,
        queue,
        writer_done,
        budget,
        registration,
        dispatcher,
        token_expires,
        connected_by,
        effects,
        after,
    } = parts(opened, &settings);
    let reader = Reader {
        rate: governor::RateLimiter::direct(governor::Quota::per_second(settings.max_message_rate)),
        settings: &settings,
        counters: &counters,
        token_expires,
        handle: registration.handle().clone(),
        dispatcher,
    };
    let reading = async {
        let ended = reader
            .run(stream, connected_by, effects, &writer_done)
            .await;
        // Out of the hub (and its groups) once nothing more is read: its
        // queue's last sender goes with the dispatcher, so the writer
        // finishes what is queued and stops.
        drop(registration);
        ended
    };
    let ((client_close, ctx), (sink, sent_close, stalled)) = tokio::join!(
        reading,
        write(sink, queue, &counters, &writer_done, &budget, &settings)
    );

    // Complete the closing handshake: read until the client's close frame
    // (or give up after a short while). A client that stopped reading is
    // not waited for: its socket is dropped with what was queued for it.
    let (code, reason) = match (&client_close, &sent_close) {
        (ClientClose::Closed(code, reason), _) => (*code, reason.clone()),
        (_, Some(close)) => (close.code(), close.reason()),
        _ => (close::code::ABNORMAL, String::new()),
    };
    if let ClientClose::Open(stream) = client_close
        && !stalled
        && let Ok(ws) = sink.reunite(stream)
    {
        // Boxed: only needed once, at the end.
        Box::pin(finish_close(ws)).await;
    }
    open.dec();
    Box::pin(after.run(&settings, ctx, code, reason)).await;
}

/// What a connection is made of, set up before it is served.
struct Parts<R: Functions> {
    counters: Counters,
    /// `tidegate_connections_open` for its route.
    open: prometheus::IntGauge,
    /// What the writer sends, in order.
    queue: mpsc::Receiver<Outbound>,
    /// Cancelled by the writer when it can no longer send, so the reader
    /// stops too.
    writer_done: CancellationToken,
    /// Replies' bytes not yet written: the dispatcher takes, the writer
    /// gives back.
    budget: Arc<ByteBudget>,
    /// Its place in the hub while the reader runs.
    registration: Registration,
    dispatcher: Dispatcher<R>,
    token_expires: Option<Instant>,
    connected_by: Option<Arc<R::Handler>>,
    effects: Vec<Effect>,
    /// What runs once it has closed.
    after: AfterClose<R>,
}

fn parts<R: Functions>(opened: Opened<R>, settings: &ConnectionSettings) -> Parts<R> {
    let Opened {
        ctx,
        functions,
        route,
        path,
        remote_addr,
        connected_by,
        effects,
        expires_at,
    } = opened;
    let route_path = route.shared_path().clone();
    let metrics = &settings.metrics;
    metrics.connections.with_label_values(&[&route_path]).inc();
    let open = metrics.connections_open.with_label_values(&[&route_path]);
    open.inc();
    let counters = Counters {
        received: metrics.messages_received.with_label_values(&[&route_path]),
        received_bytes: metrics.bytes_received.with_label_values(&[&route_path]),
        sent: metrics.messages_sent.with_label_values(&[&route_path]),
        sent_bytes: metrics.bytes_sent.with_label_values(&[&route_path]),
    };
    // futures' channel allocates per message rather than a block of slots
    // up front, so an idle connection does not pay for its queue. One
    // sender: capacity = buffer + 1.
    let (outbound, queue) = mpsc::channel(settings.send_queue.get() - 1);
    let budget = Arc::new(ByteBudget::new(settings.dispatch.send_queue_bytes));
    // In the hub while the reader runs: other connections, the API and
    // the push queue reach it there.
    let registration = settings.dispatch.hub.register(Registering {
        id: ctx.id.clone(),
        route: route_path.clone(),
        path,
        remote_addr,
        outbound: outbound.clone(),
        budget: budget.clone(),
    });
    let dispatcher = Dispatcher::new(
        settings.dispatch.clone(),
        Wiring {
            ctx: Arc::new(ctx),
            functions: functions.clone(),
            route: route.clone(),
            handle: registration.handle().clone(),
            outbound,
            budget: budget.clone(),
        },
    );
    Parts {
        counters,
        open,
        queue,
        writer_done: CancellationToken::new(),
        budget,
        registration,
        dispatcher,
        token_expires: expires_at.map(Instant::from_std),
        connected_by,
        effects,
        after: AfterClose {
            functions,
            route,
            route_path,
        },
    }
}

/// The route's `disconnect` function, run once the connection has closed.
struct AfterClose<R> {
    functions: Arc<R>,
    route: Arc<Route>,
    route_path: Arc<str>,
}

impl<R: Functions> AfterClose<R> {
    async fn run(
        self,
        settings: &ConnectionSettings,
        ctx: Arc<Context>,
        code: u16,
        reason: String,
    ) {
        let Some(function) = self
            .route
            .disconnect()
            .and_then(|name| self.functions.live(name))
        else {
            return;
        };
        match function.on_disconnect(ctx.clone(), code, reason).await {
            Ok(effects) => {
                dispatch::after_close(
                    &settings.dispatch,
                    &*function,
                    &ctx,
                    &self.route_path,
                    effects,
                )
                .await;
            }
            Err(e) => tracing::debug!(
                connection = %ctx.id,
                route = &*self.route_path,
                function = function.name(),
                version = function.version(),
                "on-disconnect failed: {e}"
            ),
        }
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

/// The reading half: frames in order, the time limits, the message rate.
struct Reader<'a, R: Functions> {
    /// Messages over the rate close the connection.
    rate: governor::DefaultDirectRateLimiter,
    /// The limits.
    settings: &'a ConnectionSettings,
    /// Messages received.
    counters: &'a Counters,
    /// When the client's token expires, if that closes the connection.
    token_expires: Option<Instant>,
    /// The connection in the hub: closes asked for from outside.
    handle: Arc<Handle>,
    /// Where each message goes.
    dispatcher: Dispatcher<R>,
}

impl<R: Functions> Reader<'_, R> {
    /// Read until the connection ends; returns how, and what the
    /// connection's last call was told (its state included).
    async fn run<T>(
        mut self,
        mut stream: T,
        connected_by: Option<Arc<R::Handler>>,
        effects: Vec<Effect>,
        writer_done: &CancellationToken,
    ) -> (ClientClose<T>, Arc<Context>)
    where
        T: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        // Boxed: once per connection, and only when there are effects.
        let mut next = match connected_by {
            Some(function) if !effects.is_empty() => {
                Box::pin(self.dispatcher.on_connected(&*function, effects)).await
            }
            _ => Next::Continue,
        };
        let limits = self.settings;
        let opened = Instant::now();
        let expires = opened + limits.max_duration;
        // The connection ends at its maximum duration or when its token
        // expires, whichever comes first.
        let ends = self
            .token_expires
            .map_or(expires, |token| token.min(expires));
        let mut last_frame = opened;
        // One timer for the idle timeout and the end; a frame only notes
        // the time, the timer is moved when it fires.
        let timer = tokio::time::sleep_until((opened + limits.idle_timeout).min(ends));
        // Created once: registering a waiter per message costs.
        let shutdown = limits.shutdown.cancelled();
        let writer_gone = writer_done.cancelled();
        let handle = self.handle.clone();
        let outside = handle.closed_from_outside();
        tokio::pin!(shutdown, writer_gone, timer, outside);
        while let Next::Continue = next {
            let frame = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    next = Next::Close(Close::Shutdown);
                    break;
                }
                close = &mut outside => {
                    next = Next::Close(close);
                    break;
                }
                _ = &mut writer_gone => {
                    next = Next::Stop;
                    break;
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    let idle_until = last_frame + limits.idle_timeout;
                    if self.token_expires.is_some_and(|token| now >= token) {
                        next = Next::Close(Close::TokenExpired);
                        break;
                    }
                    if now >= expires {
                        next = Next::Close(Close::MaxDuration(limits.max_duration));
                        break;
                    }
                    if now < idle_until {
                        timer.as_mut().reset(idle_until.min(ends));
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
                                .reset((Instant::now() + limits.idle_timeout).min(ends));
                            frame
                        }
                        Poll::Pending => {
                            next = Next::Close(Close::Idle(limits.idle_timeout));
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
                next = Next::Close(Close::Rate(limits.max_message_rate));
                break;
            }
            next = match frame {
                None => {
                    let ctx = self.dispatcher.context().clone();
                    return (
                        ClientClose::Closed(close::code::ABNORMAL, String::new()),
                        ctx,
                    );
                }
                Some(Ok(Message::Text(text))) => {
                    // Without a copy when the frame's buffer is not shared.
                    let bytes = Vec::from(bytes::Bytes::from(text));
                    match String::from_utf8(bytes) {
                        Ok(text) => self.on_message(Payload::Text(text)).await,
                        Err(_) => Next::Close(Close::InvalidUtf8),
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    self.on_message(Payload::Binary(Vec::from(data))).await
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                        .unwrap_or((close::code::NORMAL, String::new()));
                    let ctx = self.dispatcher.context().clone();
                    return (ClientClose::Closed(code, reason), ctx);
                }
                Some(Ok(_)) => Next::Continue, // ping, pong: answered by tungstenite
                Some(Err(error)) => match close_for(&error, limits.max_frame_size) {
                    Some(close) => Next::Close(close),
                    None => {
                        let ctx = self.dispatcher.context().clone();
                        return (
                            ClientClose::Closed(close::code::ABNORMAL, String::new()),
                            ctx,
                        );
                    }
                },
            };
        }
        if let Next::Close(close) = next {
            // Dropping the dispatcher (and its sender) lets the writer
            // finish what is queued.
            // Boxed: once per connection, so its state is not part of
            // every idle connection's task.
            Box::pin(self.dispatcher.close(close)).await;
        }
        let ctx = self.dispatcher.context().clone();
        (ClientClose::Open(stream), ctx)
    }

    async fn on_message(&mut self, payload: Payload) -> Next {
        let len = match &payload {
            Payload::Text(text) => text.len(),
            Payload::Binary(data) => data.len(),
        };
        self.counters.received.inc();
        self.counters.received_bytes.inc_by(len as u64);
        self.handle.touch();
        // Not boxed: the function call inside is (its state is the large
        // part); boxing the whole handling instead saved 1.1 KB per idle
        // connection but cost about 0.04 us per message.
        self.dispatcher.on_message(payload).await
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
    budget: &ByteBudget,
    settings: &ConnectionSettings,
) -> (K, Option<Close>, bool)
where
    K: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let send_timeout = settings.send_timeout;
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
        let (receipt, message, bytes) = match outbound {
            Outbound::Message {
                receipt,
                message,
                bytes,
            } => (receipt, Some(message), bytes),
            Outbound::Receipt(receipt) => (Some(receipt), None, 0),
            Outbound::Close(close) => {
                sent_close = Some(close);
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
            tracing::debug!("a copy was not kept, its reply is not sent: {error}");
            sent_close = Some(not_stored_close(&error));
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
        // Its bytes are in the socket's write buffer now.
        budget.give_back(bytes);
        counters.sent.inc();
        counters.sent_bytes.inc_by(len);
        unflushed = true;
    }
    let stalled = matches!(failure, Some(WriteFailure::Stalled));
    if stalled {
        settings
            .metrics
            .closes
            .with_label_values(&["slow_consumer"])
            .inc();
        tracing::debug!(
            "client did not read for {send_timeout:?} (websocket.send_timeout): connection dropped"
        );
    } else if let Some(close) = &sent_close {
        settings
            .metrics
            .closes
            .with_label_values(&[close.label()])
            .inc();
        let frame = CloseFrame {
            code: CloseCode::from(close.code()),
            reason: close.reason().into(),
        };
        let _ = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some(frame)))).await;
    } else {
        let _ = flush(&mut sink, send_timeout).await;
    }
    // Nothing more will be given back: a dispatcher waiting for room stops.
    budget.close();
    done.cancel();
    (sink, sent_close, stalled)
}

/// The close for a read error, or `None` when the socket is simply gone.
fn close_for(error: &WsError, max_frame_size: usize) -> Option<Close> {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some(Close::TooBig(
            format!("message of {size} bytes is over the limit of {max_size}"),
        )),
        WsError::Capacity(_) => Some(Close::TooBig(format!(
            "frame over the limit of {max_frame_size} bytes"
        ))),
        WsError::Utf8(_) => Some(Close::InvalidUtf8),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_) => None,
        WsError::Protocol(e) => Some(Close::Protocol(e.to_string())),
        _ => None,
    }
}

/// The connection in-process, over an in-memory stream, with a scripted
/// function and paused time: every time limit is checked to the tick.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::{SinkExt, StreamExt};
    use runtime::{HandlerError, InvokeError, Priority};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::config::{OnError, QueueMode};

    /// Echoes text; `fail` traps (with internals in its reason), `big`
    /// replies with 100 KiB. Notes when each call started.
    #[derive(Default)]
    struct Scripted {
        calls: Mutex<Vec<Instant>>,
        disconnected: Mutex<Option<u16>>,
    }

    impl Handler for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }

        fn version(&self) -> &str {
            "v1"
        }

        async fn on_message(
            &self,
            ctx: Arc<Context>,
            payload: Payload,
            _priority: Priority,
        ) -> Result<Result<Vec<Effect>, HandlerError>, InvokeError> {
            self.calls.lock().unwrap().push(Instant::now());
            let text = |t: &str| Payload::Text(t.into());
            if let Payload::Text(command) = &payload
                && let Some((verb, arg)) = command.split_once(':')
            {
                let effects = match verb {
                    "join" => vec![Effect::Join(arg.into()), Effect::Reply(text("joined"))],
                    "leave" => vec![Effect::Leave(arg.into()), Effect::Reply(text("left"))],
                    "say" => vec![Effect::Broadcast(("room".into(), text(arg)))],
                    "send" => {
                        let (to, what) = arg.split_once('=').unwrap();
                        vec![Effect::Send((to.into(), text(what)))]
                    }
                    "ack-then-send" => vec![
                        Effect::Reply(text("ack")),
                        Effect::Send((arg.into(), text("relayed"))),
                    ],
                    "keep" => vec![
                        Effect::SetState(arg.as_bytes().to_vec()),
                        Effect::Reply(text("kept")),
                    ],
                    "state" => {
                        let state = ctx.state.clone().unwrap_or_default();
                        vec![Effect::Reply(text(&String::from_utf8(state).unwrap()))]
                    }
                    _ => vec![Effect::Reply(payload)],
                };
                return Ok(Ok(effects));
            }
            match &payload {
                Payload::Text(text) if text == "fail" => Err(InvokeError::Trap {
                    function: "scripted".into(),
                    reason: "wasm trap: unreachable at /var/lib/tidegate/artifacts/x.cwasm".into(),
                }),
                Payload::Text(text) if text == "refuse-big" => {
                    Ok(Err(HandlerError::BadRequest("x".repeat(200 << 10))))
                }
                Payload::Text(text) if text == "stopping" => Err(InvokeError::ShuttingDown {
                    function: "scripted".into(),
                }),
                Payload::Text(text) if text == "big" => {
                    Ok(Ok(vec![Effect::Reply(Payload::Binary(vec![7; 100 << 10]))]))
                }
                _ => Ok(Ok(vec![Effect::Reply(payload)])),
            }
        }

        async fn on_disconnect(
            &self,
            _ctx: Arc<Context>,
            code: u16,
            _reason: String,
        ) -> Result<Vec<Effect>, InvokeError> {
            *self.disconnected.lock().unwrap() = Some(code);
            Ok(Vec::new())
        }
    }

    /// Every function name is the scripted function.
    struct One(Arc<Scripted>);

    impl Functions for One {
        type Handler = Scripted;

        fn live(&self, _name: &str) -> Option<Arc<Scripted>> {
            Some(self.0.clone())
        }
    }

    fn settings() -> ConnectionSettings {
        let metrics = Metrics::new().unwrap();
        ConnectionSettings {
            idle_timeout: Duration::from_secs(30),
            max_duration: Duration::from_secs(3600),
            max_message_rate: NonZeroU32::new(1000).unwrap(),
            send_queue: std::num::NonZeroUsize::new(256).unwrap(),
            send_timeout: Duration::from_secs(3600),
            max_frame_size: 1 << 20,
            dispatch: Arc::new(DispatchSettings {
                node_id: "node".into(),
                queue_mode: QueueMode::Off,
                publisher: None,
                on_error: OnError::Reply,
                fault_backoff: Duration::from_secs(1),
                max_reply_size: 1 << 20,
                send_queue_bytes: 1 << 20,
                max_state_size: 16,
                max_effects: 8,
                hub: Arc::new(crate::hub::Hub::new("node", 2, &metrics)),
                metrics: metrics.clone(),
            }),
            metrics,
            shutdown: CancellationToken::new(),
        }
    }

    type Client = WebSocketStream<DuplexStream>;

    /// Serve a connection; the client's end, and the function.
    async fn open(settings: ConnectionSettings) -> (Client, Arc<Scripted>) {
        open_with(settings, None).await
    }

    async fn open_with(
        settings: ConnectionSettings,
        expires_at: Option<std::time::Instant>,
    ) -> (Client, Arc<Scripted>) {
        let function = Arc::new(Scripted::default());
        let client = open_as(Arc::new(settings), "node.1", function.clone(), expires_at).await;
        (client, function)
    }

    /// Serve connection `id` with `function`; the client's end.
    async fn open_as(
        settings: Arc<ConnectionSettings>,
        id: &str,
        function: Arc<Scripted>,
        expires_at: Option<std::time::Instant>,
    ) -> Client {
        let (server, client) = tokio::io::duplex(16 << 10);
        let route = crate::router::Route::new(crate::router::RouteSpec {
            path: "/".into(),
            function: Some("scripted".into()),
            ..crate::router::RouteSpec::default()
        })
        .unwrap();
        let opened = Opened {
            ctx: Context {
                id: id.into(),
                route: "/".into(),
                claims: Vec::new(),
                state: None,
            },
            functions: Arc::new(One(function)),
            route: Arc::new(route),
            path: "/".into(),
            remote_addr: "127.0.0.1:1".into(),
            connected_by: None,
            effects: Vec::new(),
            expires_at,
        };
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        tokio::spawn(serve(Box::new(Upgraded { ws, opened }), settings));
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    async fn echo(client: &mut Client, text: &str) {
        client.send(Message::Text(text.into())).await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Text(text.into())
        );
    }

    /// The close frame the gateway sends next (data before it is skipped).
    async fn close_frame(client: &mut Client) -> (u16, String) {
        loop {
            match client.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    panic!("closed without a close frame")
                }
                Some(Ok(_)) => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_with_1001_at_the_idle_timeout() {
        let (mut client, function) = open(settings()).await;
        echo(&mut client, "hello").await;
        let last = Instant::now();
        let (code, reason) = close_frame(&mut client).await;
        assert_eq!(code, 1001);
        assert!(reason.contains("websocket.idle_timeout"), "{reason}");
        assert_eq!(last.elapsed().as_secs(), 30);
        drop(client);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(*function.disconnected.lock().unwrap(), Some(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_the_idle_timeout() {
        let (mut client, _) = open(settings()).await;
        let opened = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            echo(&mut client, "still here").await;
        }
        let (code, _) = close_frame(&mut client).await;
        assert_eq!(code, 1001);
        // 60 s of activity, then 30 s of silence.
        assert_eq!(opened.elapsed().as_secs(), 90);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closes_with_1001_at_its_maximum_duration() {
        let mut settings = settings();
        settings.max_duration = Duration::from_secs(100);
        let (mut client, _) = open(settings).await;
        let opened = Instant::now();
        // Pings every 20 s keep it from idling; the maximum duration
        // still ends it.
        let (code, reason) = loop {
            tokio::select! {
                frame = client.next() => match frame {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        break (u16::from(frame.code), frame.reason.to_string());
                    }
                    Some(Ok(_)) => {}
                    other => panic!("closed without a close frame: {other:?}"),
                },
                _ = tokio::time::sleep(Duration::from_secs(20)) => {
                    client.send(Message::Ping(Vec::new().into())).await.unwrap();
                }
            }
        };
        assert_eq!(code, 1001);
        assert!(reason.contains("websocket.max_duration"), "{reason}");
        assert_eq!(opened.elapsed().as_secs(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_the_message_rate_is_closed_with_1008() {
        let mut settings = settings();
        settings.max_message_rate = NonZeroU32::new(5).unwrap();
        let (mut client, function) = open(settings).await;
        for n in 0..10 {
            if client
                .send(Message::Text(format!("{n}").into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let (code, reason) = close_frame(&mut client).await;
        assert_eq!(code, 1008);
        assert!(reason.contains("websocket.max_message_rate"), "{reason}");
        assert_eq!(function.calls.lock().unwrap().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_pause_the_client_doubling_and_tell_no_internals() {
        let (mut client, function) = open(settings()).await;
        for _ in 0..3 {
            client.send(Message::Text("fail".into())).await.unwrap();
            let Some(Ok(Message::Text(reply))) = client.next().await else {
                panic!("an error reply");
            };
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(reply["error"], "function-failed");
            assert_eq!(reply["kind"], "trap");
            let message = reply["message"].as_str().unwrap();
            assert!(
                !message.contains("wasm") && !message.contains('/'),
                "{message}"
            );
        }
        echo(&mut client, "ok").await;
        echo(&mut client, "ok again").await;
        let calls = function.calls.lock().unwrap().clone();
        let gaps: Vec<u128> = calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        // 10 ms after the first failure, 20 after the second, 40 after the
        // third; a success clears the pause.
        assert_eq!(gaps, [10, 20, 40, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_replies_are_bounded_in_bytes_and_none_is_lost() {
        let mut settings = settings();
        let mut dispatch = DispatchSettings {
            send_queue_bytes: 256 << 10,
            ..Arc::try_unwrap(settings.dispatch).ok().unwrap()
        };
        dispatch.max_reply_size = 128 << 10;
        settings.dispatch = Arc::new(dispatch);
        let (mut client, function) = open(settings).await;
        // The client sends 20 messages whose replies are 100 KiB each and
        // reads nothing: the gateway stops reading once about 256 KiB of
        // replies wait (plus what the in-memory stream holds).
        for _ in 0..20 {
            client.send(Message::Text("big".into())).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let called = function.calls.lock().unwrap().len();
        assert!(
            called <= 5,
            "{called} replies were made while none was read"
        );
        for _ in 0..20 {
            match client.next().await {
                Some(Ok(Message::Binary(data))) => assert_eq!(data.len(), 100 << 10),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(function.calls.lock().unwrap().len(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closes_with_1008_when_its_token_expires() {
        let expires = std::time::Instant::now() + Duration::from_secs(45);
        let (mut client, _) = open_with(settings(), Some(expires)).await;
        let opened = Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            echo(&mut client, "fresh").await;
        }
        let (code, reason) = close_frame(&mut client).await;
        assert_eq!(code, 1008);
        assert!(reason.contains("expired"), "{reason}");
        assert_eq!(opened.elapsed().as_secs(), 45);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_with_1001_after_the_message_in_hand() {
        let settings = settings();
        let shutdown = settings.shutdown.clone();
        let (mut client, _) = open(settings).await;
        echo(&mut client, "before").await;
        shutdown.cancel();
        let (code, reason) = close_frame(&mut client).await;
        assert_eq!(code, 1001);
        assert!(reason.contains("shutting down"), "{reason}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_refused_by_a_stopping_runtime_closes_with_1001_not_as_a_failure() {
        let settings = settings();
        let metrics = settings.metrics.clone();
        let (mut client, _) = open(settings).await;
        client.send(Message::Text("stopping".into())).await.unwrap();
        let (code, reason) = close_frame(&mut client).await;
        assert_eq!(code, 1001);
        assert!(reason.contains("shutting down"), "{reason}");
        let failures = metrics
            .message_failures
            .with_label_values(&["/", "shutdown"])
            .get();
        assert_eq!(failures, 0, "shutdown is not a function failure");
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_reply_over_the_message_limit_fails_the_message_not_the_connection() {
        let mut settings = settings();
        let mut dispatch = Arc::try_unwrap(settings.dispatch).ok().unwrap();
        dispatch.max_reply_size = 128 << 10;
        settings.dispatch = Arc::new(dispatch);
        let (mut client, _) = open(settings).await;
        client
            .send(Message::Text("refuse-big".into()))
            .await
            .unwrap();
        let Some(Ok(Message::Text(reply))) = client.next().await else {
            panic!("an error reply, not a dropped connection");
        };
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["kind"], "reply_too_large");
        echo(&mut client, "still open").await;
    }

    /// The next text message the client gets.
    async fn text(client: &mut Client) -> String {
        match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    async fn say(client: &mut Client, text: &str) {
        client.send(Message::Text(text.into())).await.unwrap();
    }

    #[tokio::test]
    async fn broadcasts_reach_the_group_and_sends_reach_one_connection() {
        let settings = Arc::new(settings());
        let function = Arc::new(Scripted::default());
        let mut a = open_as(settings.clone(), "node.a", function.clone(), None).await;
        let mut b = open_as(settings.clone(), "node.b", function.clone(), None).await;
        let mut c = open_as(settings.clone(), "node.c", function.clone(), None).await;
        for client in [&mut a, &mut b] {
            say(client, "join:room").await;
            assert_eq!(text(client).await, "joined");
        }
        assert_eq!(settings.dispatch.hub.group_size("room"), 2);
        say(&mut a, "say:hello").await;
        assert_eq!(text(&mut a).await, "hello", "the sender is included");
        assert_eq!(text(&mut b).await, "hello");
        say(&mut c, "send:node.a=psst").await;
        assert_eq!(text(&mut a).await, "psst");
        say(&mut b, "leave:room").await;
        assert_eq!(text(&mut b).await, "left");
        say(&mut a, "say:again").await;
        assert_eq!(text(&mut a).await, "again");
        // c is in no group and b left: neither gets anything. Their next
        // message is the answer to their own.
        say(&mut b, "state:").await;
        assert_eq!(text(&mut b).await, "");
        say(&mut c, "send:node.gone=x").await;
        say(&mut c, "state:").await;
        assert_eq!(text(&mut c).await, "");
        let gone = settings
            .metrics
            .deliveries
            .with_label_values(&["gone"])
            .get();
        assert_eq!(gone, 1, "a send to a gone connection is counted");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            settings.dispatch.hub.group_size("room"),
            0,
            "a closed connection leaves its groups"
        );
    }

    #[tokio::test]
    async fn state_is_kept_for_later_messages_and_bounded() {
        let (mut client, _function) = open(settings()).await;
        say(&mut client, "keep:ada").await;
        assert_eq!(text(&mut client).await, "kept");
        say(&mut client, "state:").await;
        assert_eq!(text(&mut client).await, "ada");
        say(&mut client, "keep:0123456789abcdefg").await;
        let reply: serde_json::Value = serde_json::from_str(&text(&mut client).await).unwrap();
        assert_eq!(reply["kind"], "state_too_large", "{reply}");
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .contains("runtime.max_state_size")
        );
        say(&mut client, "state:").await;
        assert_eq!(
            text(&mut client).await,
            "ada",
            "a failed message changes nothing"
        );
    }

    #[tokio::test]
    async fn joins_past_the_bound_fail_the_message_and_change_nothing() {
        let (mut client, _function) = open(settings()).await;
        for group in ["g1", "g2"] {
            say(&mut client, &format!("join:{group}")).await;
            assert_eq!(text(&mut client).await, "joined");
        }
        say(&mut client, "join:g3").await;
        let reply: serde_json::Value = serde_json::from_str(&text(&mut client).await).unwrap();
        assert_eq!(reply["kind"], "too_many_groups", "{reply}");
        say(&mut client, "join:g1").await;
        assert_eq!(
            text(&mut client).await,
            "joined",
            "joining again is no change"
        );
    }

    #[tokio::test]
    async fn a_close_asked_for_from_outside_closes_with_its_code() {
        let settings = Arc::new(settings());
        let function = Arc::new(Scripted::default());
        let mut client = open_as(settings.clone(), "node.x", function.clone(), None).await;
        echo(&mut client, "before").await;
        assert!(settings.dispatch.hub.close(
            "node.x",
            Close::ByFunction {
                code: 4002,
                reason: "done".into()
            }
        ));
        assert_eq!(close_frame(&mut client).await, (4002, "done".into()));
        drop(client);
        for _ in 0..100 {
            if function.disconnected.lock().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*function.disconnected.lock().unwrap(), Some(4002));
        assert!(settings.dispatch.hub.info("node.x").is_none());
    }

    #[tokio::test]
    async fn nothing_reaches_another_connection_before_the_copy_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        let queue = crate::config::QueueSettings {
            url: "amqp://scripted".into(),
            queue: "q".into(),
            exchange: "amq.topic".into(),
            push_queue: None,
            mode: QueueMode::Receipt,
            max_in_flight: std::num::NonZeroUsize::new(8).unwrap(),
            spool_dir: dir.path().to_path_buf(),
            spool_max_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
        };
        let (publisher, _task, mut broker) =
            crate::publisher::Publisher::scripted(queue, metrics.clone());
        let mut plain = settings();
        let mut dispatch = Arc::try_unwrap(plain.dispatch).ok().unwrap();
        dispatch.publisher = Some(publisher.clone());
        dispatch.queue_mode = QueueMode::Receipt;
        plain.dispatch = Arc::new(dispatch);
        let settings = Arc::new(plain);
        while !publisher.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let function = Arc::new(Scripted::default());
        let mut sender = open_as(settings.clone(), "node.s", function.clone(), None).await;
        let mut other = open_as(settings.clone(), "node.o", function.clone(), None).await;
        // A reply first, then a send: the send waits for the copy too.
        say(&mut sender, "ack-then-send:node.o").await;
        let copy = broker.next().await;
        let early = tokio::time::timeout(Duration::from_millis(200), other.next()).await;
        assert!(
            early.is_err(),
            "delivered before the copy was confirmed: {early:?}"
        );
        copy.ack();
        assert_eq!(text(&mut other).await, "relayed");
        assert_eq!(text(&mut sender).await, "ack");
        // A refused copy: neither the reply nor the send goes out.
        say(&mut sender, "ack-then-send:node.o").await;
        broker.next().await.nack();
        let late = tokio::time::timeout(Duration::from_millis(300), other.next()).await;
        assert!(
            !matches!(late, Ok(Some(Ok(Message::Text(_))))),
            "a message whose copy was refused reached another connection: {late:?}"
        );
    }
}
