//! The stage DAG: explicit `needs` plus implicit edges from paths (a stage that reads
//! another stage's output depends on it), built with petgraph.

use crate::spec::{Pipeline, Pos, SpecError, SpecErrors};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// Why one stage depends on another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EdgeWhy {
    /// Listed in `needs`.
    Needs(Pos),
    /// Reads `input`, which `output` of the other stage writes (or contains).
    Path {
        /// The reading stage's input path.
        input: String,
        /// Where the input is declared.
        pos: Pos,
    },
}

/// The dependency graph of a pipeline. Node weights are stage indices into
/// `pipeline.stages`; an edge `a -> b` means `b` depends on `a`.
#[derive(Debug)]
pub struct Dag {
    /// The graph.
    pub graph: DiGraph<usize, EdgeWhy>,
    /// For each stage, the stages it depends on (sorted, unique).
    pub deps: Vec<Vec<usize>>,
    /// For each stage, the stages that depend on it (sorted, unique).
    pub dependents: Vec<Vec<usize>>,
    /// A topological order that keeps file order where the graph allows.
    pub order: Vec<usize>,
    /// For each input path of each stage: the producing stage, if any.
    pub producers: HashMap<String, usize>,
}

impl Dag {
    /// Builds the DAG; reports unknown producers nowhere (see `missing_inputs`) and
    /// cycles in full.
    pub fn build(p: &Pipeline) -> Result<Dag, SpecErrors> {
        let n = p.stages.len();
        let mut graph = DiGraph::with_capacity(n, n);
        let nodes: Vec<NodeIndex> = (0..n).map(|i| graph.add_node(i)).collect();
        let index: HashMap<&str, usize> = p
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let outputs: BTreeMap<&str, usize> = p
            .stages
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.outputs.iter().map(move |o| (o.path.as_str(), i)))
            .collect();
        let mut producers = HashMap::new();
        let mut edges: Vec<(usize, usize, EdgeWhy)> = Vec::new();
        for (i, s) in p.stages.iter().enumerate() {
            for need in &s.needs {
                if let Some(&j) = index.get(need.name.as_str()) {
                    edges.push((j, i, EdgeWhy::Needs(need.pos)));
                }
            }
            for input in &s.inputs {
                for j in producers_of(&outputs, &input.path) {
                    if j != i {
                        producers.insert(input.path.clone(), j);
                        edges.push((
                            j,
                            i,
                            EdgeWhy::Path {
                                input: input.path.clone(),
                                pos: input.pos,
                            },
                        ));
                    }
                }
            }
        }
        let mut deps = vec![Vec::new(); n];
        let mut dependents = vec![Vec::new(); n];
        for (from, to, why) in edges {
            if !deps[to].contains(&from) {
                deps[to].push(from);
                dependents[from].push(to);
                graph.add_edge(nodes[from], nodes[to], why);
            }
        }
        deps.iter_mut().for_each(|d| d.sort_unstable());
        dependents.iter_mut().for_each(|d| d.sort_unstable());
        let dag = Dag {
            graph,
            order: Vec::new(),
            deps,
            dependents,
            producers,
        };
        if let Some(err) = dag.cycle_error(p) {
            return Err(err.into());
        }
        let order = dag.stable_toposort();
        Ok(Dag { order, ..dag })
    }

    /// Kahn's algorithm, always taking the ready stage that comes first in the file.
    fn stable_toposort(&self) -> Vec<usize> {
        let n = self.deps.len();
        let mut missing: Vec<usize> = self.deps.iter().map(Vec::len).collect();
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| missing[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for &d in &self.dependents[i] {
                missing[d] -= 1;
                if missing[d] == 0 {
                    ready.push(Reverse(d));
                }
            }
        }
        order
    }

    /// The first dependency cycle, reported whole: `a -> b -> a`, where `x -> y` reads
    /// "x depends on y", with where each dependency is declared.
    fn cycle_error(&self, p: &Pipeline) -> Option<SpecError> {
        // A stage that `needs` itself is a cycle of one.
        let scc = tarjan_scc(&self.graph)
            .into_iter()
            .find(|c| c.len() > 1 || self.graph.contains_edge(c[0], c[0]))?;
        let members: std::collections::HashSet<usize> =
            scc.iter().map(|&ni| self.graph[ni]).collect();
        // Walk dependencies inside the component from its first stage (in file order)
        // until a stage repeats.
        let start = *members.iter().min()?;
        let mut path = vec![start];
        let mut seen = HashMap::from([(start, 0usize)]);
        let mut cur = start;
        loop {
            let next = *self.deps[cur].iter().find(|d| members.contains(d))?;
            if let Some(&at) = seen.get(&next) {
                path.push(next);
                let cycle = &path[at..];
                let names: Vec<&str> = cycle.iter().map(|&i| p.stages[i].name.as_str()).collect();
                let mut msg = format!("dependency cycle: {}", names.join(" -> "));
                for w in cycle.windows(2) {
                    let (a, b) = (w[0], w[1]);
                    let edge = self.graph.find_edge(NodeIndex::new(b), NodeIndex::new(a))?;
                    let (sa, sb) = (&p.stages[a], &p.stages[b]);
                    match &self.graph[edge] {
                        EdgeWhy::Needs(pos) => msg.push_str(&format!(
                            "\n  {} -> {}: `needs` at line {}:{}",
                            sa.name, sb.name, pos.line, pos.col
                        )),
                        EdgeWhy::Path { input, pos } => msg.push_str(&format!(
                            "\n  {} -> {}: input \"{input}\" at line {}:{} is written by {}",
                            sa.name, sb.name, pos.line, pos.col, sb.name
                        )),
                    }
                }
                let first = &p.stages[cycle[0]];
                return Some(SpecError::at(&p.file, first.pos, msg).stage(&first.name));
            }
            seen.insert(next, path.len());
            path.push(next);
            cur = next;
        }
    }

    /// Stage indices that `targets` need, targets included (upstream closure).
    pub fn upstream(&self, targets: &[usize]) -> Vec<bool> {
        self.closure(targets, &self.deps)
    }

    /// Stage indices that depend on `sources`, sources included (downstream closure).
    pub fn downstream(&self, sources: &[usize]) -> Vec<bool> {
        self.closure(sources, &self.dependents)
    }

    fn closure(&self, start: &[usize], next: &[Vec<usize>]) -> Vec<bool> {
        let mut mark = vec![false; next.len()];
        let mut stack: Vec<usize> = start.to_vec();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut mark[i], true) {
                stack.extend(&next[i]);
            }
        }
        mark
    }
}

