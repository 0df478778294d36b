//! The disk-space reserve beside the database file: space taken from the file system
//! while the disk has room, and given back the moment it fills up, so that the writes
//! which keep the server's state true (registrations, offline marks, call ends,
//! acknowledgements) go on while new records are refused. Once the file system has the
//! reserve's size plus a margin free again, the reserve is taken back and the store
//! leaves its full state.
//!
//! The reserve is an ordinary file, `<database>-reserve`, allocated with `fallocate`
//! (written out where the file system cannot preallocate), so its blocks are really
//! the store's. It holds nothing; deleting it by hand is harmless.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::io_error;
use crate::storage::StoreError;

/// Free space the file system must have, besides the reserve itself, before the store
/// leaves its full state (so that it does not flap at the edge).
pub const MARGIN_BYTES: u64 = 1 << 20;

/// The reserve file of one database.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
}

impl Reserve {
    /// The reserve of the database at `db_path`, `bytes` large (0: no reserve).
    pub fn new(db_path: &Path, bytes: u64) -> Reserve {
        let mut name = db_path.as_os_str().to_owned();
        name.push("-reserve");
        Reserve {
            path: PathBuf::from(name),
            bytes,
        }
    }

    /// The reserve file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the reserve's space (creating or completing the file) and syncs it. On a
    /// disk without that much room, removes what it wrote and answers
    /// [`StoreError::Full`].
    pub fn hold(&self) -> Result<(), StoreError> {
        if self.bytes == 0 {
            return Ok(());
        }
        let have = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if have >= self.bytes {
            return Ok(());
        }
        let result = self.allocate();
        if result.is_err() {
            self.release();
        }
        result
    }

    fn allocate(&self) -> Result<(), StoreError> {
        let what = || format!("cannot take the disk reserve {}", self.path.display());
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| io_error(what(), &e))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.bytes) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOSPC) | Err(rustix::io::Errno::DQUOT) => {
                return Err(StoreError::Full(format!("{}: no space left", what())));
            }
            // A file system that cannot preallocate: write the blocks out.
            Err(_) => write_out(&mut file, self.bytes).map_err(|e| io_error(what(), &e))?,
        }
        file.sync_all().map_err(|e| io_error(what(), &e))
    }

    /// Gives the reserve's space back to the file system (removes the file).
    pub fn release(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot release the disk reserve")
            }
        }
    }

    /// Whether the file system now has room for the reserve and the margin besides it
    /// (an unreadable file system counts as having none).
    pub fn room_returned(&self) -> bool {
        let held = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        self.free_bytes().is_some_and(|free| {
            free.saturating_add(held) >= self.bytes.saturating_add(MARGIN_BYTES)
        })
    }

    /// Bytes free for this process on the database's file system, if it can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match rustix::fs::statvfs(dir) {
            Ok(st) => Some(st.f_bavail.saturating_mul(st.f_frsize)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the free space");
                None
            }
        }
    }
}

/// Writes `bytes` bytes of filler to `file` from its start.
fn write_out(file: &mut File, bytes: u64) -> std::io::Result<()> {
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_reserve_is_taken_released_and_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let reserve = Reserve::new(&db, 256 * 1024);
        assert_eq!(reserve.path(), dir.path().join("db.sqlite-reserve"));
        reserve.hold().unwrap();
        let len = std::fs::metadata(reserve.path()).unwrap().len();
        assert_eq!(len, 256 * 1024);
        assert!(reserve.room_returned(), "a temp dir has a few MiB free");
        reserve.release();
        assert!(!reserve.path().exists());
        reserve.release(); // twice is harmless
        reserve.hold().unwrap();
        assert!(reserve.path().exists());
        // No reserve at all: nothing is created.
        let none = Reserve::new(&dir.path().join("other.sqlite"), 0);
        none.hold().unwrap();
        assert!(!none.path().exists());
    }
}
