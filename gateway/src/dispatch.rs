//! What happens to one message of a connection, in order: its copy is
//! handed to the publisher, the function runs, its effects are carried
//! out, and a failure is answered as `runtime.on_error` says (with a pause
//! before the client's next message when failures repeat). The connection
//! only reads, writes and closes; everything between a message and what
//! the client gets back is here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::SinkExt;
use runtime::{Context, Effect, HandlerError, InvokeError, Payload, Priority};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::close::Close;
use crate::config::{OnError, QueueMode};
use crate::hub::{GroupError, Handle, Hub, check_group};
use crate::metrics::Metrics;
use crate::publisher::{PublishError, Publisher, QueueMessage, Receipt};
use crate::router::{Pick, Route};

/// The pause after a first failure in a row (see [`Dispatcher`]).
const FIRST_PENALTY: Duration = Duration::from_millis(10);

/// The function a connection's events go to: the runtime's
/// [`runtime::Function`], or a scripted one in tests.
pub trait Handler: Send + Sync + 'static {
    /// The function's name (queue headers, logs).
    fn name(&self) -> &str;
    /// The version serving this connection (queue headers).
    fn version(&self) -> &str;
    /// Run `on-message`. The inner `Result` is the function's own answer;
    /// the outer one says whether it ran at all.
    fn on_message(
        &self,
        ctx: Arc<Context>,
        payload: Payload,
        priority: Priority,
    ) -> impl Future<Output = Result<Result<Vec<Effect>, HandlerError>, InvokeError>> + Send;
    /// Run `on-disconnect`.
    fn on_disconnect(
        &self,
        ctx: Arc<Context>,
        code: u16,
        reason: String,
    ) -> impl Future<Output = Result<Vec<Effect>, InvokeError>> + Send;
}

impl Handler for runtime::Function {
    fn name(&self) -> &str {
        runtime::Function::name(self)
    }

    fn version(&self) -> &str {
        runtime::Function::version(self)
    }

    fn on_message(
        &self,
        ctx: Arc<Context>,
        payload: Payload,
        priority: Priority,
    ) -> impl Future<Output = Result<Result<Vec<Effect>, HandlerError>, InvokeError>> + Send {
        runtime::Function::on_message(self, ctx, payload, priority)
    }

    fn on_disconnect(
        &self,
        ctx: Arc<Context>,
        code: u16,
        reason: String,
    ) -> impl Future<Output = Result<Vec<Effect>, InvokeError>> + Send {
        runtime::Function::on_disconnect(self, ctx, code, reason)
    }
}

/// Where a connection finds the live version of a function, looked up for
/// each event so a new version serves every later message: the runtime's
/// [`runtime::Registry`], or scripted functions in tests.
pub trait Functions: Send + Sync + 'static {
    /// The functions it hands out.
    type Handler: Handler;
    /// The live version of function `name`, if it is loaded.
    fn live(&self, name: &str) -> Option<Arc<Self::Handler>>;
}

impl Functions for runtime::Registry {
    type Handler = runtime::Function;

    fn live(&self, name: &str) -> Option<Arc<runtime::Function>> {
        self.get(name)
    }
}

/// Longest the effects after a node's first `join` of a group wait for
/// the cluster to route the group's broadcasts here.
const BIND_WAIT: Duration = Duration::from_secs(5);

/// How messages are handled, the same for every connection.
pub struct DispatchSettings {
    /// This node's id, carried by the copies' headers.
    pub node_id: String,
    /// Whether replies wait for the copy.
    pub queue_mode: QueueMode,
    /// The copy path; `None` when `queue.mode = "off"`.
    pub publisher: Option<Publisher>,
    /// What a client sees when the function fails on its message.
    pub on_error: OnError,
    /// Longest pause before reading a client whose messages keep failing.
    pub fault_backoff: Duration,
    /// Largest reply (`websocket.max_message_size`): a larger one fails the
    /// message, since the client could not be sent it.
    pub max_reply_size: usize,
    /// Most bytes of replies queued for one connection
    /// (`websocket.send_queue_bytes`).
    pub send_queue_bytes: usize,
    /// Largest state a function may keep for a connection
    /// (`runtime.max_state_size`).
    pub max_state_size: usize,
    /// Most effects one call may return (`runtime.max_effects`).
    pub max_effects: usize,
    /// Where `send`, `join`, `leave` and `broadcast` go.
    pub hub: Arc<Hub>,
    /// Failures and effects are counted here.
    pub metrics: Metrics,
}

