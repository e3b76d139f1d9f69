//! The anomaly job of `serve`: every `audit.anomalies.interval`, the hours completed
//! since are scored against their baselines ([`super::anomaly`]), and what is new is
//! stored (a rerun over the same hours stores nothing twice) and handed on.
//!
//! The series come from the store's own hourly stats (the same tested aggregation, with
//! percentiles, on both databases): one query per dimension (model, user, cluster,
//! tool) over the baseline and the scored hours, plus one list of high-risk
//! interactions for first-time actions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, DurationRound, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::anomaly::{self, Dimension, Hour, Series, Settings};
use crate::config::AnomaliesConfig;
use crate::model::RiskLevel;
use crate::store::{Bucket, Filter, GroupBy, NewAnomaly, StatsRequest, Store, StoreError};

/// High-risk interactions read per page for first-time detection.
const PAGE: u32 = 500;

impl From<&AnomaliesConfig> for Settings {
    fn from(c: &AnomaliesConfig) -> Settings {
        Settings { baseline_days: c.baseline_days, min_volume: c.min_volume, threshold: c.threshold }
    }
}

/// The hourly series of one dimension, by key, from `from` to `to`.
async fn series(
    store: &dyn Store,
    group_by: GroupBy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<BTreeMap<String, Series>, StoreError> {
    let request = StatsRequest {
        filter: Filter { from: Some(from), to: Some(to), ..Filter::default() },
        group_by,
        bucket: Some(Bucket::Hour),
        top: None,
    };
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for row in store.stats(&request).await? {
        let (Some(key), Some(hour)) = (row.key, row.bucket) else { continue };
        let hour_stats = Hour { count: row.count, errors: row.error_count, p95_ms: row.p95_ms };
        out.entry(key).or_default().hours.insert(hour, hour_stats);
    }
    Ok(out)
}

/// Scores the hours from `from` to `to` (whole hours) and stores the anomalies found;
/// returns those not stored before.
pub async fn detect(
    store: &dyn Store,
    settings: &Settings,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<NewAnomaly>, StoreError> {
    let baseline_start = from - Duration::days(settings.baseline_days.into());
    let mut found = Vec::new();
    let mut earliest: Option<DateTime<Utc>> = None;
    let mut tools = BTreeMap::new();
    let mut users = BTreeMap::new();
    for (dimension, group_by) in [
        (Dimension::Model, GroupBy::ModelName),
        (Dimension::User, GroupBy::UserId),
        (Dimension::Cluster, GroupBy::Cluster),
        (Dimension::Tool, GroupBy::ToolName),
    ] {
        let by_key = series(store, group_by, baseline_start, to).await?;
        for (key, s) in &by_key {
            let first = s.hours.keys().next().copied();
            earliest = match (earliest, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            found.extend(anomaly::score_series(dimension, key, s, from, to, settings));
        }
        match dimension {
            Dimension::Tool => tools = by_key,
            Dimension::User => users = by_key,
            _ => {}
        }
    }
    if anomaly::has_history(earliest, from) {
        found.extend(anomaly::new_tools(tools.iter().map(|(k, s)| (k.as_str(), s)), from, to));
        for (user, s) in &users {
            found.extend(anomaly::unusual_hours(user, s, from, to, settings.baseline_days));
        }
        let events = high_risk_events(store, baseline_start, to).await?;
        found.extend(anomaly::first_high_risk(
            events.iter().map(|(u, at, level)| (u.as_str(), *at, level.as_str())),
            from,
            to,
        ));
    }
    store.write_anomalies(&found).await
}

/// (user, time, level) of every interaction at high risk or above from `from` to `to`.
async fn high_risk_events(
    store: &dyn Store,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, DateTime<Utc>, RiskLevel)>, StoreError> {
    let filter = Filter { from: Some(from), to: Some(to), min_risk: Some(RiskLevel::High), ..Filter::default() };
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_interactions(&filter, after, PAGE).await?;
        out.extend(page.items.into_iter().filter_map(|i| Some((i.user_id?, i.created_at, i.risk_level))));
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// The start of the hour `t` is in.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// Runs [`detect`] every `config.interval` (the first run right away) over the hours
/// completed in the last interval, handing what is new to `found`, until `stop`. A
/// failed run (the database down) is logged and retried at the next tick.
pub fn spawn(
    store: Arc<dyn Store>,
    config: AnomaliesConfig,
    found: impl Fn(Vec<NewAnomaly>) + Send + 'static,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let settings = Settings::from(&config);
        let mut every = tokio::time::interval(config.interval.max(StdDuration::from_secs(1)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let span = Duration::from_std(config.interval).unwrap_or(Duration::hours(1)).max(Duration::hours(1));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let to = hour_of(Utc::now());
            let from = hour_of(to - span);
            let run = tokio::select! {
                run = detect(store.as_ref(), &settings, from, to) => run,
                _ = stop.cancelled() => return,
            };
            match run {
                Ok(new) => {
                    tracing::info!(anomalies = new.len(), %from, %to, "anomaly detection ran");
                    if !new.is_empty() {
                        found(new);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "anomaly detection failed; retrying at the next interval"),
            }
        }
    })
}
