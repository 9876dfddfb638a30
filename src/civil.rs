//! Calendar dates from day numbers (days since 1970-01-01, UTC) and back, and RFC 3339
//! stamps: the few date computations the audit trail and the stores need, through `jiff`
//! (proleptic Gregorian calendar). Day numbers outside jiff's range (years -9999 to 9999)
//! are clamped to its ends; no stored time comes near them.

use std::time::SystemTime;

use jiff::civil::Date;
use jiff::{Span, Timestamp};

const EPOCH: Date = Date::constant(1970, 1, 1);

/// (year, month, day) of a day number (days since 1970-01-01).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let date =
        Span::new().try_days(z).ok().and_then(|span| EPOCH.checked_add(span).ok()).unwrap_or(if z < 0 { Date::MIN } else { Date::MAX });
    (i64::from(date.year()), date.month() as u32, date.day() as u32)
}

/// The day number of (year, month, day); the inverse of [`civil_from_days`] for valid dates
/// (an invalid date, like February 30, is taken as the last day of its month).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let year = i16::try_from(y.clamp(-9999, 9999)).unwrap_or(1970);
    let month = i8::try_from(m.clamp(1, 12)).unwrap_or(1);
    let first = Date::new(year, month, 1).unwrap_or(EPOCH);
    let day = i8::try_from(d.clamp(1, 31)).unwrap_or(1).min(first.days_in_month());
    let date = Date::new(year, month, day).unwrap_or(first);
    date.since((jiff::Unit::Day, EPOCH)).map_or(0, |span| i64::from(span.get_days()))
}

/// RFC 3339 (UTC, milliseconds) for a time.
pub fn rfc3339(t: SystemTime) -> String {
    let ts = Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH);
    let ts = if ts < Timestamp::UNIX_EPOCH { Timestamp::UNIX_EPOCH } else { ts };
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn day_numbers_and_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for d in (-800_000..800_000).step_by(997) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
    }
}