/// What the dispatcher hands the connection's writer, in order.
pub enum Outbound {
    /// A message to send once `receipt` (if any) is ready.
    Message {
        /// The copy this reply waits for.
        receipt: Option<Receipt>,
        /// The reply.
        message: Message,
        /// Its bytes in the connection's [`ByteBudget`], given back once
        /// written.
        bytes: usize,
    },
    /// A copy with no reply: waited for only to notice a failure.
    Receipt(Receipt),
    /// Close the connection.
    Close(Close),
}

/// What to do after a message.
pub enum Next {
    /// Read the next one.
    Continue,
    /// Close the connection.
    Close(Close),
    /// The writer is gone: stop reading.
    Stop,
}

/// Why the function failed on a message.
struct Failure {
    /// Metric label and `kind` of the error reply.
    kind: &'static str,
    /// All instances busy and the queue full (1013 rather than 1011).
    overloaded: bool,
    /// For the error reply: what happened, without the gateway's internals.
    message: String,
}

/// One connection's messages, in order.
pub struct Dispatcher<R: Functions> {
    /// How messages are handled.
    settings: Arc<DispatchSettings>,
    /// What every call is told about the connection; its state is
    /// replaced by `set-state`.
    ctx: Arc<Context>,
    /// Where the live version of each function is found.
    functions: Arc<R>,
    /// Which function handles each event.
    route: Arc<Route>,
    /// The route's path, for metric labels and the copies' headers.
    route_path: Arc<str>,
    /// The connection in the hub (its groups).
    handle: Arc<Handle>,
    /// To the connection's writer.
    outbound: mpsc::Sender<Outbound>,
    /// The connection's reply bytes not yet written.
    budget: Arc<ByteBudget>,
    /// Pause after the function failed on this connection's last message:
    /// doubled at each failure in a row (up to `runtime.fault_backoff`),
    /// cleared by a success, so one client cannot keep a function failing
    /// (and burning CPU) back to back.
    penalty: Duration,
}

/// What a dispatcher needs about its connection.
pub struct Wiring<R> {
    /// What every call is told about the connection.
    pub ctx: Arc<Context>,
    /// Where the live version of each function is found.
    pub functions: Arc<R>,
    /// Which function handles each event.
    pub route: Arc<Route>,
    /// The connection in the hub.
    pub handle: Arc<Handle>,
    /// To the connection's writer.
    pub outbound: mpsc::Sender<Outbound>,
    /// The connection's reply bytes not yet written.
    pub budget: Arc<ByteBudget>,
}

impl<R: Functions> Dispatcher<R> {
    /// A dispatcher for one connection, handing what the client gets to
    /// `wiring.outbound`.
    pub fn new(settings: Arc<DispatchSettings>, wiring: Wiring<R>) -> Self {
        Self {
            settings,
            route_path: wiring.route.shared_path().clone(),
            ctx: wiring.ctx,
            functions: wiring.functions,
            route: wiring.route,
            handle: wiring.handle,
            outbound: wiring.outbound,
            budget: wiring.budget,
            penalty: Duration::ZERO,
        }
    }

