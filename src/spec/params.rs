//! `params:` — the pipeline's typed parameter tree, `--set` overrides and `${...}`
//! substitution.
//!
//! A string that is exactly one reference (`lr: ${params.lr}`) takes the parameter's value
//! with its type; a reference inside a longer string is replaced by the value's text.
//! `$${` writes a literal `${`. References are resolved in a scope of named roots:
//! `params` always, `item` and `key` inside a `foreach`/`matrix` stage.

use super::de::did_you_mean;
use super::node::{Key, Node, Pos, Value};

/// A failed substitution or override: message, position, and the key path below the node
/// that was walked.
#[derive(Debug)]
pub struct SubstError {
    /// What is wrong.
    pub message: String,
    /// Where.
    pub pos: Pos,
    /// Key path relative to the walked node.
    pub path: String,
}

/// Named values that `${root.a.b}` may refer to.
pub struct Scope<'a> {
    roots: Vec<(&'a str, &'a Node)>,
}

impl<'a> Scope<'a> {
    /// A scope with `params` only.
    pub fn new(params: &'a Node) -> Self {
        Scope {
            roots: vec![("params", params)],
        }
    }

    /// Adds a root such as `item`.
    pub fn with(mut self, name: &'a str, node: &'a Node) -> Self {
        self.roots.push((name, node));
        self
    }

    fn lookup(&self, reference: &str) -> Result<&'a Node, String> {
        let mut parts = reference.split('.');
        let root_name = parts.next().unwrap_or_default();
        let Some((_, mut node)) = self.roots.iter().find(|(n, _)| *n == root_name) else {
            let names: Vec<&str> = self.roots.iter().map(|(n, _)| *n).collect();
            let hint = if matches!(root_name, "item" | "key") {
                " (only inside a stage with `foreach` or `matrix`)".to_string()
            } else {
                String::new()
            };
            return Err(format!(
                "unknown reference `${{{reference}}}`{hint}; references start with: {}",
                names.join(", ")
            ));
        };
        let mut walked = root_name.to_string();
        for part in parts {
            let next = match &node.value {
                Value::Map(entries) => entries.iter().find(|(k, _)| k.name == part).map(|(_, v)| v),
                Value::Seq(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => {
                    node = n;
                    walked = format!("{walked}.{part}");
                }
                None => {
                    let mut msg = format!("unknown parameter `{walked}.{part}`");
                    if let Value::Map(entries) = &node.value {
                        if let Some(best) =
                            did_you_mean(part, entries.iter().map(|(k, _)| k.name.as_str()))
                        {
                            msg.push_str(&format!(" (did you mean `{walked}.{best}`?)"));
                        }
                    }
                    return Err(msg);
                }
            }
        }
        Ok(node)
    }
}

