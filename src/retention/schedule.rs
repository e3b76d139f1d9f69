//! The daily run in `serve` (`audit.retention.auto_cleanup`): sleeps until the next
//! `cleanup_time` in `time_zone` (the machine's local time when unset), runs retention,
//! logs a summary, sleeps again. A failed run is logged as an error and not retried
//! before the next day's time: retention catches up by itself (the next plan holds every
//! day still older than the cutoff), and retrying into a database that just failed
//! would only add load to an outage.

use std::sync::Arc;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, RetentionConfig};
use crate::store::Store;

/// Step by which a time of day that does not exist (in a DST gap) is moved forward
/// until it does: gaps are whole quarter hours in every zone.
const GAP_STEP: chrono::Duration = chrono::Duration::minutes(15);

/// When the clean-up runs: a time of day in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time of day.
    pub at: NaiveTime,
    /// Zone (`None`: the machine's local time).
    pub zone: Option<Tz>,
}

impl Schedule {
    /// The schedule of `audit.retention`.
    pub fn from_config(config: &RetentionConfig) -> Result<Schedule, ConfigError> {
        Ok(Schedule { at: config.cleanup_time_of_day()?, zone: config.zone()? })
    }

    /// The first run strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.zone {
            Some(zone) => next_run(now, self.at, &zone),
            None => next_run(now, self.at, &chrono::Local),
        }
    }
}

/// The first instant strictly after `now` at which the wall clock of `zone` shows `at`.
/// A time repeated by a DST fall-back runs once, at its first occurrence; a time skipped
/// by a spring-forward runs at the first wall-clock time after the gap that exists.
pub fn next_run<Z: TimeZone>(now: DateTime<Utc>, at: NaiveTime, zone: &Z) -> DateTime<Utc> {
    let mut day: NaiveDate = now.with_timezone(zone).date_naive();
    // Today (if still ahead), else tomorrow; a third day only when a gap pushed the
    // candidate back past `now`, which cannot happen twice.
    for _ in 0..3 {
        if let Some(t) = on_day(day, at, zone).filter(|t| *t > now) {
            return t;
        }
        day = day.succ_opt().unwrap_or(day);
    }
    now + chrono::Duration::days(1)
}

fn on_day<Z: TimeZone>(day: NaiveDate, at: NaiveTime, zone: &Z) -> Option<DateTime<Utc>> {
    let mut local = day.and_time(at);
    // A DST gap is at most a few hours; 4 hours of steps end any real one.
    for _ in 0..16 {
        match zone.from_local_datetime(&local) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => return Some(t.with_timezone(&Utc)),
            LocalResult::None => local += GAP_STEP,
        }
    }
    None
}

/// Starts the daily retention task of `serve`; it ends when `stop` is cancelled (a run
/// in progress is abandoned between two statements, which the next run completes, see
/// [`Store::expire_day`]).
pub fn spawn_scheduler(
    store: Arc<dyn Store>,
    config: RetentionConfig,
    schedule: Schedule,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = Utc::now();
            let next = schedule.next_after(now);
            let wait = (next - now).to_std().unwrap_or_default();
            tracing::info!(next = %next, keep_days = config.days, "next retention run scheduled");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            let run = super::run_configured(store.as_ref(), &config, config.days, Utc::now(), false);
            tokio::select! {
                result = run => {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "retention run failed; the next run is at the next cleanup_time");
                    }
                }
                _ = stop.cancelled() => {
                    tracing::warn!("shutdown during a retention run; the next run finishes it");
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn at(s: &str) -> NaiveTime {
        s.parse().unwrap()
    }

    #[test]
    fn later_today_or_tomorrow() {
        let zone = chrono_tz::Asia::Shanghai; // UTC+8, no DST
                                              // 01:00 in Shanghai: 03:00 is still ahead today.
        assert_eq!(next_run(utc("2026-11-19T17:00:00Z"), at("03:00"), &zone), utc("2026-11-19T19:00:00Z"));
        // 04:00 in Shanghai: already passed, tomorrow.
        assert_eq!(next_run(utc("2026-11-19T20:00:00Z"), at("03:00"), &zone), utc("2026-11-20T19:00:00Z"));
        // Exactly at the time: strictly after, so tomorrow (never twice in a row).
        assert_eq!(next_run(utc("2026-11-19T19:00:00Z"), at("03:00"), &zone), utc("2026-11-20T19:00:00Z"));
    }

    #[test]
    fn the_zone_decides_the_day() {
        // 23:30 UTC on the 19th is already the 20th in Tokyo (08:30): 03:00 has passed there.
        let now = utc("2026-11-19T23:30:00Z");
        assert_eq!(next_run(now, at("03:00"), &chrono_tz::Asia::Tokyo), utc("2026-11-20T18:00:00Z"));
        assert_eq!(next_run(now, at("03:00"), &chrono_tz::UTC), utc("2026-11-20T03:00:00Z"));
        assert_eq!(next_run(now, at("03:00"), &chrono_tz::America::New_York), utc("2026-11-20T08:00:00Z"));
    }

    #[test]
    fn a_time_skipped_by_spring_forward_runs_after_the_gap() {
        // Berlin, 2026-03-29: 02:00 → 03:00. 02:30 does not exist that day.
        let zone = chrono_tz::Europe::Berlin;
        assert_eq!(next_run(utc("2026-03-28T23:00:00Z"), at("02:30"), &zone), utc("2026-03-29T01:00:00Z"));
        // The day after, back to normal (UTC+2).
        assert_eq!(next_run(utc("2026-03-29T02:00:00Z"), at("02:30"), &zone), utc("2026-03-30T00:30:00Z"));
    }

    #[test]
    fn a_time_repeated_by_fall_back_runs_once() {
        // Berlin, 2026-10-25: 03:00 → 02:00, so 02:30 happens twice (UTC+2, then UTC+1).
        let zone = chrono_tz::Europe::Berlin;
        let first = next_run(utc("2026-10-24T23:00:00Z"), at("02:30"), &zone);
        assert_eq!(first, utc("2026-10-25T00:30:00Z"));
        // After the first occurrence, the next is the following day, not the repeat.
        assert_eq!(next_run(first, at("02:30"), &zone), utc("2026-10-26T01:30:00Z"));
    }

    #[test]
    fn the_schedule_reads_the_configuration() {
        let config =
            RetentionConfig { time_zone: Some("UTC".into()), cleanup_time: "04:15".into(), ..Default::default() };
        let schedule = Schedule::from_config(&config).unwrap();
        assert_eq!(schedule.next_after(utc("2026-11-19T05:00:00Z")), utc("2026-11-20T04:15:00Z"));
    }
}
