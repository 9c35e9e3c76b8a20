//! The stage kinds taper knows, and the typed configuration of each.
//!
//! A new kind adds a variant to [`StageConfig`], an entry to [`KINDS`] and a file beside
//! this one. The kind's `version` goes into every fingerprint, so bumping it re-runs the
//! stages of that kind.

use super::command::{self, CommandConfig};
use super::context::{StageContext, StageError};
use super::eval::{self, EvalConfig};
use super::merge::{self, MergeConfig};
use super::migrate::{self, MigrateConfig};
use super::tokenize::{self, TokenizeConfig, TokenizeError};
use super::train::{self, TrainConfig};
use crate::spec::de::{did_you_mean, from_node};
use crate::spec::Pos;
use crate::spec::{SpecError, Stage};
use std::path::Path;

/// Facts about one stage kind.
#[derive(Clone, Copy, Debug)]
pub struct KindInfo {
    /// The name written after `kind:`.
    pub name: &'static str,
    /// Implementation version, part of the fingerprint.
    pub version: u32,
    /// Whether an interrupted attempt keeps its staging folder to resume from it.
    pub resumable: bool,
    /// `None` when the kind is available; else why not.
    pub unavailable: Option<&'static str>,
    /// Its `with:` keys: (key, default, meaning), from the table beside its config struct.
    pub keys: &'static [(&'static str, &'static str, &'static str)],
}

/// Every kind, available or announced.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        name: "command",
        version: command::VERSION,
        resumable: false,
        unavailable: None,
        keys: command::KEYS,
    },
    KindInfo {
        name: "tokenize",
        // 2: `add_bos_token: false` in tokenizer_config.json leaves BOS out by default.
        version: 2,
        resumable: false,
        unavailable: None,
        keys: tokenize::config::KEYS,
    },
    KindInfo {
        name: "train",
        version: train::VERSION,
        resumable: true,
        unavailable: None,
        keys: train::config::KEYS,
    },
    KindInfo {
        name: "eval",
        version: eval::VERSION,
        resumable: false,
        unavailable: None,
        keys: eval::config::KEYS,
    },
    KindInfo {
        name: "migrate",
        version: migrate::VERSION,
        resumable: false,
        unavailable: None,
        keys: migrate::KEYS,
    },
    KindInfo {
        name: "merge",
        version: merge::VERSION,
        resumable: false,
        unavailable: None,
        keys: merge::KEYS,
    },
];

/// The facts of kind `name`.
pub fn kind_info(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.name == name)
}

/// A stage's typed `with:` configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum StageConfig {
    /// `kind: command`.
    Command(CommandConfig),
    /// `kind: tokenize`.
    Tokenize(TokenizeConfig),
    /// `kind: train`.
    Train(Box<TrainConfig>),
    /// `kind: migrate`.
    Migrate(MigrateConfig),
    /// `kind: merge`.
    Merge(MergeConfig),
    /// `kind: eval` (boxed: much larger than the other variants).
    Eval(Box<EvalConfig>),
}

impl StageConfig {
    /// Runs one attempt of the stage.
    pub fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        match self {
            StageConfig::Command(c) => command::run(c, ctx),
            StageConfig::Tokenize(c) => tokenize::stage::run_stage(c, ctx),
            StageConfig::Train(c) => train::run(c, ctx),
            StageConfig::Migrate(c) => migrate::run(c, ctx),
            StageConfig::Merge(c) => merge::run(c, ctx),
            StageConfig::Eval(c) => eval::run(c, ctx),
        }
    }
}

