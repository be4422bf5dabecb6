//! What the runtime derives once from the registered step tables: for each step its
//! children (split into those it alone feeds and joins that count down), the roots
//! and join steps of each workflow, and the arrays the claim query takes to know each
//! step's parents, lease and whether it (or each element task of a map step) reads
//! the run input.

use std::collections::HashMap;
use std::time::Duration;

use pgflow::{ParamSource, WorkflowDef};

use crate::definitions::version_i32;

/// One registered workflow, with derived tables.
#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) def: &'static WorkflowDef,
    /// Steps with no parents: enqueued at start.
    pub(crate) roots: Vec<i16>,
    /// Steps with more than one parent and their parent count: a `waiting` row is
    /// created at start and counted down as parents complete.
    pub(crate) joins: Vec<(i16, i32)>,
    /// Per step: children with this step as their only parent.
    pub(crate) direct_children: Vec<Vec<i16>>,
    /// Per step: children with several parents.
    pub(crate) join_children: Vec<Vec<i16>>,
}

impl Flow {
    fn new(def: &'static WorkflowDef) -> Self {
        let steps = def.steps();
        let mut direct_children = vec![Vec::new(); steps.len()];
        let mut join_children = vec![Vec::new(); steps.len()];
        let mut roots = Vec::new();
        let mut joins = Vec::new();
        for s in steps {
            let idx = step_i16(s.index());
            match s.parents() {
                [] => roots.push(idx),
                [p] => direct_children[*p].push(idx),
                many => {
                    joins.push((idx, i32::try_from(many.len()).unwrap_or(i32::MAX)));
                    for &p in many {
                        join_children[p].push(idx);
                    }
                }
            }
        }
        Self {
            def,
            roots,
            joins,
            direct_children,
            join_children,
        }
    }

    pub(crate) fn is_terminal(&self, step: i16) -> bool {
        usize::try_from(step).is_ok_and(|s| s == self.def.terminal().index())
    }
}

pub(crate) fn step_i16(i: usize) -> i16 {
    i16::try_from(i).unwrap_or(i16::MAX)
}

/// Every registered workflow, and the claim query's parameters.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    flows: HashMap<&'static str, Vec<(i32, Flow)>>,
    pub(crate) claim: ClaimParams,
}

/// Arrays bound to the claim query (see `queue::claim`).
#[derive(Debug, Default)]
pub(crate) struct ClaimParams {
    pub(crate) step_workflow: Vec<&'static str>,
    pub(crate) step_version: Vec<i32>,
    pub(crate) step_index: Vec<i16>,
    pub(crate) step_lease_ms: Vec<i64>,
    pub(crate) step_needs_input: Vec<bool>,
    /// For the element tasks of a map step: whether a parameter other than the
    /// element takes the run input.
    pub(crate) step_element_needs_input: Vec<bool>,
    pub(crate) edge_workflow: Vec<&'static str>,
    pub(crate) edge_version: Vec<i32>,
    pub(crate) edge_step: Vec<i16>,
    pub(crate) edge_parent: Vec<i16>,
}

impl Catalog {
    pub(crate) fn new(defs: &[&'static WorkflowDef], lease_grace: Duration) -> Self {
        let mut catalog = Self::default();
        for &def in defs {
            let version = version_i32(def.version());
            for s in def.steps() {
                let c = &mut catalog.claim;
                c.step_workflow.push(def.name());
                c.step_version.push(version);
                c.step_index.push(step_i16(s.index()));
                let lease = s.options().timeout.saturating_add(lease_grace);
                c.step_lease_ms
                    .push(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
                let element = s.map().map(|m| m.param());
                let reads_input = |skip: Option<usize>| {
                    s.params()
                        .iter()
                        .enumerate()
                        .any(|(k, p)| p.source == ParamSource::Input && Some(k) != skip)
                };
                c.step_needs_input.push(reads_input(None));
                c.step_element_needs_input.push(reads_input(element));
                for &p in s.parents() {
                    c.edge_workflow.push(def.name());
                    c.edge_version.push(version);
                    c.edge_step.push(step_i16(s.index()));
                    c.edge_parent.push(step_i16(p));
                }
            }
            catalog
                .flows
                .entry(def.name())
                .or_default()
                .push((version, Flow::new(def)));
        }
        catalog
    }

    pub(crate) fn get(&self, name: &str, version: i32) -> Option<&Flow> {
        self.flows
            .get(name)?
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, f)| f)
    }

    pub(crate) fn flow_of(&self, def: &'static WorkflowDef) -> Option<&Flow> {
        self.get(def.name(), version_i32(def.version()))
    }
}
