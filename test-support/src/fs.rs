//! A small file system that tests can fill up: a tmpfs mounted on a fresh directory
//! (needs root, as CI runs the tests), unmounted when dropped, and [`fill`] to use up
//! its space.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A tmpfs mounted on a fresh directory under the system's temporary directory;
/// unmounted and removed when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes. Fails with a message naming what it needs when
    /// the process may not mount (not root).
    pub fn mount(size: u64) -> std::io::Result<Tmpfs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tmpfs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "cannot mount a tmpfs on {}: this test needs root (CAP_SYS_ADMIN)",
                    dir.display()
                ),
            ));
        }
        Ok(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Fills the file system holding directory `dir` with a new file there until a write
/// fails with `ENOSPC` (at most 64 GiB written); returns the file, whose removal gives
/// the space back.
pub fn fill(dir: &Path) -> std::io::Result<PathBuf> {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler)?;
    for chunk in [1 << 20, 64 * 1024, 4096, 512] {
        let buf = vec![0x5au8; chunk];
        for _ in 0..65_536 {
            match f.write_all(&buf).and_then(|_| f.flush()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e),
            }
        }
    }
    let _ = f.sync_all();
    Ok(filler)
}
