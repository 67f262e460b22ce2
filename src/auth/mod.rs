//! Client tokens (AUTH_TOKENS_FILE): who may write and read which devices.
//!
//! The file holds one client per line, `<name> <sha256 of the token, hex> <device-id
//! prefix or *> <rw | w | r>`, with `#` comments and blank lines. Only hashes are stored,
//! so the file (a mounted Secret) never holds a usable token; a presented token is
//! hashed and looked up by its digest, and tokens never appear in logs or metrics.
//!
//! # Layout
//! - `tokens`: the file's format: clients, their modes and prefixes, digests, and new
//!   tokens for `iot-processor token add`.
//! - `check`: the tokens in force: checking a request's `Authorization` header, and
//!   reloading the file when it changes or on SIGHUP.

mod check;
mod tokens;

pub use check::{Auth, Denied};
pub use tokens::{new_token_line, Client, Mode, Tokens, TokensError};
