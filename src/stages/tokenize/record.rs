//! One record, from raw bytes to typed content: UTF-8 check, JSON parsing and extraction of
//! the configured field(s), with a precise [`RecordProblem`] when something is wrong.
//! Runs on the worker threads, so JSON parsing is parallel too.

use serde_json::Value;

use super::config::{FieldSpec, SourceFormat};
use super::error::RecordProblem;

/// The speaker of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// Parses a `role` value; `index` is the message's position, for the error.
    pub(crate) fn parse(role: &str, index: usize) -> Result<Role, RecordProblem> {
        match role {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            other => Err(RecordProblem::UnknownRole {
                index,
                role: other.to_string(),
            }),
        }
    }

    /// The name written into templates.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub role: Role,
    pub content: String,
}

/// The typed content of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    Text(String),
    Chat(Vec<Message>),
    PromptCompletion { prompt: String, completion: String },
}

/// What a reader hands to the workers: bytes still to parse (text and JSONL), or content a
/// columnar reader already extracted (Parquet).
#[derive(Debug)]
pub(crate) enum Body {
    Bytes(Vec<u8>),
    Parsed(Result<Content, RecordProblem>),
}

/// Turns a record body into content.
pub(crate) fn parse(
    body: Body,
    format: SourceFormat,
    field: &FieldSpec,
) -> Result<Content, RecordProblem> {
    match body {
        Body::Parsed(result) => result,
        Body::Bytes(bytes) => match format {
            SourceFormat::Jsonl => parse_json(&bytes, field),
            SourceFormat::Text | SourceFormat::Parquet => {
                let text = into_utf8(bytes)?;
                check_non_empty("text", &text)?;
                Ok(Content::Text(text))
            }
        },
    }
}

fn into_utf8(bytes: Vec<u8>) -> Result<String, RecordProblem> {
    String::from_utf8(bytes).map_err(|e| RecordProblem::InvalidUtf8 {
        byte: e.utf8_error().valid_up_to(),
    })
}

/// A text that is empty or only whitespace is a bad record, never a silent empty example.
pub(crate) fn check_non_empty(field: &str, text: &str) -> Result<(), RecordProblem> {
    if text.trim().is_empty() {
        Err(RecordProblem::Empty {
            field: field.to_string(),
        })
    } else {
        Ok(())
    }
}

fn parse_json(bytes: &[u8], field: &FieldSpec) -> Result<Content, RecordProblem> {
    let text = std::str::from_utf8(bytes).map_err(|e| RecordProblem::InvalidUtf8 {
        byte: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(cut) => full[..cut].to_string(),
            None => full,
        };
        RecordProblem::InvalidJson {
            column: e.column(),
            message,
        }
    })?;
    let Value::Object(mut object) = value else {
        return Err(RecordProblem::NotAnObject {
            found: kind_of(&value),
        });
    };
    let mut take = |name: &str| {
        object
            .swap_remove(name)
            .ok_or_else(|| RecordProblem::MissingField {
                field: name.to_string(),
            })
    };
    match field {
        FieldSpec::Text(name) => {
            let text = json_string(name, take(name)?)?;
            check_non_empty(name, &text)?;
            Ok(Content::Text(text))
        }
        FieldSpec::PromptCompletion { prompt, completion } => {
            let p = json_string(prompt, take(prompt)?)?;
            let c = json_string(completion, take(completion)?)?;
            check_non_empty(completion, &c)?;
            Ok(Content::PromptCompletion {
                prompt: p,
                completion: c,
            })
        }
        FieldSpec::Messages(name) => json_messages(name, take(name)?),
    }
}

fn json_string(field: &str, value: Value) -> Result<String, RecordProblem> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(RecordProblem::WrongType {
            field: field.to_string(),
            expected: "a string",
            found: kind_of(&other).to_string(),
        }),
    }
}

