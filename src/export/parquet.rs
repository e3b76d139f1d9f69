//! Parquet: typed columns for analysis tools (DuckDB, pandas, Spark), zstd-compressed.
//!
//! Columns are those of the CSV export, in the same order ([`super::CSV_COLUMNS`]), but
//! typed: see [`parquet_schema`].
//!
//! Memory stays bounded: records are appended to Arrow builders and handed to the
//! [`ArrowWriter`] as a batch every [`BATCH_ROWS`] rows (or sooner when their text passes
//! [`BATCH_TEXT_BYTES`]); the writer closes a row group at [`ROW_GROUP_ROWS`] rows or
//! about [`ROW_GROUP_BYTES`] encoded, and its bytes are moved out to the caller after
//! every batch. So the encoder holds at most one batch and one row group.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    Int32Builder, Int64Builder, OffsetBufferBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, MapArray, RecordBatch, StructArray};
use arrow_schema::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use uuid::Uuid;

use super::ExportError;
use crate::model::{Interaction, Thought, ToolCall};

/// Rows per Arrow batch handed to the writer: large enough that per-batch overhead does
/// not show, small enough that the builders stay a few MiB.
const BATCH_ROWS: usize = 1024;

/// A batch is written early once its text reaches this size. Besides bounding memory,
/// this keeps every string column far below the 2 GiB an Arrow `Utf8` array can address,
/// whatever the size of the records (a field may hold up to `limits.max_field_bytes`).
const BATCH_TEXT_BYTES: usize = 8 << 20;

/// Rows after which the writer closes a row group.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Estimated encoded size after which the writer closes a row group. A row group is held
/// in memory until it is closed, so this is the encoder's memory bound; readers prefer
/// larger groups, but 8 MiB of compressed audit text is already thousands of records.
const ROW_GROUP_BYTES: usize = 8 << 20;

/// The time zone of `created_at`: instants, shown in UTC.
const UTC: &str = "UTC";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let required_text = |name: &str| Field::new(name, DataType::Utf8, false);
    let int64 = |name: &str| Field::new(name, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        required_text("interaction_id"),
        required_text("session_id"),
        Field::new("created_at", DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())), false),
        text("user_id"),
        text("client_ip"),
        text("user_agent"),
        text("endpoint"),
        text("cluster"),
        text("model_name"),
        text("provider"),
        text("base_url"),
        required_text("status"),
        Field::new("http_status", DataType::Int32, true),
        text("error"),
        required_text("question"),
        text("final_answer"),
        int64("total_duration_ms"),
        int64("assistant_duration_ms"),
        int64("parse_duration_ms"),
        int64("input_tokens"),
        int64("output_tokens"),
        Field::new("thoughts", DataType::List(list_item(thought_fields())), false),
        Field::new("tool_calls", DataType::List(list_item(tool_call_fields())), false),
        Field::new("metrics", DataType::Map(metric_entries(), false), false),
        required_text("attributes"),
        required_text("risk_level"),
        Field::new("risk_flagged", DataType::Int32, false),
    ]))
});

/// The Arrow schema of a Parquet export. Ids are hyphenated UUID text; `status` is its
/// name (Parquet dictionary-encodes it, so a plain string costs nothing); `created_at` is
/// a UTC timestamp to the microsecond (the precision the stores keep); absent optional
/// values are nulls.
///
/// - `thoughts`: `List<Struct{content: Utf8, sequence_number: Int32}>`, in order.
/// - `tool_calls`: `List<Struct{tool_name: Utf8, tool_input: Utf8, tool_observation: Utf8?,
///   sequence_number: Int32, duration_ms: Int64?, thought_sequence_number: Int32?,
///   error: Utf8?, risk_level: Utf8, risk_rule: Utf8?}>`, in order.
/// - `metrics`: `Map<Utf8, Int64>` (entries `keys` → `values`, sorted by name), which
///   pandas and DuckDB read as a dict/map.
/// - `attributes`: the JSON object as text, since its shape differs from record to record.
/// - `risk_level` (the name: `none` … `critical`) and `risk_flagged`: the risk roll-up.
pub fn parquet_schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}

