//! Anomaly scoring: pure functions over hourly series, so they are tested on synthetic
//! data and the job ([`super::detect`]) only fetches and stores.
//!
//! Each series (a model, user, cluster or tool) is compared with its own recent past, by
//! a robust score: how many scaled median absolute deviations (MAD × 1.4826, which is
//! the standard deviation for normal data) an hour lies above the median of its baseline
//! hours. Median and MAD ignore the outliers already in the baseline (an earlier
//! incident does not raise the bar for the next). Each metric is put on a scale where
//! its noise is roughly constant before scoring, and the scale has a floor so a very
//! steady baseline (MAD 0) does not turn the smallest wobble into an alarm:
//!
//! - error rate (interactions) and tool failure rate (tool calls): the rate itself,
//!   floor the binomial standard error at the baseline rate and the hour's volume;
//!   also at least [`MIN_RATE_INCREASE`] above the median;
//! - p95 latency: its logarithm, floor [`LATENCY_LOG_FLOOR`]; also at least
//!   [`MIN_LATENCY_FACTOR`] times the median;
//! - volume: its square root (Poisson counts have a constant spread there, ½), against
//!   the same hour of day on the baseline days, so a daily rhythm is not an anomaly.
//!
//! An hour is scored only with at least `min_volume` requests (rates and latency) and a
//! series only with at least [`MIN_BASELINE_HOURS`] such baseline hours, so one request
//! is never a spike. First-time behaviour needs history too (see each function).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Timelike, Utc};

use crate::store::{AnomalyKind, NewAnomaly};

/// Fewest scorable baseline hours before a series' rates and latency are scored.
pub const MIN_BASELINE_HOURS: usize = 24;
/// Fewest baseline days with the same hour of day before volume is scored.
pub const MIN_BASELINE_DAYS: usize = 7;
/// Smallest rise of a rate over its median that is reported (5 percentage points).
pub const MIN_RATE_INCREASE: f64 = 0.05;
/// Smallest spread of log latency (about ±10 %).
pub const LATENCY_LOG_FLOOR: f64 = 0.1;
/// Smallest latency rise reported: this many times the median p95.
pub const MIN_LATENCY_FACTOR: f64 = 1.5;
/// Spread of √count of a Poisson count.
pub const VOLUME_SQRT_FLOOR: f64 = 0.5;
/// Fewest baseline requests of a user before an hour of day can be unusual for them.
pub const MIN_USUAL_HOURS_REQUESTS: i64 = 50;
/// Hours each side of an hour of day that make it "usual" when the user was active then.
pub const USUAL_HOURS_MARGIN: u32 = 2;

/// What the scores compare: one series' hours.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Hour {
    /// Requests (interactions, or tool calls for a tool).
    pub count: i64,
    /// How many failed.
    pub errors: i64,
    /// 95th percentile duration, in milliseconds.
    pub p95_ms: Option<f64>,
}

/// The dimension a series belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dimension {
    /// A model (`model_name`).
    Model,
    /// A user (`user_id`).
    User,
    /// A cluster.
    Cluster,
    /// A tool (`tool_name`), its calls.
    Tool,
}

impl Dimension {
    /// The scope prefix (`model:gpt-4o`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Model => "model",
            Dimension::User => "user",
            Dimension::Cluster => "cluster",
            Dimension::Tool => "tool",
        }
    }
}

/// One series: hourly values by hour start (UTC); absent hours had no requests.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The hours.
    pub hours: BTreeMap<DateTime<Utc>, Hour>,
}

/// Scoring settings (`audit.anomalies`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Days of baseline before each scored hour.
    pub baseline_days: u32,
    /// Fewest requests in an hour for its rates to count.
    pub min_volume: u32,
    /// Robust score above which an hour is reported.
    pub threshold: f64,
}

