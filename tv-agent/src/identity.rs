//! The TV's identity on disk, under `<data dir>/identity/`: its own key pair and the
//! self-signed certificate over it (made on the TV the first time it is needed; the
//! private key never leaves the TV), the CA it trusts for its server (saved at
//! enrollment), and which user it was enrolled as. Every file is written atomically
//! (a temporary file, synced, renamed); the key is readable by its owner only.

use std::path::{Path, PathBuf};

use control_client::{TlsClient, Transport, TvKey};
use serde::{Deserialize, Serialize};
use shared_proto::UserId;

/// Largest identity file read (a key, a certificate, a CA bundle, the enrollment note).
const MAX_FILE: u64 = 256 * 1024;

/// Why the identity cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// This TV has not been enrolled (or the files are gone).
    #[error("this TV is not enrolled with a server: run `tv-agent enroll` first ({0})")]
    NotEnrolled(String),
    /// The TV was enrolled as another user than the one asked for.
    #[error("this TV is enrolled as user {enrolled}, not {asked}")]
    WrongUser {
        /// The user in the credential.
        enrolled: UserId,
        /// The user given with --user.
        asked: UserId,
    },
    /// A file is unreadable or damaged.
    #[error("{0}")]
    Bad(String),
}

/// What enrollment left in the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The TV's user number.
    pub user_id: UserId,
    /// The server it was enrolled with.
    pub server: String,
}

/// The identity directory of a data directory.
#[derive(Debug, Clone)]
pub struct IdentityDir {
    dir: PathBuf,
}

fn read_limited(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IdentityError::Bad(format!("{}: {e}", path.display()))),
        Ok(m) if m.len() > MAX_FILE => {
            return Err(IdentityError::Bad(format!(
                "{} is larger than {MAX_FILE} bytes",
                path.display()
            )))
        }
        Ok(_) => {}
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|e| IdentityError::Bad(format!("{}: {e}", path.display())))
}

fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), IdentityError> {
    crate::files::write_atomic(path, data, secret)
        .map_err(|e| IdentityError::Bad(format!("cannot write {}: {e}", path.display())))
}

impl IdentityDir {
    /// The identity kept under `data_dir`.
    pub fn new(data_dir: &Path) -> IdentityDir {
        IdentityDir {
            dir: data_dir.join("identity"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The TV's key, if it has one.
    pub fn key(&self) -> Result<Option<TvKey>, IdentityError> {
        let (Some(cert), Some(key)) = (
            read_limited(&self.path("tv.crt"))?,
            read_limited(&self.path("tv.key"))?,
        ) else {
            return Ok(None);
        };
        TvKey::from_pem(&cert, &key)
            .map(Some)
            .map_err(|e| IdentityError::Bad(format!("{}: {e}", self.dir.display())))
    }

    /// The TV's key, made and stored now if it has none.
    pub fn key_or_new(&self) -> Result<TvKey, IdentityError> {
        if let Some(k) = self.key()? {
            return Ok(k);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            IdentityError::Bad(format!("cannot create {}: {e}", self.dir.display()))
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        let key = TvKey::generate().map_err(|e| IdentityError::Bad(e.to_string()))?;
        let (cert_pem, key_pem) = key.to_pem();
        // The key first: a certificate without its key is useless, the reverse is not.
        write_atomic(&self.path("tv.key"), key_pem.as_bytes(), true)?;
        write_atomic(&self.path("tv.crt"), cert_pem.as_bytes(), false)?;
        Ok(key)
    }

    /// Saves what enrollment decided: the CA to trust and the user.
    pub fn save_enrolled(&self, ca_pem: &[u8], enrolled: &Enrolled) -> Result<(), IdentityError> {
        write_atomic(&self.path("server-ca.crt"), ca_pem, false)?;
        let json = serde_json::to_vec_pretty(enrolled)
            .map_err(|e| IdentityError::Bad(format!("cannot encode the enrollment: {e}")))?;
        write_atomic(&self.path("enrolled.json"), &json, true)
    }

    /// What enrollment left, if anything.
    pub fn enrolled(&self) -> Result<Option<Enrolled>, IdentityError> {
        let path = self.path("enrolled.json");
        let Some(bytes) = read_limited(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| IdentityError::Bad(format!("{} is damaged: {e}", path.display())))
    }

    /// The CA saved at enrollment.
    pub fn ca(&self) -> Result<Option<Vec<u8>>, IdentityError> {
        read_limited(&self.path("server-ca.crt"))
    }

    /// How this TV reaches its server: TLS with its key, trusting `ca_pem` (given on
    /// the command line) or else the CA saved at enrollment; and the user it is, from
    /// `user` (checked against the enrollment) or the enrollment.
    pub fn transport(
        &self,
        ca_pem: Option<&[u8]>,
        user: Option<UserId>,
    ) -> Result<(Transport, UserId), IdentityError> {
        let enrolled = self.enrolled()?;
        let key = self.key()?;
        let (Some(enrolled), Some(key)) = (enrolled, key) else {
            return Err(IdentityError::NotEnrolled(format!(
                "no credential in {}",
                self.dir.display()
            )));
        };
        if let Some(asked) = user.filter(|u| *u != enrolled.user_id) {
            return Err(IdentityError::WrongUser {
                enrolled: enrolled.user_id,
                asked,
            });
        }
        let saved;
        let ca = match ca_pem {
            Some(ca) => ca,
            None => {
                saved = self.ca()?.ok_or_else(|| {
                    IdentityError::NotEnrolled(format!("no server CA in {}", self.dir.display()))
                })?;
                &saved
            }
        };
        let tls = TlsClient::new(ca, &key).map_err(|e| IdentityError::Bad(e.to_string()))?;
        Ok((Transport::Tls(tls), enrolled.user_id))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_the_enrollment_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = IdentityDir::new(dir.path());
        assert!(id.key().unwrap().is_none());
        assert!(matches!(
            id.transport(None, None),
            Err(IdentityError::NotEnrolled(_))
        ));
        let k = id.key_or_new().unwrap();
        let again = id.key_or_new().unwrap();
        assert_eq!(k.cert, again.cert, "the same key next time");
        let mode = std::fs::metadata(dir.path().join("identity/tv.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is the owner's only: {mode:o}");
        let e = Enrolled {
            user_id: 2002,
            server: "127.0.0.1:7600".into(),
        };
        id.save_enrolled(b"not a CA", &e).unwrap();
        assert_eq!(id.enrolled().unwrap(), Some(e));
        assert!(matches!(
            id.transport(None, Some(1001)),
            Err(IdentityError::WrongUser {
                enrolled: 2002,
                asked: 1001
            })
        ));
        // A damaged CA is a clear error, not a fallback to no TLS.
        assert!(matches!(
            id.transport(None, None),
            Err(IdentityError::Bad(_))
        ));
        std::fs::write(dir.path().join("identity/enrolled.json"), b"{").unwrap();
        assert!(matches!(id.enrolled(), Err(IdentityError::Bad(_))));
    }
}