fn thought_fields() -> Fields {
    Fields::from(vec![
        Field::new("content", DataType::Utf8, false),
        Field::new("sequence_number", DataType::Int32, false),
    ])
}

fn tool_call_fields() -> Fields {
    Fields::from(vec![
        Field::new("tool_name", DataType::Utf8, false),
        Field::new("tool_input", DataType::Utf8, false),
        Field::new("tool_observation", DataType::Utf8, true),
        Field::new("sequence_number", DataType::Int32, false),
        Field::new("duration_ms", DataType::Int64, true),
        Field::new("thought_sequence_number", DataType::Int32, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("risk_level", DataType::Utf8, false),
        Field::new("risk_rule", DataType::Utf8, true),
    ])
}

/// The element of a list column: a struct that is never null (an absent list is empty).
/// `item` is Arrow's conventional element name, which readers expect.
fn list_item(fields: Fields) -> FieldRef {
    Arc::new(Field::new("item", DataType::Struct(fields), false))
}

/// Arrow's conventional map layout: `entries: Struct{keys, values}`.
fn metric_entries() -> FieldRef {
    Arc::new(Field::new("entries", DataType::Struct(metric_entry_fields()), false))
}

fn metric_entry_fields() -> Fields {
    Fields::from(vec![Field::new("keys", DataType::Utf8, false), Field::new("values", DataType::Int64, false)])
}

/// Encodes records as a Parquet file.
pub(super) struct ParquetEncoder {
    /// Writes into a `Vec` that is emptied after every batch: the writer tracks file
    /// offsets itself, so taking bytes out from under it does not disturb the footer.
    writer: ArrowWriter<Vec<u8>>,
    batch: Columns,
}

impl ParquetEncoder {
    pub(super) fn new() -> Result<ParquetEncoder, ExportError> {
        let properties = WriterProperties::builder()
            // Level 1, the default: an export is streamed as it is encoded, so encoding
            // speed matters more than the last percent of size.
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), parquet_schema(), Some(properties))
            .map_err(|e| ExportError::encode("starting the Parquet file", e))?;
        Ok(ParquetEncoder { writer, batch: Columns::new() })
    }

    pub(super) fn push(&mut self, record: &Interaction) -> Result<(), ExportError> {
        self.batch.push(record).map_err(|e| {
            ExportError::encode(&format!("adding interaction {} to a Parquet batch", record.interaction_id), e)
        })?;
        if self.batch.rows >= BATCH_ROWS || self.batch.text_bytes >= BATCH_TEXT_BYTES {
            self.write_batch()?;
        }
        Ok(())
    }

    pub(super) fn take_output(&mut self) -> Bytes {
        Bytes::from(std::mem::take(self.writer.inner_mut()))
    }

    pub(super) fn output_len(&self) -> usize {
        self.writer.inner().len()
    }

    pub(super) fn finish(mut self) -> Result<Bytes, ExportError> {
        self.write_batch()?;
        self.writer.finish().map_err(|e| ExportError::encode("writing the Parquet footer", e))?;
        Ok(self.take_output())
    }

    /// Hands the buffered rows to the writer, which closes a row group when one is full.
    fn write_batch(&mut self) -> Result<(), ExportError> {
        if self.batch.rows == 0 {
            return Ok(());
        }
        let rows = self.batch.rows;
        let batch = self.batch.finish().map_err(|e| ExportError::encode("building a Parquet batch", e))?;
        self.writer
            .write(&batch)
            .map_err(|e| ExportError::encode(&format!("writing a Parquet batch of {rows} rows"), e))?;
        // A closed row group may still sit partly in the writer's internal `BufWriter`;
        // flushing it makes every finished byte visible to `take_output`.
        self.writer.sync().map_err(|e| ExportError::encode("flushing Parquet output", e))
    }
}