fn json_messages(field: &str, value: Value) -> Result<Content, RecordProblem> {
    let Value::Array(items) = value else {
        return Err(RecordProblem::WrongType {
            field: field.to_string(),
            expected: "a list of {role, content} messages",
            found: kind_of(&value).to_string(),
        });
    };
    if items.is_empty() {
        return Err(RecordProblem::Empty {
            field: field.to_string(),
        });
    }
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(mut object) = item else {
            return Err(RecordProblem::WrongType {
                field: format!("{field}[{index}]"),
                expected: "an object {role, content}",
                found: kind_of(&item).to_string(),
            });
        };
        let mut get = |key: &str| {
            let value = object
                .swap_remove(key)
                .ok_or_else(|| RecordProblem::MissingField {
                    field: format!("{field}[{index}].{key}"),
                })?;
            json_string(&format!("{field}[{index}].{key}"), value)
        };
        let role = Role::parse(&get("role")?, index)?;
        let content = get("content")?;
        messages.push(Message { role, content });
    }
    Ok(Content::Chat(messages))
}

/// A word for the JSON type of `value`, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl(line: &str, field: &FieldSpec) -> Result<Content, RecordProblem> {
        parse(
            Body::Bytes(line.as_bytes().to_vec()),
            SourceFormat::Jsonl,
            field,
        )
    }

    #[test]
    fn text_field() {
        let f = FieldSpec::default();
        assert_eq!(
            jsonl(r#"{"text": "hi", "x": 1}"#, &f),
            Ok(Content::Text("hi".into()))
        );
        assert_eq!(
            jsonl(r#"{"txt": "hi"}"#, &f).unwrap_err().to_string(),
            "missing field \"text\""
        );
        assert_eq!(
            jsonl(r#"{"text": 3}"#, &f).unwrap_err().to_string(),
            "field \"text\" must be a string, found a number"
        );
        assert_eq!(
            jsonl(r#"{"text": "  "}"#, &f).unwrap_err().to_string(),
            "field \"text\" is empty"
        );
        assert_eq!(
            jsonl("[1]", &f).unwrap_err().to_string(),
            "expected a JSON object, found a list"
        );
        let err = jsonl(r#"{"text": "a""#, &f).unwrap_err();
        assert!(
            matches!(err, RecordProblem::InvalidJson { column: 12, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_byte() {
        let body = Body::Bytes(vec![b'a', b'b', 0xff]);
        let err = parse(body, SourceFormat::Text, &FieldSpec::default()).unwrap_err();
        assert_eq!(err, RecordProblem::InvalidUtf8 { byte: 2 });
    }

    #[test]
    fn messages() {
        let f = FieldSpec::Messages("messages".into());
        let ok = jsonl(
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            &f,
        );
        assert_eq!(
            ok,
            Ok(Content::Chat(vec![
                Message {
                    role: Role::User,
                    content: "q".into()
                },
                Message {
                    role: Role::Assistant,
                    content: "a".into()
                },
            ]))
        );
        let bad_role = jsonl(r#"{"messages": [{"role": "bot", "content": "q"}]}"#, &f);
        assert!(bad_role
            .unwrap_err()
            .to_string()
            .contains("unknown role \"bot\""));
        let missing = jsonl(r#"{"messages": [{"role": "user"}]}"#, &f);
        assert_eq!(
            missing.unwrap_err().to_string(),
            "missing field \"messages[0].content\""
        );
        assert!(jsonl(r#"{"messages": []}"#, &f).is_err());
    }

    #[test]
    fn prompt_completion() {
        let f = FieldSpec::PromptCompletion {
            prompt: "p".into(),
            completion: "c".into(),
        };
        assert_eq!(
            jsonl(r#"{"p": "", "c": "x"}"#, &f),
            Ok(Content::PromptCompletion {
                prompt: "".into(),
                completion: "x".into()
            })
        );
        assert_eq!(
            jsonl(r#"{"p": "x"}"#, &f).unwrap_err().to_string(),
            "missing field \"c\""
        );
    }
}
