//! Round trips of every format, empty exports, bounded chunks and errors mid-stream.

use std::collections::BTreeMap;
use std::str::FromStr;

use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use futures::executor::block_on;
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::model::{Status, Thought, ToolCall};

/// Records made to trip up encoders: Chinese text, commas, quotes, newlines (LF and
/// CRLF), cells that look like spreadsheet formulas, absent optional fields, several
/// thoughts and tool calls, metrics, nested attributes. Deterministic, and `created_at`
/// is whole microseconds, the precision every format keeps.
fn varied_records(n: usize) -> Vec<Interaction> {
    (0..n).map(varied_record).collect()
}

fn varied_record(i: usize) -> Interaction {
    let questions = [
        format!("为什么 pod web-{i} 一直 CrashLoopBackOff？"),
        format!("why is \"web-{i}\", the frontend, slow?"),
        format!("line one\nline two, with a comma\r\nline three {i}"),
        format!("=HYPERLINK(\"http://evil.example\",\"{i}\")"),
        format!("-n kube-system get pods {i}"),
        String::new(),
    ];
    let some_if = |cond: bool, s: String| cond.then_some(s);
    let thoughts = (0..i % 4)
        .map(|t| Thought {
            content: format!("思考 {t}: check \"events\", then logs\nof pod {i}"),
            sequence_number: t as i32 + 1,
        })
        .collect();
    let tool_calls = (0..i % 5)
        .map(|c| ToolCall {
            tool_name: ["kubectl", "shell", "trivy"][c % 3].to_string(),
            tool_input: format!("logs web-{i} --tail=50, -c \"app\""),
            tool_observation: some_if(c % 4 != 3, format!("NAME,READY\nweb-{i},0/1\n错误: \"OOMKilled\"")),
            sequence_number: c as i32 + 1,
            duration_ms: c.is_multiple_of(2).then_some(100 + c as i64),
            thought_sequence_number: (c % 3 != 2).then_some(1),
            error: some_if(c == 2, "exit status 1".into()),
            ..ToolCall::new("", "")
        })
        .collect();
    let status = Status::ALL[i % Status::ALL.len()];
    let mut metrics = BTreeMap::new();
    for m in 0..i % 3 {
        metrics.insert(format!("metric_{m}_ms"), (i * 10 + m) as i64 - 5);
    }
    let mut attributes = serde_json::Map::new();
    if i.is_multiple_of(2) {
        attributes.insert("trace".into(), json!(format!("t-{i}")));
        attributes.insert("nested".into(), json!({"tags": ["a", "b,c"], "n": i, "none": null, "文字": "值"}));
    }
    Interaction {
        interaction_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + i as u128),
        session_id: Uuid::from_u128(0xc7a1_0000_0000_4000_8000_0000_0000_0000 + (i % 37) as u128),
        user_id: some_if(!i.is_multiple_of(5), format!("user-{}", i % 50)),
        client_ip: some_if(i.is_multiple_of(3), format!("10.0.{}.{}", i % 7, i % 250)),
        user_agent: some_if(i % 4 != 1, "curl/8.5.0 \"test\", v1".into()),
        created_at: Utc.timestamp_micros(1_795_000_000_000_000 + i as i64 * 1_234_567).single().unwrap(),
        endpoint: some_if(!i.is_multiple_of(6), "/api/diagnose".into()),
        question: questions[i % questions.len()].clone(),
        model_name: some_if(!i.is_multiple_of(7), ["gpt-4o", "qwen-max", "deepseek-r1"][i % 3].into()),
        provider: some_if(!i.is_multiple_of(7), "openai".into()),
        base_url: some_if(!i.is_multiple_of(8), "https://llm.internal/v1".into()),
        cluster: some_if(!i.is_multiple_of(9), format!("prod-{}", i % 3)),
        thoughts,
        tool_calls,
        final_answer: some_if(i % 7 != 3, format!("重启后恢复。Answer, \"quoted\"\nsecond line {i}")),
        status,
        error: some_if(status != Status::Success, format!("{status}: upstream said \"no\", twice")),
        http_status: (!i.is_multiple_of(10)).then_some([200, 500, 504, 499][i % 4]),
        total_duration_ms: (!i.is_multiple_of(11)).then_some(5_000 + i as i64),
        assistant_duration_ms: (!i.is_multiple_of(12)).then_some(4_000 + i as i64),
        parse_duration_ms: (!i.is_multiple_of(13)).then_some(i as i64 % 20),
        metrics,
        input_tokens: (!i.is_multiple_of(14)).then_some(1_200 + i as i64),
        output_tokens: (!i.is_multiple_of(15)).then_some(300),
        attributes,
        ..Interaction::new("")
    }
}