/// Median of `values` (not empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Median and scaled MAD of `values` (not empty).
fn median_mad(mut values: Vec<f64>) -> (f64, f64) {
    let med = median(&mut values);
    let mut deviations: Vec<f64> = values.iter().map(|v| (v - med).abs()).collect();
    (med, 1.4826 * median(&mut deviations))
}

/// The anomalies of `series` (of `dimension`, `key`) in the hours from `from` to `to`.
pub fn score_series(
    dimension: Dimension,
    key: &str,
    series: &Series,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    settings: &Settings,
) -> Vec<NewAnomaly> {
    let mut out = Vec::new();
    let min_volume = i64::from(settings.min_volume.max(1));
    let scope = format!("{}:{key}", dimension.as_str());
    for (&hour, now) in series.hours.range(from..to) {
        let baseline_start = hour - Duration::days(settings.baseline_days.into());
        let baseline: Vec<&Hour> = series.hours.range(baseline_start..hour).map(|(_, h)| h).collect();
        let mut report = |kind: AnomalyKind, score: f64, value: f64, base: f64, detail: String| {
            if score >= settings.threshold {
                out.push(NewAnomaly {
                    kind,
                    scope: scope.clone(),
                    window_start: hour,
                    window_end: hour + Duration::hours(1),
                    score,
                    value,
                    baseline: base,
                    detail,
                });
            }
        };
        // Volume: against the same hour of day, zeros included (a quiet day counts).
        let same_hour: Vec<f64> = (1..=i64::from(settings.baseline_days))
            .map(|d| hour - Duration::days(d))
            .filter(|h| series.hours.range(..*h).next().is_some())
            .map(|h| series.hours.get(&h).map_or(0.0, |x| x.count as f64))
            .collect();
        if now.count >= min_volume && same_hour.len() >= MIN_BASELINE_DAYS {
            let (med, mad) = median_mad(same_hour.iter().map(|c| c.sqrt()).collect());
            let score = ((now.count as f64).sqrt() - med) / mad.max(VOLUME_SQRT_FLOOR);
            let base = med * med;
            report(
                AnomalyKind::Volume,
                score,
                now.count as f64,
                base,
                format!("{} requests in the hour; the same hour usually has {base:.0}", now.count),
            );
        }
        if now.count < min_volume {
            continue;
        }
        let scorable: Vec<&Hour> = baseline.iter().copied().filter(|h| h.count >= min_volume).collect();
        if scorable.len() < MIN_BASELINE_HOURS {
            continue;
        }
        let rate = now.errors as f64 / now.count as f64;
        let (med, mad) = median_mad(scorable.iter().map(|h| h.errors as f64 / h.count as f64).collect());
        let p = med.clamp(0.01, 0.99);
        let standard_error = (p * (1.0 - p) / now.count as f64).sqrt();
        if rate - med >= MIN_RATE_INCREASE {
            let score = (rate - med) / mad.max(standard_error);
            let kind = if dimension == Dimension::Tool { AnomalyKind::ToolFailureRate } else { AnomalyKind::ErrorRate };
            report(
                kind,
                score,
                rate,
                med,
                format!(
                    "{:.0} % of {} failed; usually {:.1} %",
                    rate * 100.0,
                    if dimension == Dimension::Tool { "tool calls" } else { "requests" },
                    med * 100.0
                ),
            );
        }
        if let Some(p95) = now.p95_ms.filter(|v| *v > 0.0) {
            let logs: Vec<f64> = scorable.iter().filter_map(|h| h.p95_ms).filter(|v| *v > 0.0).map(f64::ln).collect();
            if logs.len() >= MIN_BASELINE_HOURS {
                let (med, mad) = median_mad(logs);
                let typical = med.exp();
                if p95 >= MIN_LATENCY_FACTOR * typical {
                    let score = (p95.ln() - med) / mad.max(LATENCY_LOG_FLOOR);
                    report(
                        AnomalyKind::Latency,
                        score,
                        p95,
                        typical,
                        format!("p95 {p95:.0} ms; usually {typical:.0} ms"),
                    );
                }
            }
        }
    }
    out
}

