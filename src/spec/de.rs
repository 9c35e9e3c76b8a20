//! Typed values out of [`Node`]s, with errors that say where.
//!
//! A serde `Deserializer` over the node tree. It is how a stage kind turns its `with:`
//! block into its typed configuration: unknown keys, wrong types and bad values come back
//! as a [`DeError`] carrying the line:column of the offending key or value, its key path
//! (`with.optimizer.lr`) and, for a misspelt key, a "did you mean" suggestion.

use super::node::{Node, Pos, Value};
use serde::de::{self, DeserializeSeed, Error as _, IntoDeserializer, Visitor};
use std::fmt;

/// A rejected value: what is wrong, where, and at which key path.
#[derive(Clone, Debug, PartialEq)]
pub struct DeError {
    /// What is wrong.
    pub message: String,
    /// Where; unknown until a node claims the error.
    pub pos: Option<Pos>,
    /// The key path below the deserialized root, e.g. `optimizer.lr` or `targets[2]`.
    pub path: Option<String>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            pos: None,
            path: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::custom(unknown_message("key", field, expected))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::custom(unknown_message("value", variant, expected))
    }
}

/// `unknown key "lrr" (did you mean "lr"?); expected one of: ...`
pub fn unknown_message(what: &str, got: &str, expected: &[&str]) -> String {
    let mut msg = format!("unknown {what} \"{got}\"");
    if let Some(best) = did_you_mean(got, expected.iter().copied()) {
        msg.push_str(&format!(" (did you mean \"{best}\"?)"));
    }
    if expected.is_empty() {
        msg.push_str("; no keys are allowed here");
    } else {
        msg.push_str("; expected one of: ");
        msg.push_str(&expected.join(", "));
    }
    msg
}

/// The candidate closest to `got`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    got: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            // Jaro-Winkler misses one-edit typos of short words (`evn` for `env`), so
            // a single edit or swap of neighbours counts as close too.
            let one_edit = got.chars().count() >= 3 && strsim::osa_distance(got, c) == 1;
            let score = strsim::jaro_winkler(got, c);
            (if one_edit { score.max(0.81) } else { score }, c)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Deserializes `T` from `node`; error paths are relative to `node`.
pub fn from_node<'a, T: de::Deserialize<'a>>(node: &'a Node) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: String::new(),
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Gives an error without a position this node's position and path.
fn claim(mut e: DeError, pos: Pos, path: &str) -> DeError {
    if e.pos.is_none() {
        e.pos = Some(pos);
        e.path = Some(path.to_string());
    }
    e
}

struct NodeDe<'a> {
    node: &'a Node,
    path: String,
}

impl<'a> NodeDe<'a> {
    fn invalid(&self, expected: &str) -> DeError {
        DeError {
            message: format!("expected {expected}, found {}", self.node.type_name()),
            pos: Some(self.node.pos),
            path: Some(self.path.clone()),
        }
    }
}

macro_rules! forward_any {
    ($($name:ident)*) => {
        $(fn $name<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
            self.deserialize_any(v)
        })*
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let (pos, path) = (self.node.pos, self.path.clone());
        let r = match &self.node.value {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Int(i) => v.visit_i64(*i),
            Value::Float(x) => v.visit_f64(*x),
            Value::Str(s) => v.visit_borrowed_str(s),
            Value::Seq(items) => v.visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
                path: self.path.clone(),
            }),
            Value::Map(entries) => v.visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: self.path.clone(),
            }),
        };
        r.map_err(|e| claim(e, pos, &path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        if matches!(self.node.value, Value::Null) {
            v.visit_none()
        } else {
            let (pos, path) = (self.node.pos, self.path.clone());
            v.visit_some(self).map_err(|e| claim(e, pos, &path))
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_string(v)
    }

    /// Scalars are accepted where text is expected, in their source spelling
    /// (`lr: 3e-4` into a string field gives `"3e-4"`).
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let (pos, path) = (self.node.pos, self.path.clone());
        match &self.node.value {
            Value::Str(s) => v.visit_borrowed_str(s),
            Value::Bool(_) | Value::Int(_) | Value::Float(_) => {
                v.visit_string(self.node.scalar_text().unwrap_or_default())
            }
            _ => Err(self.invalid("a string")),
        }
        .map_err(|e| claim(e, pos, &path))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let (pos, path) = (self.node.pos, self.path.clone());
        match &self.node.value {
            Value::Int(i) => v.visit_f64(*i as f64),
            Value::Float(x) => v.visit_f64(*x),
            _ => Err(self.invalid("a number")),
        }
        .map_err(|e| claim(e, pos, &path))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let (pos, path) = (self.node.pos, self.path.clone());
        match &self.node.value {
            Value::Str(s) => v.visit_enum(s.as_str().into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => {
                let (k, val) = &entries[0];
                v.visit_enum(EnumDe {
                    variant: &k.name,
                    node: val,
                    path: join(&self.path, &k.name),
                    key_pos: k.pos,
                })
            }
            _ => Err(self.invalid("one of the allowed names")),
        }
        .map_err(|e| claim(e, pos, &path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    forward_any! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_char deserialize_bytes deserialize_byte_buf
        deserialize_unit deserialize_seq deserialize_map deserialize_identifier
        deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(_) => self.deserialize_any(v),
            // `key:` with nothing after it reads as an empty mapping.
            Value::Null => {
                let (pos, path) = (self.node.pos, self.path.clone());
                v.visit_map(MapDe {
                    entries: [].iter(),
                    value: None,
                    path: self.path.clone(),
                })
                .map_err(|e| claim(e, pos, &path))
            }
            _ => Err(self.invalid("a mapping")),
        }
    }
}

struct SeqDe<I> {
    items: I,
    index: usize,
    path: String,
}

impl<'de, I: Iterator<Item = &'de Node>> de::SeqAccess<'de> for SeqDe<I> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDe {
            node,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| claim(e, node.pos, &path))
    }
}