/// Arrow builders for one batch, one per column of [`parquet_schema`].
struct Columns {
    rows: usize,
    /// Text appended since the last batch, to end a batch early (see [`BATCH_TEXT_BYTES`]).
    text_bytes: usize,
    interaction_id: StringBuilder,
    session_id: StringBuilder,
    created_at: TimestampMicrosecondBuilder,
    user_id: StringBuilder,
    client_ip: StringBuilder,
    user_agent: StringBuilder,
    endpoint: StringBuilder,
    cluster: StringBuilder,
    model_name: StringBuilder,
    provider: StringBuilder,
    base_url: StringBuilder,
    status: StringBuilder,
    http_status: Int32Builder,
    error: StringBuilder,
    question: StringBuilder,
    final_answer: StringBuilder,
    total_duration_ms: Int64Builder,
    assistant_duration_ms: Int64Builder,
    parse_duration_ms: Int64Builder,
    input_tokens: Int64Builder,
    output_tokens: Int64Builder,
    thoughts: ThoughtsColumn,
    tool_calls: ToolCallsColumn,
    metrics: MetricsColumn,
    attributes: StringBuilder,
    risk_level: StringBuilder,
    risk_flagged: Int32Builder,
}

impl Columns {
    fn new() -> Columns {
        Columns {
            rows: 0,
            text_bytes: 0,
            interaction_id: StringBuilder::new(),
            session_id: StringBuilder::new(),
            created_at: TimestampMicrosecondBuilder::new().with_timezone(UTC),
            user_id: StringBuilder::new(),
            client_ip: StringBuilder::new(),
            user_agent: StringBuilder::new(),
            endpoint: StringBuilder::new(),
            cluster: StringBuilder::new(),
            model_name: StringBuilder::new(),
            provider: StringBuilder::new(),
            base_url: StringBuilder::new(),
            status: StringBuilder::new(),
            http_status: Int32Builder::new(),
            error: StringBuilder::new(),
            question: StringBuilder::new(),
            final_answer: StringBuilder::new(),
            total_duration_ms: Int64Builder::new(),
            assistant_duration_ms: Int64Builder::new(),
            parse_duration_ms: Int64Builder::new(),
            input_tokens: Int64Builder::new(),
            output_tokens: Int64Builder::new(),
            thoughts: ThoughtsColumn::new(),
            tool_calls: ToolCallsColumn::new(),
            metrics: MetricsColumn::new(),
            attributes: StringBuilder::new(),
            risk_level: StringBuilder::new(),
            risk_flagged: Int32Builder::new(),
        }
    }

    /// Appends one record. Fails only if its attributes cannot be written as JSON, and
    /// then before anything is appended, so the columns never get out of step.
    fn push(&mut self, r: &Interaction) -> Result<(), serde_json::Error> {
        let attributes = serde_json::to_string(&r.attributes)?;
        let bytes = &mut self.text_bytes;
        append_id(&mut self.interaction_id, r.interaction_id);
        append_id(&mut self.session_id, r.session_id);
        self.created_at.append_value(r.created_at.timestamp_micros());
        append_text(&mut self.user_id, bytes, r.user_id.as_deref());
        append_text(&mut self.client_ip, bytes, r.client_ip.as_deref());
        append_text(&mut self.user_agent, bytes, r.user_agent.as_deref());
        append_text(&mut self.endpoint, bytes, r.endpoint.as_deref());
        append_text(&mut self.cluster, bytes, r.cluster.as_deref());
        append_text(&mut self.model_name, bytes, r.model_name.as_deref());
        append_text(&mut self.provider, bytes, r.provider.as_deref());
        append_text(&mut self.base_url, bytes, r.base_url.as_deref());
        self.status.append_value(r.status.as_str());
        self.http_status.append_option(r.http_status);
        append_text(&mut self.error, bytes, r.error.as_deref());
        append_text(&mut self.question, bytes, Some(&r.question));
        append_text(&mut self.final_answer, bytes, r.final_answer.as_deref());
        self.total_duration_ms.append_option(r.total_duration_ms);
        self.assistant_duration_ms.append_option(r.assistant_duration_ms);
        self.parse_duration_ms.append_option(r.parse_duration_ms);
        self.input_tokens.append_option(r.input_tokens);
        self.output_tokens.append_option(r.output_tokens);
        *bytes += self.thoughts.push(&r.thoughts);
        *bytes += self.tool_calls.push(&r.tool_calls);
        *bytes += self.metrics.push(&r.metrics);
        append_text(&mut self.attributes, bytes, Some(&attributes));
        self.risk_level.append_value(r.risk_level.as_str());
        self.risk_flagged.append_value(r.risk_flagged);
        self.rows += 1;
        Ok(())
    }