/// The stages whose outputs are `path`, contain it, or lie inside it.
fn producers_of(outputs: &BTreeMap<&str, usize>, path: &str) -> Vec<usize> {
    let mut found = Vec::new();
    // Exact match or an output folder that contains the input.
    let mut prefix = path;
    loop {
        if let Some(&i) = outputs.get(prefix) {
            found.push(i);
        }
        match prefix.rfind('/') {
            Some(cut) => prefix = &prefix[..cut],
            None => break,
        }
    }
    // Outputs inside an input folder.
    let lower = format!("{path}/");
    let upper = format!("{path}0"); // '0' sorts right after '/'
    for (_, &i) in outputs.range(lower.as_str()..upper.as_str()) {
        found.push(i);
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// Inputs that no stage produces and that do not exist under `root`.
pub fn missing_inputs(p: &Pipeline, dag: &Dag, root: &std::path::Path) -> Vec<SpecError> {
    let mut errors = Vec::new();
    for s in &p.stages {
        for (i, input) in s.inputs.iter().enumerate() {
            if !dag.producers.contains_key(&input.path)
                && std::fs::metadata(root.join(&input.path)).is_err()
            {
                errors.push(
                    SpecError::at(
                        &p.file,
                        input.pos,
                        format!(
                            "input \"{}\" does not exist and no stage writes it",
                            input.path
                        ),
                    )
                    .stage(&s.name)
                    .key(format!("stages.{}.inputs[{i}]", s.base_name)),
                );
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_str;
    use std::path::Path;

    #[test]
    fn implicit_edges_and_stable_order() {
        let p = load_str(
            Path::new("p.yaml"),
            "version: 1\nname: t\nstages:\n  c:\n    kind: command\n    inputs: [data/b.txt, out]\n  a:\n    kind: command\n    outputs: [data]\n  b:\n    kind: command\n    outputs: [out/x]\n",
            &[],
        )
        .unwrap();
        let dag = Dag::build(&p).unwrap();
        assert_eq!(dag.deps[0], vec![1, 2]);
        assert_eq!(dag.order, vec![1, 2, 0]);
    }

    #[test]
    fn a_stage_that_needs_itself_is_a_cycle() {
        let p = load_str(
            Path::new("p.yaml"),
            "version: 1\nname: t\nstages:\n  a:\n    kind: command\n    needs: [a]\n  b:\n    kind: command\n",
            &[],
        )
        .unwrap();
        let e = Dag::build(&p).unwrap_err();
        assert_eq!(
            e.0[0].message,
            "dependency cycle: a -> a\n  a -> a: `needs` at line 6:13"
        );
    }

    #[test]
    fn cycles_are_reported_whole_with_locations() {
        let p = load_str(
            Path::new("p.yaml"),
            "version: 1\nname: t\nstages:\n  a:\n    kind: command\n    needs: [b]\n  b:\n    kind: command\n    inputs: [x]\n  c:\n    kind: command\n    needs: [a]\n    outputs: [x]\n",
            &[],
        )
        .unwrap();
        let e = Dag::build(&p).unwrap_err();
        let msg = &e.0[0].message;
        assert!(
            msg.starts_with("dependency cycle: a -> b -> c -> a"),
            "{msg}"
        );
        assert!(msg.contains("a -> b: `needs` at line 6:13"), "{msg}");
        assert!(
            msg.contains("b -> c: input \"x\" at line 9:14 is written by c"),
            "{msg}"
        );
        assert!(msg.contains("c -> a: `needs` at line 12:13"), "{msg}");
    }
}
