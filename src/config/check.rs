//! What clap cannot check: combinations of settings (a cluster's needs, the checkpoint
//! interval against the TTL and the idle timeout, TLS files without TLS) and the Redis TLS
//! files themselves. Each refusal is a [`ConfigError`] naming the setting at fault first.

use super::cli::{parse_duration, Config};
use actors::store::{ClientIdentity, RedisTls, TlsError};
use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A setting, or a combination of settings, that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a Redis URL this build can use (checked here rather than by clap, whose
    /// message would echo the value and with it the password).
    #[error(
        "invalid value for REDIS_URL (--redis-url): expected redis://[:password@]host:port/db or rediss://…{0}"
    )]
    RedisUrl(&'static str),
    /// TLS files without TLS.
    #[error("{0} is set but REDIS_URL is not a rediss:// URL: the TLS files apply only to TLS connections to Redis; use rediss://… or unset {0}")]
    TlsWithoutRediss(&'static str),
    /// Mutual TLS needs both halves.
    #[error("{0} is set but {1} is not: mutual TLS to Redis needs both REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE")]
    HalfClientIdentity(&'static str, &'static str),
    /// A TLS file that cannot be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    TlsFileUnreadable {
        /// The setting's environment variable.
        setting: &'static str,
        /// The path it gives.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file that does not hold what it should.
    #[error("{setting} ({}): {problem}", path.display())]
    TlsFileInvalid {
        /// The setting at fault.
        setting: &'static str,
        /// The path of the file at fault.
        path: PathBuf,
        /// What is wrong (never the file's content).
        problem: TlsError,
    },
    /// Clustering needs a shared store.
    #[error("CLUSTER_ADVERTISE_ADDR is set but REDIS_URL is not: a cluster needs Redis, which holds its ownership table and lets any replica answer /analyze; set REDIS_URL or unset CLUSTER_ADVERTISE_ADDR")]
    ClusterWithoutRedis,
    /// A clustered node must know itself.
    #[error("CLUSTER_PEERS is set but CLUSTER_ADVERTISE_ADDR is not: a cluster member is configured by CLUSTER_ADVERTISE_ADDR (in Kubernetes, $(POD_IP):8081), REDIS_URL and CLUSTER_TOKEN; CLUSTER_PEERS is no longer needed")]
    NoAdvertiseAddr,
    /// A lease must outlast several heartbeats.
    #[error("CLUSTER_LEASE ({lease:?}) must be at least 3 × CLUSTER_HEARTBEAT_INTERVAL ({heartbeat:?}): a node stops admitting one interval before its lease ends, and one late heartbeat must not cost it its shards")]
    LeaseTooShort {
        /// CLUSTER_LEASE.
        lease: Duration,
        /// CLUSTER_HEARTBEAT_INTERVAL.
        heartbeat: Duration,
    },
    /// A window must be checkpointed before its key expires and before its actor is
    /// evicted. Names first the setting that was changed (WINDOW_CHECKPOINT_INTERVAL
    /// unless it is at its default), then the one it conflicts with.
    #[error("{setting} ({}) must be {} {other} ({}): {why}", humantime::format_duration(*value), if *shorter { "shorter than" } else { "longer than" }, humantime::format_duration(*other_value))]
    CheckpointInterval {
        /// The setting at fault.
        setting: &'static str,
        /// Its value.
        value: Duration,
        /// Whether it must be shorter than the other (else longer).
        shorter: bool,
        /// The setting it conflicts with.
        other: &'static str,
        /// That one's value.
        other_value: Duration,
        /// What would go wrong.
        why: &'static str,
    },
    /// Internal requests must be authenticated.
    #[error("CLUSTER_ADVERTISE_ADDR is set but CLUSTER_TOKEN is not (or is empty): internal requests must carry a shared secret")]
    NoToken,
}

impl Config {
    /// Checks what clap cannot, and returns the cluster settings (`None` on a single
    /// node).
    pub fn check(&self) -> Result<Option<actors::cluster::ClusterConfig>, ConfigError> {
        if let Some(url) = &self.redis_url {
            match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("redis" | "rediss" | "redis+unix" | "unix") => {}
                _ => return Err(ConfigError::RedisUrl("")),
            }
        }
        self.check_checkpoint_interval()?;
        let tls = self
            .redis_url
            .as_deref()
            .is_some_and(|u| u.starts_with("rediss://"));
        for (set, setting) in [
            (self.redis_ca_file.is_some(), REDIS_CA_FILE),
            (
                self.redis_client_cert_file.is_some(),
                REDIS_CLIENT_CERT_FILE,
            ),
            (self.redis_client_key_file.is_some(), REDIS_CLIENT_KEY_FILE),
        ] {
            if set && !tls {
                return Err(ConfigError::TlsWithoutRediss(setting));
            }
        }
        match (&self.redis_client_cert_file, &self.redis_client_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::HalfClientIdentity(
                    REDIS_CLIENT_CERT_FILE,
                    REDIS_CLIENT_KEY_FILE,
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::HalfClientIdentity(
                    REDIS_CLIENT_KEY_FILE,
                    REDIS_CLIENT_CERT_FILE,
                ))
            }
            _ => {}
        }
        let peers_set = self.cluster_peers.iter().any(|p| !p.trim().is_empty());
        let Some(advertise) = self.cluster_advertise_addr else {
            return if peers_set {
                Err(ConfigError::NoAdvertiseAddr)
            } else {
                Ok(None)
            };
        };
        if self.redis_url.is_none() {
            return Err(ConfigError::ClusterWithoutRedis);
        }
        if self.cluster_token.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::NoToken);
        }
        let (lease, heartbeat) = (self.cluster_lease, self.cluster_heartbeat_interval);
        if lease < heartbeat * 3 {
            return Err(ConfigError::LeaseTooShort { lease, heartbeat });
        }
        Ok(Some(actors::cluster::ClusterConfig {
            advertise,
            shards: self.cluster_shards,
            heartbeat,
            lease,
            forward_timeout: self.cluster_forward_timeout,
        }))
    }

    /// WINDOW_CHECKPOINT_INTERVAL must be shorter than RESULT_TTL and DEVICE_IDLE_TIMEOUT.
    fn check_checkpoint_interval(&self) -> Result<(), ConfigError> {
        let interval = self.window_checkpoint_interval;
        let default_interval = Self::command()
            .get_arguments()
            .find(|a| a.get_id() == "window_checkpoint_interval")
            .and_then(|a| a.get_default_values().first()?.to_str().map(parse_duration))
            .and_then(Result::ok);
        // Blame the interval only when it was changed: otherwise the other setting was.
        let interval_changed = default_interval != Some(interval);
        for (other, other_value, why) in [
            (
                "RESULT_TTL",
                self.result_ttl,
                "a stored window would expire between checkpoints",
            ),
            (
                "DEVICE_IDLE_TIMEOUT",
                self.device_idle_timeout,
                "an idle actor would be evicted before its trailing checkpoint",
            ),
        ] {
            if interval < other_value {
                continue;
            }
            return Err(if interval_changed {
                ConfigError::CheckpointInterval {
                    setting: "WINDOW_CHECKPOINT_INTERVAL",
                    value: interval,
                    shorter: true,
                    other,
                    other_value,
                    why,
                }
            } else {
                ConfigError::CheckpointInterval {
                    setting: other,
                    value: other_value,
                    shorter: false,
                    other: "WINDOW_CHECKPOINT_INTERVAL",
                    other_value: interval,
                    why,
                }
            });
        }
        Ok(())
    }

    /// Reads and checks the TLS files of a `rediss://` connection (after [`Config::check`]);
    /// an error names the setting and the path, never the content.
    pub fn redis_tls(&self) -> Result<RedisTls, ConfigError> {
        let ca = read_tls_file(REDIS_CA_FILE, self.redis_ca_file.as_deref())?;
        let cert = read_tls_file(
            REDIS_CLIENT_CERT_FILE,
            self.redis_client_cert_file.as_deref(),
        )?;
        let key = read_tls_file(REDIS_CLIENT_KEY_FILE, self.redis_client_key_file.as_deref())?;
        let client = cert
            .zip(key)
            .map(|(cert_pem, key_pem)| ClientIdentity { cert_pem, key_pem });
        RedisTls::new(ca, client).map_err(|problem| {
            let (setting, path) = match problem {
                TlsError::Ca(_) => (REDIS_CA_FILE, &self.redis_ca_file),
                TlsError::ClientCert(_) => (REDIS_CLIENT_CERT_FILE, &self.redis_client_cert_file),
                TlsError::ClientKey(_) | TlsError::ClientPair(_) => {
                    (REDIS_CLIENT_KEY_FILE, &self.redis_client_key_file)
                }
            };
            ConfigError::TlsFileInvalid {
                setting,
                path: path.clone().unwrap_or_default(),
                problem,
            }
        })
    }
}

