//! Times as people type them: `2026-11-01`, `2026-11-01T10:00`, RFC 3339, `now`, or a
//! duration back from now (`24h`, `7d`, `30m`).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// Parses `text` as a point in time; durations count back from `now`. Times without a
/// zone are UTC, the zone every stored time is in.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or(now));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!("`{text}` is not a time: use 2026-11-01, 2026-11-01T10:00, RFC 3339, `now`, or a duration such as 24h or 7d")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("`{text}` is too long ago"))?;
    now.checked_sub_signed(ago).ok_or_else(|| format!("`{text}` is too long ago"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_form() {
        let now: DateTime<Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        let t = |s: &str| parse_time(s, now).unwrap().to_rfc3339();
        assert_eq!(t("now"), "2026-11-25T12:00:00+00:00");
        assert_eq!(t("24h"), "2026-11-24T12:00:00+00:00");
        assert_eq!(t("7d"), "2026-11-18T12:00:00+00:00");
        assert_eq!(t("30m"), "2026-11-25T11:30:00+00:00");
        assert_eq!(t("2026-11-01"), "2026-11-01T00:00:00+00:00");
        assert_eq!(t("2026-11-01T10:00"), "2026-11-01T10:00:00+00:00");
        assert_eq!(t("2026-11-01 10:00:05.5"), "2026-11-01T10:00:05.500+00:00");
        assert_eq!(t("2026-11-01T10:00:00+08:00"), "2026-11-01T02:00:00+00:00");
        assert!(parse_time("yesterday", now).unwrap_err().contains("`yesterday` is not a time"));
        assert!(parse_time("2026-13-01", now).is_err());
    }
}
