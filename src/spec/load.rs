//! Pipeline file text -> [`Pipeline`]: the two-level parse.
//!
//! Level one reads YAML into span-carrying [`Node`]s. Level two walks them: it checks the
//! top-level keys, applies `--set`, substitutes `${params...}`, expands `foreach`/`matrix`,
//! converts each stage header with serde (`deny_unknown_fields`) and checks what can be
//! checked without touching the disk. Every problem found is collected, not just the first.

use super::de::{did_you_mean, from_node, unknown_message};
use super::error::{SpecError, SpecErrors};
use super::model::{Named, PathDecl, Pipeline, ReportSpec, Stage};
use super::node::{self, Key, Node, Pos, Value};
use super::params::{self, Scope};
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The pipeline file format this build reads.
pub const FORMAT_VERSION: u32 = 1;

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "params",
    "resources",
    "stages",
    "schedule",
    "report",
];

/// The header of a stage, as written. `with`, `foreach` and `matrix` are handled on the
/// node tree; they are listed here so that unknown-key errors name every valid key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    needs: Vec<String>,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default, rename = "with")]
    _with: Option<IgnoredAny>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    resources: BTreeMap<String, u32>,
    #[serde(default, rename = "foreach")]
    _foreach: Option<IgnoredAny>,
    #[serde(default, rename = "matrix")]
    _matrix: Option<IgnoredAny>,
}

/// `report:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    path: String,
}

/// Reads and validates the pipeline file at `file`, applying `--set` overrides.
pub fn load(file: &Path, overrides: &[String]) -> Result<Pipeline, SpecErrors> {
    load_with(file, overrides, &[])
}

/// As [`load`], with extra roots that `${...}` references may use besides `params`
/// (`run`, for `${run.folder}` of scheduled runs).
pub fn load_with(
    file: &Path,
    overrides: &[String],
    extra_roots: &[(&str, Node)],
) -> Result<Pipeline, SpecErrors> {
    let source = std::fs::read_to_string(file).map_err(|e| SpecError {
        file: file.to_path_buf(),
        pos: None,
        stage: None,
        key: None,
        message: format!("cannot read the pipeline file: {e}"),
        line_text: None,
    })?;
    load_str_with(file, &source, overrides, extra_roots)
}

/// As [`load`], from text already read.
pub fn load_str(file: &Path, source: &str, overrides: &[String]) -> Result<Pipeline, SpecErrors> {
    load_str_with(file, source, overrides, &[])
}

/// As [`load_with`], from text already read.
pub fn load_str_with(
    file: &Path,
    source: &str,
    overrides: &[String],
    extra_roots: &[(&str, Node)],
) -> Result<Pipeline, SpecErrors> {
    let mut loader = Loader {
        file,
        errors: Vec::new(),
        extra: extra_roots,
        resource_pos: HashMap::new(),
    };
    let pipeline = loader.pipeline(source, overrides);
    if loader.errors.is_empty() {
        if let Some(p) = pipeline {
            return Ok(p);
        }
    }
    let errors = loader
        .errors
        .into_iter()
        .map(|e| e.with_source(source))
        .collect();
    Err(SpecErrors(errors))
}

struct Loader<'a> {
    file: &'a Path,
    errors: Vec<SpecError>,
    extra: &'a [(&'a str, Node)],
    /// Where each `(stage, resource slot)` is written, for errors about the slot.
    resource_pos: HashMap<(String, String), Pos>,
}

