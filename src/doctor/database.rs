//! The database checks of `doctor` (see the module docs of [`super`]).

use super::{counted, Check, Options, EXAMPLES};
use crate::store::verify::{self, DayStatus};
use crate::store::{ChildTable, Inspection, Store, StoreError};

/// Runs the database checks in order; each stands alone.
pub(super) async fn checks(store: &dyn Store, options: Options) -> Vec<Check> {
    let mut checks = vec![migrations(store).await];
    for child in ChildTable::ALL {
        checks.push(orphans(store, child, options).await);
    }
    checks.push(
        finding(store, "empty sessions", Inspection::EmptySessions, |n, ex| {
            Check::warn("empty sessions", format!("{} sessions without interactions", counted(n, ex)))
        })
        .await,
    );
    for (name, inspection, children) in [
        ("thought sequences", Inspection::ThoughtSequences, "thoughts"),
        ("tool call sequences", Inspection::ToolCallSequences, "tool calls"),
    ] {
        checks.push(
            finding(store, name, inspection, |n, ex| {
                Check::warn(
                    name,
                    format!("{} interactions whose {children}' sequence numbers repeat or skip", counted(n, ex)),
                )
            })
            .await,
        );
    }
    checks.push(
        finding(store, "interactions without children", Inspection::DanglingThoughtRefs, |n, ex| {
            Check::warn(
                "interactions without children",
                format!(
                    "{} interactions have tool calls naming a thought they do not have \
                     (deleted, or never sent by the producer)",
                    counted(n, ex)
                ),
            )
        })
        .await,
    );
    checks.push(hash_chain(store).await);
    checks.push(search_index(store, options).await);
    checks.push(
        finding(store, "dead letters", Inspection::DeadLetters, |n, ex| {
            Check::warn(
                "dead letters",
                format!("{} records refused by the database, kept aside (`GET /api/v1/dead-letters`)", counted(n, ex)),
            )
        })
        .await,
    );
    checks
}

/// A check that could not run.
fn unchecked(name: &'static str, e: &StoreError) -> Check {
    Check::fail(name, format!("could not check: {e}"))
}

async fn migrations(store: &dyn Store) -> Check {
    const NAME: &str = "migrations";
    match store.readiness().await {
        Ok(r) if r.is_ready() => Check::ok(NAME, "all applied"),
        Ok(r) => Check::fail(
            NAME,
            format!(
                "not applied: {} (run `opsagent-audit migrate`; `serve` applies them at start-up)",
                r.pending_migrations.iter().map(|v| format!("{v:04}")).collect::<Vec<_>>().join(", ")
            ),
        ),
        Err(e) => unchecked(NAME, &e),
    }
}

/// Runs an inspection: ok when it finds nothing, else what `found` makes of the count.
async fn finding(
    store: &dyn Store,
    name: &'static str,
    inspection: Inspection,
    found: impl FnOnce(u64, &[String]) -> Check,
) -> Check {
    match store.inspect(inspection, EXAMPLES).await {
        Ok(f) if f.count == 0 => Check::ok(name, "none"),
        Ok(f) => found(f.count, &f.examples),
        Err(e) => unchecked(name, &e),
    }
}

async fn orphans(store: &dyn Store, child: ChildTable, options: Options) -> Check {
    let name = match child {
        ChildTable::Thoughts => "orphan thoughts",
        ChildTable::ToolCalls => "orphan tool calls",
        ChildTable::PerformanceMetrics => "orphan metrics",
    };
    let finding = match store.inspect(Inspection::Orphans(child), EXAMPLES).await {
        Ok(f) if f.count == 0 => return Check::ok(name, "none"),
        Ok(f) => f,
        Err(e) => return unchecked(name, &e),
    };
    let mut check = Check::fail(
        name,
        format!(
            "{} rows of {} whose interaction does not exist",
            counted(finding.count, &finding.examples),
            child.table()
        ),
    )
    .repairable();
    if options.repair {
        match store.delete_orphans(child).await {
            Ok(deleted) => {
                tracing::info!(table = child.table(), deleted, "orphan rows deleted");
                check.repaired = true;
                check.detail.push_str(&format!("; deleted {deleted}"));
            }
            Err(e) => check.detail.push_str(&format!("; repair failed: {e}")),
        }
    }
    check
}

async fn hash_chain(store: &dyn Store) -> Check {
    const NAME: &str = "hash chain";
    let report = match verify::verify(store, None, None).await {
        Ok(r) => r,
        Err(e) => return unchecked(NAME, &e),
    };
    if let Some((day, problem)) = report.first_problem() {
        let broken = report.days.iter().filter(|d| matches!(d.status, DayStatus::Broken(_))).count();
        return Check::fail(
            NAME,
            format!("{broken} of {} days broken; first {day}: {problem} (`opsagent-audit verify`)", report.days.len()),
        );
    }
    let unchained = report.days.iter().filter(|d| d.status == DayStatus::Unchained).count();
    let chained = report.days.len() - unchained;
    match (chained, unchained) {
        (0, 0) => Check::ok(NAME, "no records"),
        (0, _) => Check::ok(NAME, format!("not present: {unchained} days written without the hash chain")),
        (_, 0) => Check::ok(NAME, format!("{chained} days verified")),
        _ => Check::ok(NAME, format!("{chained} days verified, {unchained} written without the hash chain")),
    }
}

async fn search_index(store: &dyn Store, options: Options) -> Check {
    const NAME: &str = "search index";
    match store.search_index_intact().await {
        Ok(None) => Check::ok(NAME, "maintained by the database"),
        Ok(Some(true)) => Check::ok(NAME, "agrees with the rows"),
        Ok(Some(false)) => {
            let mut check = Check::fail(NAME, "the full-text index disagrees with the rows").repairable();
            if options.repair {
                match store.rebuild_search_index().await {
                    Ok(()) => {
                        tracing::info!("full-text index rebuilt");
                        check.repaired = true;
                        check.detail.push_str("; rebuilt from the rows");
                    }
                    Err(e) => check.detail.push_str(&format!("; rebuild failed: {e}")),
                }
            }
            check
        }
        Err(e) => unchecked(NAME, &e),
    }
}
