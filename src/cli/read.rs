//! The read commands: `query`, `stats` and `export`, against the database directly.
//!
//! Options are turned into the same parameters the HTTP API takes and parsed by
//! `query`, so `--since 24h` and `?since=24h` mean the same and are refused for the same
//! reasons (the message names the option).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use comfy_table::{presets, Cell, CellAlignment, ColumnConstraint, ContentArrangement, Row, Table};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::export;
use crate::query::{self, ListRequest, ParamError, Params};
use crate::store::{InteractionSummary, StatsRow, Store};

/// The filters every read command takes.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// From this time: 2026-11-01, 2026-11-01T10:00, RFC 3339, or a duration back from now (24h, 7d).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Same as --from with a duration: the last 24h, 7d, …
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Before this time (same forms as --from).
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Who asked.
    #[arg(long, visible_alias = "user", value_name = "USER")]
    pub user_id: Option<String>,
    /// One conversation.
    #[arg(long, visible_alias = "session", value_name = "ID")]
    pub session_id: Option<String>,
    /// The model that answered.
    #[arg(long, visible_alias = "model", value_name = "NAME")]
    pub model_name: Option<String>,
    /// The model's provider.
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    /// The cluster worked on.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Outcomes, comma-separated: success, error, timeout, cancelled.
    #[arg(long, value_name = "STATUS[,STATUS]")]
    pub status: Option<String>,
    /// Interactions that ran this tool.
    #[arg(long, visible_alias = "tool", value_name = "NAME")]
    pub tool_name: Option<String>,
    /// At least this long (total_duration_ms).
    #[arg(long, value_name = "MS")]
    pub min_duration_ms: Option<String>,
    /// At most this long (total_duration_ms).
    #[arg(long, value_name = "MS")]
    pub max_duration_ms: Option<String>,
    /// Text in the question or the answer (any language, case-insensitive).
    #[arg(long, short = 'q', value_name = "TEXT")]
    pub q: Option<String>,
    /// Interactions with a tool call at least this risky: none, low, medium, high, critical.
    #[arg(long, value_name = "LEVEL")]
    pub min_risk: Option<String>,
}

impl FilterArgs {
    /// The options as API parameters.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("from", &self.from),
            ("since", &self.since),
            ("to", &self.to),
            ("user_id", &self.user_id),
            ("session_id", &self.session_id),
            ("model_name", &self.model_name),
            ("provider", &self.provider),
            ("cluster", &self.cluster),
            ("status", &self.status),
            ("tool_name", &self.tool_name),
            ("min_duration_ms", &self.min_duration_ms),
            ("max_duration_ms", &self.max_duration_ms),
            ("q", &self.q),
            ("min_risk", &self.min_risk),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name, v)))
        .collect()
    }

    fn params<'a>(&self, extra: impl IntoIterator<Item = (&'a str, String)>) -> Params {
        Params::from_pairs(self.pairs().into_iter().chain(extra))
    }
}

/// A parameter error in command-line terms (`--from`, not `from`).
fn option_error(e: ParamError) -> anyhow::Error {
    anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message)
}

/// How `query` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// A table fitted to the terminal.
    Table,
    /// One JSON document: `{"items": […], "next_cursor": …}`.
    Json,
    /// One interaction per line.
    Ndjson,
}

/// `query` options.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    format: ListFormat,
    /// Interactions per page (1–500).
    #[arg(long, default_value_t = query::DEFAULT_LIMIT)]
    limit: u32,
    /// Continue from a previous page's cursor.
    #[arg(long)]
    cursor: Option<String>,
    /// Follow the cursors to the end (every matching interaction).
    #[arg(long, conflicts_with = "cursor")]
    all: bool,
}

