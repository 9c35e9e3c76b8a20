//! Timestamps: microseconds since the Unix epoch, UTC, and their text forms.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in microseconds since the epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A timestamp as RFC 3339 UTC with second precision, e.g. `2026-11-26T15:30:12Z`.
pub fn rfc3339(micros: i64) -> String {
    match jiff::Timestamp::from_microsecond(micros) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => micros.to_string(),
    }
}

/// Now as RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(now_micros())
}

/// A new run id: sortable by start time, unique within a workspace
/// (`20261126-153012-3fa9`).
pub fn new_run_id() -> String {
    let now = now_micros();
    let stamp = match jiff::Timestamp::from_microsecond(now) {
        Ok(t) => t.strftime("%Y%m%d-%H%M%S").to_string(),
        Err(_) => now.to_string(),
    };
    let mix = blake3::hash(format!("{now}-{}", std::process::id()).as_bytes());
    format!("{stamp}-{}", &mix.to_hex()[..4])
}