/// Encodes `records` through [`encode_stream`] and returns the chunks.
fn encode(records: &[Interaction], format: Format) -> Vec<Bytes> {
    // `encode_stream` takes a `'static` stream, as a store's would be.
    let owned: Vec<Interaction> = records.to_vec();
    let input = futures::stream::iter(owned.into_iter().map(Ok));
    block_on(encode_stream(input, format).map(|chunk| chunk.unwrap()).collect())
}

fn concat(chunks: &[Bytes]) -> Bytes {
    Bytes::from(chunks.concat())
}

const N: usize = 2_500;

#[test]
fn ndjson_round_trips_every_field() {
    let records = varied_records(N);
    let chunks = encode(&records, Format::Ndjson);
    assert!(chunks.len() > 1, "a large export comes in several chunks");
    let text = String::from_utf8(concat(&chunks).to_vec()).unwrap();
    assert!(text.ends_with('\n'));
    let parsed: Vec<Interaction> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(parsed, records);
}

#[test]
fn json_round_trips_every_field() {
    let records = varied_records(N);
    let bytes = concat(&encode(&records, Format::Json));
    assert!(bytes.starts_with(b"[{") && bytes.ends_with(b"}]\n"));
    let parsed: Vec<Interaction> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(parsed, records);
}

#[test]
fn csv_round_trips_a_row_per_interaction() {
    let records = varied_records(N);
    let bytes = concat(&encode(&records, Format::Csv));
    let mut reader = ::csv::Reader::from_reader(&bytes[..]);
    assert_eq!(reader.headers().unwrap(), CSV_COLUMNS);
    let rows: Vec<::csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), records.len());
    let column = |name: &str| CSV_COLUMNS.iter().position(|c| *c == name).unwrap();
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let number = |n: Option<i64>| n.map(|n| n.to_string());
    for (row, r) in rows.iter().zip(&records) {
        assert_eq!(row.len(), CSV_COLUMNS.len());
        assert_eq!(row[column("interaction_id")], r.interaction_id.to_string());
        assert_eq!(row[column("session_id")], r.session_id.to_string());
        let created_at = &row[column("created_at")];
        assert!(created_at.ends_with('Z') && created_at.len() == "2026-11-24T10:00:00.123456Z".len(), "{created_at}");
        assert_eq!(DateTime::parse_from_rfc3339(created_at).unwrap(), r.created_at);
        assert_eq!(opt(&row[column("user_id")]), r.user_id);
        assert_eq!(opt(&row[column("client_ip")]), r.client_ip);
        assert_eq!(opt(&row[column("user_agent")]), r.user_agent);
        assert_eq!(opt(&row[column("endpoint")]), r.endpoint);
        assert_eq!(opt(&row[column("cluster")]), r.cluster);
        assert_eq!(opt(&row[column("model_name")]), r.model_name);
        assert_eq!(opt(&row[column("provider")]), r.provider);
        assert_eq!(opt(&row[column("base_url")]), r.base_url);
        assert_eq!(&row[column("status")], r.status.as_str());
        assert_eq!(opt(&row[column("http_status")]), r.http_status.map(|s| s.to_string()));
        assert_eq!(opt(&row[column("error")]), r.error);
        // Faithful: quotes, commas, newlines (CRLF too) and a leading `=` come back as is.
        assert_eq!(&row[column("question")], r.question);
        assert_eq!(opt(&row[column("final_answer")]), r.final_answer);
        assert_eq!(opt(&row[column("total_duration_ms")]), number(r.total_duration_ms));
        assert_eq!(opt(&row[column("assistant_duration_ms")]), number(r.assistant_duration_ms));
        assert_eq!(opt(&row[column("parse_duration_ms")]), number(r.parse_duration_ms));
        assert_eq!(opt(&row[column("input_tokens")]), number(r.input_tokens));
        assert_eq!(opt(&row[column("output_tokens")]), number(r.output_tokens));
        let thoughts: Vec<Thought> = serde_json::from_str(&row[column("thoughts")]).unwrap();
        assert_eq!(thoughts, r.thoughts);
        let tool_calls: Vec<ToolCall> = serde_json::from_str(&row[column("tool_calls")]).unwrap();
        assert_eq!(tool_calls, r.tool_calls);
        let metrics: BTreeMap<String, i64> = serde_json::from_str(&row[column("metrics")]).unwrap();
        assert_eq!(metrics, r.metrics);
        let attributes: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&row[column("attributes")]).unwrap();
        assert_eq!(attributes, r.attributes);
    }
    // The fixtures do hold what the comments claim to test.
    assert!(records.iter().any(|r| r.question.starts_with('=') && r.question.contains('"')));
    assert!(records.iter().any(|r| r.question.contains("\r\n")));
}

