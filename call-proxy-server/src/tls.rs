//! TLS 1.3 on the control port (rustls with the ring provider) and who a TV is.
//!
//! - The server's certificate: the operator's own (`tls_cert`/`tls_key`), or one made on
//!   first start under `<data dir>/tls/`: a private CA (`ca.crt` is what TVs trust, `ca.key`
//!   never leaves the directory) and a server certificate it signs for `tls_names`.
//! - A TV's identity is its own key pair, generated on the TV: it presents a self-signed
//!   certificate over that key as its TLS client certificate, and the handshake proves it
//!   holds the private key (TLS 1.3 CertificateVerify over the transcript: a captured
//!   handshake cannot be replayed). The server keeps only the certificate's SHA-256
//!   fingerprint ([`TvIdentity`]) and the public certificate; nothing it stores lets a
//!   reader act as the TV. Which user a fingerprint is, is the enrollment's business
//!   (`handler/enroll.rs`).
//! - A TV sent by the dispatcher adds its token as a second chain entry (after its own
//!   certificate); the verifier allows that one entry, and [`TvIdentity::token`] carries
//!   it to the registration check.
//! - Resumption: stateless TLS 1.3 tickets (the ring ticketer); a resumed session
//!   carries the client certificate of its first handshake, so a TV that reconnects
//!   after a blip skips the certificate exchange and the signatures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Largest TV certificate accepted (a self-signed Ed25519 or P-256 certificate is a few
/// hundred bytes).
pub const MAX_TV_CERT_LEN: usize = 4096;

/// A TV's identity: the SHA-256 of the certificate it presented.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a certificate.
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The first 8 bytes are enough to tell TVs apart in a log.
        write!(f, "tv:{}", &self.hex()[..16])
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Who is at the other end of a control connection, as TLS established it.
#[derive(Clone, PartialEq, Eq)]
pub struct TvIdentity {
    /// The certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// The certificate itself (public), for an enrollment; emptied once the TV has
    /// registered (its session needs only the fingerprint).
    pub cert: Vec<u8>,
    /// The dispatcher's token, when the TV presented one as the second entry of its
    /// certificate chain (see [`crate::dispatch`]): covered by the TV's handshake
    /// signature, so bound to this TLS channel. Emptied once registered.
    pub token: Option<Vec<u8>>,
}

impl std::fmt::Debug for TvIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.fingerprint)
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A certificate or key could not be used.
    #[error("{0}")]
    Bad(String),
}

fn io(what: &str, path: &Path, e: std::io::Error) -> TlsError {
    TlsError::Io(format!("{what} {}: {e}", path.display()))
}

/// The files of the server's own certificate.
#[derive(Debug, Clone)]
pub struct ServerCertFiles {
    /// The certificate chain (PEM: server certificate, then the CA).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate TVs trust (PEM), when the server made its own.
    pub ca: Option<PathBuf>,
}

/// The server's certificate: the operator's (`cert`, `key`) or, with neither, made in
/// `dir` on first start (a private CA and a server certificate for `names`). Later
/// starts reuse what is there.
pub fn server_cert_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    dir: &Path,
    names: &[String],
) -> Result<ServerCertFiles, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(ServerCertFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: None,
        }),
        (None, None) => make_private_ca(dir, names),
        _ => Err(TlsError::Bad(
            "give both --tls-cert and --tls-key, or neither (the server then makes its own CA)"
                .into(),
        )),
    }
}

/// Atomic, durable replacement of a file (the same as the TV's).
pub use control_client::tls::write_atomic;

fn make_private_ca(dir: &Path, names: &[String]) -> Result<ServerCertFiles, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256,
    };
    let files = ServerCertFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        ca: Some(dir.join("ca.crt")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let bad =
        |e: rcgen::Error| TlsError::Bad(format!("cannot make the server's certificates: {e}"));
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    let tag: u32 = rand::random();
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("call-proxy-server CA {tag:08x}"),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(bad)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(bad)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "call-proxy-server");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).map_err(bad)?;

    let w = |path: &Path, data: &[u8], secret| {
        write_atomic(path, data, secret).map_err(|e| io("cannot write", path, e))
    };
    w(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    w(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), false)?;
    w(&files.key, server_key.serialize_pem().as_bytes(), true)?;
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    w(&files.cert, chain.as_bytes(), false)?;
    tracing::info!(ca = %dir.join("ca.crt").display(), names = ?names, "made a private CA and a server certificate; TVs trust ca.crt");
    Ok(files)
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            TlsError::Bad(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?
        .collect();
    let certs =
        certs.map_err(|e| TlsError::Bad(format!("bad certificate in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Bad(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        TlsError::Bad(format!(
            "cannot read a private key from {}: {e}",
            path.display()
        ))
    })
}

/// The control port's TLS configuration: TLS 1.3 only, the server certificate, a TV
/// certificate required from every client ([`TvCertVerifier`]), stateless tickets.
pub fn server_config(files: &ServerCertFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let verifier = Arc::new(TvCertVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Bad(format!("TLS 1.3: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Bad(format!("the server certificate cannot be used: {e}")))?;
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsError::Bad(format!("TLS tickets: {e}")))?;
    // Tickets only: no per-session state kept in the server.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// Accepts any well-formed TV certificate whose key signs the handshake: a TV's
/// certificate is self-signed over a key it generated; what that key may do is decided
/// by the enrollment records, not by a certificate chain.
#[derive(Debug)]
pub struct TvCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for TvCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // At most one entry after the TV's certificate: the dispatcher's token.
        let token_too_big = intermediates
            .iter()
            .any(|t| t.len() > shared_proto::dispatch::MAX_TOKEN_LEN);
        if end_entity.len() > MAX_TV_CERT_LEN || intermediates.len() > 1 || token_too_big {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        }
        // Its key proves itself in `verify_tls13_signature`, which also parses it.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is not offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identity a finished TLS handshake established (its client certificate).
pub fn identity_of(conn: &rustls::ServerConnection) -> Option<TvIdentity> {
    let chain = conn.peer_certificates()?;
    let cert = chain.first()?;
    Some(TvIdentity {
        fingerprint: Fingerprint::of(cert),
        cert: cert.to_vec(),
        token: chain.get(1).map(|t| t.to_vec()),
    })
}