    /// What the next call is told about the connection (its state
    /// included).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Handle one message: pick the function, copy, call, effects, failure
    /// policy, backoff.
    pub async fn on_message(&mut self, payload: Payload) -> Next {
        // The live version, looked up per message: a deploy serves every
        // later message, while a call already running finishes on the
        // version it started on.
        let function = match self.route.pick(&payload) {
            Pick::Function(name) => match self.functions.live(name) {
                Some(function) => function,
                None => {
                    let message = format!("function {name} is not loaded");
                    return Box::pin(self.unserved(payload, name.to_owned(), message)).await;
                }
            },
            Pick::NoRoute => return Box::pin(self.no_route(payload)).await,
        };
        let receipt = match self
            .copy(&payload, function.name(), function.version())
            .await
        {
            Ok(receipt) => receipt,
            Err(close) => return Next::Close(close),
        };
        // A client whose messages keep failing has its calls run at the
        // lowest priority from the start.
        let priority = if self.penalty.is_zero() {
            Priority::Normal
        } else {
            Priority::Low
        };
        // Boxed: the call's state is large and only lives while it runs,
        // so it should not be part of every idle connection's task. One
        // allocation per message.
        let called = Box::pin(function.on_message(self.ctx.clone(), payload, priority)).await;
        match called {
            Ok(Ok(effects)) => match self.check(&effects) {
                None => {
                    self.penalty = Duration::ZERO;
                    self.apply(&*function, effects, receipt).await
                }
                Some(failure) => Box::pin(self.fail(failure, receipt)).await,
            },
            Ok(Err(error)) => {
                let (kind, message) = match error {
                    HandlerError::BadRequest(m) => ("bad-request", m),
                    HandlerError::Internal(m) => ("internal", m),
                };
                let body = serde_json::json!({ "error": kind, "message": message }).to_string();
                // The function's error is a reply too: over the limit, the
                // client could not be sent it.
                match self.oversized(body.len()) {
                    None => self.reply(Message::Text(body.into()), receipt).await,
                    Some(failure) => Box::pin(self.fail(failure, receipt)).await,
                }
            }
            // Not the function's fault, nor the client's: the connection
            // closes as every other does at shutdown.
            Err(InvokeError::ShuttingDown { .. }) => {
                if let Some(receipt) = receipt
                    && let Next::Stop = self.send(Outbound::Receipt(receipt)).await
                {
                    return Next::Stop;
                }
                Next::Close(Close::Shutdown)
            }
            Err(error) => {
                // The client gets the kind and a short message; the log
                // gets the detail (wasmtime's words, file paths).
                tracing::debug!(
                    connection = %self.ctx.id,
                    route = &*self.route_path,
                    function = function.name(),
                    version = function.version(),
                    "the function failed on a message: {error}"
                );
                let failure = Failure {
                    kind: error.kind(),
                    overloaded: matches!(error, InvokeError::Overloaded { .. }),
                    message: error.client_message().to_owned(),
                };
                // Boxed, like every rare path: its state (a pause, an
                // error reply) should not be part of every idle
                // connection's task.
                Box::pin(self.fail(failure, receipt)).await
            }
        }
    }

    /// A message no route key selects, on a route without a default: its
    /// copy is kept, and the client is told.
    async fn no_route(&mut self, payload: Payload) -> Next {
        let receipt = match self.copy(&payload, "", "").await {
            Ok(receipt) => receipt,
            Err(close) => return Next::Close(close),
        };
        self.settings
            .metrics
            .message_failures
            .with_label_values(&[&self.route_path, "no_route"])
            .inc();
        let body = serde_json::json!({
            "error": "no-route",
            "message": "no route matches this message and the route has no default",
        })
        .to_string();
        self.reply(Message::Text(body.into()), receipt).await
    }

    /// A message for a function that is not loaded (deleted since the
    /// client connected): its copy is kept, and it fails.
    async fn unserved(&mut self, payload: Payload, name: String, message: String) -> Next {
        let receipt = match self.copy(&payload, &name, "").await {
            Ok(receipt) => receipt,
            Err(close) => return Next::Close(close),
        };
        let failure = Failure {
            kind: "function_unavailable",
            overloaded: false,
            message,
        };
        self.fail(failure, receipt).await
    }