// The TLS settings as their messages name them (the `env` of their fields above).
const REDIS_CA_FILE: &str = "REDIS_CA_FILE";
const REDIS_CLIENT_CERT_FILE: &str = "REDIS_CLIENT_CERT_FILE";
const REDIS_CLIENT_KEY_FILE: &str = "REDIS_CLIENT_KEY_FILE";

/// A TLS file's content, when its setting is given.
fn read_tls_file(
    setting: &'static str,
    path: Option<&Path>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    path.map(|path| {
        std::fs::read(path).map_err(|source| ConfigError::TlsFileUnreadable {
            setting,
            path: path.to_path_buf(),
            source,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn a_cluster_needs_redis_an_address_and_a_token() {
        let member = ["--cluster-advertise-addr", "10.0.0.1:8081"];
        let err = |extra: &[&str]| {
            let args: Vec<&str> = member.iter().chain(extra).copied().collect();
            parse(&args)
                .expect("parses")
                .check()
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&[]).contains("REDIS_URL"));
        assert!(err(&["--redis-url", "redis://r/"]).contains("CLUSTER_TOKEN"));
        let short = err(&[
            "--redis-url",
            "redis://r/",
            "--cluster-token",
            "t",
            "--cluster-lease",
            "1s",
        ]);
        assert!(
            short.contains("CLUSTER_LEASE") && short.contains("CLUSTER_HEARTBEAT_INTERVAL"),
            "{short}"
        );
        // The old way alone (peers without an address) names what a member needs now.
        let old = parse(&["--cluster-peers", "a:8081"])
            .expect("parses")
            .check()
            .expect_err("refused")
            .to_string();
        assert!(old.contains("CLUSTER_ADVERTISE_ADDR"), "{old}");
        let c = parse(&[
            "--cluster-peers",
            "a:8081, b:8081",
            "--cluster-discovery-interval",
            "2s",
            "--redis-url",
            "redis://r/",
            "--cluster-advertise-addr",
            "10.0.0.1:8081",
            "--cluster-token",
            "t",
        ])
        .expect("parses");
        let ok = c.check().expect("valid").expect("clustered");
        assert_eq!(ok.advertise, "10.0.0.1:8081".parse().expect("addr"));
        assert_eq!(ok.shards, 256);
        assert_eq!(
            c.deprecated(),
            vec!["CLUSTER_PEERS", "CLUSTER_DISCOVERY_INTERVAL"]
        );
    }

    #[test]
    fn a_checkpoint_interval_must_be_shorter_than_the_ttl_and_the_idle_timeout() {
        let check = |args: &[&str]| parse(args).expect("parses").check().map(|_| ());
        assert!(check(&["--window-checkpoint-interval", "0"]).is_ok());
        assert!(check(&["--window-checkpoint-interval", "4m"]).is_ok());
        for args in [
            &["--window-checkpoint-interval", "5m"][..],
            &[
                "--window-checkpoint-interval",
                "2s",
                "--device-idle-timeout",
                "2s",
            ][..],
        ] {
            let err = check(args).expect_err("refused").to_string();
            assert!(err.contains("WINDOW_CHECKPOINT_INTERVAL"), "{err}");
        }
        // The setting that was changed comes first, then the one it conflicts with.
        for (args, expected) in [
            (
                &["--window-checkpoint-interval", "5m"][..],
                "WINDOW_CHECKPOINT_INTERVAL (5m) must be shorter than RESULT_TTL (5m): ",
            ),
            (
                &["--device-idle-timeout", "1s"][..],
                "DEVICE_IDLE_TIMEOUT (1s) must be longer than WINDOW_CHECKPOINT_INTERVAL (1s): ",
            ),
            (
                &["--result-ttl", "1s"][..],
                "RESULT_TTL (1s) must be longer than WINDOW_CHECKPOINT_INTERVAL (1s): ",
            ),
            (
                &[
                    "--window-checkpoint-interval",
                    "3s",
                    "--device-idle-timeout",
                    "2s",
                ][..],
                "WINDOW_CHECKPOINT_INTERVAL (3s) must be shorter than DEVICE_IDLE_TIMEOUT (2s): ",
            ),
        ] {
            let err = check(args).expect_err("refused").to_string();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn tls_files_need_rediss_and_a_client_identity_needs_both_halves() {
        let err = |args: &[&str]| {
            parse(args)
                .expect("parses")
                .check()
                .expect_err("refused")
                .to_string()
        };
        let ca = ["--redis-ca-file", "/ca.pem"];
        for url in [None, Some("redis://r:6379/")] {
            let mut args = ca.to_vec();
            args.extend(url.iter().flat_map(|u| ["--redis-url", u]));
            let e = err(&args);
            assert!(
                e.contains("REDIS_CA_FILE") && e.contains("rediss://"),
                "{e}"
            );
        }
        let e = err(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-cert-file",
            "/c.pem",
        ]);
        assert!(
            e.contains("REDIS_CLIENT_CERT_FILE is set but REDIS_CLIENT_KEY_FILE is not"),
            "{e}"
        );
        let e = err(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-key-file",
            "/k.pem",
        ]);
        assert!(
            e.contains("REDIS_CLIENT_KEY_FILE is set but REDIS_CLIENT_CERT_FILE is not"),
            "{e}"
        );
        let ok = parse(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("parses");
        assert!(ok.check().is_ok());
    }

    #[test]
    fn an_unreadable_or_wrong_tls_file_names_the_setting_and_the_path() {
        let missing = parse(&[
            "--redis-url",
            "rediss://r/",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ])
        .expect("parses")
        .redis_tls()
        .expect_err("refused")
        .to_string();
        assert!(
            missing.starts_with("REDIS_CA_FILE: cannot read /nonexistent/ca.pem"),
            "{missing}"
        );
        // A key where the CA belongs: named, and the key is not echoed.
        let key = std::env::temp_dir().join(format!("iot-config-test-{}.pem", std::process::id()));
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
        std::fs::write(&key, secret).expect("write");
        let path = key.to_str().expect("utf-8 path");
        let wrong = parse(&["--redis-url", "rediss://r/", "--redis-ca-file", path])
            .expect("parses")
            .redis_tls()
            .expect_err("refused")
            .to_string();
        let _ = std::fs::remove_file(&key);
        assert!(
            wrong.contains(&format!(
                "REDIS_CA_FILE ({path}): CA certificate: no PEM CERTIFICATE"
            )),
            "{wrong}"
        );
        assert!(!wrong.contains("c2VjcmV0"), "{wrong}");
    }
}
