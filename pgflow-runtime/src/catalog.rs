//! The workflows this runtime serves, looked up by `(name, version)`, with what the
//! engine derives once from each definition: its [`Plan`] (from `pgflow`, the one
//! model of the step graph), each step's row values for the enqueue statement, and
//! the arrays the claim statement binds to know each step's parents, lease and
//! whether it (or each element task of a map step) reads the run input.

use std::time::Duration;

use pgflow::{Definition, ParamSource, Plan, StepDef, WorkflowDef};

use crate::store::{step_i16, tasks::lease_ms, version_i32};

/// What the enqueue statement needs of a step.
#[derive(Debug, Clone)]
pub(crate) struct StepRow {
    pub(crate) priority: i16,
    pub(crate) max_attempts: i32,
    /// Its `delay`, in milliseconds.
    pub(crate) delay_ms: i64,
    /// The signal it waits for.
    pub(crate) waits_for: Option<String>,
    /// Its `signal_timeout` in milliseconds; -1: none (it waits forever).
    pub(crate) wait_ms: i64,
    /// For a map step: what it maps over (-1: the run input; else a parent's index).
    pub(crate) map_from: Option<i16>,
}

/// The catalog's entry for one workflow version this runtime serves: its
/// definition, its plan and what is derived from them.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) def: &'static WorkflowDef,
    pub(crate) plan: &'static Plan,
    rows: Vec<StepRow>,
    /// A step of it starts child runs (`Subflow<W>`).
    pub(crate) has_subflows: bool,
}

impl Entry {
    fn new(def: &'static WorkflowDef) -> Self {
        let rows = step_rows(&def.to_definition());
        Self {
            def,
            plan: def.plan(),
            rows,
            has_subflows: def.steps().iter().any(|s| s.subflow().is_some()),
        }
    }

    /// Step `step`'s definition.
    pub(crate) fn step(&self, step: usize) -> Option<&'static StepDef> {
        self.def.steps().get(step)
    }

    /// The name of step `step` (an index as stored), `?` for one it does not have.
    pub(crate) fn step_name(&self, step: i16) -> &'static str {
        crate::store::step_index(step)
            .and_then(|s| self.step(s))
            .map_or("?", StepDef::name)
    }

    /// Step `step`'s values for the enqueue statement.
    pub(crate) fn step_row(&self, step: usize) -> Option<&StepRow> {
        self.rows.get(step)
    }

    /// Every step's values for the enqueue statement, in step order.
    pub(crate) fn step_rows(&self) -> &[StepRow] {
        &self.rows
    }

    /// Whether `step` is the terminal step (its output is the run's).
    pub(crate) fn is_terminal(&self, step: usize) -> bool {
        step == self.def.terminal().index()
    }
}

/// Row values of each step of a definition, compiled or stored (a tool repairing
/// runs has only the stored one).
pub(crate) fn step_rows(def: &Definition) -> Vec<StepRow> {
    def.steps
        .iter()
        .map(|s| StepRow {
            priority: s.priority,
            max_attempts: i32::try_from(s.max_attempts.max(1)).unwrap_or(i32::MAX),
            delay_ms: i64::try_from(s.delay_ms).unwrap_or(i64::MAX),
            waits_for: s.signal.as_ref().map(|g| g.name.clone()),
            wait_ms: s
                .signal
                .as_ref()
                .and_then(|g| g.timeout_ms)
                .map_or(-1, |ms| i64::try_from(ms).unwrap_or(i64::MAX)),
            map_from: s.map.as_ref().map(|m| {
                let from = s
                    .params
                    .iter()
                    .find(|p| p.name == m.param)
                    .map(|p| p.from.as_str());
                match from {
                    Some("input") | None => -1,
                    Some(parent) => def.step_index(parent).map_or(-1, step_i16),
                }
            }),
        })
        .collect()
}

/// Every registered workflow, and the claim statement's parameters.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    flows: foldhash::HashMap<&'static str, Vec<(i32, Entry)>>,
    pub(crate) claim: ClaimParams,
}

/// Arrays bound to the claim statement (see `store::tasks::claim`), one entry per
/// step of every registered workflow.
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
    /// The step's parents (step indexes), comma-separated: one text per step, as
    /// Postgres has no arrays of arrays of different lengths.
    pub(crate) step_parents: Vec<String>,
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
                c.step_lease_ms
                    .push(lease_ms(s.options().timeout, lease_grace));
                let element = s.map().map(|m| m.param());
                let reads_input = |skip: Option<usize>| {
                    s.params()
                        .iter()
                        .enumerate()
                        .any(|(k, p)| p.source == ParamSource::Input && Some(k) != skip)
                };
                c.step_needs_input.push(reads_input(None));
                c.step_element_needs_input.push(reads_input(element));
                let parents: Vec<String> = s
                    .parents()
                    .iter()
                    .map(|&p| step_i16(p).to_string())
                    .collect();
                c.step_parents.push(parents.join(","));
            }
            catalog
                .flows
                .entry(def.name())
                .or_default()
                .push((version, Entry::new(def)));
        }
        catalog
    }

    /// The workflow `name` at `version`, if this runtime serves it.
    pub(crate) fn get(&self, name: &str, version: i32) -> Option<&Entry> {
        self.flows
            .get(name)?
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, f)| f)
    }

    /// The entry of a linked definition.
    pub(crate) fn flow_of(&self, def: &'static WorkflowDef) -> Option<&Entry> {
        self.get(def.name(), version_i32(def.version()))
    }
}