    /// Carry out a function's effects, in order (also `on-connect`'s). The
    /// copy's receipt goes with the first reply (or alone, if there is
    /// none); before anything reaches another connection, the copy is
    /// durable.
    pub async fn apply<H: Handler>(
        &mut self,
        function: &H,
        effects: Vec<Effect>,
        mut receipt: Option<Receipt>,
    ) -> Next {
        // What reaches anyone but the caller waits for the copy first, even
        // when a reply before it takes the receipt.
        // Boxed, as every rarer path: its state (a wait on the broker)
        // should not be part of every idle connection's task.
        if effects.iter().any(reaches_others)
            && let Some(close) = Box::pin(self.settle(&mut receipt)).await
        {
            return Next::Close(close);
        }
        let mut next = Next::Continue;
        for effect in effects {
            // A call's effects may be many (up to `runtime.max_effects`,
            // each a broadcast): let other tasks run between them.
            tokio::task::consume_budget().await;
            self.settings.metrics.effect_counts.get(&effect).inc();
            match effect {
                Effect::Reply(payload) => {
                    if let Next::Stop = self.reply(message(payload), receipt.take()).await {
                        return Next::Stop;
                    }
                }
                Effect::Send((id, payload)) => {
                    self.settings.hub.send(&id, message(payload));
                }
                Effect::Broadcast((group, payload)) => {
                    self.settings.hub.broadcast(&group, &message(payload));
                }
                Effect::Join(group) => {
                    // Checked before any effect was carried out (see
                    // `check`): only a bad name can fail here.
                    match self.settings.hub.join(&self.handle, &group) {
                        Err(error) => {
                            tracing::debug!(connection = %self.ctx.id, "join refused: {error}");
                        }
                        // The group's first member here: the effects after
                        // the join (a reply saying so) wait until other
                        // nodes' broadcasts reach it, for a bounded time.
                        Ok(Some(bound)) => {
                            if tokio::time::timeout(BIND_WAIT, bound).await.is_err() {
                                tracing::debug!(
                                    connection = %self.ctx.id,
                                    group,
                                    "the cluster did not bind the group within {BIND_WAIT:?}"
                                );
                            }
                        }
                        Ok(None) => {}
                    }
                }
                Effect::Leave(group) => self.settings.hub.leave(&self.handle, &group),
                Effect::SetState(state) => {
                    // Unique once the call has ended: no copy.
                    Arc::make_mut(&mut self.ctx).state = Some(state);
                }
                Effect::Publish((routing_key, body)) => {
                    if let Some(close) = Box::pin(self.publish(function, routing_key, body)).await {
                        return Next::Close(close);
                    }
                }
                Effect::Close((code, reason)) => {
                    let close = Close::by_function(code, reason).unwrap_or_else(|fallback| {
                        tracing::warn!(
                            function = function.name(),
                            code,
                            "a function may close with 1000 or 3000-4999; using 1000"
                        );
                        fallback
                    });
                    next = Next::Close(close);
                    break;
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

    /// Carry out `on-connect`'s effects, checked as a message's are: over a
    /// limit, none is carried out and the connection closes with 1011.
    pub async fn on_connected<H: Handler>(&mut self, function: &H, effects: Vec<Effect>) -> Next {
        match self.check(&effects) {
            None => self.apply(function, effects, None).await,
            Some(failure) => {
                self.settings
                    .metrics
                    .message_failures
                    .with_label_values(&[&self.route_path, failure.kind])
                    .inc();
                tracing::debug!(
                    connection = %self.ctx.id,
                    route = &*self.route_path,
                    function = function.name(),
                    "on-connect's effects were refused: {}",
                    failure.message
                );
                Next::Close(Close::FunctionFailed(failure.kind))
            }
        }
    }

    /// Wait until the copy of the message being handled is durable (once):
    /// what other connections are sent must not get ahead of it. The close
    /// to send when the copy could not be kept.
    async fn settle(&mut self, receipt: &mut Option<Receipt>) -> Option<Close> {
        let receipt = receipt.take()?;
        match receipt.ready().await {
            Ok(()) => None,
            Err(error) => Some(not_stored_close(&error)),
        }
    }

    /// Hand the connection's close to the writer, after what is queued.
    pub async fn close(&mut self, close: Close) {
        let _ = self.send(Outbound::Close(close)).await;
    }

    /// Queue a reply, once its bytes fit in `websocket.send_queue_bytes`
    /// (a reply over the whole budget waits until the queue is empty).
    async fn reply(&mut self, message: Message, receipt: Option<Receipt>) -> Next {
        let bytes = message.len();
        if !self.budget.try_take(bytes) {
            // Waiting for the writer is rare: boxed, so the wait's state is
            // not part of every idle connection's task.
            if !Box::pin(self.budget.take_when_room(bytes)).await {
                return Next::Stop;
            }
        }
        self.send(Outbound::Message {
            receipt,
            message,
            bytes,
        })
        .await
    }

    /// Check a function's effects before carrying out any: a message
    /// for a client over `websocket.max_message_size`, state over
    /// `runtime.max_state_size`, a bad group name, more groups than
    /// `websocket.max_groups` or a bad routing key fails the whole message,
    /// so none of its effects happen.
    fn check(&self, effects: &[Effect]) -> Option<Failure> {
        let max_effects = self.settings.max_effects;
        if effects.len() > max_effects {
            return Some(Failure {
                kind: "too_many_effects",
                overloaded: false,
                message: format!(
                    "the function returned {} effects, over the limit of {max_effects} \
                     (runtime.max_effects)",
                    effects.len()
                ),
            });
        }
        let mut joins = 0usize;
        for effect in effects {
            let failure = match effect {
                Effect::Reply(payload)
                | Effect::Send((_, payload))
                | Effect::Broadcast((_, payload)) => self.oversized(payload_len(payload)),
                Effect::SetState(state) if state.len() > self.settings.max_state_size => {
                    Some(Failure {
                        kind: "state_too_large",
                        overloaded: false,
                        message: format!(
                            "the function kept {} bytes of state, over the limit of {} \
                             (runtime.max_state_size)",
                            state.len(),
                            self.settings.max_state_size
                        ),
                    })
                }
                Effect::Join(group) | Effect::Leave(group) => match check_group(group) {
                    Err(error) => Some(Failure {
                        kind: "bad_group",
                        overloaded: false,
                        message: error.to_string(),
                    }),
                    Ok(()) => {
                        if matches!(effect, Effect::Join(_)) {
                            joins += 1;
                        }
                        None
                    }
                },
                Effect::Publish((routing_key, body)) => self.check_publish(routing_key, body),
                _ => None,
            };
            if failure.is_some() {
                return failure;
            }
        }
        if joins > 0 {
            // Joins and leaves in order, from the groups it is in now.
            let max = self.settings.hub.max_groups();
            let mut groups: std::collections::HashSet<String> =
                self.handle.groups().into_iter().collect();
            for effect in effects {
                match effect {
                    Effect::Join(group) => {
                        groups.insert(group.clone());
                        if groups.len() > max {
                            return Some(Failure {
                                kind: "too_many_groups",
                                overloaded: false,
                                message: GroupError::TooMany(max).to_string(),
                            });
                        }
                    }
                    Effect::Leave(group) => {
                        groups.remove(group);
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// A `publish` effect the broker would refuse.
    fn check_publish(&self, routing_key: &str, body: &[u8]) -> Option<Failure> {
        let failure = |message: String| {
            Some(Failure {
                kind: "bad_publish",
                overloaded: false,
                message,
            })
        };
        if self.settings.publisher.is_none() {
            return failure("publish needs the message queue: queue.mode is off".into());
        }
        if routing_key.len() > 255 {
            return failure(format!(
                "a routing key is at most 255 bytes, not {}",
                routing_key.len()
            ));
        }
        if body.len() > self.settings.max_reply_size {
            return failure(format!(
                "a published message is at most {} bytes (websocket.max_message_size), not {}",
                self.settings.max_reply_size,
                body.len()
            ));
        }
        None
    }

    /// Publish a function's extra message to `queue.exchange`, as durably
    /// as a copy: the close to send when it cannot be kept.
    async fn publish<H: Handler>(
        &mut self,
        function: &H,
        routing_key: String,
        body: Vec<u8>,
    ) -> Option<Close> {
        let publisher = self.settings.publisher.as_ref()?;
        let mut message = QueueMessage::new(
            std::str::from_utf8(&body).is_ok(),
            body,
            &self.ctx.id,
            &self.route_path,
            function.name(),
            function.version(),
            &self.settings.node_id,
        );
        message.routing_key = Some(routing_key);
        let receipt = match publisher.publish(message).await {
            Ok(receipt) => receipt,
            Err(_) => return Some(Close::Shutdown),
        };
        // Waited for here only in receipt mode (in async mode, accepted is
        // enough): the effects after it, and the reply, come once it is
        // kept.
        match receipt.ready().await {
            Ok(()) => None,
            Err(error) => Some(not_stored_close(&error)),
        }
    }

    /// The failure for a reply of `len` bytes, if it is over the limit.
    fn oversized(&self, len: usize) -> Option<Failure> {
        let limit = self.settings.max_reply_size;
        (len > limit).then(|| Failure {
            kind: "reply_too_large",
            overloaded: false,
            message: format!(
                "the function replied with {len} bytes, over the limit of {limit} (websocket.max_message_size)"
            ),
        })
    }

    /// The function failed on this message: count it, and tell the client
    /// with an error reply or a close, as `runtime.on_error` says. The
    /// copy's receipt still orders what the client sees.
    async fn fail(&mut self, failure: Failure, receipt: Option<Receipt>) -> Next {
        self.settings
            .metrics
            .message_failures
            .with_label_values(&[&self.route_path, failure.kind])
            .inc();
        let next = self.tell_failure(failure, receipt).await;
        if let Next::Continue = next {
            // Read this client's next message only after a pause.
            let limit = self.settings.fault_backoff;
            self.penalty = (self.penalty * 2).clamp(FIRST_PENALTY.min(limit), limit);
            tokio::time::sleep(self.penalty).await;
        }
        next
    }

    async fn tell_failure(&mut self, failure: Failure, receipt: Option<Receipt>) -> Next {
        match self.settings.on_error {
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
                self.reply(Message::Text(body.into()), receipt).await
            }
            OnError::Close => {
                if let Some(receipt) = receipt
                    && let Next::Stop = self.send(Outbound::Receipt(receipt)).await
                {
                    return Next::Stop;
                }
                if failure.overloaded {
                    Next::Close(Close::Overloaded)
                } else {
                    Next::Close(Close::FunctionFailed(failure.kind))
                }
            }
        }
    }

    /// Hand the message's copy to the publisher. Returns the receipt the
    /// reply must wait for: the copy durable in receipt mode, accepted
    /// (spooled, or published with spool room reserved) in async mode.
    async fn copy(
        &self,
        payload: &Payload,
        function: &str,
        version: &str,
    ) -> Result<Option<Receipt>, Close> {
        let Some(publisher) = &self.settings.publisher else {
            return Ok(None);
        };
        let (body, text) = match payload {
            Payload::Text(text) => (text.as_bytes().to_vec(), true),
            Payload::Binary(data) => (data.clone(), false),
        };
        if self.settings.queue_mode == QueueMode::Async && !publisher.is_ready() {
            return Err(Close::NotStored(not_stored(&PublishError::SpoolFull)));
        }
        let copy = QueueMessage::new(
            text,
            body,
            &self.ctx.id,
            &self.route_path,
            function,
            version,
            &self.settings.node_id,
        );
        match publisher.publish(copy).await {
            Ok(receipt) => Ok(Some(receipt)),
            Err(_) => Err(Close::Shutdown),
        }
    }

    async fn send(&mut self, outbound: Outbound) -> Next {
        match self.outbound.send(outbound).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }
}

/// Carry out the effects of `on-disconnect`, in order: what reaches other
/// connections (`send`, `broadcast`) and the broker (`publish`). Replies,
/// joins, state and closes concern the closed socket and are dropped.
pub async fn after_close<H: Handler>(
    settings: &DispatchSettings,
    function: &H,
    ctx: &Context,
    route: &str,
    effects: Vec<Effect>,
) {
    if effects.len() > settings.max_effects {
        tracing::debug!(
            connection = %ctx.id,
            function = function.name(),
            "on-disconnect returned {} effects, over runtime.max_effects: none is carried out",
            effects.len()
        );
        return;
    }
    for effect in effects {
        tokio::task::consume_budget().await;
        settings.metrics.effect_counts.get(&effect).inc();
        match effect {
            Effect::Send((id, payload)) if payload_len(&payload) <= settings.max_reply_size => {
                settings.hub.send(&id, message(payload));
            }
            Effect::Broadcast((group, payload))
                if payload_len(&payload) <= settings.max_reply_size =>
            {
                settings.hub.broadcast(&group, &message(payload));
            }
            Effect::Publish((routing_key, body))
                if routing_key.len() <= 255 && body.len() <= settings.max_reply_size =>
            {
                let Some(publisher) = &settings.publisher else {
                    continue;
                };
                let mut extra = QueueMessage::new(
                    std::str::from_utf8(&body).is_ok(),
                    body,
                    &ctx.id,
                    route,
                    function.name(),
                    function.version(),
                    &settings.node_id,
                );
                extra.routing_key = Some(routing_key);
                let kept = match publisher.publish(extra).await {
                    Ok(receipt) => receipt.ready().await,
                    Err(error) => Err(error),
                };
                if let Err(error) = kept {
                    tracing::warn!(
                        connection = %ctx.id,
                        function = function.name(),
                        "a message published by on-disconnect was not kept: {error}"
                    );
                }
            }
            other => tracing::debug!(
                connection = %ctx.id,
                function = function.name(),
                effect = effect_name(&other),
                "effect of on-disconnect dropped: the connection is closed (or it is over a limit)"
            ),
        }
    }
}

/// The bytes of replies queued for one connection and not yet written
/// (`websocket.send_queue_bytes`). Its dispatcher and deliveries from
/// elsewhere (other connections' functions, the API, the push queue) take,
/// its writer gives back. A reply waits for room; a delivery without room
/// is refused (a semaphore would lock a mutex per reply).
pub struct ByteBudget {
    /// Most bytes queued; a reply larger than this counts as this much
    /// (it waits until the queue is empty).
    limit: usize,
    /// Bytes queued now.
    queued: AtomicUsize,
    /// The dispatcher waits for room.
    waiting: AtomicBool,
    /// The writer has stopped: nothing will be given back.
    closed: AtomicBool,
    /// Woken when bytes are given back while the dispatcher waits.
    room: Notify,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            queued: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    /// Take room for `bytes` if there is some now (any number of takers:
    /// the dispatcher, and deliveries from other connections).
    pub fn try_take(&self, bytes: usize) -> bool {
        let bytes = bytes.min(self.limit);
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
                (queued == 0 || bytes <= self.limit - queued).then_some(queued + bytes)
            })
            .is_ok()
    }

    /// Wait for room for `bytes`, and take it; `false` when the writer has
    /// stopped.
    async fn take_when_room(&self, bytes: usize) -> bool {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            // Checked after announcing the wait: a writer that gives back
            // after this sees `waiting` and wakes this one.
            if self.closed.load(Ordering::SeqCst) {
                self.waiting.store(false, Ordering::SeqCst);
                return false;
            }
            if self.try_take(bytes) {
                self.waiting.store(false, Ordering::SeqCst);
                return true;
            }
            room.await;
        }
    }

    /// Give back the room of a reply written to the socket.
    pub fn give_back(&self, bytes: usize) {
        let bytes = bytes.min(self.limit);
        if bytes == 0 {
            return;
        }
        self.queued.fetch_sub(bytes, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.room.notify_one();
        }
    }

    /// The writer has stopped: a waiting dispatcher stops too.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.room.notify_one();
    }
}

/// The close for a copy that could not be kept: why, in words that hold
/// no file path or I/O detail (those are in the log).
pub fn not_stored_close(error: &PublishError) -> Close {
    match error {
        PublishError::Closed => Close::Shutdown,
        PublishError::InDoubt => Close::InDoubt,
        other => Close::NotStored(not_stored(other)),
    }
}

fn not_stored(error: &PublishError) -> String {
    match error {
        PublishError::SpoolFull => "the broker is unreachable and the spool is full".into(),
        PublishError::SpoolFailed(_) => "the spool could not be written".into(),
        PublishError::Closed => "the gateway is shutting down".into(),
        PublishError::InDoubt => "kept, perhaps twice".into(),
    }
}

/// Whether `effect` reaches anyone but the caller (or the broker).
fn reaches_others(effect: &Effect) -> bool {
    matches!(
        effect,
        Effect::Send(_) | Effect::Broadcast(_) | Effect::Publish(_)
    )
}

/// A function's payload as a WebSocket message.
fn message(payload: Payload) -> Message {
    match payload {
        Payload::Text(text) => Message::Text(text.into()),
        Payload::Binary(data) => Message::Binary(data.into()),
    }
}

fn payload_len(payload: &Payload) -> usize {
    match payload {
        Payload::Text(text) => text.len(),
        Payload::Binary(data) => data.len(),
    }
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
    use super::*;

    #[test]
    fn each_effect_is_counted_under_its_own_name() {
        let metrics = Metrics::new().unwrap();
        let text = || Payload::Text(String::new());
        let effects = [
            Effect::Reply(text()),
            Effect::Send((String::new(), text())),
            Effect::Join(String::new()),
            Effect::Leave(String::new()),
            Effect::Broadcast((String::new(), text())),
            Effect::Publish((String::new(), Vec::new())),
            Effect::SetState(Vec::new()),
            Effect::Close((1000, String::new())),
        ];
        for (n, effect) in effects.iter().enumerate() {
            for _ in 0..=n {
                metrics.effect_counts.get(effect).inc();
            }
        }
        for (n, effect) in effects.iter().enumerate() {
            let counted = metrics
                .effects
                .with_label_values(&[effect_name(effect)])
                .get();
            assert_eq!(counted, n as u64 + 1, "{}", effect_name(effect));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_waits_for_room_and_gets_it_when_bytes_are_given_back() {
        let budget = Arc::new(ByteBudget::new(100));
        assert!(budget.try_take(60));
        assert!(!budget.try_take(60), "60 + 60 is over 100");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take_when_room(60).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        budget.give_back(60);
        assert!(waiting.await.unwrap(), "room given back");
        assert_eq!(budget.queued.load(Ordering::SeqCst), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_over_the_whole_budget_waits_for_an_empty_queue_only() {
        let budget = ByteBudget::new(100);
        assert!(budget.try_take(500), "an empty queue takes any one reply");
        assert!(!budget.try_take(1));
        budget.give_back(500);
        assert!(budget.try_take(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reply_stops_when_the_writer_stops() {
        let budget = Arc::new(ByteBudget::new(100));
        assert!(budget.try_take(100));
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take_when_room(1).await }
        });
        tokio::task::yield_now().await;
        budget.close();
        assert!(!waiting.await.unwrap(), "no room will come");
    }
}