#[test]
fn parquet_round_trips_every_field_with_the_documented_schema() {
    let records = varied_records(N);
    let builder = ParquetRecordBatchReaderBuilder::try_new(concat(&encode(&records, Format::Parquet))).unwrap();
    assert_eq!(builder.schema(), &parquet_schema());
    assert_eq!(builder.metadata().file_metadata().num_rows(), N as i64);
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    let decoded: Vec<Interaction> =
        batches.iter().flat_map(|batch| (0..batch.num_rows()).map(move |row| from_parquet_row(batch, row))).collect();
    assert_eq!(decoded.len(), records.len());
    for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
        assert_eq!(got, want, "row {i}");
    }
    // Spot checks that do not go through the decoder below, in case it shares a mistake
    // with the encoder.
    let first = &batches[0];
    let created_at = first.column_by_name("created_at").unwrap().as_primitive::<TimestampMicrosecondType>();
    assert_eq!(created_at.value(3), records[3].created_at.timestamp_micros());
    assert_eq!(created_at.timezone(), Some("UTC"));
    let calls = first.column_by_name("tool_calls").unwrap().as_list::<i32>().value(4);
    assert_eq!(calls.len(), 4);
    let observations = calls.as_struct().column_by_name("tool_observation").unwrap().as_string::<i32>();
    assert_eq!(observations.value(0), "NAME,READY\nweb-4,0/1\n错误: \"OOMKilled\"");
    assert!(observations.is_null(3));
}

/// Reads one Parquet row back into a record, column by column.
fn from_parquet_row(batch: &RecordBatch, row: usize) -> Interaction {
    let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).clone();
    let text = |name: &str| opt_text(&col(name), row);
    let int64 = |name: &str| opt_i64(&col(name), row);
    let id = |name: &str| Uuid::parse_str(&text(name).unwrap()).unwrap();

    let thoughts = col("thoughts").as_list::<i32>().value(row);
    let thoughts = thoughts.as_struct();
    let thoughts = (0..thoughts.len())
        .map(|j| Thought {
            content: opt_text(thoughts.column_by_name("content").unwrap(), j).unwrap(),
            sequence_number: opt_i32(thoughts.column_by_name("sequence_number").unwrap(), j).unwrap(),
        })
        .collect();
    let calls = col("tool_calls").as_list::<i32>().value(row);
    let calls = calls.as_struct();
    let field = |name: &str| calls.column_by_name(name).unwrap().clone();
    let tool_calls = (0..calls.len())
        .map(|j| ToolCall {
            tool_name: opt_text(&field("tool_name"), j).unwrap(),
            tool_input: opt_text(&field("tool_input"), j).unwrap(),
            tool_observation: opt_text(&field("tool_observation"), j),
            sequence_number: opt_i32(&field("sequence_number"), j).unwrap(),
            duration_ms: opt_i64(&field("duration_ms"), j),
            thought_sequence_number: opt_i32(&field("thought_sequence_number"), j),
            error: opt_text(&field("error"), j),
            ..ToolCall::new("", "")
        })
        .collect();
    let entries = col("metrics").as_map().value(row);
    let metrics = (0..entries.len())
        .map(|j| (opt_text(entries.column(0), j).unwrap(), opt_i64(entries.column(1), j).unwrap()))
        .collect();
    let micros = col("created_at").as_primitive::<TimestampMicrosecondType>().value(row);

    Interaction {
        interaction_id: id("interaction_id"),
        session_id: id("session_id"),
        user_id: text("user_id"),
        client_ip: text("client_ip"),
        user_agent: text("user_agent"),
        created_at: Utc.timestamp_micros(micros).single().unwrap(),
        endpoint: text("endpoint"),
        question: text("question").unwrap(),
        model_name: text("model_name"),
        provider: text("provider"),
        base_url: text("base_url"),
        cluster: text("cluster"),
        thoughts,
        tool_calls,
        final_answer: text("final_answer"),
        status: Status::parse(&text("status").unwrap()).unwrap(),
        error: text("error"),
        http_status: opt_i32(&col("http_status"), row),
        total_duration_ms: int64("total_duration_ms"),
        assistant_duration_ms: int64("assistant_duration_ms"),
        parse_duration_ms: int64("parse_duration_ms"),
        metrics,
        input_tokens: int64("input_tokens"),
        output_tokens: int64("output_tokens"),
        attributes: serde_json::from_str(&text("attributes").unwrap()).unwrap(),
        ..Interaction::new("")
    }
}

