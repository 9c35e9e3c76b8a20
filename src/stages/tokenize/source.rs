//! Finding the input files (a path or a sorted glob) and reading text and JSONL files into
//! records that remember their file and line. Parquet is in [`super::parquet_source`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::chunk::{ChunkSink, Stopped};
use super::config::{FieldSpec, SourceFormat, TextSplit};
use super::error::TokenizeError;
use super::parquet_source;
use super::record::Body;

/// One input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// The path as the user would write it: relative to the workspace, `/`-separated.
    pub display: String,
    /// The path to open.
    pub path: PathBuf,
    /// Size in bytes when it was found.
    pub size: u64,
}

/// The files `pattern` (relative to `workspace`) names: the file itself, or every file a glob
/// (`*`, `?`, `[..]`, `**`; `*` does not cross `/`) matches, sorted by path so that the
/// order, and so the output, never depends on the file system.
pub fn resolve_inputs(pattern: &str, workspace: &Path) -> Result<Vec<InputFile>, TokenizeError> {
    let is_glob = pattern.contains(['*', '?', '[']);
    let paths: Vec<PathBuf> = if is_glob {
        let base = workspace.to_str().ok_or_else(|| {
            TokenizeError::config("source.path", "the workspace path is not valid UTF-8")
        })?;
        let full = if Path::new(pattern).is_absolute() {
            pattern.to_string()
        } else {
            format!("{}/{pattern}", glob::Pattern::escape(base))
        };
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let matches = glob::glob_with(&full, options).map_err(|e| {
            TokenizeError::config("source.path", format!("bad glob `{pattern}`: {e}"))
        })?;
        let mut paths = Vec::new();
        for entry in matches {
            let path = entry.map_err(|e| {
                let path = e.path().to_path_buf();
                TokenizeError::io(path, e.into())
            })?;
            if path.is_file() {
                paths.push(path);
            }
        }
        paths
    } else {
        let path = workspace.join(pattern);
        if !path.is_file() {
            return Err(TokenizeError::NoInputFiles {
                pattern: pattern.to_string(),
            });
        }
        vec![path]
    };
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let size = std::fs::metadata(&path)
            .map_err(|e| TokenizeError::io(&path, e))?
            .len();
        files.push(InputFile {
            display: display_path(&path, workspace),
            path,
            size,
        });
    }
    if files.is_empty() {
        return Err(TokenizeError::NoInputFiles {
            pattern: pattern.to_string(),
        });
    }
    files.sort_by(|a, b| a.display.cmp(&b.display));
    Ok(files)
}

/// `path` relative to `workspace` with `/` separators (or as it is, if outside).
fn display_path(path: &Path, workspace: &Path) -> String {
    let rel = path.strip_prefix(workspace).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("/")
}

/// Reads every file in order into `sink`; returns each file's blake3 hash (hex), in order.
/// Stops early (returning `Ok` with what it has) when the sink says so.
pub(crate) fn read_inputs(
    files: &[InputFile],
    format: SourceFormat,
    text_split: TextSplit,
    field: &FieldSpec,
    sink: &mut ChunkSink<'_>,
) -> Result<Vec<String>, TokenizeError> {
    let mut hashes = Vec::with_capacity(files.len());
    for (index, file) in files.iter().enumerate() {
        let outcome = match format {
            SourceFormat::Parquet => parquet_source::read(index, file, field, sink),
            SourceFormat::Jsonl => read_lines(index, file, TextSplit::Line, sink),
            SourceFormat::Text => read_lines(index, file, text_split, sink),
        };
        match outcome? {
            Ok(hash) => hashes.push(hash),
            Err(Stopped) => return Ok(hashes),
        }
    }
    if sink.flush().is_err() {
        return Ok(hashes);
    }
    Ok(hashes)
}

/// A reader that hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A byte order mark, dropped from the start of a text or JSONL file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

type ReadOutcome = Result<Result<String, Stopped>, TokenizeError>;