/// True when the data reaches back at least [`MIN_BASELINE_HOURS`] hours before
/// `from`: before that, everything is "first" and first-time anomalies mean nothing.
pub fn has_history(earliest: Option<DateTime<Utc>>, from: DateTime<Utc>) -> bool {
    earliest.is_some_and(|e| e <= from - Duration::hours(MIN_BASELINE_HOURS as i64))
}

/// Tools whose first call (in the data given) falls in `from..to`.
pub fn new_tools<'a>(
    tools: impl IntoIterator<Item = (&'a str, &'a Series)>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<NewAnomaly> {
    tools
        .into_iter()
        .filter_map(|(tool, series)| {
            let (&first, hour) = series.hours.iter().find(|(_, h)| h.count > 0)?;
            (from..to).contains(&first).then(|| NewAnomaly {
                kind: AnomalyKind::NewTool,
                scope: format!("tool:{tool}"),
                window_start: first,
                window_end: first + Duration::hours(1),
                score: 0.0,
                value: hour.count as f64,
                baseline: 0.0,
                detail: format!("`{tool}` was never called before ({} calls in its first hour)", hour.count),
            })
        })
        .collect()
}

/// Users whose first high-risk action (of `events`: user, time, level name) falls in
/// `from..to`.
pub fn first_high_risk<'a>(
    events: impl IntoIterator<Item = (&'a str, DateTime<Utc>, &'a str)>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<NewAnomaly> {
    let mut first: BTreeMap<&str, (DateTime<Utc>, &str)> = BTreeMap::new();
    for (user, at, level) in events {
        let entry = first.entry(user).or_insert((at, level));
        if at < entry.0 {
            *entry = (at, level);
        }
    }
    first
        .into_iter()
        .filter(|(_, (at, _))| (from..to).contains(at))
        .map(|(user, (at, level))| {
            let hour =
                at.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)).unwrap_or(at);
            NewAnomaly {
                kind: AnomalyKind::FirstHighRisk,
                scope: format!("user:{user}"),
                window_start: hour,
                window_end: hour + Duration::hours(1),
                score: 0.0,
                value: 1.0,
                baseline: 0.0,
                detail: format!("first {level}-risk action of `{user}` (at {})", at.to_rfc3339()),
            }
        })
        .collect()
}