fn opt_text(array: &ArrayRef, i: usize) -> Option<String> {
    let array = array.as_string::<i32>();
    array.is_valid(i).then(|| array.value(i).to_string())
}

fn opt_i64(array: &ArrayRef, i: usize) -> Option<i64> {
    let array = array.as_primitive::<Int64Type>();
    array.is_valid(i).then(|| array.value(i))
}

fn opt_i32(array: &ArrayRef, i: usize) -> Option<i32> {
    let array = array.as_primitive::<Int32Type>();
    array.is_valid(i).then(|| array.value(i))
}

#[test]
fn parquet_columns_are_the_csv_columns() {
    let schema = parquet_schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, CSV_COLUMNS);
}

#[test]
fn an_empty_export_is_a_valid_file_in_every_format() {
    let json = concat(&encode(&[], Format::Json));
    assert_eq!(&json[..], b"[]\n");
    assert_eq!(serde_json::from_slice::<Vec<Interaction>>(&json).unwrap(), vec![]);

    assert!(concat(&encode(&[], Format::Ndjson)).is_empty());

    let csv = concat(&encode(&[], Format::Csv));
    let mut reader = ::csv::Reader::from_reader(&csv[..]);
    assert_eq!(reader.headers().unwrap(), CSV_COLUMNS);
    assert_eq!(reader.records().count(), 0);

    let builder = ParquetRecordBatchReaderBuilder::try_new(concat(&encode(&[], Format::Parquet))).unwrap();
    assert_eq!(builder.schema(), &parquet_schema());
    assert_eq!(builder.metadata().file_metadata().num_rows(), 0);
    assert_eq!(builder.build().unwrap().map(|b| b.unwrap().num_rows()).sum::<usize>(), 0);
}

/// A small record, made on demand so that the test itself holds no more than the encoder.
fn small_record(i: u64) -> Interaction {
    let mut r = Interaction::new(format!("question {i}"));
    r.interaction_id = Uuid::from_u64_pair(1, i);
    r.created_at = Utc.timestamp_micros(1_795_000_000_000_000 + i as i64).single().unwrap();
    r.total_duration_ms = Some(i as i64 % 10_000);
    r.metrics.insert("llm_first_token_ms".into(), 800);
    r
}

#[test]
fn parquet_streams_in_bounded_chunks() {
    const RECORDS: u64 = 200_000;
    const MAX_CHUNK: usize = 32 << 20;
    let input = futures::stream::iter((0..RECORDS).map(|i| Ok(small_record(i))));
    let mut stream = Box::pin(encode_stream(input, Format::Parquet));
    let (mut chunks, mut largest) = (0, 0);
    let mut file = Vec::new();
    while let Some(chunk) = block_on(stream.next()) {
        let chunk = chunk.unwrap();
        chunks += 1;
        largest = largest.max(chunk.len());
        file.extend_from_slice(&chunk);
    }
    assert!(largest <= MAX_CHUNK, "largest chunk {largest} bytes");
    assert!(chunks > 1, "the file came in one chunk: the encoder buffered the whole export");
    let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(file)).unwrap();
    assert_eq!(builder.metadata().file_metadata().num_rows(), RECORDS as i64);
    assert!(builder.metadata().num_row_groups() > 1);
}

#[test]
fn parquet_row_groups_of_large_records_are_bounded_by_size() {
    // 1,500 records with 32 KiB of poorly compressible output each: ~48 MB of text, far
    // fewer rows than a row group's row limit, so only the size limits can cut it.
    const RECORDS: u64 = 1_500;
    let input = futures::stream::iter((0..RECORDS).map(|i| {
        let mut r = small_record(i);
        r.tool_calls.push(ToolCall {
            tool_name: "kubectl".into(),
            tool_input: "logs web-1".into(),
            tool_observation: Some(noise(i, 32 * 1024)),
            sequence_number: 1,
            duration_ms: None,
            thought_sequence_number: None,
            error: None,
            ..ToolCall::new("", "")
        });
        Ok(r)
    }));
    let chunks: Vec<Bytes> = block_on(encode_stream(input, Format::Parquet).map(|c| c.unwrap()).collect());
    let largest = chunks.iter().map(Bytes::len).max().unwrap();
    assert!(largest <= 12 << 20, "largest chunk {largest} bytes");
    let builder = ParquetRecordBatchReaderBuilder::try_new(concat(&chunks)).unwrap();
    assert_eq!(builder.metadata().file_metadata().num_rows(), RECORDS as i64);
    assert!(builder.metadata().num_row_groups() > 1, "{} row groups", builder.metadata().num_row_groups());
    let last = builder.build().unwrap().last().unwrap().unwrap();
    let calls = last.column_by_name("tool_calls").unwrap().as_list::<i32>();
    let observation = calls.value(last.num_rows() - 1).as_struct().column(2).as_string::<i32>().value(0).to_string();
    assert_eq!(observation, noise(RECORDS - 1, 32 * 1024));
}