/// Runs `query`.
pub async fn run_query(store: Arc<dyn Store>, args: QueryArgs) -> anyhow::Result<()> {
    let mut extra = vec![("limit", args.limit.to_string())];
    if let Some(c) = &args.cursor {
        extra.push(("cursor", c.clone()));
    }
    let mut request = ListRequest::from_params(args.filter.params(extra)).map_err(option_error)?;
    let mut out = std::io::stdout().lock();
    let mut items = Vec::new();
    loop {
        let page = query::list(store.as_ref(), &request).await.context("querying interactions")?;
        let next = page.next_cursor.clone();
        match args.format {
            ListFormat::Ndjson => {
                for item in &page.items {
                    serde_json::to_writer(&mut out, item)?;
                    writeln!(out)?;
                }
            }
            ListFormat::Json if !args.all => {
                serde_json::to_writer_pretty(&mut out, &page)?;
                writeln!(out)?;
            }
            ListFormat::Json | ListFormat::Table => items.extend(page.items),
        }
        match next {
            Some(cursor) if args.all => {
                request.after = Some(query::cursor::decode(&cursor, &request.filter).map_err(anyhow::Error::msg)?);
            }
            Some(cursor) => {
                if args.format == ListFormat::Table {
                    print_summaries(&mut out, &items)?;
                }
                // The hint goes to stderr so that stdout stays only data.
                out.flush()?;
                writeln!(std::io::stderr(), "more: --cursor {cursor}")?;
                return Ok(());
            }
            None => break,
        }
    }
    match args.format {
        ListFormat::Table => print_summaries(&mut out, &items)?,
        ListFormat::Json if args.all => {
            serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "items": items, "next_cursor": null }))?;
            writeln!(out)?;
        }
        _ => {}
    }
    Ok(())
}

/// A table sized to the terminal (or 160 columns when not on one).
pub(super) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic);
    if !std::io::stdout().is_terminal() {
        table.set_width(160);
    }
    table.set_header(header.iter().copied());
    table
}

/// Cuts `text` to one line of at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn or_dash(value: Option<&str>) -> &str {
    value.unwrap_or("-")
}

fn print_summaries(out: &mut impl Write, items: &[InteractionSummary]) -> anyhow::Result<()> {
    if items.is_empty() {
        writeln!(out, "no interactions match")?;
        return Ok(());
    }
    let mut t = table(&["created_at (UTC)", "user", "model", "cluster", "status", "ms", "tools", "question", "id"]);
    // One line per interaction, its id whole (it is what `show` takes): the time and the
    // id keep their width, and a cell too long for what remains is cut, not wrapped.
    for column in [0, 8] {
        if let Some(c) = t.column_mut(column) {
            c.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
    for i in items {
        let mut row = Row::from(vec![
            Cell::new(i.created_at.format("%Y-%m-%d %H:%M:%S")),
            Cell::new(or_dash(i.user_id.as_deref())),
            Cell::new(or_dash(i.model_name.as_deref())),
            Cell::new(or_dash(i.cluster.as_deref())),
            Cell::new(i.status),
            Cell::new(i.total_duration_ms.map_or("-".into(), |d| d.to_string())).set_alignment(CellAlignment::Right),
            Cell::new(i.tool_call_count).set_alignment(CellAlignment::Right),
            Cell::new(one_line(&i.question, 80)),
            Cell::new(i.interaction_id),
        ]);
        row.max_height(1);
        t.add_row(row);
    }
    writeln!(out, "{t}")?;
    Ok(())
}

/// How `stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsFormat {
    /// A table fitted to the terminal.
    Table,
    /// The API's JSON.
    Json,
}

/// `stats` options.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Group by model_name, user_id, status, cluster, provider, tool_name or risk_rule.
    #[arg(long, default_value = "model_name", value_name = "COLUMN")]
    group_by: String,
    /// Time buckets: hour or day.
    #[arg(long, value_name = "SIZE")]
    bucket: Option<String>,
    /// Only the N biggest groups.
    #[arg(long, value_name = "N")]
    top: Option<u32>,
    /// The overview instead: most used, failing and slowest tools, busiest users and
    /// clusters, most frequent questions.
    #[arg(long, conflicts_with_all = ["group_by", "bucket"])]
    overview: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = StatsFormat::Table)]
    format: StatsFormat,
}

/// Runs `stats`.
pub async fn run_stats(store: Arc<dyn Store>, args: StatsArgs) -> anyhow::Result<()> {
    let top = args.top.map(|n| ("top", n.to_string()));
    let mut out = std::io::stdout().lock();
    if args.overview {
        let (filter, top) = query::overview_request(args.filter.params(top)).map_err(option_error)?;
        let overview = query::overview(store.as_ref(), &filter, top).await.context("computing the overview")?;
        if args.format == StatsFormat::Json {
            serde_json::to_writer_pretty(&mut out, &overview)?;
            writeln!(out)?;
            return Ok(());
        }
        for (title, rows) in [
            ("most used tools", &overview.most_used_tools),
            ("most failing tools", &overview.most_failing_tools),
            ("slowest tools (p95)", &overview.slowest_tools),
            ("busiest users", &overview.busiest_users),
            ("busiest clusters", &overview.busiest_clusters),
        ] {
            writeln!(out, "{title}")?;
            print_stats(&mut out, rows, false)?;
        }
        writeln!(out, "most frequent questions")?;
        let mut t = table(&["count", "last asked (UTC)", "question"]);
        for q in &overview.frequent_questions {
            t.add_row(vec![
                Cell::new(q.count).set_alignment(CellAlignment::Right),
                Cell::new(q.last_asked.format("%Y-%m-%d %H:%M")),
                Cell::new(one_line(&q.question, 100)),
            ]);
        }
        writeln!(out, "{t}")?;
        return Ok(());
    }
    let mut extra = vec![("group_by", args.group_by.clone())];
    extra.extend(args.bucket.clone().map(|b| ("bucket", b)));
    extra.extend(top);
    let request = query::stats_request(args.filter.params(extra)).map_err(option_error)?;
    let stats = query::stats(store.as_ref(), &request).await.context("computing stats")?;
    match args.format {
        StatsFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &stats)?;
            writeln!(out)?;
        }
        StatsFormat::Table => print_stats(&mut out, &stats.rows, request.bucket.is_some())?,
    }
    Ok(())
}

