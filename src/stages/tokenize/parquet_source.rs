//! Reading Parquet inputs: the columns named by `field` (string columns, or for chats a
//! `list<struct<role: string, content: string>>` column), row by row, each row a record
//! located by its 1-based row number. A missing column or a column of the wrong type is a
//! schema error for the whole file, not a bad record.

use std::fs::File;

use arrow::array::{Array, AsArray, GenericListArray, OffsetSizeTrait, StructArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::chunk::{ChunkSink, Stopped};
use super::config::FieldSpec;
use super::error::{RecordProblem, TokenizeError};
use super::record::{check_non_empty, Body, Content, Message, Role};
use super::source::InputFile;

/// Rows decoded at a time.
const BATCH_ROWS: usize = 1024;

/// Reads one Parquet file into `sink`; returns its blake3 hash (hex).
pub(crate) fn read(
    index: usize,
    file: &InputFile,
    field: &FieldSpec,
    sink: &mut ChunkSink<'_>,
) -> Result<Result<String, Stopped>, TokenizeError> {
    let err = |message: String| TokenizeError::Parquet {
        path: file.display.clone().into(),
        message,
    };
    let handle = File::open(&file.path).map_err(|e| TokenizeError::io(&file.display, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| err(e.to_string()))?;
    let schema = builder.schema().clone();
    let mut roots = Vec::new();
    for name in field.names() {
        match schema.index_of(name) {
            Ok(i) => roots.push(i),
            Err(_) => {
                let columns: Vec<&str> =
                    schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(err(format!(
                    "no column \"{name}\" (columns: {})",
                    columns.join(", ")
                )));
            }
        }
    }
    let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut row = 0u64;
    let mut bytes_done = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| err(format!("no column \"{name}\"")))
        };
        let rows = batch.num_rows();
        let mut contents: Vec<Result<Content, RecordProblem>> = Vec::with_capacity(rows);
        match field {
            FieldSpec::Text(name) => {
                let col = column(name)?;
                let col = StrCol::new(col.as_ref())
                    .ok_or_else(|| wrong_type(name, col.data_type(), "a string"))
                    .map_err(err)?;
                for i in 0..rows {
                    contents.push(text_at(&col, name, i).map(Content::Text));
                }
            }
            FieldSpec::PromptCompletion { prompt, completion } => {
                let (p, c) = (column(prompt)?, column(completion)?);
                let pc = StrCol::new(p.as_ref())
                    .ok_or_else(|| err(wrong_type(prompt, p.data_type(), "a string")))?;
                let cc = StrCol::new(c.as_ref())
                    .ok_or_else(|| err(wrong_type(completion, c.data_type(), "a string")))?;
                for i in 0..rows {
                    contents.push(prompt_completion_at(&pc, &cc, prompt, completion, i));
                }
            }
            FieldSpec::Messages(name) => {
                let col = column(name)?;
                let expected = "a list<struct<role: string, content: string>>";
                let bad = || err(wrong_type(name, col.data_type(), expected));
                if let Some(list) = col.as_list_opt::<i32>() {
                    let chat = ChatCol::new(list).ok_or_else(bad)?;
                    contents.extend((0..rows).map(|i| chat.at(name, i)));
                } else if let Some(list) = col.as_list_opt::<i64>() {
                    let chat = ChatCol::new(list).ok_or_else(bad)?;
                    contents.extend((0..rows).map(|i| chat.at(name, i)));
                } else {
                    return Err(bad());
                }
            }
        }
        for content in contents {
            row += 1;
            let size = match &content {
                Ok(c) => content_size(c),
                Err(_) => 1,
            };
            if let Err(stop) = sink.record(index, row, Body::Parsed(content), size) {
                return Ok(Err(stop));
            }
        }
        // Progress in bytes: the file's share of rows done so far.
        let done = (file.size as u128 * row as u128 / total_rows.max(1) as u128) as u64;
        sink.bytes(done.saturating_sub(bytes_done));
        bytes_done = done.max(bytes_done);
    }
    sink.bytes(file.size.saturating_sub(bytes_done));
    if row == 0 {
        sink.empty_file(index);
    }
    let mut hasher = blake3::Hasher::new();
    let mut handle = File::open(&file.path).map_err(|e| TokenizeError::io(&file.display, e))?;
    std::io::copy(&mut handle, &mut hasher).map_err(|e| TokenizeError::io(&file.display, e))?;
    Ok(Ok(hasher.finalize().to_hex().to_string()))
}

