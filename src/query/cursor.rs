//! The opaque page cursor: where the next page starts, bound to the query it came from.
//!
//! A cursor carries the last row's `(created_at, id)` and a fingerprint of the filter; a
//! cursor replayed with other filters is refused rather than silently returning a page
//! of a different list. It is opaque (base64url) so clients do not build their own and
//! the encoding can change.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::DateTime;

use crate::store::{Filter, Keyset};

/// Format version, so a cursor of another encoding is refused plainly.
const VERSION: &str = "1";

fn fingerprint(filter: &Filter) -> u32 {
    // Debug output names every field and value, so any change of filter changes it.
    crc32fast::hash(format!("{filter:?}").as_bytes())
}

/// The cursor of the page after `keyset`, for `filter`.
pub fn encode(keyset: Keyset, filter: &Filter) -> String {
    let text = format!("{VERSION}.{}.{}.{:08x}", keyset.created_at.timestamp_micros(), keyset.id, fingerprint(filter));
    URL_SAFE_NO_PAD.encode(text)
}

/// The position a cursor holds, checked against the filter it is used with.
pub fn decode(cursor: &str, filter: &Filter) -> Result<Keyset, String> {
    let malformed = || "not a cursor returned by this API".to_owned();
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let mut parts = text.split('.');
    let (Some(VERSION), Some(micros), Some(id), Some(print), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let micros: i64 = micros.parse().map_err(|_| malformed())?;
    let id: i64 = id.parse().map_err(|_| malformed())?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or_else(malformed)?;
    if print != format!("{:08x}", fingerprint(filter)) {
        return Err("belongs to a query with other filters; start again without a cursor".into());
    }
    Ok(Keyset { created_at, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_filters_and_garbage() {
        let filter = Filter { user_id: Some("alice".into()), ..Filter::default() };
        let keyset = Keyset { created_at: "2026-11-25T12:00:00.123456Z".parse().unwrap(), id: 42 };
        let cursor = encode(keyset, &filter);
        assert_eq!(decode(&cursor, &filter), Ok(keyset));
        let other = Filter { user_id: Some("bob".into()), ..Filter::default() };
        assert!(decode(&cursor, &other).unwrap_err().contains("other filters"));
        assert!(decode("bm9wZQ", &filter).is_err());
        assert!(decode("%%%", &filter).is_err());
    }
}
