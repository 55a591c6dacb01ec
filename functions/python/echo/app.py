"""Tidegate's echo function in Python: every message comes back unchanged,
text as text and binary as binary.

componentize-py generates the `wit_world` package from
functions/wit/world.wit when it builds the component; the class below must
be called `WitWorld`. A WIT variant case is a dataclass (`Payload_Text`,
`Effect_Reply`, ...), a record is a dataclass with snake_case fields, and an
`option` is a value or None. `on_message` returns its list of effects;
raising `componentize_py_types.Err(HandlerError_BadRequest("why"))` answers
with a handler error.
"""

import wit_world
from wit_world.imports.types import ConnectDecision, Effect_Reply


class WitWorld(wit_world.WitWorld):
    def on_connect(self, conn):
        """Accept every connection."""
        return ConnectDecision(
            accept=True, status=101, subprotocol=None, effects=[], claims=[]
        )

    def on_message(self, ctx, message):
        """Reply with the message itself."""
        return [Effect_Reply(message)]

    def on_disconnect(self, ctx, code, reason):
        """Nothing to do when a connection closes."""
        return []
