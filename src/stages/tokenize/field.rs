//! The `field:` key: which part of each record is the training text, and what shape it has.
//!
//! ```yaml
//! field: text                              # a string field named `text` (the default)
//! field: messages                          # a chat: a list of {role, content} named `messages`
//! field: {text: body}                      # a string field with another name
//! field: {messages: conversation}          # a chat under another name
//! field: {prompt: question, completion: answer}   # two string fields
//! ```
//!
//! A bare string is a field name; the one name `messages` means a chat. The map form names
//! the shape explicitly, so a plain-text field that happens to be called `messages` can
//! still be read with `{text: messages}`.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which field(s) of a record hold the example, and how to read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSpec {
    /// One string field: the whole text is the example (every token counts toward the loss).
    Text(String),
    /// A list of `{role, content}` messages rendered with `chat_template`.
    Messages(String),
    /// Two string fields: `prompt` then `completion`, concatenated with nothing in between;
    /// with `mask_prompt` only the completion counts toward the loss.
    PromptCompletion { prompt: String, completion: String },
}

impl Default for FieldSpec {
    /// `field: text`.
    fn default() -> Self {
        FieldSpec::Text("text".to_string())
    }
}

impl FieldSpec {
    /// The field names read from each record, in a fixed order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            FieldSpec::Text(name) | FieldSpec::Messages(name) => vec![name],
            FieldSpec::PromptCompletion { prompt, completion } => vec![prompt, completion],
        }
    }
}

impl Serialize for FieldSpec {
    /// Always the explicit map form, so a manifest says the shape as well as the name.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            FieldSpec::Text(name) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("text", name)?;
                map.end()
            }
            FieldSpec::Messages(name) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("messages", name)?;
                map.end()
            }
            FieldSpec::PromptCompletion { prompt, completion } => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("prompt", prompt)?;
                map.serialize_entry("completion", completion)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

/// Reads either a bare field name or the explicit map form.
struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = FieldSpec;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a field name (`text`, `messages`, ...) or a map {text: NAME}, {messages: NAME} \
             or {prompt: NAME, completion: NAME}",
        )
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<FieldSpec, E> {
        if value.is_empty() {
            return Err(E::custom("the field name is empty"));
        }
        Ok(if value == "messages" {
            FieldSpec::Messages(value.to_string())
        } else {
            FieldSpec::Text(value.to_string())
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldSpec, A::Error> {
        let (mut text, mut messages, mut prompt, mut completion) = (None, None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            let slot = match key.as_str() {
                "text" => &mut text,
                "messages" => &mut messages,
                "prompt" => &mut prompt,
                "completion" => &mut completion,
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["text", "messages", "prompt", "completion"],
                    ));
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let name: String = map.next_value()?;
            if name.is_empty() {
                return Err(de::Error::custom(format!("`{key}` names an empty field")));
            }
            *slot = Some(name);
        }
        match (text, messages, prompt, completion) {
            (Some(t), None, None, None) => Ok(FieldSpec::Text(t)),
            (None, Some(m), None, None) => Ok(FieldSpec::Messages(m)),
            (None, None, Some(prompt), Some(completion)) => {
                Ok(FieldSpec::PromptCompletion { prompt, completion })
            }
            (None, None, Some(_), None) => Err(de::Error::missing_field("completion")),
            (None, None, None, Some(_)) => Err(de::Error::missing_field("prompt")),
            _ => Err(de::Error::custom(
                "give exactly one of {text: NAME}, {messages: NAME} or \
                 {prompt: NAME, completion: NAME}",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FieldSpec, String> {
        serde_saphyr::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn bare_names() {
        assert_eq!(parse("text").unwrap(), FieldSpec::Text("text".into()));
        assert_eq!(parse("body").unwrap(), FieldSpec::Text("body".into()));
        assert_eq!(
            parse("messages").unwrap(),
            FieldSpec::Messages("messages".into())
        );
    }

    #[test]
    fn map_forms() {
        assert_eq!(
            parse("{messages: conv}").unwrap(),
            FieldSpec::Messages("conv".into())
        );
        assert_eq!(
            parse("{text: messages}").unwrap(),
            FieldSpec::Text("messages".into())
        );
        assert_eq!(
            parse("{prompt: p, completion: c}").unwrap(),
            FieldSpec::PromptCompletion {
                prompt: "p".into(),
                completion: "c".into()
            }
        );
    }

    #[test]
    fn map_errors_name_the_problem() {
        assert!(parse("{prompt: p}").unwrap_err().contains("completion"));
        assert!(parse("{text: a, messages: b}")
            .unwrap_err()
            .contains("exactly one"));
        assert!(parse("{answer: a}").unwrap_err().contains("answer"));
    }

    #[test]
    fn serializes_to_the_explicit_form() {
        let json = serde_json::to_string(&FieldSpec::Messages("messages".into())).unwrap();
        assert_eq!(json, r#"{"messages":"messages"}"#);
    }
}
