//! A YAML document as a tree of nodes that remember where they came from.
//!
//! The pipeline file is first read into [`Node`]s (with `serde-saphyr`'s `Spanned`), so that
//! every later step — parameter substitution, fan-out, the typed conversion of a stage's
//! `with:` block — can point at the exact line and column of the value it rejects.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::fmt;

/// A 1-based line and column in the pipeline file; `line == 0` means unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub col: u32,
}

impl Pos {
    /// Whether this position points somewhere.
    pub fn is_known(&self) -> bool {
        self.line > 0
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One YAML value with its position and, for scalars, its source text.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the value starts.
    pub pos: Pos,
    /// The value.
    pub value: Value,
    /// The scalar as written in the file (`3e-4` stays `3e-4`); `None` for collections
    /// and for values that were not read from text.
    pub raw: Option<String>,
}

/// A mapping key with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key as a string (YAML integer or boolean keys are rendered as text).
    pub name: String,
    /// Where the key is written.
    pub pos: Pos,
}

/// The shape of a YAML value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `~`, `null` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order.
    Map(Vec<(Key, Node)>),
}

impl Node {
    /// A node made by taper rather than read from a file.
    pub fn synthetic(value: Value, pos: Pos) -> Node {
        Node {
            pos,
            value,
            raw: None,
        }
    }

    /// The entry `key` of a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The entries of a mapping node, or `None` for any other node.
    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The string of a string node.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar as text: its source spelling when known, else a canonical rendering.
    /// `None` for null and collections.
    pub fn scalar_text(&self) -> Option<String> {
        if let Some(raw) = &self.raw {
            if !matches!(self.value, Value::Str(_)) {
                return Some(raw.clone());
            }
        }
        match &self.value {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(x) => Some(format_float(*x)),
            Value::Str(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Converts to JSON, the canonical form used for fingerprints and reports.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(x) => serde_json::Number::from_f64(*x)
                .map(J::Number)
                .unwrap_or_else(|| J::String(format_float(*x))),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Fills `raw` of every scalar from the source text, using byte spans recorded while
    /// parsing.
    fn attach_raw(&mut self, source: &str, span: Option<(usize, usize)>) {
        if let (Some((start, len)), false) =
            (span, matches!(self.value, Value::Seq(_) | Value::Map(_)))
        {
            if let Some(text) = source.get(start..start + len) {
                self.raw = Some(text.trim().to_string());
            }
        }
    }
}

/// Renders a float the way a person writes it (`0.0003`, `1.0`).
pub fn format_float(x: f64) -> String {
    if x.is_finite() && x == x.trunc() && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Parses a YAML document into a [`Node`] tree.
pub fn parse(source: &str) -> Result<Node, serde_saphyr::Error> {
    // YAML 1.2 booleans only: `y`, `no`, `on` stay strings (no "Norway problem").
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let spanned: SpannedNode = serde_saphyr::from_str_with_options(source, options)?;
    let mut root = spanned.0;
    fill_raw(&mut root, source);
    Ok(root)
}

/// Walks the tree and fills scalar source text. Spans are kept in a side field while
/// parsing (see [`SpannedNode`]) and resolved here, where the source is known.
fn fill_raw(node: &mut Node, source: &str) {
    let span = node.raw.take().and_then(|s| {
        let (a, b) = s.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    node.attach_raw(source, span);
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| fill_raw(n, source)),
        Value::Map(entries) => entries.iter_mut().for_each(|(_, n)| fill_raw(n, source)),
        _ => {}
    }
}

/// Deserialization wrapper: a node read through `Spanned`, with its byte span stashed in
/// `raw` as `"offset:len"` until [`fill_raw`] replaces it with the text.
struct SpannedNode(Node);

impl<'de> Deserialize<'de> for SpannedNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Spanned<ValueOnly> = Spanned::deserialize(d)?;
        let loc = s.referenced;
        let span = loc.span();
        let raw = match (span.byte_offset(), span.byte_len()) {
            (Some(o), Some(l)) => Some(format!("{o}:{l}")),
            _ => None,
        };
        Ok(SpannedNode(Node {
            pos: Pos {
                line: loc.line() as u32,
                col: loc.column() as u32,
            },
            value: s.value.0,
            raw,
        }))
    }
}

struct SpannedKey(Key);

impl<'de> Deserialize<'de> for SpannedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Spanned<ValueOnly> = Spanned::deserialize(d)?;
        let name = match s.value.0 {
            Value::Str(s) => s,
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Float(x) => format_float(x),
            Value::Null => "null".to_string(),
            Value::Seq(_) | Value::Map(_) => {
                return Err(de::Error::custom("a mapping key must be a scalar"))
            }
        };
        Ok(SpannedKey(Key {
            name,
            pos: Pos {
                line: s.referenced.line() as u32,
                col: s.referenced.column() as u32,
            },
        }))
    }
}

struct ValueOnly(Value);

impl<'de> Deserialize<'de> for ValueOnly {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor).map(ValueOnly)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .or(Ok(Value::Float(v as f64)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(SpannedNode(n)) = seq.next_element()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries: Vec<(Key, Node)> = Vec::new();
        while let Some(SpannedKey(k)) = map.next_key()? {
            let SpannedNode(v) = map.next_value()?;
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_raw_text_are_kept() {
        let src = "a: 1\nb:\n  c: 3e-4\n  d: [x, 'y']\n";
        let root = parse(src).unwrap();
        let b = root.get("b").unwrap();
        let c = b.get("c").unwrap();
        assert_eq!(c.pos, Pos { line: 3, col: 6 });
        assert_eq!(c.scalar_text().as_deref(), Some("3e-4"));
        assert!(matches!(c.value, Value::Float(x) if (x - 3e-4).abs() < 1e-12));
        let d = b.get("d").unwrap();
        let Value::Seq(items) = &d.value else {
            panic!("not a list")
        };
        assert_eq!(items[1].as_str(), Some("y"));
        assert_eq!(items[1].pos.line, 4);
        let keys: Vec<_> = root
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| (k.name.clone(), k.pos))
            .collect();
        assert_eq!(keys[1], ("b".to_string(), Pos { line: 2, col: 1 }));
    }

    #[test]
    fn merge_keys_are_resolved() {
        let src = "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 5\n";
        let root = parse(src).unwrap();
        let other = root.get("other").unwrap();
        assert_eq!(other.get("x").map(|n| n.value.clone()), Some(Value::Int(1)));
        assert_eq!(other.get("y").map(|n| n.value.clone()), Some(Value::Int(5)));
    }
}
