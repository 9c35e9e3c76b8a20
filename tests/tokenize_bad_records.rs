//! Bad input never panics and is never dropped silently: with `on_bad_record: error` the
//! error names the file and line (or Parquet row); with `skip` the summary and manifest
//! count every skipped record. Also: Parquet inputs, cancellation, a non-empty output folder.

mod tokenize_util;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use taper::stages::tokenize::{self, TokenizeError};
use tokenize_util::{config, Workspace};

const JSONL: &str =
    "tokenizer: tok/tokenizer.json\nsource: {path: \"data/*.jsonl\"}\nsplit: {valid: 0}\n";

fn err(ws: &Workspace, yaml: &str) -> String {
    ws.run(yaml).unwrap_err().to_string()
}

#[test]
fn each_kind_of_bad_record_names_file_and_line() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"{\"text\": \"ok\"}\n\n{\"txt\": \"x\"}\n",
            "data/chat.jsonl:3: missing field \"text\"",
        ),
        (
            b"{\"text\": \"ok\"}\n{\"text\": \"a\",}\n",
            "data/chat.jsonl:2: invalid JSON at column 14: trailing comma",
        ),
        (
            b"{\"text\": 5}\n",
            "data/chat.jsonl:1: field \"text\" must be a string, found a number",
        ),
        (
            b"[\"text\"]\n",
            "data/chat.jsonl:1: expected a JSON object, found a list",
        ),
        (
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n",
            "data/chat.jsonl:2: invalid UTF-8 at byte 10",
        ),
        (
            b"{\"text\": \" \"}\n",
            "data/chat.jsonl:1: field \"text\" is empty",
        ),
        (b"\n\n", "data/chat.jsonl: file has no records"),
        (b"", "data/chat.jsonl: file has no records"),
    ];
    for (content, expected) in cases {
        let ws = Workspace::new();
        ws.write("data/chat.jsonl", content);
        assert_eq!(err(&ws, JSONL), *expected);
    }
}

#[test]
fn chat_records_name_the_message() {
    let ws = Workspace::new();
    ws.write(
        "data/chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}\n",
    );
    let yaml = JSONL.replace("split:", "field: messages\nsplit:");
    assert_eq!(
        err(&ws, &yaml),
        "data/chat.jsonl:2: message 1: unknown role \"bot\" (expected system, user, assistant or tool)"
    );
}

#[test]
fn invalid_utf8_in_text_files() {
    let ws = Workspace::new();
    ws.write("data/a.txt", b"fine\nbad \xc3\x28 here\n");
    let yaml = "tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\n";
    assert_eq!(err(&ws, yaml), "data/a.txt:2: invalid UTF-8 at byte 4");
}

#[test]
fn the_first_bad_record_in_input_order_is_reported() {
    let ws = Workspace::new();
    ws.write("data/a.jsonl", "{\"text\": \"ok\"}\n{\"nope\": 1}\n");
    ws.write("data/b.jsonl", "{\"text\": 1}\n");
    assert_eq!(err(&ws, JSONL), "data/a.jsonl:2: missing field \"text\"");
}