fn print_stats(out: &mut impl Write, rows: &[StatsRow], bucketed: bool) -> anyhow::Result<()> {
    let mut header = vec!["group"];
    if bucketed {
        header.push("bucket (UTC)");
    }
    header.extend(["count", "errors", "error %", "p50 ms", "p95 ms", "p99 ms", "mean ms", "tokens in", "tokens out"]);
    let mut t = table(&header);
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let n = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
    for r in rows {
        let mut row = vec![Cell::new(or_dash(r.key.as_deref()))];
        if bucketed {
            row.push(Cell::new(r.bucket.map_or("-".into(), |b| b.format("%Y-%m-%d %H:%M").to_string())));
        }
        let numbers = [
            r.count.to_string(),
            r.error_count.to_string(),
            format!("{:.1}", r.error_rate * 100.0),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            ms(r.mean_ms),
            n(r.input_tokens),
            n(r.output_tokens),
        ];
        row.extend(numbers.into_iter().map(|v| Cell::new(v).set_alignment(CellAlignment::Right)));
        t.add_row(row);
    }
    writeln!(out, "{t}")?;
    Ok(())
}

/// `export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// csv, json, ndjson or parquet.
    #[arg(long, value_name = "FORMAT")]
    format: String,
    /// Where to write; `-` for stdout. The file appears under its name only when complete.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
}

/// Runs `export`: streams from the database into the file, with a progress bar on a
/// terminal.
pub async fn run_export(store: Arc<dyn Store>, args: ExportArgs) -> anyhow::Result<()> {
    let (filter, format) =
        query::export_request(args.filter.params([("format", args.format.clone())])).map_err(option_error)?;

    let total = store.count_matching(&filter).await.context("counting the interactions to export")?;
    // indicatif draws nothing when stderr is not a terminal, so piped runs stay quiet.
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} {human_pos}/{human_len} interactions [{bar:30}] {per_sec} {msg} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let counted = {
        let progress = progress.clone();
        store.export(&filter).inspect(move |_| progress.inc(1))
    };
    let mut chunks = std::pin::pin!(export::encode_stream(counted, format));

    let to_stdout = args.output.as_os_str() == "-";
    // Written under a temporary name and renamed at the end, so an interrupted export
    // never leaves a file that looks complete.
    let partial = {
        let mut name = args.output.clone().into_os_string();
        name.push(".partial");
        PathBuf::from(name)
    };
    let mut file = if to_stdout {
        None
    } else {
        let file = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        Some(std::io::BufWriter::with_capacity(1 << 20, file))
    };
    let mut bytes = 0u64;
    let result: anyhow::Result<()> = async {
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.context("exporting")?;
            bytes += chunk.len() as u64;
            match file.as_mut() {
                Some(f) => f.write_all(&chunk),
                None => stdout.write_all(&chunk),
            }
            .context("writing the export")?;
            progress.set_message(indicatif::HumanBytes(bytes).to_string());
        }
        match file.take() {
            // On disk before it takes its final name.
            Some(f) => f.into_inner().map_err(|e| e.into_error())?.sync_all(),
            None => stdout.flush(),
        }
        .context("writing the export")?;
        Ok(())
    }
    .await;
    progress.finish_and_clear();
    if let Err(e) = result {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(e);
    }
    if !to_stdout {
        std::fs::rename(&partial, &args.output)
            .with_context(|| format!("renaming {} to {}", partial.display(), args.output.display()))?;
        tracing::info!(
            records = progress.position(),
            bytes,
            file = %args.output.display(),
            format = format.as_str(),
            "export written"
        );
    }
    Ok(())
}
