//! Message bodies as files in the body directory (`body_dir`): uploads in progress under
//! `partial/<sender>-<key>` (their length is how much arrived, so an upload broken by a
//! lost link or a restart resumes where it stopped), and sealed bodies under
//! `store/<sender>/<key>` once their length, SHA-256 and media check passed, fsynced and
//! renamed into place (and the directory fsynced) before the message's row commits.
//!
//! Why files named by (sender, key) and not content-addressed: a body belongs to exactly
//! one message, so deleting a message is one unlink with no reference counting between
//! messages (or between nodes sharing the directory), and a crash between sealing and
//! the row's commit leaves a file the sweep can tell is unclaimed by asking for that
//! sender's key. Why files and not rows: a 10 MB body through the database's single
//! writer would sit in the commit path of every call record.
//!
//! Everything here is blocking file I/O; callers run it on blocking threads. Nothing is
//! ever held whole in memory: bodies are hashed and checked as streams, chunks are at
//! most [`shared_proto::MAX_CHUNK`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use shared_proto::{IdempotencyKey, MessageKind, UserId};

use crate::storage::BodyMeta;

/// The body directory.
#[derive(Debug, Clone)]
pub struct Bodies {
    root: PathBuf,
}

/// Why a body could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Its length or SHA-256 is not what was announced (the partial file is gone).
    #[error("{0}")]
    BadHash(String),
    /// It is not what its kind says (the partial file is gone).
    #[error("{message}")]
    BadMedia {
        /// A short stable word for metrics.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// It is longer than the kind allows (a voice message or clip).
    #[error("{0}")]
    TooLong(String),
    /// The file system failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The limits a body is checked against (the media check's own type).
pub use media_check::Limits as MediaLimits;

impl Bodies {
    /// Opens (creating) the body directory.
    pub fn open(root: &Path) -> io::Result<Bodies> {
        fs::create_dir_all(root.join("partial"))?;
        fs::create_dir_all(root.join("store"))?;
        Ok(Bodies {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn partial(&self, sender: UserId, key: IdempotencyKey) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{sender}-{key:016x}"))
    }

    /// The sealed body's path relative to the directory (what a row names).
    pub fn sealed_name(sender: UserId, key: IdempotencyKey) -> String {
        format!("store/{sender}/{key:016x}")
    }

    /// The full path of a body a row names; `None` for a name this directory never
    /// makes.
    pub fn sealed_path(&self, name: &str) -> Option<PathBuf> {
        let mut parts = name.split('/');
        let ok = parts.next() == Some("store")
            && parts
                .next()
                .is_some_and(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_digit()))
            && parts
                .next()
                .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
            && parts.next().is_none();
        ok.then(|| self.root.join(name))
    }

    /// Bytes of `sender`'s upload under `key` that arrived so far.
    pub fn have(&self, sender: UserId, key: IdempotencyKey) -> io::Result<u64> {
        match fs::metadata(self.partial(sender, key)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Appends `bytes` at `offset` of the upload, if that is where it stands; answers
    /// the length it has now (unchanged when `offset` is not its end).
    pub fn append(
        &self,
        sender: UserId,
        key: IdempotencyKey,
        offset: u64,
        bytes: &[u8],
    ) -> io::Result<u64> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.partial(sender, key))?;
        let len = f.metadata()?.len();
        if len != offset {
            return Ok(len);
        }
        f.write_all(bytes)?;
        Ok(len + bytes.len() as u64)
    }

    /// Drops an upload.
    pub fn discard(&self, sender: UserId, key: IdempotencyKey) {
        let _ = fs::remove_file(self.partial(sender, key));
    }

    /// Checks a complete upload (length, SHA-256, media) and seals it: fsynced, renamed
    /// to its place, the directory fsynced. On a bad body the upload is discarded.
    pub fn seal(
        &self,
        sender: UserId,
        key: IdempotencyKey,
        kind: MessageKind,
        size: u64,
        sha256: &[u8],
        limits: &MediaLimits,
    ) -> Result<BodyMeta, SealError> {
        let partial = self.partial(sender, key);
        let result = self.check_and_seal(&partial, sender, key, kind, size, sha256, limits);
        if matches!(
            result,
            Err(SealError::BadHash(_) | SealError::BadMedia { .. } | SealError::TooLong(_))
        ) {
            let _ = fs::remove_file(&partial);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn check_and_seal(
        &self,
        partial: &Path,
        sender: UserId,
        key: IdempotencyKey,
        kind: MessageKind,
        size: u64,
        sha256: &[u8],
        limits: &MediaLimits,
    ) -> Result<BodyMeta, SealError> {
        let mut f = File::open(partial)?;
        let len = f.metadata()?.len();
        if len != size {
            return Err(SealError::BadHash(format!(
                "the body has {len} bytes, not the {size} announced"
            )));
        }
        let digest = sha256_of(&mut f)?;
        if digest.as_slice() != sha256 {
            return Err(SealError::BadHash(
                "the body's SHA-256 is not the one announced".into(),
            ));
        }
        f.seek(SeekFrom::Start(0))?;
        let info = super::check::body(kind, io::BufReader::new(&mut f), len, limits)?;
        drop(f);
        File::open(partial)?.sync_all()?;
        let name = Self::sealed_name(sender, key);
        let target = self.root.join(&name);
        let dir = target
            .parent()
            .ok_or_else(|| io::Error::other("a sealed body has no directory"))?
            .to_path_buf();
        let new_dir = !dir.exists();
        fs::create_dir_all(&dir)?;
        fs::rename(partial, &target)?;
        File::open(&dir)?.sync_all()?;
        if new_dir {
            File::open(self.root.join("store"))?.sync_all()?;
        }
        File::open(self.root.join("partial"))?.sync_all()?;
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&digest);
        Ok(BodyMeta {
            size,
            sha256: sha,
            mime: info.mime.to_string(),
            duration_ms: info.duration_ms,
            width: info.width,
            height: info.height,
            path: name,
        })
    }

    /// Up to `len` bytes of a sealed body from `offset` (fewer at its end).
    pub fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let path = self
            .sealed_path(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not a body's name"))?;
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut out = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Removes a sealed body (a deleted or expired message's, or one no row claimed).
    pub fn remove(&self, name: &str) {
        if let Some(path) = self.sealed_path(name) {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(body = name, error = %e, "cannot remove a message body");
                }
            }
        }
    }

    /// Uploads untouched for `idle`: removed (their senders gave up). Answers how many.
    pub fn sweep_partials(&self, idle: Duration) -> usize {
        let Ok(dir) = fs::read_dir(self.root.join("partial")) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut n = 0;
        for entry in dir.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= idle));
            if old && fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Sealed bodies older than `age`, as (sender, key, name): candidates for the sweep
    /// of bodies no row claims (a crash between sealing and the row's commit).
    pub fn sealed_older_than(&self, age: Duration) -> Vec<(UserId, IdempotencyKey, String)> {
        let mut out = Vec::new();
        let now = SystemTime::now();
        let Ok(users) = fs::read_dir(self.root.join("store")) else {
            return out;
        };
        for user in users.flatten() {
            let Some(sender) = user.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(files) = fs::read_dir(user.path()) else {
                continue;
            };
            for file in files.flatten() {
                let Some(key) = file
                    .file_name()
                    .to_str()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                else {
                    continue;
                };
                let old = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a >= age));
                if old {
                    out.push((sender, key, Self::sealed_name(sender, key)));
                }
            }
        }
        out
    }
}

/// SHA-256 of a stream.
pub fn sha256_of(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_it_makes_are_paths() {
        let b = Bodies {
            root: PathBuf::from("/b"),
        };
        let name = Bodies::sealed_name(1001, 0xab);
        assert_eq!(name, "store/1001/00000000000000ab");
        assert_eq!(
            b.sealed_path(&name),
            Some(PathBuf::from("/b/store/1001/00000000000000ab"))
        );
        for bad in [
            "../etc/passwd",
            "store/1001/../../x",
            "store/x/00000000000000ab",
            "store/1/ab",
            "/abs",
        ] {
            assert_eq!(b.sealed_path(bad), None, "{bad}");
        }
    }
}
