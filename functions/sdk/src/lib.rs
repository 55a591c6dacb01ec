//! Write Tidegate functions in Rust.
//!
//! Implement [`Function`] for a type, overriding the events you care about,
//! and export it with [`export!`]. Events you do not implement get the
//! defaults: connections are accepted, messages get no reply, disconnects do
//! nothing.
//!
//! ```ignore
//! use tidegate_sdk::{Context, Effect, Function, HandlerError, Payload};
//!
//! struct Echo;
//!
//! impl Function for Echo {
//!     fn on_message(_ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
//!         Ok(vec![Effect::Reply(message)])
//!     }
//! }
//!
//! tidegate_sdk::export!(Echo);
//! ```

#[doc(hidden)]
#[expect(
    clippy::too_many_arguments,
    reason = "generated code: the canonical ABI flattens records into many arguments"
)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
        default_bindings_module: "tidegate_sdk::bindings",
    });
}

pub use bindings::tidegate::gateway::logging::{Level, log};
pub use bindings::tidegate::gateway::types::{
    ConnectDecision, Connection, Context, Effect, HandlerError, Payload,
};

/// A Tidegate function: the three events of a WebSocket connection's life.
pub trait Function {
    /// A client is connecting. Return [`ConnectDecision::accept`] to let it in,
    /// or [`ConnectDecision::reject`] with an HTTP status to refuse it.
    fn on_connect(conn: Connection) -> ConnectDecision {
        let _ = conn;
        ConnectDecision::accept()
    }

    /// A client sent a message. Return the effects to carry out, in order;
    /// [`Effect::Reply`] sends a message back to the client.
    ///
    /// # Errors
    /// [`HandlerError::BadRequest`] tells the client its message was malformed;
    /// [`HandlerError::Internal`] reports a failure of the function.
    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        let _ = (ctx, message);
        Ok(Vec::new())
    }

    /// The connection closed with this WebSocket close code and reason.
    fn on_disconnect(ctx: Context, code: u16, reason: String) -> Vec<Effect> {
        let _ = (ctx, code, reason);
        Vec::new()
    }
}

impl ConnectDecision {
    /// Accept the connection, with no subprotocol and no effects.
    pub fn accept() -> Self {
        Self {
            accept: true,
            status: 101,
            subprotocol: None,
            effects: Vec::new(),
            claims: Vec::new(),
        }
    }

    /// Attach claims to the connection (an authorizer's verdict on who the
    /// client is); later calls see them in [`Context::claims`].
    pub fn with_claims(mut self, claims: Vec<(String, String)>) -> Self {
        self.claims = claims;
        self
    }

    /// Refuse the connection with this HTTP status (for example 401 or 403).
    pub fn reject(status: u16) -> Self {
        Self {
            accept: false,
            status,
            subprotocol: None,
            effects: Vec::new(),
            claims: Vec::new(),
        }
    }
}

impl<T: Function> bindings::Guest for T {
    fn on_connect(conn: Connection) -> ConnectDecision {
        <T as Function>::on_connect(conn)
    }

    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        <T as Function>::on_message(ctx, message)
    }

    fn on_disconnect(ctx: Context, code: u16, reason: String) -> Vec<Effect> {
        <T as Function>::on_disconnect(ctx, code, reason)
    }
}

/// Export a type implementing [`Function`] as this component's handler.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::bindings::__export_handler!($ty with_types_in $crate::bindings);
    };
}
