// Tidegate's echo function in JavaScript: every message comes back
// unchanged, text as text and binary as binary.
//
// The exports are the `handler` world of functions/wit/world.wit, in
// camelCase. A WIT variant is an object `{ tag, val }` (a payload is
// `{ tag: 'text', val: string }` or `{ tag: 'binary', val: Uint8Array }`),
// a record is a plain object with camelCase fields, and an `option` is a
// value or `undefined`. `onMessage` returns its list of effects; throwing
// `{ tag: 'bad-request', val: 'why' }` answers with a handler error.

/** Accept every connection. */
export function onConnect(conn) {
  return { accept: true, status: 101, subprotocol: undefined, effects: [], claims: [] };
}

/** Reply with the message itself. */
export function onMessage(ctx, message) {
  return [{ tag: 'reply', val: message }];
}

/** Nothing to do when a connection closes. */
export function onDisconnect(ctx, code, reason) {
  return [];
}
