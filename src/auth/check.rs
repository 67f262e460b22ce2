//! The tokens in force: checking a request's `Authorization` header against them, and
//! reloading the file when it changes (checked every few seconds: a Kubernetes Secret
//! update swaps a symlink, which changes what the path resolves to) or on SIGHUP. A file
//! that does not parse keeps the previous tokens and logs the line at fault; at start-up
//! it stops the service (exit 2).

use super::tokens::{read, Client, Mode, Tokens, TokensError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

/// Why a request was not authorised; also the `reason` label of `auth_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// A token that is not in the file (401).
    Unknown,
    /// The client may not do this (read or write) at all (403).
    Mode(Arc<Client>, Mode),
    /// The device is outside the client's prefix (403).
    Device(Arc<Client>, Mode),
}

impl Denied {
    /// The fixed label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Unknown => "unknown",
            Denied::Mode(..) => "mode",
            Denied::Device(..) => "device",
        }
    }

    /// Every label value, for pre-creating the series.
    pub const REASONS: [&'static str; 4] = ["missing", "unknown", "mode", "device"];

    /// The message of the error body (401 or 403).
    pub fn message(&self, device: Option<&str>) -> String {
        match self {
            Denied::Missing => "an Authorization: Bearer <token> header is required".into(),
            Denied::Unknown => "the bearer token is not valid".into(),
            Denied::Mode(client, need) => format!(
                "token '{}' may not {} (mode {})",
                client.name,
                need.verb(),
                match client.mode {
                    Mode::Read => "r",
                    Mode::Write => "w",
                    Mode::ReadWrite => "rw",
                }
            ),
            Denied::Device(client, need) => format!(
                "token '{}' may not {} device_id '{}' (allowed prefix '{}')",
                client.name,
                need.verb(),
                device.unwrap_or(""),
                client.prefix.as_deref().unwrap_or("")
            ),
        }
    }

    /// 401 (no or unknown token) or 403 (a known client, not allowed).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, Denied::Missing | Denied::Unknown)
    }
}

/// What identifies a version of the file on disk.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The tokens in force, reloaded when the file changes.
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    current: RwLock<Arc<Tokens>>,
    seen: Mutex<Stamp>,
}

impl Auth {
    /// Reads the file once (start-up: an error stops the service).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let seen = stamp(path);
        let tokens = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(tokens)),
            seen: Mutex::new(seen),
        })
    }

    /// The tokens in force.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks a request's `Authorization` header for `need` (Read or Write).
    pub fn check(&self, header: Option<&[u8]>, need: Mode) -> Result<Arc<Client>, Denied> {
        let header = header.ok_or(Denied::Missing)?;
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Missing)?;
        let client = self.tokens().find(token).ok_or(Denied::Unknown)?;
        if !client.mode.allows(need) {
            return Err(Denied::Mode(client, need));
        }
        Ok(client)
    }

    /// Reads the file again if it changed (or when `force`); a file that does not parse
    /// keeps the tokens in force.
    pub fn reload(&self, force: bool) {
        let now = stamp(&self.path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && *seen == now {
                return;
            }
            *seen = now;
        }
        match read(&self.path) {
            Ok(tokens) => {
                let clients = tokens.len();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
                tracing::info!(path = %self.path.display(), clients, "tokens reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "tokens file not reloaded; the previous tokens stay in force");
            }
        }
    }

    /// Reloads on change (checked every `every`) and on SIGHUP, for as long as the
    /// process runs. The file is stat'ed and read on tokio's blocking pool: a slow or
    /// hung volume (a network mount) must not stall a worker that serves requests.
    pub fn watch(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(every);
            loop {
                let force = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => true,
                };
                let auth = self.clone();
                // Waiting keeps reloads from overlapping; a panic in one (a bug) ends
                // only that reload.
                let _ = tokio::task::spawn_blocking(move || auth.reload(force)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token's digest as the file holds it: SHA-256, lowercase hex.
    fn hash(token: &str) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn modes_and_the_authorization_header() {
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            format!("w {} dev- w\nr {} * r\n", hash("wt"), hash("rt")),
        )
        .expect("write");
        let auth = Auth::load(&path).expect("loads");
        let check = |h: Option<&str>, need| auth.check(h.map(str::as_bytes), need);
        assert_eq!(check(None, Mode::Write), Err(Denied::Missing));
        assert_eq!(check(Some("Basic abc"), Mode::Write), Err(Denied::Missing));
        assert_eq!(check(Some("Bearer "), Mode::Write), Err(Denied::Missing));
        assert_eq!(
            check(Some("Bearer nope"), Mode::Write),
            Err(Denied::Unknown)
        );
        assert_eq!(check(Some("Bearer wt"), Mode::Write).expect("ok").name, "w");
        assert_eq!(
            check(Some("bearer  wt "), Mode::Write).expect("ok").name,
            "w"
        );
        assert!(matches!(
            check(Some("Bearer wt"), Mode::Read),
            Err(Denied::Mode(..))
        ));
        assert!(matches!(
            check(Some("Bearer rt"), Mode::Write),
            Err(Denied::Mode(..))
        ));
        assert_eq!(check(Some("Bearer rt"), Mode::Read).expect("ok").name, "r");

        // A broken file keeps the tokens in force; a good one replaces them.
        std::fs::write(&path, "garbage\n").expect("write");
        auth.reload(true);
        assert!(check(Some("Bearer wt"), Mode::Write).is_ok());
        std::fs::write(&path, format!("n {} * rw\n", hash("new"))).expect("write");
        auth.reload(true);
        assert_eq!(check(Some("Bearer wt"), Mode::Write), Err(Denied::Unknown));
        assert!(check(Some("Bearer new"), Mode::Read).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