    /// The batch built so far, in schema order; the builders are left empty for the next.
    fn finish(&mut self) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.interaction_id.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.created_at.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.client_ip.finish()),
            Arc::new(self.user_agent.finish()),
            Arc::new(self.endpoint.finish()),
            Arc::new(self.cluster.finish()),
            Arc::new(self.model_name.finish()),
            Arc::new(self.provider.finish()),
            Arc::new(self.base_url.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.http_status.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.question.finish()),
            Arc::new(self.final_answer.finish()),
            Arc::new(self.total_duration_ms.finish()),
            Arc::new(self.assistant_duration_ms.finish()),
            Arc::new(self.parse_duration_ms.finish()),
            Arc::new(self.input_tokens.finish()),
            Arc::new(self.output_tokens.finish()),
            self.thoughts.finish()?,
            self.tool_calls.finish()?,
            self.metrics.finish()?,
            Arc::new(self.attributes.finish()),
            Arc::new(self.risk_level.finish()),
            Arc::new(self.risk_flagged.finish()),
        ];
        self.rows = 0;
        self.text_bytes = 0;
        // `try_new` checks every column against the schema, so a builder that drifted from
        // `parquet_schema` is an error here, not a corrupt file.
        RecordBatch::try_new(parquet_schema(), columns)
    }
}

