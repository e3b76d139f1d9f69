//! The opaque page cursor: where the next page starts, bound to the query it came from.
//!
//! A cursor carries the last row's `(created_at, id)`, the instant the list's relative
//! times (`since=24h`) were resolved against, and a fingerprint of the filter; a cursor
//! replayed with other filters is refused rather than silently returning a page of a
//! different list. Carrying the instant keeps every page of a relative window on the
//! first page's window (and its fingerprint valid) although the clock has moved on. It is
//! opaque (base64url) so clients do not build their own and the encoding can change.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};

use crate::store::{Filter, Keyset};

/// Format version, so a cursor of another encoding is refused plainly.
const VERSION: &str = "2";

fn fingerprint(filter: &Filter) -> u32 {
    // Debug output names every field and value, so any change of filter changes it.
    crc32fast::hash(format!("{filter:?}").as_bytes())
}

/// The cursor of the page after `keyset`, for `filter` whose relative times were
/// resolved against `now` (kept to the microsecond).
pub fn encode(keyset: Keyset, filter: &Filter, now: DateTime<Utc>) -> String {
    let text = format!(
        "{VERSION}.{}.{}.{}.{:08x}",
        keyset.created_at.timestamp_micros(),
        keyset.id,
        now.timestamp_micros(),
        fingerprint(filter)
    );
    URL_SAFE_NO_PAD.encode(text)
}

/// A cursor's parts: position, instant, fingerprint.
fn parse(cursor: &str) -> Result<(Keyset, DateTime<Utc>, String), String> {
    let malformed = || "not a cursor returned by this API".to_owned();
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let mut parts = text.split('.');
    let (Some(VERSION), Some(micros), Some(id), Some(now), Some(print), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let time = |micros: &str| micros.parse().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(malformed);
    let created_at = time(micros)?;
    let id: i64 = id.parse().map_err(|_| malformed())?;
    Ok((Keyset { created_at, id }, time(now)?, print.to_owned()))
}

/// The instant the list a cursor came from resolved its relative times against (`None`
/// for text that is not a cursor: [`decode`] says why).
pub fn now_of(cursor: &str) -> Option<DateTime<Utc>> {
    parse(cursor).ok().map(|(_, now, _)| now)
}

/// The position a cursor holds, checked against the filter it is used with.
pub fn decode(cursor: &str, filter: &Filter) -> Result<Keyset, String> {
    let (keyset, _, print) = parse(cursor)?;
    if print != format!("{:08x}", fingerprint(filter)) {
        return Err("belongs to a query with other filters; start again without a cursor".into());
    }
    Ok(keyset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_filters_and_garbage() {
        let filter = Filter { user_id: Some("alice".into()), ..Filter::default() };
        let keyset = Keyset { created_at: "2026-11-25T12:00:00.123456Z".parse().unwrap(), id: 42 };
        let now = "2026-11-25T13:00:00.654321Z".parse().unwrap();
        let cursor = encode(keyset, &filter, now);
        assert_eq!(decode(&cursor, &filter), Ok(keyset));
        assert_eq!(now_of(&cursor), Some(now));
        assert_eq!(now_of("bm9wZQ"), None);
        let other = Filter { user_id: Some("bob".into()), ..Filter::default() };
        assert!(decode(&cursor, &other).unwrap_err().contains("other filters"));
        assert!(decode("bm9wZQ", &filter).is_err());
        assert!(decode("%%%", &filter).is_err());
    }
}