impl<'a> Loader<'a> {
    /// `params` and the extra roots.
    fn scope<'s>(&self, params: &'s Node) -> Scope<'s>
    where
        'a: 's,
    {
        self.extra
            .iter()
            .fold(Scope::new(params), |scope, (name, node)| {
                scope.with(name, node)
            })
    }

    fn err(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(SpecError::at(self.file, pos, message));
    }

    fn push(&mut self, e: SpecError) {
        self.errors.push(e);
    }

    fn pipeline(&mut self, source: &str, overrides: &[String]) -> Option<Pipeline> {
        let root = match node::parse(source) {
            Ok(root) => root,
            Err(e) => {
                let pos = e
                    .location()
                    .map(|l| Pos {
                        line: l.line() as u32,
                        col: l.column() as u32,
                    })
                    .unwrap_or_default();
                let message = e.without_snippet().to_string();
                let message = message.lines().next().unwrap_or("invalid YAML");
                // The position is printed in front of the message already.
                let message = match message.rfind(" at line ") {
                    Some(cut) if pos.is_known() => &message[..cut],
                    _ => message,
                };
                self.err(pos, format!("invalid YAML: {message}"));
                return None;
            }
        };
        let Some(entries) = root.as_map() else {
            self.err(
                root.pos,
                format!("a pipeline file is a mapping, found {}", root.type_name()),
            );
            return None;
        };
        for (k, _) in entries {
            if !TOP_KEYS.contains(&k.name.as_str()) {
                let msg = unknown_message("key", &k.name, TOP_KEYS);
                self.push(SpecError::at(self.file, k.pos, msg).key(k.name.clone()));
            }
        }
        let version = match root.get("version") {
            None => {
                self.err(
                    root.pos,
                    format!("missing key `version` (this taper reads version {FORMAT_VERSION})"),
                );
                FORMAT_VERSION
            }
            Some(n) => match n.value {
                Value::Int(v) if v == FORMAT_VERSION as i64 => FORMAT_VERSION,
                _ => {
                    let msg = format!(
                        "unsupported pipeline format version {}; this taper reads version {FORMAT_VERSION}",
                        n.scalar_text().unwrap_or_else(|| n.type_name().to_string())
                    );
                    self.push(SpecError::at(self.file, n.pos, msg).key("version"));
                    FORMAT_VERSION
                }
            },
        };
        let name = match root.get("name") {
            Some(Node {
                value: Value::Str(s),
                ..
            }) if !s.trim().is_empty() => s.clone(),
            Some(n) => {
                self.push(
                    SpecError::at(self.file, n.pos, "`name` must be a non-empty string")
                        .key("name"),
                );
                String::new()
            }
            None => {
                self.err(root.pos, "missing key `name`");
                String::new()
            }
        };
        let mut params = match root.get("params") {
            None => params::empty(),
            Some(
                n @ Node {
                    value: Value::Map(_),
                    ..
                },
            ) => n.clone(),
            Some(n) if matches!(n.value, Value::Null) => params::empty(),
            Some(n) => {
                let msg = format!("`params` must be a mapping, found {}", n.type_name());
                self.push(SpecError::at(self.file, n.pos, msg).key("params"));
                params::empty()
            }
        };
        for o in overrides {
            if let Err(msg) = params::apply_override(&mut params, o) {
                self.errors.push(SpecError {
                    file: self.file.to_path_buf(),
                    pos: None,
                    stage: None,
                    key: None,
                    message: msg,
                    line_text: None,
                });
            }
        }
        let resources: BTreeMap<String, u32> = match root.get("resources") {
            None => BTreeMap::new(),
            Some(n) => from_node(n).unwrap_or_else(|e| {
                self.errors
                    .push(SpecError::from_de(self.file, n.pos, "resources", e));
                BTreeMap::new()
            }),
        };
        let stages_node = root.get("stages");
        let mut stages = Vec::new();
        match stages_node.map(|n| &n.value) {
            Some(Value::Map(entries)) => {
                for (key, node) in entries {
                    self.stage(key, node, &params, &mut stages);
                }
            }
            Some(_) => {
                let n = stages_node.expect("matched Some");
                let msg = format!(
                    "`stages` must be a mapping of stage name to stage, found {}",
                    n.type_name()
                );
                self.push(SpecError::at(self.file, n.pos, msg).key("stages"));
            }
            None => {
                self.err(root.pos, "missing key `stages`");
            }
        }
        self.cross_checks(&mut stages, &resources);
        let report = root.get("report").and_then(|n| self.report(n, &stages));
        Some(Pipeline {
            file: self.file.to_path_buf(),
            source: Arc::from(source),
            version,
            name,
            params,
            resources,
            stages,
            schedule: root.get("schedule").cloned(),
            report,
        })
    }

    /// The `report:` block: `{path: reports/run.html}`, a workspace-relative file that no
    /// stage declares (it is written after the run, outside the fingerprinted outputs).
    fn report(&mut self, node: &Node, stages: &[Stage]) -> Option<ReportSpec> {
        let raw: RawReport = match from_node(node) {
            Ok(r) => r,
            Err(e) => {
                self.push(SpecError::from_de(self.file, node.pos, "report", e));
                return None;
            }
        };
        let pos = node.get("path").map(|n| n.pos).unwrap_or(node.pos);
        let path = match normalize_path(&raw.path) {
            Ok(p) => p,
            Err(msg) => {
                self.push(SpecError::at(self.file, pos, msg).key("report.path"));
                return None;
            }
        };
        for s in stages {
            for o in &s.outputs {
                let inside = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
                if inside(&path, &o.path) || inside(&o.path, &path) {
                    let msg = format!(
                        "the report \"{path}\" overlaps output \"{}\" of stage \"{}\"; the report is written after the run and must not be a stage output",
                        o.path, s.name
                    );
                    self.push(SpecError::at(self.file, pos, msg).key("report.path"));
                    return None;
                }
            }
        }
        Some(ReportSpec { path, pos })
    }

    /// Substitutes params, expands fan-out and converts one stage entry.
    fn stage(&mut self, key: &Key, node: &Node, params: &Node, out: &mut Vec<Stage>) {
        let name = &key.name;
        let base_path = format!("stages.{name}");
        if !valid_name(name) {
            let msg = format!(
                "invalid stage name \"{name}\": use letters, digits, `_`, `-` and `.`, starting with a letter, digit or `_`"
            );
            self.push(SpecError::at(self.file, key.pos, msg).key(base_path.clone()));
            return;
        }
        if !matches!(node.value, Value::Map(_)) {
            let msg = format!("a stage is a mapping, found {}", node.type_name());
            self.push(SpecError::at(self.file, node.pos, msg).stage(name));
            return;
        }
        let mut node = node.clone();
        if let Err(e) =
            params::substitute(&mut node, &self.scope(params), &["item", "key"], &base_path)
        {
            self.errors.push(
                SpecError::at(self.file, e.pos, e.message)
                    .stage(name)
                    .key(e.path),
            );
            return;
        }
        let fanout = match self.fanout(name, &node) {
            Some(f) => f,
            None => return,
        };
        for (suffix, item, key_node) in fanout {
            let mut stage_node = node.clone();
            let full_name = match &suffix {
                Some(s) => format!("{name}@{s}"),
                None => name.clone(),
            };
            if let Some(item) = &item {
                let mut scope = self.scope(params).with("item", item);
                if let Some(k) = &key_node {
                    scope = scope.with("key", k);
                }
                if let Err(e) = params::substitute(&mut stage_node, &scope, &[], &base_path) {
                    self.errors.push(
                        SpecError::at(self.file, e.pos, e.message)
                            .stage(&full_name)
                            .key(e.path),
                    );
                    continue;
                }
            } else if let Err(e) =
                params::substitute(&mut stage_node, &self.scope(params), &[], &base_path)
            {
                self.errors.push(
                    SpecError::at(self.file, e.pos, e.message)
                        .stage(&full_name)
                        .key(e.path),
                );
                continue;
            }
            if let Some(stage) =
                self.stage_header(&full_name, name, key.pos, &stage_node, item.as_ref())
            {
                out.push(stage);
            }
        }
    }

    /// The fan-out of a stage: `(name suffix, item, key)` per generated stage; one entry
    /// with no suffix when the stage has no `foreach`/`matrix`.
    #[allow(clippy::type_complexity)]
    fn fanout(
        &mut self,
        name: &str,
        node: &Node,
    ) -> Option<Vec<(Option<String>, Option<Node>, Option<Node>)>> {
        let foreach = node.get("foreach");
        let matrix = node.get("matrix");
        match (foreach, matrix) {
            (None, None) => Some(vec![(None, None, None)]),
            (Some(_), Some(m)) => {
                self.push(
                    SpecError::at(
                        self.file,
                        m.pos,
                        "a stage has either `foreach` or `matrix`, not both",
                    )
                    .stage(name),
                );
                None
            }
            (Some(f), None) => match &f.value {
                Value::Seq(items) if !items.is_empty() => Some(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, it)| (Some(suffix_text(it, i)), Some(it.clone()), None))
                        .collect(),
                ),
                Value::Map(entries) if !entries.is_empty() => Some(
                    entries
                        .iter()
                        .map(|(k, v)| {
                            let key_node = Node::synthetic(Value::Str(k.name.clone()), k.pos);
                            (Some(k.name.clone()), Some(v.clone()), Some(key_node))
                        })
                        .collect(),
                ),
                _ => {
                    let msg = format!(
                        "`foreach` must be a non-empty list or mapping, found {}",
                        f.type_name()
                    );
                    self.push(
                        SpecError::at(self.file, f.pos, msg)
                            .stage(name)
                            .key(format!("stages.{name}.foreach")),
                    );
                    None
                }
            },
            (None, Some(m)) => {
                let Some(axes) = m.as_map().filter(|a| !a.is_empty()) else {
                    let msg = "`matrix` must be a mapping of name to a non-empty list of values";
                    self.push(
                        SpecError::at(self.file, m.pos, msg)
                            .stage(name)
                            .key(format!("stages.{name}.matrix")),
                    );
                    return None;
                };
                let mut combos: Vec<(Vec<String>, Vec<(Key, Node)>)> =
                    vec![(Vec::new(), Vec::new())];
                for (axis, values) in axes {
                    let Value::Seq(vals) = &values.value else {
                        let msg = format!(
                            "matrix axis `{}` must be a list, found {}",
                            axis.name,
                            values.type_name()
                        );
                        self.push(
                            SpecError::at(self.file, values.pos, msg)
                                .stage(name)
                                .key(format!("stages.{name}.matrix.{}", axis.name)),
                        );
                        return None;
                    };
                    let mut next = Vec::with_capacity(combos.len() * vals.len());
                    for (parts, fields) in &combos {
                        for (i, v) in vals.iter().enumerate() {
                            let mut parts = parts.clone();
                            parts.push(format!("{}={}", axis.name, suffix_text(v, i)));
                            let mut fields = fields.clone();
                            fields.push((axis.clone(), v.clone()));
                            next.push((parts, fields));
                        }
                    }
                    combos = next;
                }
                Some(
                    combos
                        .into_iter()
                        .map(|(parts, fields)| {
                            let item = Node::synthetic(Value::Map(fields), m.pos);
                            (Some(parts.join(",")), Some(item), None)
                        })
                        .collect(),
                )
            }
        }
    }

    fn stage_header(
        &mut self,
        name: &str,
        base: &str,
        pos: Pos,
        node: &Node,
        item: Option<&Node>,
    ) -> Option<Stage> {
        let base_path = format!("stages.{base}");
        let raw: RawStage = match from_node(node) {
            Ok(r) => r,
            Err(e) => {
                self.errors
                    .push(SpecError::from_de(self.file, node.pos, &base_path, e).stage(name));
                return None;
            }
        };
        let kind_node = node.get("kind").expect("kind is required by RawStage");
        if let Some(slots) = node.get("resources").and_then(Node::as_map) {
            for (k, _) in slots {
                self.resource_pos
                    .insert((name.to_string(), k.name.clone()), k.pos);
            }
        }
        let list_pos = |key: &str, i: usize| -> Pos {
            match node.get(key).map(|n| &n.value) {
                Some(Value::Seq(items)) => items.get(i).map(|n| n.pos).unwrap_or_default(),
                _ => node.pos,
            }
        };
        let needs = raw
            .needs
            .iter()
            .enumerate()
            .map(|(i, n)| Named {
                name: n.clone(),
                pos: list_pos("needs", i),
            })
            .collect();
        let mut paths = |key: &str, list: &[String]| -> Vec<PathDecl> {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let pos = list_pos(key, i);
                match normalize_path(p) {
                    Ok(path) => out.push(PathDecl { path, pos }),
                    Err(msg) => {
                        self.errors.push(
                            SpecError::at(self.file, pos, msg)
                                .stage(name)
                                .key(format!("{base_path}.{key}[{i}]")),
                        );
                    }
                }
            }
            out
        };
        let inputs = paths("inputs", &raw.inputs);
        let outputs = paths("outputs", &raw.outputs);
        let duration = |this: &mut Self, key: &str, text: &Option<String>| -> Option<Duration> {
            let text = text.as_ref()?;
            match parse_duration(text) {
                Ok(d) => Some(d),
                Err(msg) => {
                    let pos = node.get(key).map(|n| n.pos).unwrap_or(node.pos);
                    this.errors.push(
                        SpecError::at(this.file, pos, msg)
                            .stage(name)
                            .key(format!("{base_path}.{key}")),
                    );
                    None
                }
            }
        };
        let backoff = duration(self, "backoff", &raw.backoff).unwrap_or(Duration::from_secs(1));
        let timeout = duration(self, "timeout", &raw.timeout);
        Some(Stage {
            name: name.to_string(),
            base_name: base.to_string(),
            pos,
            kind: Named {
                name: raw.kind,
                pos: kind_node.pos,
            },
            needs,
            inputs,
            outputs,
            with: node
                .get("with")
                .cloned()
                .unwrap_or_else(|| Node::synthetic(Value::Map(Vec::new()), node.pos)),
            retries: raw.retries,
            backoff,
            timeout,
            resources: raw.resources,
            item: item.map(Node::to_json),
        })
    }

    /// Checks across stages: unique names, known `needs`, one writer per output,
    /// declared resources.
    fn cross_checks(&mut self, stages: &mut [Stage], resources: &BTreeMap<String, u32>) {
        let mut by_name: HashMap<&str, &Stage> = HashMap::new();
        let mut bases: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in stages.iter() {
            if by_name.insert(&s.name, s).is_some() {
                self.errors.push(
                    SpecError::at(
                        self.file,
                        s.pos,
                        format!(
                            "two stages are named \"{}\" (fan-out values must differ)",
                            s.name
                        ),
                    )
                    .stage(&s.name),
                );
            }
            bases.entry(&s.base_name).or_default().push(&s.name);
        }
        let mut expanded_needs: Vec<Vec<Named>> = Vec::new();
        for s in stages.iter() {
            let mut needs = Vec::new();
            for n in &s.needs {
                if by_name.contains_key(n.name.as_str()) {
                    needs.push(n.clone());
                } else if let Some(generated) = bases.get(n.name.as_str()) {
                    needs.extend(generated.iter().map(|g| Named {
                        name: g.to_string(),
                        pos: n.pos,
                    }));
                } else {
                    let mut msg = format!("`needs` names an unknown stage \"{}\"", n.name);
                    if let Some(best) = did_you_mean(&n.name, bases.keys().copied()) {
                        msg.push_str(&format!(" (did you mean \"{best}\"?)"));
                    }
                    self.errors.push(
                        SpecError::at(self.file, n.pos, msg)
                            .stage(&s.name)
                            .key(format!("stages.{}.needs", s.base_name)),
                    );
                }
            }
            expanded_needs.push(needs);
            for (slot, amount) in &s.resources {
                let pos = self
                    .resource_pos
                    .get(&(s.name.clone(), slot.clone()))
                    .copied()
                    .unwrap_or(s.pos);
                match resources.get(slot) {
                    None => {
                        let mut msg = format!(
                            "resource \"{slot}\" is not declared in the top-level `resources`"
                        );
                        if let Some(best) = did_you_mean(slot, resources.keys().map(String::as_str))
                        {
                            msg.push_str(&format!(" (did you mean \"{best}\"?)"));
                        }
                        self.errors.push(
                            SpecError::at(self.file, pos, msg)
                                .stage(&s.name)
                                .key(format!("stages.{}.resources.{slot}", s.base_name)),
                        );
                    }
                    Some(cap) if amount > cap => {
                        let msg = format!(
                            "asks for {amount} of resource \"{slot}\" but only {cap} exist"
                        );
                        self.errors.push(
                            SpecError::at(self.file, pos, msg)
                                .stage(&s.name)
                                .key(format!("stages.{}.resources.{slot}", s.base_name)),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        for (s, needs) in stages.iter_mut().zip(expanded_needs) {
            s.needs = needs;
        }
        // One writer per output; no output inside another stage's output.
        let mut writers: Vec<(&Stage, usize, &PathDecl)> = Vec::new();
        for s in stages.iter() {
            for (i, o) in s.outputs.iter().enumerate() {
                writers.push((s, i, o));
            }
        }
        writers.sort_by(|a, b| a.2.path.cmp(&b.2.path));
        for pair in writers.windows(2) {
            let ((s1, _, o1), (s2, i2, o2)) = (pair[0], pair[1]);
            let s1 = &s1.name;
            let nested = o2.path.starts_with(&format!("{}/", o1.path));
            if o1.path == o2.path || nested {
                let what = if nested {
                    format!(
                        "output \"{}\" lies inside output \"{}\" of stage \"{s1}\"",
                        o2.path, o1.path
                    )
                } else {
                    format!(
                        "output \"{}\" is also written by stage \"{s1}\" (line {})",
                        o2.path, o1.pos.line
                    )
                };
                self.errors.push(
                    SpecError::at(self.file, o2.pos, what)
                        .stage(&s2.name)
                        .key(format!("stages.{}.outputs[{i2}]", s2.base_name)),
                );
            }
        }
        for s in stages.iter() {
            for (n, i) in s.inputs.iter().enumerate() {
                for o in &s.outputs {
                    if i.path == o.path
                        || o.path.starts_with(&format!("{}/", i.path))
                        || i.path.starts_with(&format!("{}/", o.path))
                    {
                        let msg = format!(
                            "input \"{}\" overlaps output \"{}\" of the same stage",
                            i.path, o.path
                        );
                        self.errors.push(
                            SpecError::at(self.file, i.pos, msg)
                                .stage(&s.name)
                                .key(format!("stages.{}.inputs[{n}]", s.base_name)),
                        );
                    }
                }
            }
        }
    }
}

/// Stage names: letters, digits, `_`, `-`, `.`; not starting with `-` or `.`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The text a fan-out value contributes to a generated stage name.
fn suffix_text(node: &Node, index: usize) -> String {
    match node.scalar_text() {
        Some(t) if !t.is_empty() && !t.contains([',', '@', '/', ' ']) => t,
        _ => index.to_string(),
    }
}

/// Normalises a workspace-relative path: no absolute paths, no `..`, no empty parts.
pub fn normalize_path(p: &str) -> Result<String, String> {
    if p.trim().is_empty() {
        return Err("empty path".into());
    }
    if p.starts_with('/') {
        return Err(format!(
            "path \"{p}\" is absolute; paths are relative to the workspace"
        ));
    }
    let mut parts = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("path \"{p}\" leaves the workspace (`..`)")),
            ".taper" if parts.is_empty() => {
                return Err(format!(
                    "path \"{p}\" is inside taper's state folder `.taper`"
                ))
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err(format!("path \"{p}\" names the workspace itself"));
    }
    Ok(parts.join("/"))
}

/// `"90s"`, `"5m"`, `"1h 30m"`, `"250ms"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration \"{t}\" ({e}); write e.g. 30s, 5m, 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Pipeline, SpecErrors> {
        load_str(Path::new("p.yaml"), text, &[])
    }

    #[test]
    fn matrix_generates_stable_names_and_substitutes_items() {
        let p = load(
            "version: 1\nname: t\nparams: {lrs: [1e-4, 3e-4]}\nstages:\n  sweep:\n    kind: command\n    matrix: {lr: \"${params.lrs}\", r: [8, 16]}\n    outputs: [\"out/${item.lr}-${item.r}\"]\n    with: {run: \"echo ${item.lr}\"}\n  after:\n    kind: command\n    needs: [sweep]\n",
        )
        .unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "sweep@lr=1e-4,r=8",
                "sweep@lr=1e-4,r=16",
                "sweep@lr=3e-4,r=8",
                "sweep@lr=3e-4,r=16",
                "after"
            ]
        );
        assert_eq!(p.stages[2].outputs[0].path, "out/3e-4-8");
        assert_eq!(
            p.stages[2].with.get("run").unwrap().as_str(),
            Some("echo 3e-4")
        );
        assert_eq!(p.stages[4].needs.len(), 4);
    }

    #[test]
    fn foreach_over_list_and_map() {
        let p = load("version: 1\nname: t\nstages:\n  a:\n    kind: command\n    foreach: [x, y]\n    with: {run: \"echo ${item}\"}\n  b:\n    kind: command\n    foreach: {one: 1, two: 2}\n    with: {run: \"echo ${key}=${item}\"}\n").unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a@x", "a@y", "b@one", "b@two"]);
        assert_eq!(
            p.stages[3].with.get("run").unwrap().as_str(),
            Some("echo two=2")
        );
    }

    #[test]
    fn errors_are_collected_with_positions() {
        let e = load("version: 1\nname: t\nstages:\n  a:\n    kind: command\n    need: [b]\n  c:\n    kind: command\n    outputs: [/abs]\n").unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert_eq!(e.0[0].pos, Some(Pos { line: 6, col: 5 }));
        assert!(
            e.0[0].message.contains("did you mean \"needs\""),
            "{}",
            e.0[0].message
        );
        assert_eq!(e.0[1].stage.as_deref(), Some("c"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
    }
}
