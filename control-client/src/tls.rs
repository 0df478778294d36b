//! The TV's side of TLS on the control link: its own key pair and certificate
//! ([`TvKey`]), the trust in the server's CA, and TLS 1.3 connections
//! ([`TlsClient::connect`]) that resume after a network blip.
//!
//! A TV's identity is an Ed25519 key generated on the TV; the private key never leaves
//! it. It is presented as a self-signed certificate over that key, as the TLS client
//! certificate; the server learns only the certificate (and its fingerprint) and decides
//! which user it is through enrollment.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::recorded::{refusal_instead_of_tls, Recorded, RefusedBeforeTls};

/// Why a TLS setting could not be made or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A key, certificate or name is unusable.
    #[error("{0}")]
    Bad(String),
}

/// A TV's key pair and the self-signed certificate over it.
#[derive(Clone)]
pub struct TvKey {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The private key (PKCS#8 DER). Never sent anywhere.
    key: Vec<u8>,
}

impl std::fmt::Debug for TvKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TvKey({} byte certificate)", self.cert.len())
    }
}

impl TvKey {
    /// A new Ed25519 key pair and its self-signed certificate.
    pub fn generate() -> Result<TvKey, TlsSetupError> {
        let bad = |e: rcgen::Error| TlsSetupError::Bad(format!("cannot make a TV key: {e}"));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(bad)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tv-agent");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key).map_err(bad)?;
        Ok(TvKey {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        })
    }

    /// The certificate and key as PEM (certificate first), for storing.
    pub fn to_pem(&self) -> (String, String) {
        (
            pem_block("CERTIFICATE", &self.cert),
            pem_block("PRIVATE KEY", &self.key),
        )
    }

    /// Reads a key stored with [`TvKey::to_pem`].
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TvKey, TlsSetupError> {
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| TlsSetupError::Bad(format!("bad TV certificate: {e}")))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsSetupError::Bad(format!("bad TV key: {e}")))?;
        Ok(TvKey {
            cert,
            key: key.secret_pkcs8_der().to_vec(),
        })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads the CA certificates TVs trust from PEM.
pub fn ca_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsSetupError::Bad(format!("bad CA certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Bad("no CA certificate in the file".into()));
    }
    Ok(certs)
}

/// TLS to one server: the CA it must be signed by, the TV's certificate, and the
/// resumption cache (shared by every connection made through this value, so a TV that
/// reconnects resumes instead of repeating the full handshake).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    /// The CA (PEM), to make a [`TlsClient::with_token`].
    ca_pem: Arc<Vec<u8>>,
    /// The TV's key, to make a [`TlsClient::with_token`].
    tv: TvKey,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

impl TlsClient {
    /// TLS 1.3 verifying the server against `ca` (PEM), presenting `tv`.
    pub fn new(ca_pem: &[u8], tv: &TvKey) -> Result<TlsClient, TlsSetupError> {
        Self::with_chain(ca_pem, tv, None)
    }

    /// The same CA and TV key, presenting the dispatcher's `token` as well: it travels
    /// as a second entry of the TV's certificate chain, so the TV's handshake signature
    /// covers it and binds it to the connection (the node checks it). A fresh resumption
    /// cache: a session resumed from before would carry the old chain.
    pub fn with_token(&self, token: &[u8]) -> Result<TlsClient, TlsSetupError> {
        Self::with_chain(&self.ca_pem, &self.tv, Some(token))
    }

    fn with_chain(
        ca_pem: &[u8],
        tv: &TvKey,
        token: Option<&[u8]>,
    ) -> Result<TlsClient, TlsSetupError> {
        let mut chain = vec![tv.cert.clone()];
        if let Some(token) = token {
            chain.push(CertificateDer::from(token.to_vec()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca_certs(ca_pem)? {
            roots
                .add(cert)
                .map_err(|e| TlsSetupError::Bad(format!("unusable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsSetupError::Bad(format!("TLS 1.3: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, tv.private_key())
            .map_err(|e| TlsSetupError::Bad(format!("the TV key cannot be used: {e}")))?;
        Ok(TlsClient {
            config: Arc::new(config),
            ca_pem: Arc::new(ca_pem.to_vec()),
            tv: tv.clone(),
        })
    }

    /// The rustls configuration (for benchmarks that drive handshakes in memory).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Connects to `server` over TCP (from `local`, if given) and completes the TLS
    /// handshake, checking the server's certificate is valid for `name` (the host name or
    /// IP address the TV was told to use).
    pub async fn connect(
        &self,
        server: SocketAddr,
        name: &str,
        local: Option<SocketAddr>,
    ) -> std::io::Result<TlsStream<Recorded<TcpStream>>> {
        let name = ServerName::try_from(name.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not a server name: {e}"),
            )
        })?;
        let stream = crate::client::tcp_connect(server, local).await?;
        // Recorded until the handshake is done: a server that refuses the connection
        // (full, or this address flooded) answers in plain text, before any TLS.
        let handshake = tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(name, Recorded::new(stream))
            .into_fallible();
        match handshake.await {
            Ok(mut tls) => {
                tls.get_mut().0.stop();
                Ok(tls)
            }
            Err((e, stream)) => match refusal_instead_of_tls(stream).await {
                Some(w) => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    RefusedBeforeTls(w),
                )),
                None => Err(e),
            },
        }
    }
}

/// The host part of a `host:port` address (an IPv6 literal without its brackets), as
/// the name the server's certificate must be valid for.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Writes `body` to `path`, durably and atomically (a temporary file beside it, synced,
/// renamed, the directory synced): a power cut leaves the old or the new file, never half
/// of one. With `secret`, the file is the owner's only from its creation on. Used for
/// keys and certificates on both sides, and for the TV's JSON files.
pub fn write_atomic(path: &Path, body: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a file (for PEM inputs), naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path)
        .map_err(|e| TlsSetupError::Io(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tv_key_survives_pem_and_the_host_of_an_address() {
        let k = TvKey::generate().unwrap();
        let (cert, key) = k.to_pem();
        let back = TvKey::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(back.cert, k.cert);
        assert_eq!(back.key, k.key);
        assert!(TvKey::from_pem(cert.as_bytes(), b"junk").is_err());
        assert_eq!(host_of("127.0.0.1:7600"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7600"), "::1");
        assert_eq!(host_of("tv.example.net:7600"), "tv.example.net");
        assert_eq!(host_of("tv.example.net"), "tv.example.net");
    }
}