/// Converts a stage's `with:` block into its kind's typed configuration, with errors that
/// point into the pipeline file.
pub fn configure(file: &Path, stage: &Stage) -> Result<StageConfig, SpecError> {
    let key_base = format!("stages.{}.with", stage.base_name);
    let key = key_base.clone();
    let Some(info) = kind_info(&stage.kind.name) else {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        let mut msg = format!("unknown stage kind \"{}\"", stage.kind.name);
        if let Some(best) = did_you_mean(&stage.kind.name, names.iter().copied()) {
            msg.push_str(&format!(" (did you mean \"{best}\"?)"));
        }
        msg.push_str(&format!("; known kinds: {}", names.join(", ")));
        return Err(SpecError::at(file, stage.kind.pos, msg)
            .stage(&stage.name)
            .key(format!("stages.{}.kind", stage.base_name)));
    };
    if let Some(why) = info.unavailable {
        return Err(SpecError::at(file, stage.kind.pos, why)
            .stage(&stage.name)
            .key(format!("stages.{}.kind", stage.base_name)));
    }
    let de_err = |e| SpecError::from_de(file, stage.with.pos, &key, e).stage(&stage.name);
    match info.name {
        "command" => from_node(&stage.with)
            .map(StageConfig::Command)
            .map_err(de_err),
        "tokenize" => {
            let cfg: TokenizeConfig = from_node(&stage.with).map_err(de_err)?;
            cfg.validate().map_err(|e| match e {
                TokenizeError::Config { key, message } => {
                    let pos = node_at(&stage.with, &key).unwrap_or(stage.with.pos);
                    SpecError::at(file, pos, message)
                        .stage(&stage.name)
                        .key(format!("{key_base}.{key}"))
                }
                other => SpecError::at(file, stage.with.pos, other.to_string())
                    .stage(&stage.name)
                    .key(key_base.clone()),
            })?;
            Ok(StageConfig::Tokenize(cfg))
        }
        "train" => from_node(&stage.with)
            .map(StageConfig::Train)
            .map_err(de_err),
        "migrate" => from_node(&stage.with)
            .map(StageConfig::Migrate)
            .map_err(de_err),
        "merge" => from_node(&stage.with)
            .map(StageConfig::Merge)
            .map_err(de_err),
        "eval" => {
            let cfg: EvalConfig = from_node(&stage.with).map_err(de_err)?;
            let outputs: Vec<&str> = stage.outputs.iter().map(|o| o.path.as_str()).collect();
            cfg.validate(&outputs).map_err(|p| {
                SpecError::at(file, stage.with.pos, p.message)
                    .stage(&stage.name)
                    .key(format!("{key}.{}", p.key))
            })?;
            Ok(StageConfig::Eval(Box::new(cfg)))
        }
        other => Err(SpecError::at(
            file,
            stage.kind.pos,
            format!("stage kind \"{other}\" has no implementation"),
        )
        .stage(&stage.name)),
    }
}

/// The position of the value at dotted `path` below `node`, if it is there.
fn node_at(node: &crate::spec::Node, path: &str) -> Option<Pos> {
    let mut n = node;
    for part in path.split('.') {
        n = n.get(part)?;
    }
    Some(n.pos)
}

#[cfg(test)]
mod key_table_tests {
    use super::*;

    /// The `KEYS` table of each kind names exactly the top-level fields its config struct
    /// accepts: the list comes from the unknown-key error of the real deserializer.
    #[test]
    fn key_tables_match_the_config_structs() {
        for k in KINDS.iter().filter(|k| k.unavailable.is_none()) {
            let src = format!(
                "version: 1\nname: t\nstages:\n  s:\n    kind: {}\n    outputs: [o]\n    with: {{zz_not_a_key: 1}}\n",
                k.name
            );
            let p = crate::spec::load_str(Path::new("p.yaml"), &src, &[]).unwrap();
            let e = configure(&p.file, &p.stages[0]).unwrap_err();
            let listed = e
                .message
                .split("expected one of: ")
                .nth(1)
                .unwrap_or_else(|| panic!("{}: {}", k.name, e.message));
            let mut fields: Vec<&str> = listed.split(", ").map(str::trim).collect();
            fields.sort();
            let mut keys: Vec<&str> = k
                .keys
                .iter()
                .map(|(n, _, _)| n.split('.').next().unwrap())
                .collect();
            keys.sort();
            keys.dedup();
            assert_eq!(keys, fields, "kind {}: KEYS vs the config struct", k.name);
        }
    }
}
