//! `taper kinds [KIND]`: every stage kind's `with:` keys and defaults, printed from the
//! tables beside each kind's config struct (`KEYS` in `src/stages/*`), so the help cannot
//! drift from the code. `taper run --help` prints the same text.

use super::exit::{self, Failure};
use crate::stages::{KindInfo, KINDS};
use clap::Args;
use std::fmt::Write;

/// `taper kinds` options.
#[derive(Debug, Args)]
pub struct KindsArgs {
    /// Show only this kind.
    pub kind: Option<String>,
}

fn one(out: &mut String, k: &KindInfo) {
    let _ = writeln!(out, "kind: {}", k.name);
    if let Some(why) = k.unavailable {
        let _ = writeln!(out, "  ({why})");
        return;
    }
    let kw = k.keys.iter().map(|(n, _, _)| n.len()).max().unwrap_or(0);
    let dw = k.keys.iter().map(|(_, d, _)| d.len()).max().unwrap_or(0);
    for (name, default, meaning) in k.keys {
        let _ = writeln!(out, "  {name:<kw$}  {default:<dw$}  {meaning}");
    }
}

/// The keys of every kind, as plain text.
pub fn help_text() -> String {
    let mut out = String::from("Stage kinds and their `with:` keys (key, default, meaning):\n\n");
    for k in KINDS {
        one(&mut out, k);
        out.push('\n');
    }
    out
}

/// `taper kinds`.
pub fn kinds(a: &KindsArgs) -> Result<i32, Failure> {
    match &a.kind {
        None => print!("{}", help_text()),
        Some(name) => {
            let Some(k) = KINDS.iter().find(|k| k.name == name) else {
                let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
                return Err(Failure::new(
                    exit::USAGE,
                    format!(
                        "error: unknown stage kind \"{name}\"; known kinds: {}",
                        names.join(", ")
                    ),
                ));
            };
            let mut out = String::new();
            one(&mut out, k);
            print!("{out}");
        }
    }
    Ok(exit::SUCCESS)
}