/// `len` hex digits from a xorshift seeded by `seed`: text that compresses about 2:1.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap()
        })
        .collect()
}

#[test]
fn text_formats_stream_in_chunks_of_about_chunk_bytes() {
    let records = varied_records(N);
    for format in [Format::Csv, Format::Json, Format::Ndjson] {
        let chunks = encode(&records, format);
        assert!(chunks.len() > 2, "{format}: {} chunks", chunks.len());
        // Every chunk but the last is at least CHUNK_BYTES and exceeds it by less than one
        // record (the fixture's records are a few KiB at most).
        for chunk in &chunks[..chunks.len() - 1] {
            assert!((CHUNK_BYTES..CHUNK_BYTES + 16 * 1024).contains(&chunk.len()), "{format}: {}", chunk.len());
        }
    }
}

#[test]
fn a_store_error_mid_stream_ends_the_stream_with_that_error() {
    for format in Format::ALL {
        let input = futures::stream::iter(
            varied_records(N)
                .into_iter()
                .map(Ok)
                .take(2_000)
                .chain([Err(StoreError::unavailable("connection reset by peer"))])
                .chain(varied_records(10).into_iter().map(Ok)),
        );
        let items: Vec<Result<Bytes, ExportError>> = block_on(encode_stream(input, format).collect());
        let (last, before) = items.split_last().unwrap();
        assert!(
            matches!(last, Err(ExportError::Store(StoreError::Unavailable(cause))) if cause.to_string() == "connection reset by peer"),
            "{format}: {last:?}"
        );
        assert!(before.iter().all(Result::is_ok), "{format}: only the last item is an error");
        let partial: Vec<u8> = before.iter().flat_map(|c| c.as_ref().unwrap().to_vec()).collect();
        if format == Format::Json {
            // No closing bracket after an error: a cut-off export never parses as complete.
            assert!(!partial.is_empty());
            assert!(serde_json::from_slice::<Vec<Interaction>>(&partial).is_err());
        }
        if format == Format::Parquet {
            assert!(ParquetRecordBatchReaderBuilder::try_new(Bytes::from(partial)).is_err());
        }
    }
}

#[test]
fn the_encoder_counts_records_and_its_pieces_make_the_file() {
    let records = varied_records(50);
    let mut encoder = Encoder::new(Format::Ndjson).unwrap();
    let mut file = Vec::new();
    for r in &records {
        encoder.push(r).unwrap();
        file.extend_from_slice(&encoder.take_output());
    }
    assert_eq!(encoder.records(), 50);
    assert!(encoder.take_output().is_empty(), "output is handed out once");
    file.extend_from_slice(&encoder.finish().unwrap());
    assert_eq!(Bytes::from(file), concat(&encode(&records, Format::Ndjson)));
}

#[test]
fn format_names_parse_and_unknown_ones_are_refused_naming_the_choices() {
    for format in Format::ALL {
        assert_eq!(Format::from_str(format.as_str()), Ok(format));
        assert_eq!(format.extension(), format.as_str());
    }
    assert_eq!(Format::from_str("CSV"), Ok(Format::Csv));
    let error = Format::from_str("xml").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("`xml`"), "{message}");
    for format in Format::ALL {
        assert!(message.contains(format.as_str()), "{message} does not name {format}");
    }
    assert_eq!(Format::Parquet.content_type(), "application/vnd.apache.parquet");
    assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
}

#[test]
fn file_names_carry_the_time_and_extension() {
    let at = Utc.with_ymd_and_hms(2026, 11, 25, 16, 30, 0).unwrap();
    assert_eq!(file_name(Format::Csv, at), "opsagent-audit-interactions-20261125T163000Z.csv");
    assert_eq!(file_name(Format::Parquet, at), "opsagent-audit-interactions-20261125T163000Z.parquet");
}