#[test]
fn skip_mode_counts_every_skipped_record() {
    let ws = Workspace::new();
    ws.write(
        "data/a.jsonl",
        "{\"text\": \"ok\"}\n{\"nope\": 1}\nnot json\n{\"text\": \"fine\"}\n",
    );
    ws.write("data/b.jsonl", "\n");
    ws.write(
        "data/c.jsonl",
        b"{\"text\": \"\xff\"}\n{\"text\": \"last\"}\n",
    );
    let summary = ws.run(&format!("{JSONL}on_bad_record: skip\n")).unwrap();
    assert_eq!(summary.records, 6);
    assert_eq!(summary.skipped, 3);
    assert_eq!(summary.train.examples, 3);
    assert_eq!(
        summary.skipped_samples,
        [
            "data/a.jsonl:2: missing field \"text\"",
            "data/a.jsonl:3: invalid JSON at column 2: expected ident",
            "data/c.jsonl:1: invalid UTF-8 at byte 10",
        ]
    );
    assert_eq!(summary.empty_files, ["data/b.jsonl"]);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ws.path().join("out/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["skipped"], 3);
    assert_eq!(manifest["records"], 6);
    assert_eq!(manifest["empty_files"][0], "data/b.jsonl");
}

#[test]
fn all_records_skipped_is_an_error() {
    let ws = Workspace::new();
    ws.write("data/a.jsonl", "{\"x\": 1}\n");
    let e = ws
        .run(&format!("{JSONL}on_bad_record: skip\n"))
        .unwrap_err();
    assert!(matches!(e, TokenizeError::NoRecords { skipped: 1 }), "{e}");
}

#[test]
fn missing_inputs_and_tokenizer_are_named() {
    let ws = Workspace::new();
    assert_eq!(
        err(&ws, JSONL),
        "tokenize config `source.path`: `data/*.jsonl` matches no file"
    );
    ws.write("data/a.jsonl", "{\"text\": \"x\"}\n");
    let e = err(
        &ws,
        &JSONL.replace("tok/tokenizer.json", "tok/missing.json"),
    );
    assert!(e.starts_with("tok/missing.json: "), "{e}");
    ws.write("tok/bad.json", "{}");
    let e = err(&ws, &JSONL.replace("tok/tokenizer.json", "tok/bad.json"));
    assert!(e.starts_with("tokenizer tok/bad.json: "), "{e}");
}

fn write_parquet(ws: &Workspace, rel: &str, columns: Vec<(&str, ArrayRef)>) {
    let schema = Schema::new(
        columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let path = ws.path().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_inputs_read_and_report_rows() {
    let ws = Workspace::new();
    let text: ArrayRef = Arc::new(StringArray::from(vec![Some("hello"), None, Some("world")]));
    write_parquet(
        &ws,
        "data/a.parquet",
        vec![
            ("text", text),
            ("n", Arc::new(StringArray::from(vec!["1", "2", "3"]))),
        ],
    );
    let yaml = "tokenizer: tok/tokenizer.json\nsource: {path: data/a.parquet}\nsplit: {valid: 0}\n";
    assert_eq!(
        err(&ws, yaml),
        "data/a.parquet: row 2: field \"text\" must be a string, found null"
    );
    let summary = ws
        .run_in(&format!("{yaml}on_bad_record: skip\n"), "skip", 1)
        .unwrap();
    assert_eq!(
        (summary.records, summary.skipped, summary.train.examples),
        (3, 1, 2)
    );
    let rows = ws.rows_with_ids("skip", "train");
    let tok = tokenize_util::reference_tokenizer();
    let mut want = vec![1];
    want.extend(tokenize_util::ids(&tok, "hello"));
    want.push(2);
    want.push(1);
    want.extend(tokenize_util::ids(&tok, "world"));
    want.push(2);
    assert_eq!(rows[0].0.input_ids, want);

    let other = ws.run_in(
        &yaml
            .replace("split:", "field: body\nsplit:")
            .replace("data/a.parquet}", "data/a.parquet, format: parquet}"),
        "o",
        1,
    );
    assert_eq!(
        other.unwrap_err().to_string(),
        "data/a.parquet: parquet: no column \"body\" (columns: text, n)"
    );
}

#[test]
fn parquet_chat_column_matches_jsonl() {
    use arrow::array::{Array, ListArray, StructArray};
    use arrow::buffer::OffsetBuffer;
    let ws = Workspace::new();
    let roles: ArrayRef = Arc::new(StringArray::from(vec![
        "user",
        "assistant",
        "user",
        "assistant",
    ]));
    let contents: ArrayRef = Arc::new(StringArray::from(vec!["Hi", "Hello!", "2+2?", "4"]));
    let items = StructArray::from(vec![
        (
            Arc::new(Field::new("role", arrow::datatypes::DataType::Utf8, true)),
            roles,
        ),
        (
            Arc::new(Field::new(
                "content",
                arrow::datatypes::DataType::Utf8,
                true,
            )),
            contents,
        ),
    ]);
    let item_field = Arc::new(Field::new("item", items.data_type().clone(), true));
    let list = ListArray::try_new(
        item_field,
        OffsetBuffer::from_lengths([2, 2]),
        Arc::new(items),
        None,
    )
    .unwrap();
    write_parquet(
        &ws,
        "pq/chat.parquet",
        vec![("messages", Arc::new(list) as ArrayRef)],
    );
    let m = |r: &str, c: &str| serde_json::json!({"role": r, "content": c});
    let lines = [
        serde_json::json!({"messages": [m("user", "Hi"), m("assistant", "Hello!")]}),
        serde_json::json!({"messages": [m("user", "2+2?"), m("assistant", "4")]}),
    ];
    ws.write(
        "js/chat.jsonl",
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    );
    let yaml = |path: &str| {
        format!("tokenizer: tok/tokenizer.json\nsource: {{path: {path}}}\nfield: messages\nsplit: {{valid: 0}}\n")
    };
    ws.run_in(&yaml("pq/chat.parquet"), "pq_out", 2).unwrap();
    ws.run_in(&yaml("js/chat.jsonl"), "js_out", 2).unwrap();
    let (pq, js) = (
        ws.rows_with_ids("pq_out", "train"),
        ws.rows_with_ids("js_out", "train"),
    );
    assert_eq!(pq, js);
    assert!(pq[0].0.loss_mask.iter().any(|m| *m));
}

#[test]
fn cancel_stops_the_run() {
    let ws = Workspace::new();
    ws.write("data/a.jsonl", "{\"text\": \"x\"}\n");
    let cfg = config(JSONL);
    let cancel = AtomicBool::new(true);
    let out = ws.path().join("out");
    let e = tokenize::run(&cfg, ws.path(), &out, &|_| {}, &cancel).unwrap_err();
    assert!(matches!(e, TokenizeError::Cancelled), "{e}");
    // Raised while running (here from the progress callback), it still ends in Cancelled.
    let cancel = AtomicBool::new(false);
    let raise = |_: &tokenize::Progress| cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let e = tokenize::run(&cfg, ws.path(), &ws.path().join("out2"), &raise, &cancel).unwrap_err();
    assert!(matches!(e, TokenizeError::Cancelled), "{e}");
}

#[test]
fn output_folder_must_be_empty() {
    let ws = Workspace::new();
    ws.write("data/a.jsonl", "{\"text\": \"x\"}\n");
    ws.write("out/stale.txt", "old");
    assert!(matches!(
        ws.run(JSONL).unwrap_err(),
        TokenizeError::OutputNotEmpty { .. }
    ));
}

#[test]
fn progress_reports_bytes_records_and_tokens() {
    let ws = Workspace::new();
    let data = "{\"text\": \"one two\"}\n{\"text\": \"three\"}\n";
    ws.write("data/a.jsonl", data);
    let cfg = config(JSONL);
    let seen = std::sync::Mutex::new(Vec::new());
    let summary = tokenize::run(
        &cfg,
        ws.path(),
        &ws.path().join("out"),
        &|p| seen.lock().unwrap().push(p.clone()),
        &AtomicBool::new(false),
    )
    .unwrap();
    let seen = seen.into_inner().unwrap();
    let last = seen.last().unwrap();
    assert_eq!(
        (last.bytes_read, last.bytes_total),
        (data.len() as u64, data.len() as u64)
    );
    assert_eq!(last.records, 2);
    assert_eq!(last.tokens, summary.train.tokens);
}
