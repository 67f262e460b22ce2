//! TLS fixtures: a throwaway PKI (a CA, a server certificate for 127.0.0.1 and localhost, a
//! client certificate) written as PEM files, and a real `redis-server` that speaks only
//! TLS on a free loopback port.

use super::free_port;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// PEM files in a temporary folder, removed on drop: `ca.crt`, `server.crt`/`server.key`,
/// `client.crt`/`client.key`.
pub struct Pki {
    dir: PathBuf,
}

fn params(common_name: &str, names: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate params");
    // Distinct names: with rcgen's default name for all, a leaf would look self-issued.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p
}

impl Pki {
    pub fn generate() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "iot-tls-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");

        let mut ca = params("iot-stream-processor test CA", &[]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");

        let mut server = params("redis test server", &["127.0.0.1", "localhost"]);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("key");
        let server = server.signed_by(&server_key, &ca).expect("server cert");

        let mut client = params("iot-processor test client", &[]);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("key");
        let client = client.signed_by(&client_key, &ca).expect("client cert");

        for (name, pem) in [
            ("ca.crt", ca.pem()),
            ("server.crt", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.crt", client.pem()),
            ("client.key", client_key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), pem).expect("write PEM");
        }
        Self { dir }
    }

    /// One of the files, as a string for an environment variable.
    pub fn file(&self, name: &str) -> String {
        let path = self.dir.join(name);
        assert!(path.exists(), "no {name}");
        path.to_str().expect("utf-8 temp path").to_string()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server with TLS only (`--port 0`), without persistence.
pub struct TlsRedis {
    child: Child,
    pub port: u16,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl TlsRedis {
    /// With `client_auth`, the server requires a client certificate signed by the CA.
    pub fn start(pki: &Pki, client_auth: bool) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &pki.file("server.crt")])
            .args(["--tls-key-file", &pki.file("server.key")])
            .args(["--tls-ca-cert-file", &pki.file("ca.crt")])
            .args(["--tls-auth-clients", if client_auth { "yes" } else { "no" }])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let redis = Self {
            child,
            port,
            ca: pki.file("ca.crt"),
            client_cert: pki.file("client.crt"),
            client_key: pki.file("client.key"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not answer PING (built without TLS?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// Runs one command with redis-cli over TLS (with the client certificate, so it works
    /// with client authentication too); `None` when the server does not answer.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--tls"])
            .args(["--cacert", &self.ca])
            .args(["--cert", &self.client_cert, "--key", &self.client_key])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (out.status.success() && !text.is_empty() && !text.starts_with("Could not connect"))
            .then_some(text)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
