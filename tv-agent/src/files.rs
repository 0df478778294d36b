//! The TV's own small files (address book, missed-call list): JSON, replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory) so a power cut leaves the
//! old or the new version, never half of one; read with a size limit; a file that cannot
//! be read is set aside as `<name>.bad` for a person to look at, never overwritten.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Atomic, durable replacement of a file (shared with the server's certificate files).
pub use control_client::tls::write_atomic;

/// Writes `value` as JSON to `path`, durably and atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &body, false)
}

/// Reads JSON from `path` (creating its directory if needed). A missing file gives
/// `T::default()`; a file larger than `max_bytes` or not valid JSON for `T` is renamed
/// to `<name>.bad` with a warning and gives `T::default()`. Only I/O errors fail.
pub fn read_json<T: DeserializeOwned + Default>(path: &Path, max_bytes: u64) -> std::io::Result<T> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let len = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(e),
        Ok(meta) => meta.len(),
    };
    let parsed = if len > max_bytes {
        Err(format!("{len} bytes, more than {max_bytes}"))
    } else {
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(v) => Ok(v),
        Err(why) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".bad");
            tracing::warn!(file = %path.display(), %why, "unreadable; kept aside as .bad, starting empty");
            std::fs::rename(path, &aside)?;
            Ok(T::default())
        }
    }
}