/// Replaces every `${...}` in string values below `node`, in place. Roots named in
/// `skip` are left untouched (they are resolved in a later pass).
pub fn substitute(
    node: &mut Node,
    scope: &Scope<'_>,
    skip: &[&str],
    path: &str,
) -> Result<(), SubstError> {
    match &mut node.value {
        Value::Str(s) => {
            if let Some(replacement) = substitute_str(s, node.pos, scope, skip, path)? {
                let pos = node.pos;
                *node = replacement;
                node.pos = pos;
            }
            Ok(())
        }
        Value::Seq(items) => items
            .iter_mut()
            .enumerate()
            .try_for_each(|(i, n)| substitute(n, scope, skip, &format!("{path}[{i}]"))),
        Value::Map(entries) => entries
            .iter_mut()
            .try_for_each(|(k, n)| substitute(n, scope, skip, &join(path, &k.name))),
        _ => Ok(()),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Substitutes references in one string. Returns the new node, or `None` if unchanged.
fn substitute_str(
    s: &str,
    pos: Pos,
    scope: &Scope<'_>,
    skip: &[&str],
    path: &str,
) -> Result<Option<Node>, SubstError> {
    if !s.contains("${") {
        return Ok(None);
    }
    let err = |message: String| SubstError {
        message,
        pos,
        path: path.to_string(),
    };
    // A string that is one whole reference keeps the referenced value's type.
    if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if !inner.contains('}') && !inner.contains("${") {
            let reference = inner.trim();
            if skip.iter().any(|r| root_of(reference) == *r) {
                return Ok(None);
            }
            return scope
                .lookup(reference)
                .map(|n| Some(n.clone()))
                .map_err(err);
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            // `$${` is an escaped literal `${`.
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            changed = true;
            continue;
        }
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            return Err(err(format!("unclosed `${{` in \"{s}\"")));
        };
        let reference = rest[i + 2..i + end].trim();
        if skip.iter().any(|r| root_of(reference) == *r) {
            out.push_str(&rest[i..i + end + 1]);
        } else {
            let value = scope.lookup(reference).map_err(err)?;
            let text = value.scalar_text().ok_or_else(|| {
                err(format!(
                    "`${{{reference}}}` is {} and cannot be placed inside a string",
                    value.type_name()
                ))
            })?;
            out.push_str(&text);
            changed = true;
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(changed.then_some(Node {
        pos,
        value: Value::Str(out),
        raw: None,
    }))
}

fn root_of(reference: &str) -> &str {
    reference.split('.').next().unwrap_or_default()
}

/// Applies one `--set key=value` to the params tree. `key` is a dotted path, with or
/// without a leading `params.`; the key must exist, and the new value must have a
/// compatible type (numbers for numbers, booleans for booleans; anything for strings).
pub fn apply_override(params: &mut Node, assignment: &str) -> Result<(), String> {
    let (key, text) = assignment
        .split_once('=')
        .ok_or_else(|| format!("--set {assignment}: expected KEY=VALUE"))?;
    let key = key.trim();
    let key = key.strip_prefix("params.").unwrap_or(key);
    let parsed = super::node::parse(text).map_err(|e| format!("--set {key}: {e}"))?;
    let mut node = params;
    let mut walked = String::from("params");
    for part in key.split('.') {
        let Value::Map(entries) = &mut node.value else {
            return Err(format!("--set {key}: `{walked}` is not a mapping"));
        };
        let names: Vec<String> = entries.iter().map(|(k, _)| k.name.clone()).collect();
        match entries.iter_mut().find(|(k, _)| k.name == part) {
            Some((_, n)) => node = n,
            None => {
                let mut msg = format!("--set {key}: unknown parameter `{walked}.{part}`");
                if let Some(best) = did_you_mean(part, names.iter().map(String::as_str)) {
                    msg.push_str(&format!(" (did you mean `{best}`?)"));
                }
                return Err(msg);
            }
        }
        walked = format!("{walked}.{part}");
    }
    let compatible = match (&node.value, &parsed.value) {
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => true,
        (Value::Bool(_), Value::Bool(_)) | (Value::Null, _) => true,
        (Value::Str(_), Value::Seq(_) | Value::Map(_)) => false,
        (Value::Str(_), _) => true,
        (Value::Seq(_), Value::Seq(_)) | (Value::Map(_), Value::Map(_)) => true,
        _ => false,
    };
    if !compatible {
        return Err(format!(
            "--set {key}: `{walked}` is {}, but `{}` is {}",
            node.type_name(),
            text.trim(),
            parsed.type_name()
        ));
    }
    let pos = node.pos;
    *node = match (&node.value, parsed.value) {
        (Value::Str(_), _) => Node::synthetic(Value::Str(text.trim().to_string()), pos),
        (_, value) => Node {
            pos,
            value,
            raw: parsed.raw,
        },
    };
    Ok(())
}

/// An empty params tree.
pub fn empty() -> Node {
    Node::synthetic(Value::Map(Vec::<(Key, Node)>::new()), Pos::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::node::parse;

    fn params() -> Node {
        parse("lr: 3e-4\nmodel: {name: tiny, layers: 2}\nflag: true\n").unwrap()
    }

    #[test]
    fn whole_reference_keeps_type_and_inline_uses_source_text() {
        let p = params();
        let mut n =
            parse("a: ${params.model.layers}\nb: \"--lr ${params.lr} --m ${params.model.name}\"\n")
                .unwrap();
        substitute(&mut n, &Scope::new(&p), &[], "").unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Int(2));
        assert_eq!(n.get("b").unwrap().as_str(), Some("--lr 3e-4 --m tiny"));
    }

    #[test]
    fn unknown_reference_suggests() {
        let p = params();
        let mut n = parse("a: x ${params.lrr}\n").unwrap();
        let e = substitute(&mut n, &Scope::new(&p), &[], "").unwrap_err();
        assert_eq!(
            e.message,
            "unknown parameter `params.lrr` (did you mean `params.lr`?)"
        );
        assert_eq!(e.pos.line, 1);
        assert_eq!(e.path, "a");
    }

    #[test]
    fn escapes_and_skipped_roots_stay() {
        let p = params();
        let mut n = parse("a: \"$${HOME} ${item.x}\"\n").unwrap();
        substitute(&mut n, &Scope::new(&p), &["item"], "").unwrap();
        assert_eq!(n.get("a").unwrap().as_str(), Some("${HOME} ${item.x}"));
    }

    #[test]
    fn overrides_check_existence_and_type() {
        let mut p = params();
        apply_override(&mut p, "lr=1e-3").unwrap();
        assert_eq!(p.get("lr").unwrap().scalar_text().as_deref(), Some("1e-3"));
        apply_override(&mut p, "params.model.name=big").unwrap();
        assert_eq!(
            p.get("model").unwrap().get("name").unwrap().as_str(),
            Some("big")
        );
        assert!(apply_override(&mut p, "lrr=1")
            .unwrap_err()
            .contains("did you mean `lr`"));
        assert!(apply_override(&mut p, "flag=yes please")
            .unwrap_err()
            .contains("is a boolean"));
    }
}