fn append_id(builder: &mut StringBuilder, id: Uuid) {
    builder.append_value(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
}

fn append_text(builder: &mut StringBuilder, bytes: &mut usize, value: Option<&str>) {
    *bytes += value.map_or(0, str::len);
    builder.append_option(value);
}

/// Where each row's elements end in a list or map column, sized for one batch.
fn offsets_builder() -> OffsetBufferBuilder<i32> {
    OffsetBufferBuilder::new(BATCH_ROWS)
}

/// Builds a `List<Struct>` column from per-row lengths and the structs' fields.
fn list_column(
    offsets: &mut OffsetBufferBuilder<i32>,
    fields: Fields,
    children: Vec<ArrayRef>,
) -> Result<ArrayRef, arrow_schema::ArrowError> {
    let offsets = std::mem::replace(offsets, offsets_builder())
        .try_finish()
        .map_err(|e| arrow_schema::ArrowError::InvalidArgumentError(e.to_string()))?;
    let values = StructArray::try_new(fields.clone(), children, None)?;
    Ok(Arc::new(ListArray::try_new(list_item(fields), offsets, Arc::new(values), None)?))
}

/// `thoughts`: one list of structs per row.
struct ThoughtsColumn {
    offsets: OffsetBufferBuilder<i32>,
    content: StringBuilder,
    sequence_number: Int32Builder,
}

impl ThoughtsColumn {
    fn new() -> ThoughtsColumn {
        ThoughtsColumn {
            offsets: offsets_builder(),
            content: StringBuilder::new(),
            sequence_number: Int32Builder::new(),
        }
    }

    /// Appends one row's thoughts; returns the bytes of text appended.
    fn push(&mut self, thoughts: &[Thought]) -> usize {
        let mut bytes = 0;
        for t in thoughts {
            append_text(&mut self.content, &mut bytes, Some(&t.content));
            self.sequence_number.append_value(t.sequence_number);
        }
        self.offsets.push_length(thoughts.len());
        bytes
    }

    fn finish(&mut self) -> Result<ArrayRef, arrow_schema::ArrowError> {
        let children: Vec<ArrayRef> = vec![Arc::new(self.content.finish()), Arc::new(self.sequence_number.finish())];
        list_column(&mut self.offsets, thought_fields(), children)
    }
}

/// `tool_calls`: one list of structs per row.
struct ToolCallsColumn {
    offsets: OffsetBufferBuilder<i32>,
    tool_name: StringBuilder,
    tool_input: StringBuilder,
    tool_observation: StringBuilder,
    sequence_number: Int32Builder,
    duration_ms: Int64Builder,
    thought_sequence_number: Int32Builder,
    error: StringBuilder,
    risk_level: StringBuilder,
    risk_rule: StringBuilder,
}

impl ToolCallsColumn {
    fn new() -> ToolCallsColumn {
        ToolCallsColumn {
            offsets: offsets_builder(),
            tool_name: StringBuilder::new(),
            tool_input: StringBuilder::new(),
            tool_observation: StringBuilder::new(),
            sequence_number: Int32Builder::new(),
            duration_ms: Int64Builder::new(),
            thought_sequence_number: Int32Builder::new(),
            error: StringBuilder::new(),
            risk_level: StringBuilder::new(),
            risk_rule: StringBuilder::new(),
        }
    }

    /// Appends one row's tool calls; returns the bytes of text appended.
    fn push(&mut self, calls: &[ToolCall]) -> usize {
        let mut bytes = 0;
        for c in calls {
            append_text(&mut self.tool_name, &mut bytes, Some(&c.tool_name));
            append_text(&mut self.tool_input, &mut bytes, Some(&c.tool_input));
            append_text(&mut self.tool_observation, &mut bytes, c.tool_observation.as_deref());
            self.sequence_number.append_value(c.sequence_number);
            self.duration_ms.append_option(c.duration_ms);
            self.thought_sequence_number.append_option(c.thought_sequence_number);
            append_text(&mut self.error, &mut bytes, c.error.as_deref());
            self.risk_level.append_value(c.risk_level.as_str());
            append_text(&mut self.risk_rule, &mut bytes, c.risk_rule.as_deref());
        }
        self.offsets.push_length(calls.len());
        bytes
    }

    fn finish(&mut self) -> Result<ArrayRef, arrow_schema::ArrowError> {
        let children: Vec<ArrayRef> = vec![
            Arc::new(self.tool_name.finish()),
            Arc::new(self.tool_input.finish()),
            Arc::new(self.tool_observation.finish()),
            Arc::new(self.sequence_number.finish()),
            Arc::new(self.duration_ms.finish()),
            Arc::new(self.thought_sequence_number.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.risk_level.finish()),
            Arc::new(self.risk_rule.finish()),
        ];
        list_column(&mut self.offsets, tool_call_fields(), children)
    }
}

/// `metrics`: one map per row.
struct MetricsColumn {
    offsets: OffsetBufferBuilder<i32>,
    names: StringBuilder,
    values: Int64Builder,
}

impl MetricsColumn {
    fn new() -> MetricsColumn {
        MetricsColumn { offsets: offsets_builder(), names: StringBuilder::new(), values: Int64Builder::new() }
    }

    /// Appends one row's metrics; returns the bytes of text appended.
    fn push(&mut self, metrics: &std::collections::BTreeMap<String, i64>) -> usize {
        let mut bytes = 0;
        for (name, value) in metrics {
            append_text(&mut self.names, &mut bytes, Some(name));
            self.values.append_value(*value);
        }
        self.offsets.push_length(metrics.len());
        bytes
    }

    fn finish(&mut self) -> Result<ArrayRef, arrow_schema::ArrowError> {
        let offsets = std::mem::replace(&mut self.offsets, offsets_builder())
            .try_finish()
            .map_err(|e| arrow_schema::ArrowError::InvalidArgumentError(e.to_string()))?;
        let children: Vec<ArrayRef> = vec![Arc::new(self.names.finish()), Arc::new(self.values.finish())];
        let entries = StructArray::try_new(metric_entry_fields(), children, None)?;
        // Not flagged as sorted: keys are sorted within a row (they come from a BTreeMap),
        // but the flag is part of the type and readers gain nothing from it.
        Ok(Arc::new(MapArray::try_new(metric_entries(), offsets, entries, None, false)?))
    }
}
