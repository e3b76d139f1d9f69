//! Request parameters (`?user_id=alice&since=24h…`) into a [`Filter`] and the other
//! settings of a read, with one error naming the parameter at fault.
//!
//! The HTTP API and the command line both go through [`Params`], so a parameter means
//! the same thing, and is refused for the same reason, wherever it is given. Every
//! parameter must be consumed: one nobody asked for is an error (a typo such as
//! `user=alice` must not silently widen an audit query to everyone).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::time::parse_time;
use crate::model::{id_from_key, RiskLevel, Status};
use crate::store::{Filter, Keyset};

/// Longest accepted search text, in characters.
const MAX_TEXT_CHARS: usize = 200;

/// A parameter the request got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{field}`: {message}")]
pub struct ParamError {
    /// The parameter.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ParamError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ParamError {
        ParamError { field: field.into(), message: message.into() }
    }
}

/// The parameters of one request, consumed by name.
#[derive(Debug, Default)]
pub struct Params {
    values: BTreeMap<String, Vec<String>>,
    now: Option<DateTime<Utc>>,
}

impl Params {
    /// Parameters from `name=value` pairs (a query string, command-line options).
    pub fn from_pairs<I, K, V>(pairs: I) -> Params
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in pairs {
            values.entry(k.into()).or_default().push(v.into());
        }
        Params { values, now: None }
    }

    /// Parses a raw query string (`a=1&b=2`, percent-encoded; bytes that are not UTF-8
    /// become U+FFFD, which then fails whatever check the parameter has).
    pub fn from_query(query: Option<&str>) -> Params {
        Params::from_pairs(form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned())
    }

    /// Relative times (`24h`) count back from `now` instead of the clock (tests).
    pub fn with_now(mut self, now: DateTime<Utc>) -> Params {
        self.now = Some(now);
        self
    }

    /// Fixes the instant relative times (`since=24h`) count back from, and returns it:
    /// the one the `cursor` carries, so every page of a list covers the window its first
    /// page did; else the one of [`Params::with_now`]; else the clock (to the
    /// microsecond, which a cursor keeps).
    pub fn pin_now(&mut self) -> DateTime<Utc> {
        let from_cursor = self.values.get("cursor").and_then(|v| v.first()).and_then(|c| super::cursor::now_of(c));
        let now = from_cursor.or(self.now).unwrap_or_else(|| {
            let now = Utc::now();
            DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
        });
        self.now = Some(now);
        now
    }

    /// Takes a parameter given at most once; empty values count as absent.
    pub fn take(&mut self, name: &str) -> Result<Option<String>, ParamError> {
        match self.values.remove(name) {
            None => Ok(None),
            Some(mut values) if values.len() == 1 => {
                let value = values.remove(0);
                Ok(if value.is_empty() { None } else { Some(value) })
            }
            Some(_) => Err(ParamError::new(name, "given more than once")),
        }
    }

    /// Takes an integer parameter within `min..=max`.
    pub fn take_int(&mut self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ParamError> {
        let Some(text) = self.take(name)? else { return Ok(None) };
        let value: i64 =
            text.trim().parse().map_err(|_| ParamError::new(name, format!("`{text}` is not a whole number")))?;
        if !(min..=max).contains(&value) {
            return Err(ParamError::new(name, format!("{value} is out of range {min}..={max}")));
        }
        Ok(Some(value))
    }

    /// Takes `limit`: `default` when absent, refused beyond `max`.
    pub fn take_limit(&mut self, default: u32, max: u32) -> Result<u32, ParamError> {
        Ok(self.take_int("limit", 1, max.into())?.map_or(default, |n| n as u32))
    }

    /// Takes a parameter that must be one of `allowed`.
    pub fn take_choice<T>(
        &mut self,
        name: &str,
        parse: impl Fn(&str) -> Option<T>,
        allowed: &[&str],
    ) -> Result<Option<T>, ParamError> {
        let Some(text) = self.take(name)? else { return Ok(None) };
        parse(&text)
            .map(Some)
            .ok_or_else(|| ParamError::new(name, format!("`{text}` is not one of {}", allowed.join(", "))))
    }

    /// Takes the filter parameters: `from`, `to` (or `since`), `user_id`, `session_id`,
    /// `model_name`, `provider`, `cluster`, `status` (comma-separated), `tool_name`,
    /// `min_duration_ms`, `max_duration_ms`, `min_risk` and `q`.
    pub fn take_filter(&mut self) -> Result<Filter, ParamError> {
        let now = self.now.unwrap_or_else(Utc::now);
        let time = |params: &mut Params, name: &str| -> Result<Option<DateTime<Utc>>, ParamError> {
            params.take(name)?.map(|t| parse_time(&t, now).map_err(|e| ParamError::new(name, e))).transpose()
        };
        let since = time(self, "since")?;
        let from = time(self, "from")?;
        if since.is_some() && from.is_some() {
            return Err(ParamError::new("since", "give `since` or `from`, not both"));
        }
        let from = from.or(since);
        let to = time(self, "to")?;
        if let (Some(from), Some(to)) = (from, to) {
            if from >= to {
                return Err(ParamError::new("to", format!("{to} is not after `from` ({from})")));
            }
        }
        let status = match self.take("status")? {
            None => Vec::new(),
            Some(text) => text
                .split(',')
                .map(|s| {
                    Status::parse(s.trim()).ok_or_else(|| {
                        ParamError::new("status", format!("`{s}` is not one of success, error, timeout, cancelled"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let min_duration_ms = self.take_int("min_duration_ms", 0, i64::MAX)?;
        let max_duration_ms = self.take_int("max_duration_ms", 0, i64::MAX)?;
        if let (Some(min), Some(max)) = (min_duration_ms, max_duration_ms) {
            if min > max {
                return Err(ParamError::new("max_duration_ms", format!("{max} is below min_duration_ms ({min})")));
            }
        }
        let text = self.take("q")?.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty());
        if let Some(q) = &text {
            if q.chars().count() > MAX_TEXT_CHARS {
                return Err(ParamError::new("q", format!("longer than {MAX_TEXT_CHARS} characters")));
            }
        }
        Ok(Filter {
            from,
            to,
            user_id: self.take("user_id")?,
            // The same mapping as ingest: a producer key that is not a UUID names the
            // session it was stored under.
            session_id: self.take("session_id")?.map(|s| id_from_key(&s)),
            model_name: self.take("model_name")?,
            provider: self.take("provider")?,
            cluster: self.take("cluster")?,
            status,
            tool_name: self.take("tool_name")?,
            min_duration_ms,
            max_duration_ms,
            text,
            min_risk: self.take_choice("min_risk", RiskLevel::parse, &RiskLevel::ALL.map(RiskLevel::as_str))?,
        })
    }

    /// Takes `cursor`, which must come from a page of the same query.
    pub fn take_cursor(&mut self, filter: &Filter) -> Result<Option<Keyset>, ParamError> {
        self.take("cursor")?
            .map(|c| super::cursor::decode(&c, filter).map_err(|e| ParamError::new("cursor", e)))
            .transpose()
    }

    /// Ends parsing: a parameter nobody took is an error naming it.
    pub fn finish(self) -> Result<(), ParamError> {
        match self.values.into_keys().next() {
            None => Ok(()),
            Some(name) => Err(ParamError::new(name.clone(), format!("unknown parameter `{name}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Params {
        Params::from_query(Some(q)).with_now("2026-11-25T12:00:00Z".parse().unwrap())
    }

    #[test]
    fn a_full_filter_parses() {
        let mut p =
            params("user_id=alice&status=error,timeout&since=24h&q=%E6%95%B0%E6%8D%AE%E5%BA%93&min_duration_ms=5");
        let f = p.take_filter().unwrap();
        p.finish().unwrap();
        assert_eq!(f.user_id.as_deref(), Some("alice"));
        assert_eq!(f.status, vec![Status::Error, Status::Timeout]);
        assert_eq!(f.from, Some("2026-11-24T12:00:00Z".parse().unwrap()));
        assert_eq!(f.text.as_deref(), Some("数据库"));
        assert_eq!(f.min_duration_ms, Some(5));
    }

    #[test]
    fn a_cursor_pins_the_instant_relative_times_count_back_from() {
        // The first page of `since=24h` was resolved an hour ago; its cursor still fits.
        let first: DateTime<Utc> = "2026-11-25T11:00:00.000001Z".parse().unwrap();
        let mut p = Params::from_query(Some("since=24h")).with_now(first);
        assert_eq!(p.pin_now(), first);
        let filter = p.take_filter().unwrap();
        let keyset = Keyset { created_at: "2026-11-25T10:00:00Z".parse().unwrap(), id: 7 };
        let cursor = super::super::cursor::encode(keyset, &filter, first);
        let mut p = params(&format!("since=24h&cursor={cursor}"));
        assert_eq!(p.pin_now(), first);
        let again = p.take_filter().unwrap();
        assert_eq!(again, filter);
        assert_eq!(p.take_cursor(&again).unwrap(), Some(keyset));
        // Another window is another query.
        let mut p = params(&format!("since=48h&cursor={cursor}"));
        p.pin_now();
        let other = p.take_filter().unwrap();
        assert_eq!(p.take_cursor(&other).unwrap_err().field, "cursor");
    }

    #[test]
    fn an_unknown_parameter_is_named() {
        let mut p = params("user=alice");
        p.take_filter().unwrap();
        assert_eq!(p.finish().unwrap_err().field, "user");
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (query, field) in [
            ("from=yesterday-ish", "from"),
            ("status=exploded", "status"),
            ("min_duration_ms=-1", "min_duration_ms"),
            ("min_duration_ms=10&max_duration_ms=5", "max_duration_ms"),
            ("from=2026-11-02&to=2026-11-01", "to"),
            ("user_id=a&user_id=b", "user_id"),
            ("min_risk=severe", "min_risk"),
        ] {
            let err = params(query).take_filter().unwrap_err();
            assert_eq!(err.field, field, "{query}: {err}");
        }
        assert_eq!(params("limit=0").take_limit(50, 500).unwrap_err().field, "limit");
        assert_eq!(params("limit=501").take_limit(50, 500).unwrap_err().field, "limit");
        assert_eq!(params("limit=7").take_limit(50, 500).unwrap(), 7);
    }
}
