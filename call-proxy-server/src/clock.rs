//! Wall-clock time for records, and its text form in the database.
//!
//! Timestamps are milliseconds since the Unix epoch everywhere in memory and on the wire;
//! the database stores them as RFC 3339 UTC text with milliseconds
//! (`2026-11-23T10:33:24.123Z`), which sorts as text and which operators can read.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// The stored timestamp format.
const DB_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Formats milliseconds since the epoch as stored text. Out-of-range values (beyond
/// year 9999) are clamped to the epoch rather than failing a write.
pub fn to_db_text(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let dt = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    dt.format(DB_FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

/// Parses an RFC 3339 time with any offset (an operator's `--since`, `?until=`) to
/// milliseconds since the epoch; the error says what is expected.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}); example: 2026-11-23T20:00:00Z"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| "time out of range".into())
}

/// Parses stored text back to milliseconds since the epoch.
pub fn from_db_text(text: &str) -> Option<i64> {
    let dt = PrimitiveDateTime::parse(text, DB_FORMAT).ok()?.assume_utc();
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_text_round_trips_and_sorts() {
        let a = 1_795_430_004_123;
        let text = to_db_text(a);
        assert_eq!(text, "2026-11-23T10:33:24.123Z");
        assert_eq!(from_db_text(&text), Some(a));
        assert!(to_db_text(a) < to_db_text(a + 1));
        assert_eq!(from_db_text("yesterday"), None);
    }

    #[test]
    fn rfc3339_with_offsets_and_clear_errors() {
        assert_eq!(
            parse_rfc3339_ms("2026-11-23T12:33:24.123+02:00"),
            Ok(1_795_430_004_123)
        );
        let err = parse_rfc3339_ms("last tuesday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
