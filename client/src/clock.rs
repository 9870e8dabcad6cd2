//! Times as the user reads them: the local time zone (the system's, or `TZ`), or UTC with `--utc`;
//! ISO 8601 in UTC in JSON. The calendar arithmetic is jiff's.

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// How times are shown in text output.
#[derive(Debug, Clone)]
pub struct Clock {
    zone: TimeZone,
}

impl Clock {
    /// The local time zone, or UTC when `utc` (the `--utc` flag).
    pub fn new(utc: bool) -> Clock {
        let zone = if utc {
            TimeZone::UTC
        } else {
            TimeZone::system()
        };
        Clock { zone }
    }

    /// A clock in a named zone (for tests).
    pub fn in_zone(zone: TimeZone) -> Clock {
        Clock { zone }
    }

    /// `2026-11-30 18:00:00 CET` for a `*Usec` property; 0 (not yet) as `-`.
    pub fn usec(&self, usec: u64) -> String {
        match timestamp(usec) {
            Some(ts) => ts
                .to_zoned_datetime(self.zone.clone())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string(),
            None => "-".to_owned(),
        }
    }

    /// ISO 8601 with the zone's offset (`2026-11-30T18:00:00+01:00`, `Z` for offset 0), for the
    /// timestamped lines of a followed job and of `monitor`.
    pub fn now_iso(&self) -> String {
        let zoned = Timestamp::now().to_zoned_datetime(self.zone.clone());
        if zoned.offset().seconds() == 0 {
            zoned.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
        } else {
            zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
        }
    }
}

fn timestamp(usec: u64) -> Option<Timestamp> {
    if usec == 0 {
        return None;
    }
    Timestamp::from_microsecond(i64::try_from(usec).ok()?).ok()
}

/// ISO 8601 in UTC (`2026-11-30T17:00:00Z`) for JSON; `None` for 0 (not yet).
pub fn usec_iso_utc(usec: u64) -> Option<String> {
    timestamp(usec).map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The current time as ISO 8601 in UTC, for JSON.
pub fn now_iso_utc() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A duration in seconds as a person says it: `42 s`, `3 min 5 s`, `1 h 2 min`.
pub fn duration_text(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn local_and_utc_text() {
        // 2026-11-30T17:00:00Z, the example of the spec.
        let usec = 1_796_058_000_123_456;
        assert_eq!(Clock::new(true).usec(usec), "2026-11-30 17:00:00 UTC");
        let rome = Clock::in_zone(TimeZone::get("Europe/Rome").unwrap());
        assert_eq!(rome.usec(usec), "2026-11-30 18:00:00 CET");
        let kolkata = Clock::in_zone(TimeZone::get("Asia/Kolkata").unwrap());
        assert_eq!(kolkata.usec(usec), "2026-11-30 22:30:00 IST");
        assert_eq!(Clock::new(true).usec(0), "-");
        assert_eq!(Clock::new(true).usec(u64::MAX), "-");
    }

    #[test]
    fn json_times_are_iso_utc() {
        assert_eq!(
            usec_iso_utc(1_796_058_000_123_456).as_deref(),
            Some("2026-11-30T17:00:00Z")
        );
        assert_eq!(
            usec_iso_utc(951_782_400_000_000).as_deref(),
            Some("2000-02-29T00:00:00Z")
        );
        assert_eq!(usec_iso_utc(0), None);
        let now = now_iso_utc();
        assert!(now.ends_with('Z') && now.len() == 20, "{now}");
        let now = Clock::new(true).now_iso();
        assert!(now.ends_with('Z') && now.len() == 20, "{now}");
        let kolkata = Clock::in_zone(TimeZone::get("Asia/Kolkata").unwrap()).now_iso();
        assert!(kolkata.ends_with("+05:30"), "{kolkata}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_text(0), "0 s");
        assert_eq!(duration_text(59), "59 s");
        assert_eq!(duration_text(185), "3 min 5 s");
        assert_eq!(duration_text(3720), "1 h 2 min");
    }
}