/// Reads a text or JSONL file line by line, cutting records by `split`; a UTF-8 byte order
/// mark at the start of the file is dropped.
fn read_lines(
    index: usize,
    file: &InputFile,
    split: TextSplit,
    sink: &mut ChunkSink<'_>,
) -> ReadOutcome {
    let io = |e| TokenizeError::io(&file.display, e);
    let handle = File::open(&file.path).map_err(io)?;
    let mut reader = BufReader::with_capacity(
        1 << 18,
        Hashing {
            inner: handle,
            hasher: blake3::Hasher::new(),
        },
    );
    let mut records = 0u64;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    // For paragraphs: the text so far and the line it started on.
    let mut para: Vec<u8> = Vec::new();
    let mut para_start = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        sink.bytes(n as u64);
        line_no += 1;
        if line_no == 1 && line.starts_with(UTF8_BOM) {
            line.drain(..UTF8_BOM.len());
        }
        if split == TextSplit::Document {
            para.extend_from_slice(&line);
            continue;
        }
        strip_line_ending(&mut line);
        let blank = line.iter().all(u8::is_ascii_whitespace);
        match split {
            TextSplit::Line if !blank => {
                let size = line.len();
                records += 1;
                if let Err(stop) =
                    sink.record(index, line_no, Body::Bytes(std::mem::take(&mut line)), size)
                {
                    return Ok(Err(stop));
                }
            }
            TextSplit::Paragraph if !blank => {
                if para.is_empty() {
                    para_start = line_no;
                } else {
                    para.push(b'\n');
                }
                para.extend_from_slice(&line);
            }
            TextSplit::Paragraph if !para.is_empty() => {
                let size = para.len();
                records += 1;
                if let Err(stop) = sink.record(
                    index,
                    para_start,
                    Body::Bytes(std::mem::take(&mut para)),
                    size,
                ) {
                    return Ok(Err(stop));
                }
            }
            _ => {}
        }
    }
    let last_start = if split == TextSplit::Document {
        1
    } else {
        para_start
    };
    if !para.is_empty() && !para.iter().all(u8::is_ascii_whitespace) {
        let size = para.len();
        records += 1;
        if let Err(stop) = sink.record(index, last_start, Body::Bytes(para), size) {
            return Ok(Err(stop));
        }
    }
    if records == 0 {
        sink.empty_file(index);
    }
    let hash = reader.into_inner().hasher.finalize().to_hex().to_string();
    Ok(Ok(hash))
}

/// Removes a trailing `\n` or `\r\n`.
fn strip_line_ending(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::tokenize::chunk::{Chunk, Event};
    use std::sync::atomic::AtomicBool;

    /// Reads `content` as one file and returns (line, text) per record, or "EMPTY".
    fn records(content: &[u8], split: TextSplit) -> Vec<(u64, String)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), content).unwrap();
        let files = resolve_inputs("a.txt", dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(64);
        let cancel = AtomicBool::new(false);
        let mut sink = ChunkSink::new(tx, &cancel);
        read_inputs(
            &files,
            SourceFormat::Text,
            split,
            &FieldSpec::default(),
            &mut sink,
        )
        .unwrap();
        drop(sink);
        let mut out = Vec::new();
        for chunk in rx {
            for event in chunk.events {
                match event {
                    Event::Record(r) => match r.body {
                        Body::Bytes(b) => out.push((r.number, String::from_utf8(b).unwrap())),
                        Body::Parsed(_) => unreachable!(),
                    },
                    Event::EmptyFile(_) => out.push((0, "EMPTY".into())),
                }
            }
        }
        out
    }

    #[test]
    fn lines_skip_blank_lines_and_keep_numbers() {
        let got = records(b"a\r\n\n  \nb c\nlast", TextSplit::Line);
        assert_eq!(
            got,
            vec![(1, "a".into()), (4, "b c".into()), (5, "last".into())]
        );
    }

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let got = records(b"\xEF\xBB\xBFfirst\nsecond\n", TextSplit::Line);
        assert_eq!(got, vec![(1, "first".into()), (2, "second".into())]);
    }

    #[test]
    fn paragraphs_join_lines_and_start_at_their_first_line() {
        let got = records(b"\na\nb\n\n\nc\n", TextSplit::Paragraph);
        assert_eq!(got, vec![(2, "a\nb".into()), (6, "c".into())]);
    }

    #[test]
    fn document_is_the_file_as_is() {
        let got = records(b"a\n\nb\n", TextSplit::Document);
        assert_eq!(got, vec![(1, "a\n\nb\n".into())]);
    }

    #[test]
    fn empty_files_are_reported() {
        assert_eq!(
            records(b"\n \n", TextSplit::Line),
            vec![(0, "EMPTY".into())]
        );
        assert_eq!(records(b"", TextSplit::Document), vec![(0, "EMPTY".into())]);
    }

    #[test]
    fn globs_are_sorted_and_relative() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d/sub")).unwrap();
        for name in ["d/b.jsonl", "d/a.jsonl", "d/c.txt", "d/sub/e.jsonl"] {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let names = |p: &str| -> Vec<String> {
            resolve_inputs(p, dir.path())
                .unwrap()
                .into_iter()
                .map(|f| f.display)
                .collect()
        };
        assert_eq!(names("d/*.jsonl"), ["d/a.jsonl", "d/b.jsonl"]);
        assert_eq!(
            names("d/**/*.jsonl"),
            ["d/a.jsonl", "d/b.jsonl", "d/sub/e.jsonl"]
        );
        assert!(matches!(
            resolve_inputs("d/*.parquet", dir.path()),
            Err(TokenizeError::NoInputFiles { .. })
        ));
        assert!(matches!(
            resolve_inputs("nope.jsonl", dir.path()),
            Err(TokenizeError::NoInputFiles { .. })
        ));
    }
}
