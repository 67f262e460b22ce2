//! TLS to Redis (`rediss://`): the CA and the optional client certificate and key, checked
//! once when the service starts, and the rustls crypto provider.
//!
//! The redis crate parses these PEM inputs only when it dials, so a wrong file would show
//! as every connection failing, forever, behind a "store unreachable". Checking them here
//! makes it a start-up error that names the input instead. Trust: without a CA, the
//! compiled-in webpki (Mozilla) roots, because the image is `FROM scratch` and has no
//! system store; a CA replaces them (a private CA, or a mounted system bundle).

use bb8_redis::redis::{ClientTlsConfig, TlsCertificates};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// What is wrong with one PEM input. Never carries the input's bytes: a key file's content
/// must not reach a log.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// No block of the expected kind (an empty file, or the wrong file).
    #[error("no PEM {0} block in it")]
    Missing(&'static str),
    /// Not well-formed PEM.
    #[error("malformed PEM: {0}")]
    Malformed(&'static str),
    /// Well-formed, but rustls refuses it (e.g. not an X.509 certificate, an unsupported
    /// key type).
    #[error("refused: {0}")]
    Refused(rustls::Error),
}

/// A TLS input that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA certificate(s).
    #[error("CA certificate: {0}")]
    Ca(PemError),
    /// The client certificate (chain).
    #[error("client certificate: {0}")]
    ClientCert(PemError),
    /// The client's private key.
    #[error("client key: {0}")]
    ClientKey(PemError),
    /// Both parse, but the key is not the certificate's.
    #[error("the client certificate and key do not belong together: {0}")]
    ClientPair(rustls::Error),
}

/// A client certificate (chain) and its private key, PEM, for mutual TLS. Its `Debug`
/// form shows neither.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate, then any intermediates.
    pub cert_pem: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(<redacted>)")
    }
}

/// The TLS material of a `rediss://` connection, checked; PEM as read.
#[derive(Clone, Default)]
pub struct RedisTls {
    ca_pem: Option<Vec<u8>>,
    client: Option<ClientIdentity>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Whether each part is set, never its content.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Checks a CA (PEM, one or more certificates; replaces the public roots) and a client
    /// certificate chain and key (PEM; for mutual TLS) the way rustls will use them.
    pub fn new(ca_pem: Option<Vec<u8>>, client: Option<ClientIdentity>) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &ca_pem {
            for cert in certificates(ca).map_err(TlsError::Ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Ca(PemError::Refused(e)))?;
            }
        }
        if let Some(client) = &client {
            let chain = certificates(&client.cert_pem).map_err(TlsError::ClientCert)?;
            let key = PrivateKeyDer::from_pem_slice(&client.key_pem)
                .map_err(|e| TlsError::ClientKey(pem_error(e, "PRIVATE KEY")))?;
            // What rustls does with them on every connection: load the key with the
            // provider (is its type supported?) and check it matches the certificate.
            rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::ClientPair)?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => TlsError::ClientPair(e),
                    other => TlsError::ClientKey(PemError::Refused(other)),
                })?;
        }
        Ok(Self { ca_pem, client })
    }

    /// Whether anything beyond the defaults is set.
    pub fn is_configured(&self) -> bool {
        self.ca_pem.is_some() || self.client.is_some()
    }

    /// The form `redis::Client::build_with_tls` takes.
    pub(super) fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.client.as_ref().map(|c| ClientTlsConfig {
                client_cert: c.cert_pem.clone(),
                client_key: c.key_pem.clone(),
            }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// ring: aws-lc-rs, rustls' default, needs cmake and nasm to build the static musl binary.
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Makes ring the process-wide provider, which the redis crate's TLS connections use.
/// rustls would pick it by itself while ring is the only provider compiled in, but panic
/// on the first connection if a dependency ever enabled a second one.
pub(super) fn install_provider() {
    // An error means a provider is installed already, which is then the one used.
    let _ = provider().install_default();
}

/// Every certificate in a PEM input; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

/// A PEM parse error without the parser's details, some of which quote the input.
fn pem_error(e: pem::Error, expected: &'static str) -> PemError {
    match e {
        pem::Error::NoItemsFound => PemError::Missing(expected),
        pem::Error::MissingSectionEnd { .. } => {
            PemError::Malformed("a BEGIN line without its END line")
        }
        pem::Error::IllegalSectionStart { .. } => PemError::Malformed("an invalid BEGIN line"),
        pem::Error::Base64Decode(_) => PemError::Malformed("invalid base64"),
        _ => PemError::Malformed("unreadable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> (String, String, String) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("signed");
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    fn identity(cert: &str, key: &str) -> ClientIdentity {
        ClientIdentity {
            cert_pem: cert.as_bytes().to_vec(),
            key_pem: key.as_bytes().to_vec(),
        }
    }

    #[test]
    fn good_inputs_pass_and_the_debug_form_shows_no_pem() {
        let (ca, cert, key) = pki();
        let tls = RedisTls::new(Some(ca.clone().into_bytes()), Some(identity(&cert, &key)))
            .expect("valid");
        assert!(tls.is_configured());
        let shown = format!("{tls:?}");
        assert!(!shown.contains("-----"), "{shown}");
        // It says which parts are set, so a log of it still helps.
        assert_eq!(shown, "RedisTls { ca: true, client_identity: true }");
        assert_eq!(
            format!("{:?}", identity(&cert, &key)),
            "ClientIdentity(<redacted>)"
        );
        assert!(!RedisTls::default().is_configured());
        // Either part alone is a configuration too.
        let ca_only = RedisTls::new(Some(ca.into_bytes()), None).expect("valid");
        assert!(ca_only.is_configured());
        let client_only = RedisTls::new(None, Some(identity(&cert, &key))).expect("valid");
        assert!(client_only.is_configured());
    }

    #[test]
    fn each_wrong_input_is_named_without_its_content() {
        let (ca, cert, key) = pki();
        let (_, other_cert, _) = pki();
        let b = |s: &str| Some(s.as_bytes().to_vec());
        let cases = [
            (Some(Vec::new()), None, "CA certificate: no PEM CERTIFICATE"),
            (b(&key), None, "CA certificate: no PEM CERTIFICATE"),
            (
                b(&ca[..ca.len() - 30]),
                None,
                "CA certificate: malformed PEM: a BEGIN line without its END line",
            ),
            (
                b(&ca),
                Some(identity(&key, &key)),
                "client certificate: no PEM",
            ),
            (
                b(&ca),
                Some(identity(&cert, &cert)),
                "client key: no PEM PRIVATE KEY",
            ),
            (
                b(&ca),
                Some(identity(&other_cert, &key)),
                "do not belong together",
            ),
            (
                b("-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n"),
                None,
                "CA certificate: malformed PEM: invalid base64",
            ),
            (
                b("-----BEGIN CERTIFICATE\nAAAA\n-----END CERTIFICATE-----\n"),
                None,
                "CA certificate: malformed PEM: an invalid BEGIN line",
            ),
        ];
        for (ca, client, expected) in cases {
            let err = RedisTls::new(ca, client).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("-----") && !err.contains("MI"), "{err}");
        }
    }
}