struct MapDe<'a, I> {
    entries: I,
    value: Option<(&'a Node, String)>,
    path: String,
}

impl<'de, I> de::MapAccess<'de> for MapDe<'de, I>
where
    I: Iterator<Item = &'de (super::node::Key, Node)>,
{
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, node)) = self.entries.next() else {
            return Ok(None);
        };
        let path = join(&self.path, &key.name);
        self.value = Some((node, path.clone()));
        let key_de: de::value::StrDeserializer<'_, DeError> = key.name.as_str().into_deserializer();
        seed.deserialize(key_de)
            .map(Some)
            .map_err(|e| claim(e, key.pos, &path))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((node, path)) = self.value.take() else {
            return Err(DeError::custom("value requested before key"));
        };
        seed.deserialize(NodeDe {
            node,
            path: path.clone(),
        })
        .map_err(|e| claim(e, node.pos, &path))
    }
}

struct EnumDe<'a> {
    variant: &'a str,
    node: &'a Node,
    path: String,
    key_pos: Pos,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = DeError;
    type Variant = NodeDe<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'de>), DeError> {
        let key_de: de::value::StrDeserializer<'_, DeError> = self.variant.into_deserializer();
        let v = seed
            .deserialize(key_de)
            .map_err(|e| claim(e, self.key_pos, &self.path))?;
        Ok((
            v,
            NodeDe {
                node: self.node,
                path: self.path,
            },
        ))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self, v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::node::parse;
    use serde::Deserialize;

    #[test]
    fn did_you_mean_catches_swapped_letters_in_short_words() {
        let keys = ["run", "env", "kill_grace"];
        assert_eq!(did_you_mean("evn", keys), Some("env"));
        assert_eq!(did_you_mean("rnu", keys), Some("run"));
        assert_eq!(did_you_mean("xy", keys), None);
        assert_eq!(did_you_mean("train", keys), None);
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Opt {
        lr: f64,
        #[serde(default)]
        betas: Vec<f64>,
        name: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        optimizer: Opt,
        #[serde(default)]
        decay: Decay,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Decay {
        #[default]
        Cosine,
        Linear,
    }

    #[test]
    fn typed_values_come_through() {
        let n = parse("optimizer: {lr: 2e-4, betas: [0.9, 1], name: 3}\ndecay: linear\n").unwrap();
        let c: Cfg = from_node(&n).unwrap();
        assert_eq!(c.optimizer.lr, 2e-4);
        assert_eq!(c.optimizer.betas, vec![0.9, 1.0]);
        assert_eq!(c.optimizer.name.as_deref(), Some("3"));
        assert_eq!(c.decay, Decay::Linear);
    }

    #[test]
    fn unknown_key_points_at_the_key_and_suggests() {
        let n = parse("optimizer:\n  lr: 1\n  betass: [1]\n").unwrap();
        let e = from_node::<Cfg>(&n).unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 3, col: 3 }));
        assert_eq!(e.path.as_deref(), Some("optimizer.betass"));
        assert!(
            e.message.contains("did you mean \"betas\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let n = parse("optimizer:\n  lr: fast\n").unwrap();
        let e = from_node::<Cfg>(&n).unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, col: 7 }));
        assert_eq!(e.path.as_deref(), Some("optimizer.lr"));
        assert_eq!(e.message, "expected a number, found a string");
    }

    #[test]
    fn missing_key_points_at_the_mapping() {
        let n = parse("optimizer:\n  betas: [1, 2]\n").unwrap();
        let e = from_node::<Cfg>(&n).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("optimizer"));
        assert_eq!(e.message, "missing field `lr`");
    }

    #[test]
    fn bad_enum_value_suggests() {
        let n = parse("optimizer: {lr: 1}\ndecay: cosin\n").unwrap();
        let e = from_node::<Cfg>(&n).unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, col: 8 }));
        assert!(
            e.message.contains("did you mean \"cosine\""),
            "{}",
            e.message
        );
    }
}
