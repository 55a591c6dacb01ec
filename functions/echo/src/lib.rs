//! The echo function: every message comes back unchanged, text as text and
//! binary as binary.

use tidegate_sdk::{Context, Effect, Function, HandlerError, Payload};

struct Echo;

impl Function for Echo {
    fn on_message(_conn: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        Ok(vec![Effect::Reply(message)])
    }
}

tidegate_sdk::export!(Echo);
