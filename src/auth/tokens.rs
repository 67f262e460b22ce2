//! The AUTH_TOKENS_FILE format: one client per line, `<name> <sha256 of the token, hex>
//! <device-id prefix or *> <rw | w | r>`, with `#` comments and blank lines; the clients of
//! one version of the file by digest; and new tokens with their line
//! (`iot-processor token add`).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `r`: read analyses.
    Read,
    /// `w`: post events.
    Write,
    /// `rw`: both.
    ReadWrite,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "r" => Some(Mode::Read),
            "w" => Some(Mode::Write),
            "rw" => Some(Mode::ReadWrite),
            _ => None,
        }
    }

    /// Whether this mode includes `need` (which is `Read` or `Write`).
    pub fn allows(self, need: Mode) -> bool {
        self == Mode::ReadWrite || self == need
    }

    pub(super) fn verb(self) -> &'static str {
        match self {
            Mode::Read => "read",
            Mode::Write | Mode::ReadWrite => "write",
        }
    }
}

/// One client of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Its name (logs and error messages; not a secret).
    pub name: String,
    /// Device ids it may touch start with this; `None` = any (`*`).
    pub prefix: Option<String>,
    /// Read, write or both.
    pub mode: Mode,
}

impl Client {
    /// Whether this client may touch `device`.
    pub fn covers(&self, device: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| device.starts_with(p))
    }
}

/// A tokens file that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensError {
    /// The file could not be read.
    #[error("AUTH_TOKENS_FILE {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// A line is malformed.
    #[error("AUTH_TOKENS_FILE {path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based.
        line: usize,
        /// What is wrong (never the line itself: it may hold a pasted token).
        message: String,
    },
}

/// The clients of one version of the file, by token digest.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Arc<Client>>,
}

impl Tokens {
    /// Parses the file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, TokensError> {
        let mut by_digest = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let line_error = |message: String| TokensError::Line {
                path: path.to_string(),
                line: i + 1,
                message,
            };
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, digest, prefix, mode] = fields[..] else {
                return Err(line_error(format!(
                    "expected 4 fields (name, sha256 hex, prefix or *, rw|w|r), found {}",
                    fields.len()
                )));
            };
            let digest = parse_digest(digest).ok_or_else(|| {
                line_error("the second field must be a sha256 digest: 64 hex digits".into())
            })?;
            // The value is not echoed: a token pasted into the wrong column must not
            // reach the log.
            let mode = Mode::parse(mode)
                .ok_or_else(|| line_error("the fourth field (mode) must be rw, w or r".into()))?;
            if !names.insert(name.to_string()) {
                return Err(line_error(format!("client '{name}' appears twice")));
            }
            let client = Arc::new(Client {
                name: name.to_string(),
                prefix: (prefix != "*").then(|| prefix.to_string()),
                mode,
            });
            if by_digest.insert(digest, client).is_some() {
                return Err(line_error("the same token digest appears twice".into()));
            }
        }
        Ok(Self { by_digest })
    }

    /// The client a presented token belongs to.
    pub fn find(&self, token: &str) -> Option<Arc<Client>> {
        self.by_digest.get(&digest(token)).cloned()
    }

    /// Whether `client` is still in the file, unchanged (a long-lived stream checks it).
    pub fn still_has(&self, client: &Client) -> bool {
        self.by_digest.values().any(|c| **c == *client)
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True when the file lists no client (every request is then refused).
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub(super) fn read(path: &Path) -> Result<Tokens, TokensError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TokensError::Read {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    Tokens::parse(&text, &shown)
}

/// `iot-processor token add NAME PREFIX MODE`: a new random token and its line for the
/// file. The token is shown once; only its digest goes into the file.
pub fn new_token_line(name: &str, prefix: &str, mode: &str) -> Result<(String, String), String> {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '#') {
        return Err("NAME must be non-empty, without spaces or '#'".into());
    }
    if prefix.is_empty() || prefix.contains(|c: char| c.is_whitespace() || c == '#') {
        return Err("PREFIX must be a device-id prefix without spaces or '#', or * for any".into());
    }
    if Mode::parse(mode).is_none() {
        return Err("MODE must be rw, w or r".into());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness available: {e}"))?;
    let token = format!("iot_{}", to_hex(&secret));
    let line = format!("{name} {} {prefix} {mode}", to_hex(&digest(&token)));
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(token: &str) -> String {
        to_hex(&digest(token))
    }

    #[test]
    fn the_digest_is_sha256_in_lowercase_hex() {
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_digest(&hash("abc")), Some(digest("abc")));
        assert_eq!(
            parse_digest(&hash("abc").to_uppercase()),
            Some(digest("abc"))
        );
        assert_eq!(parse_digest("abc"), None);
        assert_eq!(parse_digest(&"zz".repeat(32)), None);
    }

    #[test]
    fn a_file_parses_into_clients_found_by_their_token() {
        let text = format!(
            "# gateways\n\ngw-1 {} site-a/ w  # writes site A\nreader {} * r\nadmin {} * rw\n",
            hash("t1"),
            hash("t2"),
            hash("t3")
        );
        let tokens = Tokens::parse(&text, "f").expect("parses");
        assert_eq!(tokens.len(), 3);
        let gw = tokens.find("t1").expect("gw-1");
        assert_eq!(gw.name, "gw-1");
        assert_eq!(gw.mode, Mode::Write);
        assert!(gw.covers("site-a/42") && !gw.covers("site-b/1"));
        assert!(tokens.find("t2").expect("reader").covers("anything"));
        assert!(tokens.find("t4").is_none());
        assert!(tokens.find("").is_none());
    }

    #[test]
    fn malformed_lines_are_refused_naming_the_line_never_echoing_it() {
        let good = format!("a {} * rw\n", hash("x"));
        for (bad, expect) in [
            (
                "b secret-token-pasted-here\n".to_string(),
                "expected 4 fields",
            ),
            (
                format!("b {} * rwx\n", hash("y")),
                "(mode) must be rw, w or r",
            ),
            (
                format!("b {} * secret-token-in-the-mode-column\n", hash("y")),
                "(mode) must be rw, w or r",
            ),
            ("b 1234 * r\n".to_string(), "sha256"),
            (format!("a {} * r\n", hash("y")), "appears twice"),
            (format!("b {} * r\n", hash("x")), "digest appears twice"),
        ] {
            let err = Tokens::parse(&format!("{good}{bad}"), "/etc/tokens")
                .expect_err(&bad)
                .to_string();
            assert!(err.contains("line 2") && err.contains(expect), "{err}");
            assert!(!err.contains("secret-token"), "{err}");
        }
    }

    #[test]
    fn a_new_token_line_verifies_against_its_token() {
        let (token, line) = new_token_line("gw-9", "site-a/", "w").expect("line");
        assert!(token.starts_with("iot_") && token.len() == 68, "{token}");
        let tokens = Tokens::parse(&line, "f").expect("parses");
        let client = tokens.find(&token).expect("the token matches its line");
        assert_eq!(client.prefix.as_deref(), Some("site-a/"));
        assert!(!line.contains(&token), "the line holds only the digest");
        let (other, _) = new_token_line("gw-9", "*", "rw").expect("line");
        assert_ne!(token, other);
        for (n, p, m) in [
            ("a b", "*", "r"),
            ("a#b", "*", "r"),
            ("", "*", "r"),
            ("a", "", "r"),
            ("a", "site a/", "r"),
            ("a", "site#a/", "r"),
            ("a", "*", "x"),
        ] {
            assert!(new_token_line(n, p, m).is_err(), "{n:?} {p:?} {m:?}");
        }
    }
}
