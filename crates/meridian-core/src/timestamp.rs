//! Timestamps as unix milliseconds, parsed from what SDKs send and formatted the one way we store.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

pub const MILLIS_PER_DAY: i64 = 86_400_000;

/// The current time in unix milliseconds (shifted by [`TEST_CLOCK_OFFSET_VARIABLE`] when set).
pub fn now_unix_ms() -> i64 {
    system_now_unix_ms() + clock_offset_ms()
}

/// The system's time in unix milliseconds, never shifted: for what other parties check against
/// their own clocks (the `iat`, `nbf` and `exp` of tokens).
pub fn system_now_unix_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A process's clock can be shifted by this many milliseconds, read once from the environment:
/// for tests whose expectations depend on the time of day (a retention cutoff is a UTC day start)
/// and must not depend on when they run. Never set it in production.
pub const TEST_CLOCK_OFFSET_VARIABLE: &str = "MERIDIAN_TEST_CLOCK_OFFSET_MS";

fn clock_offset_ms() -> i64 {
    static OFFSET_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET_MS.get_or_init(|| {
        std::env::var(TEST_CLOCK_OFFSET_VARIABLE)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Parses an ISO 8601 / RFC 3339 timestamp the way SDKs send them: `Z` or `+hh:mm` offsets,
/// any number of fractional digits; a timestamp without offset is taken as UTC.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(parsed) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some((parsed.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let without_offset_formats = [
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond]"),
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    ];
    for format in without_offset_formats {
        if let Ok(parsed) = PrimitiveDateTime::parse(text, format) {
            let utc = parsed.assume_offset(UtcOffset::UTC);
            return Some((utc.unix_timestamp_nanos() / 1_000_000) as i64);
        }
    }
    // Offsets without a colon (`+0000`), as some HTTP libraries print them.
    let with_compact_offset = format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond][offset_hour sign:mandatory][offset_minute]"
    );
    if let Ok(parsed) = OffsetDateTime::parse(text, with_compact_offset) {
        return Some((parsed.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    None
}

/// Formats unix milliseconds as RFC 3339 UTC with exactly three fractional digits,
/// e.g. `2026-11-24T05:12:26.678Z`. Out-of-range values are clamped to the representable range.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    let moment =
        OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    moment
        .format(format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

/// The start of the UTC day containing `unix_ms`, in unix milliseconds (the archive's
/// `<received-day>` path component).
pub fn utc_day_start_ms(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(MILLIS_PER_DAY) * MILLIS_PER_DAY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_sdks_send() {
        let expected = 1_795_497_146_678; // 2026-11-24T05:12:26.678Z
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26.678Z"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26.678+00:00"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T06:12:26.678+01:00"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26.678123+00:00"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26.678"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26.678+0000"),
            Some(expected)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-24T05:12:26Z"),
            Some(expected - 678)
        );
        assert_eq!(parse_timestamp_ms("yesterday"), None);
        assert_eq!(parse_timestamp_ms(""), None);
    }

    #[test]
    fn formats_with_millisecond_precision_in_utc() {
        assert_eq!(
            format_rfc3339_ms(1_795_497_146_678),
            "2026-11-24T05:12:26.678Z"
        );
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        let round_trip = parse_timestamp_ms(&format_rfc3339_ms(1_795_497_146_001));
        assert_eq!(round_trip, Some(1_795_497_146_001));
    }

    #[test]
    fn day_start_truncates_to_utc_midnight() {
        assert_eq!(utc_day_start_ms(1_795_497_146_678), 1_795_478_400_000);
        assert_eq!(utc_day_start_ms(1_795_478_400_000), 1_795_478_400_000);
    }
}
