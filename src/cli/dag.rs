//! `taper dag`: the stage graph as text, Graphviz dot or Mermaid.

use super::exit::{self, Failure};
use super::load::load;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DagFormat {
    /// One line per stage with what it needs.
    Text,
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// `taper dag` options.
#[derive(Debug, Args)]
pub struct DagArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: DagFormat,
}

/// Prints the DAG.
pub fn dag(a: &DagArgs) -> Result<i32, Failure> {
    let l = load(&a.pipeline, &[], None)?;
    let name = |i: usize| l.pipeline.stages[i].name.as_str();
    match a.format {
        DagFormat::Text => {
            for &i in &l.dag.order {
                let deps: Vec<&str> = l.dag.deps[i].iter().map(|&d| name(d)).collect();
                if deps.is_empty() {
                    println!("{} ({})", name(i), l.pipeline.stages[i].kind.name);
                } else {
                    println!(
                        "{} ({}) <- {}",
                        name(i),
                        l.pipeline.stages[i].kind.name,
                        deps.join(", ")
                    );
                }
            }
        }
        DagFormat::Dot => {
            println!(
                "digraph \"{}\" {{\n  rankdir=LR;",
                l.pipeline.name.replace('"', "\\\"")
            );
            for &i in &l.dag.order {
                println!(
                    "  \"{}\" [label=\"{}\\n{}\"];",
                    name(i),
                    name(i),
                    l.pipeline.stages[i].kind.name
                );
            }
            for &i in &l.dag.order {
                for &d in &l.dag.deps[i] {
                    println!("  \"{}\" -> \"{}\";", name(d), name(i));
                }
            }
            println!("}}");
        }
        DagFormat::Mermaid => {
            println!("flowchart LR");
            for &i in &l.dag.order {
                println!(
                    "  s{i}[\"{} ({})\"]",
                    name(i).replace('"', "#quot;"),
                    l.pipeline.stages[i].kind.name
                );
            }
            for &i in &l.dag.order {
                for &d in &l.dag.deps[i] {
                    println!("  s{d} --> s{i}");
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}