/// Hours in `from..to` when `user` (with [`MIN_USUAL_HOURS_REQUESTS`] baseline requests
/// or more) was active at an hour of day (UTC) with no activity within
/// [`USUAL_HOURS_MARGIN`] hours either side on any baseline day.
pub fn unusual_hours(
    user: &str,
    series: &Series,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    baseline_days: u32,
) -> Vec<NewAnomaly> {
    let baseline_start = from - Duration::days(baseline_days.into());
    let mut usual: BTreeSet<u32> = BTreeSet::new();
    let mut total = 0;
    for (hour, h) in series.hours.range(baseline_start..from) {
        if h.count > 0 {
            usual.insert(hour.hour());
            total += h.count;
        }
    }
    if total < MIN_USUAL_HOURS_REQUESTS {
        return Vec::new();
    }
    let near = |h: u32| {
        (0..=USUAL_HOURS_MARGIN).any(|d| usual.contains(&((h + d) % 24)) || usual.contains(&((h + 24 - d) % 24)))
    };
    series
        .hours
        .range(from..to)
        .filter(|(hour, h)| h.count > 0 && !near(hour.hour()))
        .map(|(&hour, h)| NewAnomaly {
            kind: AnomalyKind::UnusualHour,
            scope: format!("user:{user}"),
            window_start: hour,
            window_end: hour + Duration::hours(1),
            score: 0.0,
            value: h.count as f64,
            baseline: usual.len() as f64,
            detail: format!(
                "{} requests at {:02}:00 UTC; `{user}` is otherwise active at {:?} h",
                h.count,
                hour.hour(),
                usual
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const SETTINGS: Settings = Settings { baseline_days: 14, min_volume: 20, threshold: 6.0 };

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap()
    }

    /// A standard normal draw (Box–Muller).
    fn normal(rng: &mut StdRng) -> f64 {
        let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// An ordinary hour: a daily rhythm of volume (`peak` at 14:00 UTC, a tenth at
    /// night, Poisson-like noise), `error_rate` binomial errors, log-normal durations
    /// around `median_ms`; p95 computed from the draws as the store would.
    fn hour(rng: &mut StdRng, at: DateTime<Utc>, peak: f64, error_rate: f64, median_ms: f64) -> Hour {
        let phase = (f64::from(at.hour()) - 14.0) / 24.0 * std::f64::consts::TAU;
        let mean = peak * (0.55 + 0.45 * phase.cos());
        let count = (mean + mean.sqrt() * normal(rng)).round().max(0.0) as i64;
        let errors = (0..count).filter(|_| rng.random_bool(error_rate)).count() as i64;
        let mut durations: Vec<f64> = (0..count).map(|_| median_ms * (0.4 * normal(rng)).exp()).collect();
        durations.sort_by(f64::total_cmp);
        let p95_ms = (!durations.is_empty()).then(|| durations[((durations.len() - 1) as f64 * 0.95) as usize]);
        Hour { count, errors, p95_ms }
    }

    /// `days` of ordinary hours for one series.
    fn ordinary(rng: &mut StdRng, days: i64, peak: f64, error_rate: f64, median_ms: f64) -> Series {
        let mut s = Series::default();
        for h in 0..days * 24 {
            let at = start() + Duration::hours(h);
            s.hours.insert(at, hour(rng, at, peak, error_rate, median_ms));
        }
        s
    }

    /// Two weeks of baseline, then a week scored: ordinary noise of 20 series (models,
    /// users, clusters, tools of different sizes) raises (almost) nothing. The false
    /// alarms are printed and counted.
    #[test]
    fn two_weeks_of_ordinary_noise_raise_no_alarm() {
        let mut rng = StdRng::seed_from_u64(14);
        let (from, to) = (start() + Duration::days(14), start() + Duration::days(21));
        let mut alarms = Vec::new();
        let mut hours = 0;
        for n in 0..20 {
            let dimension = [Dimension::Model, Dimension::User, Dimension::Cluster, Dimension::Tool][n % 4];
            let peak = [30.0, 80.0, 200.0, 600.0][n % 4] * (1.0 + n as f64 / 20.0);
            let error_rate = [0.01, 0.03, 0.08, 0.15][n / 5];
            let series = ordinary(&mut rng, 21, peak, error_rate, 500.0 + 100.0 * n as f64);
            hours += series.hours.range(from..to).count();
            alarms.extend(score_series(dimension, &format!("s{n}"), &series, from, to, &SETTINGS));
        }
        println!("ordinary noise: {} false alarms in {hours} scored series-hours", alarms.len());
        for a in &alarms {
            println!(
                "  false alarm: {:?} {} at {} score {:.1}: {}",
                a.kind, a.scope, a.window_start, a.score, a.detail
            );
        }
        assert!(alarms.len() <= 2, "{} false alarms in {hours} series-hours", alarms.len());
    }

    /// Each injected hour is found, with its kind, scope and hour, and nothing else is.
    #[test]
    fn injected_spikes_are_reported() {
        let mut rng = StdRng::seed_from_u64(7);
        let (from, to) = (start() + Duration::days(14), start() + Duration::days(15));
        let at = |h: i64| from + Duration::hours(h);
        let mut model = ordinary(&mut rng, 15, 120.0, 0.02, 800.0);
        // 10:00: 40 % errors; 15:00: p95 five times slower; 03:00: six times the volume.
        let h = model.hours.get_mut(&at(10)).unwrap();
        h.errors = (h.count as f64 * 0.4) as i64;
        model.hours.get_mut(&at(15)).unwrap().p95_ms = Some(800.0 * 1.9 * 5.0);
        let h = model.hours.get_mut(&at(3)).unwrap();
        h.count *= 6;
        let mut tool = ordinary(&mut rng, 15, 300.0, 0.05, 200.0);
        let h = tool.hours.get_mut(&at(20)).unwrap();
        h.errors = h.count / 2;

        let mut found = score_series(Dimension::Model, "gpt-4o", &model, from, to, &SETTINGS);
        found.extend(score_series(Dimension::Tool, "kubectl", &tool, from, to, &SETTINGS));
        let got: Vec<(AnomalyKind, &str, DateTime<Utc>)> =
            found.iter().map(|a| (a.kind, a.scope.as_str(), a.window_start)).collect();
        for a in &found {
            println!("found: {:?} {} at {} score {:.1}: {}", a.kind, a.scope, a.window_start, a.score, a.detail);
        }
        for want in [
            (AnomalyKind::ErrorRate, "model:gpt-4o", at(10)),
            (AnomalyKind::Latency, "model:gpt-4o", at(15)),
            (AnomalyKind::Volume, "model:gpt-4o", at(3)),
            (AnomalyKind::ToolFailureRate, "tool:kubectl", at(20)),
        ] {
            assert!(got.contains(&want), "{want:?} not found in {got:?}");
        }
        assert!(got.len() <= 5, "unexpected extra anomalies: {got:?}");
    }

    #[test]
    fn one_request_is_never_a_spike() {
        let mut rng = StdRng::seed_from_u64(3);
        let (from, to) = (start() + Duration::days(14), start() + Duration::days(15));
        // A user who asks a few times a day; one of today's requests fails and is slow.
        let mut s = ordinary(&mut rng, 15, 1.0, 0.0, 300.0);
        s.hours.insert(from + Duration::hours(9), Hour { count: 1, errors: 1, p95_ms: Some(60_000.0) });
        assert_eq!(score_series(Dimension::User, "bob", &s, from, to, &SETTINGS), vec![]);
    }

    #[test]
    fn first_time_behaviour_is_reported_once_history_exists() {
        let (from, to) = (start() + Duration::days(14), start() + Duration::days(15));
        assert!(has_history(Some(start()), from));
        assert!(!has_history(Some(from - Duration::hours(3)), from));

        let old = start() + Duration::days(2);
        let events = [
            ("alice", old, "high"),
            ("alice", from + Duration::hours(2), "critical"),
            ("mallory", from + Duration::minutes(130), "high"),
            ("mallory", from + Duration::hours(5), "critical"),
        ];
        let first = first_high_risk(events, from, to);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!((first[0].scope.as_str(), first[0].window_start), ("user:mallory", from + Duration::hours(2)));

        let mut usual = Series::default();
        let mut brand_new = Series::default();
        for d in 0..15 {
            for h in 9..18 {
                usual
                    .hours
                    .insert(start() + Duration::days(d) + Duration::hours(h), Hour { count: 2, ..Hour::default() });
            }
        }
        brand_new.hours.insert(from + Duration::hours(4), Hour { count: 3, ..Hour::default() });
        let tools = new_tools([("kubectl", &usual), ("velero", &brand_new)], from, to);
        assert_eq!(tools.iter().map(|a| a.scope.as_str()).collect::<Vec<_>>(), vec!["tool:velero"]);

        // 03:00 is far from 09–17; 19:00 is within two hours of 17:00.
        usual.hours.insert(from + Duration::hours(3), Hour { count: 4, ..Hour::default() });
        usual.hours.insert(from + Duration::hours(19), Hour { count: 4, ..Hour::default() });
        let odd = unusual_hours("alice", &usual, from, to, 14);
        assert_eq!(odd.iter().map(|a| a.window_start).collect::<Vec<_>>(), vec![from + Duration::hours(3)]);
    }
}