fn wrong_type(name: &str, found: &DataType, expected: &str) -> String {
    format!("column \"{name}\" has type {found}, expected {expected}")
}

fn content_size(content: &Content) -> usize {
    match content {
        Content::Text(t) => t.len(),
        Content::PromptCompletion { prompt, completion } => prompt.len() + completion.len(),
        Content::Chat(m) => m.iter().map(|m| m.content.len() + 8).sum(),
    }
}

/// A string column of any of Arrow's string layouts.
enum StrCol<'a> {
    Utf8(&'a arrow::array::StringArray),
    Large(&'a arrow::array::LargeStringArray),
    View(&'a arrow::array::StringViewArray),
}

impl<'a> StrCol<'a> {
    fn new(array: &'a dyn Array) -> Option<Self> {
        if let Some(a) = array.as_string_opt::<i32>() {
            Some(StrCol::Utf8(a))
        } else if let Some(a) = array.as_string_opt::<i64>() {
            Some(StrCol::Large(a))
        } else {
            array.as_string_view_opt().map(StrCol::View)
        }
    }

    /// The string at `i`, or `None` when null.
    fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            StrCol::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            StrCol::Large(a) => a.is_valid(i).then(|| a.value(i)),
            StrCol::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

fn string_at(col: &StrCol<'_>, field: &str, i: usize) -> Result<String, RecordProblem> {
    col.get(i)
        .map(str::to_string)
        .ok_or_else(|| RecordProblem::WrongType {
            field: field.to_string(),
            expected: "a string",
            found: "null".to_string(),
        })
}

fn text_at(col: &StrCol<'_>, field: &str, i: usize) -> Result<String, RecordProblem> {
    let text = string_at(col, field, i)?;
    check_non_empty(field, &text)?;
    Ok(text)
}

fn prompt_completion_at(
    p: &StrCol<'_>,
    c: &StrCol<'_>,
    prompt: &str,
    completion: &str,
    i: usize,
) -> Result<Content, RecordProblem> {
    Ok(Content::PromptCompletion {
        prompt: string_at(p, prompt, i)?,
        completion: text_at(c, completion, i)?,
    })
}

/// A `list<struct<role, content>>` column.
struct ChatCol<'a, O: OffsetSizeTrait> {
    list: &'a GenericListArray<O>,
    items: &'a StructArray,
    role: StrCol<'a>,
    content: StrCol<'a>,
}

impl<'a, O: OffsetSizeTrait> ChatCol<'a, O> {
    fn new(list: &'a GenericListArray<O>) -> Option<Self> {
        let items: &StructArray = list.values().as_struct_opt()?;
        Some(ChatCol {
            list,
            items,
            role: StrCol::new(items.column_by_name("role")?.as_ref())?,
            content: StrCol::new(items.column_by_name("content")?.as_ref())?,
        })
    }

    fn at(&self, field: &str, i: usize) -> Result<Content, RecordProblem> {
        if self.list.is_null(i) {
            return Err(RecordProblem::WrongType {
                field: field.to_string(),
                expected: "a list of messages",
                found: "null".to_string(),
            });
        }
        let offsets = self.list.value_offsets();
        let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
        if start == end {
            return Err(RecordProblem::Empty {
                field: field.to_string(),
            });
        }
        let mut messages = Vec::with_capacity(end - start);
        for (index, j) in (start..end).enumerate() {
            if self.items.is_null(j) {
                return Err(RecordProblem::WrongType {
                    field: format!("{field}[{index}]"),
                    expected: "an object {role, content}",
                    found: "null".to_string(),
                });
            }
            let role = string_at(&self.role, &format!("{field}[{index}].role"), j)?;
            let content = string_at(&self.content, &format!("{field}[{index}].content"), j)?;
            messages.push(Message {
                role: Role::parse(&role, index)?,
                content,
            });
        }
        Ok(Content::Chat(messages))
    }
}
