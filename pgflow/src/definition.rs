//! One model of a workflow's step graph, for everything that reads it: the
//! serializable [`Definition`] (what the durable runtime stores in
//! `pgflow.workflows` and tools read back) and the [`Plan`] derived from it (children,
//! joins, roots, topological order).
//!
//! A compiled workflow gives both: [`WorkflowDef::to_definition`] and
//! [`WorkflowDef::plan`]. A tool that only has the database parses the stored JSON
//! into a [`Definition`] and calls [`Definition::plan`]: the same type, the same
//! defaults, the same graph.
//!
//! ```
//! use pgflow::{workflow, Definition, StepError, Workflow};
//!
//! pub struct Diamond;
//! #[workflow]
//! impl Diamond {
//!     #[step]
//!     async fn split(n: u32) -> Result<u32, StepError> { Ok(n) }
//!     #[step(depends_on = [split])]
//!     async fn left(split: u32) -> Result<u32, StepError> { Ok(split + 1) }
//!     #[step(depends_on = [split])]
//!     async fn right(split: u32) -> Result<u32, StepError> { Ok(split + 2) }
//!     #[step(depends_on = [left, right])]
//!     async fn join(left: u32, right: u32) -> Result<u32, StepError> { Ok(left + right) }
//! }
//!
//! let def = Diamond::definition().to_definition();
//! let json = serde_json::to_string(&def).unwrap();
//! let stored: Definition = serde_json::from_str(&json).unwrap();
//! assert_eq!(stored, def);
//! let plan = stored.plan().unwrap();
//! assert_eq!(plan.roots(), [0]);
//! assert_eq!(plan.children(0), [1, 2]);
//! assert_eq!(plan.joins().collect::<Vec<_>>(), [(3, 2)]);
//! assert_eq!(plan.order(), [0, 1, 2, 3]);
//! assert_eq!(plan.terminal(), Some(3));
//! ```
//!
//! [`WorkflowDef::to_definition`]: crate::WorkflowDef::to_definition
//! [`WorkflowDef::plan`]: crate::WorkflowDef::plan

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ParamSource, StepKind, StepOptions, WorkflowDef};

/// A workflow's step table as data: identity, queue, types (as written) and, per
/// step, its parents, parameters, kind and options. Serializes to the JSON stored in
/// `pgflow.workflows.definition`; fields absent from a stored row take the same
/// defaults as `#[workflow]` (3 attempts, 30 s timeout, 1 s backoff, priority 0,
/// queue `default`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// The durable name.
    pub name: String,
    /// The definition version.
    #[serde(default = "one")]
    pub version: u32,
    /// The queue its tasks go to.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// The input type, as written.
    #[serde(default)]
    pub input: String,
    /// The output type, as written.
    #[serde(default)]
    pub output: String,
    /// The steps, in declaration order.
    pub steps: Vec<StepDefinition>,
}

/// One step of a [`Definition`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Its name.
    pub name: String,
    /// How it runs.
    #[serde(default = "single", with = "kind_name")]
    pub kind: StepKind,
    /// The names of the steps it depends on.
    #[serde(default)]
    pub parents: Vec<String>,
    /// Its data parameters.
    #[serde(default)]
    pub params: Vec<ParamDefinition>,
    /// Its output type as its children see it.
    #[serde(default)]
    pub output: String,
    /// Attempts before it fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The timeout of one attempt, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The base delay of the backoff, in milliseconds.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Its priority (higher runs first).
    #[serde(default)]
    pub priority: i16,
    /// How long after its parents complete it becomes due, in milliseconds (absent
    /// when zero).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    /// How many times it may snooze (absent when the default, 1000).
    #[serde(
        default = "default_max_snoozes",
        skip_serializing_if = "is_default_max_snoozes"
    )]
    pub max_snoozes: u32,
    /// What one attempt is expected to cost, in cents (absent when zero).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub estimate_cents: u64,
    /// What one attempt is expected to consume, in tokens (absent when zero).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub estimate_tokens: u64,
    /// The runtime's limits it counts against (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// The predicate of a conditional step, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// How a map step maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapDefinition>,
    /// The signal it waits for (absent for a step that waits for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalDefinition>,
    /// The workflow it runs as a child run (absent for a step that runs none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subflow: Option<SubflowDefinition>,
}

/// The child workflow a step of a [`Definition`] runs (a step returning
/// `Subflow<W>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubflowDefinition {
    /// The child workflow's durable name.
    pub workflow: String,
    /// Its version, as linked when the parent was registered.
    pub version: u32,
}

/// The signal a step of a [`Definition`] waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalDefinition {
    /// The signal's name.
    pub name: String,
    /// The payload type, as written.
    #[serde(rename = "payload", default)]
    pub payload_type: String,
    /// How long the step waits before it runs without the signal, in milliseconds;
    /// absent: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One data parameter of a [`StepDefinition`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamDefinition {
    /// The parameter's name.
    pub name: String,
    /// `input`, the name of the step whose output it takes, or `signal` (the payload
    /// of the signal its step waits for).
    pub from: String,
    /// Its Rust type, as written.
    #[serde(rename = "type", default)]
    pub type_name: String,
}

/// How a map step maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDefinition {
    /// The parameter that takes one element.
    pub param: String,
    /// The element type.
    #[serde(default)]
    pub item: String,
    /// The output type of one element.
    #[serde(default)]
    pub element_output: String,
}

fn one() -> u32 {
    1
}
fn default_queue() -> String {
    "default".to_owned()
}
fn single() -> StepKind {
    StepKind::Single
}
fn default_max_attempts() -> u32 {
    StepOptions::DEFAULT.max_attempts
}
fn default_timeout_ms() -> u64 {
    duration_ms(StepOptions::DEFAULT.timeout)
}
fn default_backoff_ms() -> u64 {
    duration_ms(StepOptions::DEFAULT.backoff)
}
fn default_max_snoozes() -> u32 {
    StepOptions::DEFAULT.max_snoozes
}
fn is_zero(ms: &u64) -> bool {
    *ms == 0
}
fn is_default_max_snoozes(n: &u32) -> bool {
    *n == StepOptions::DEFAULT.max_snoozes
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

mod kind_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::StepKind;

    pub(super) fn serialize<S: Serializer>(kind: &StepKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StepKind, D::Error> {
        let name = String::deserialize(d)?;
        StepKind::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown step kind `{name}`, expected `single`, `map` or `conditional`"
            ))
        })
    }
}

impl StepDefinition {
    /// Its options (attempts, timeout, backoff, priority).
    pub fn options(&self) -> StepOptions {
        StepOptions {
            max_attempts: self.max_attempts,
            timeout: Duration::from_millis(self.timeout_ms),
            backoff: Duration::from_millis(self.backoff_ms),
            priority: self.priority,
            delay: Duration::from_millis(self.delay_ms),
            max_snoozes: self.max_snoozes,
            estimate_cents: self.estimate_cents,
            estimate_tokens: self.estimate_tokens,
        }
    }
}

impl Definition {
    /// The step graph: parents resolved by name, children, joins, roots and a
    /// topological order.
    ///
    /// # Errors
    ///
    /// [`PlanError`] when a step names an unknown parent, or the graph has a cycle
    /// (neither can come from `#[workflow]`; a hand-edited stored row can).
    pub fn plan(&self) -> Result<Plan, PlanError> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let parents = self
            .steps
            .iter()
            .map(|s| {
                s.parents
                    .iter()
                    .map(|p| {
                        index
                            .get(p.as_str())
                            .copied()
                            .ok_or_else(|| PlanError::UnknownParent {
                                step: s.name.clone(),
                                parent: p.clone(),
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Plan::new(parents)
    }

    /// The index of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

impl WorkflowDef {
    /// The step table as a [`Definition`]: what the durable runtime stores and
    /// compares to detect a definition that changed without a version bump.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Workflow};
    /// # pub struct One;
    /// # #[workflow]
    /// # impl One { #[step] async fn only(x: u8) -> Result<u8, StepError> { Ok(x) } }
    /// let d = One::definition().to_definition();
    /// assert_eq!(d.name, "one");
    /// assert_eq!(d.steps[0].name, "only");
    /// assert_eq!(d.steps[0].timeout_ms, 30_000);
    /// ```
    pub fn to_definition(&self) -> Definition {
        let steps = self.steps();
        let name_of = |i: usize| steps.get(i).map_or("?", |s| s.name()).to_owned();
        Definition {
            name: self.name().to_owned(),
            version: self.version(),
            queue: self.queue().to_owned(),
            input: self.input().type_name.to_owned(),
            output: self.output().type_name.to_owned(),
            steps: steps
                .iter()
                .map(|s| {
                    let o = s.options();
                    StepDefinition {
                        name: s.name().to_owned(),
                        kind: s.kind(),
                        parents: s.parents().iter().map(|&p| name_of(p)).collect(),
                        params: s
                            .params()
                            .iter()
                            .map(|p| ParamDefinition {
                                name: p.name.to_owned(),
                                from: match p.source {
                                    ParamSource::Input => "input".to_owned(),
                                    ParamSource::Step(i) => name_of(i),
                                    ParamSource::Signal => "signal".to_owned(),
                                },
                                type_name: p.type_name.to_owned(),
                            })
                            .collect(),
                        output: s.output().type_name.to_owned(),
                        max_attempts: o.max_attempts,
                        timeout_ms: duration_ms(o.timeout),
                        backoff_ms: duration_ms(o.backoff),
                        priority: o.priority,
                        delay_ms: duration_ms(o.delay),
                        max_snoozes: o.max_snoozes,
                        estimate_cents: o.estimate_cents,
                        estimate_tokens: o.estimate_tokens,
                        limits: s.limits().iter().map(|l| (*l).to_owned()).collect(),
                        when: s.predicate().map(str::to_owned),
                        map: s.map().map(|m| MapDefinition {
                            param: s
                                .params()
                                .get(m.param())
                                .map_or(String::new(), |p| p.name.to_owned()),
                            item: m.item().type_name.to_owned(),
                            element_output: m.element_output().type_name.to_owned(),
                        }),
                        signal: s.signal().map(|g| SignalDefinition {
                            name: g.name.to_owned(),
                            payload_type: g.payload_type.to_owned(),
                            timeout_ms: g.timeout.map(duration_ms),
                        }),
                        subflow: s.subflow().map(|c| SubflowDefinition {
                            workflow: c.name().to_owned(),
                            version: c.version(),
                        }),
                    }
                })
                .collect(),
        }
    }

    /// The same description as JSON (`serde_json::to_value(self.to_definition())`).
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Workflow};
    /// # pub struct Solo;
    /// # #[workflow]
    /// # impl Solo { #[step] async fn only(x: u8) -> Result<u8, StepError> { Ok(x) } }
    /// let d = Solo::definition().describe();
    /// assert_eq!(d["name"], "solo");
    /// assert_eq!(d["steps"][0]["timeout_ms"], 30000);
    /// ```
    pub fn describe(&self) -> serde_json::Value {
        serde_json::to_value(self.to_definition()).unwrap_or(serde_json::Value::Null)
    }
}

/// What the executors and tools derive from a step graph: each step's parents and
/// children, the roots, the joins (steps with several parents, which count their
/// parents down), a topological order and the terminal step.
///
/// ```
/// use pgflow::Plan;
/// // 0 -> 1, 0 -> 2, (1, 2) -> 3
/// let plan = Plan::new(vec![vec![], vec![0], vec![0], vec![1, 2]]).unwrap();
/// assert_eq!(plan.children(0), [1, 2]);
/// assert!(plan.is_join(3) && !plan.is_join(1));
/// assert!(Plan::new(vec![vec![1], vec![0]]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    parents: Vec<Vec<usize>>,
    children: Vec<Vec<usize>>,
    roots: Vec<usize>,
    order: Vec<usize>,
}

/// A step graph that cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A step names a parent that does not exist.
    #[error("step `{step}` names an unknown parent `{parent}`")]
    UnknownParent {
        /// The step.
        step: String,
        /// The parent it names.
        parent: String,
    },
    /// A parent index is out of range.
    #[error("step {step} names parent {parent}, but there are only {steps} steps")]
    OutOfRange {
        /// The step.
        step: usize,
        /// The parent index.
        parent: usize,
        /// The number of steps.
        steps: usize,
    },
    /// The graph has a cycle.
    #[error("the step graph has a cycle")]
    Cycle,
}

impl Plan {
    /// Plans a graph given each step's parents (indices, in declaration order).
    ///
    /// # Errors
    ///
    /// [`PlanError::OutOfRange`] for a parent index past the end; [`PlanError::Cycle`].
    pub fn new(parents: Vec<Vec<usize>>) -> Result<Self, PlanError> {
        let n = parents.len();
        let mut children = vec![Vec::new(); n];
        let mut roots = Vec::new();
        for (i, ps) in parents.iter().enumerate() {
            if ps.is_empty() {
                roots.push(i);
            }
            for &p in ps {
                if p >= n {
                    return Err(PlanError::OutOfRange {
                        step: i,
                        parent: p,
                        steps: n,
                    });
                }
                children[p].push(i);
            }
        }
        let order = topological_order(&parents, &children).ok_or(PlanError::Cycle)?;
        Ok(Self {
            parents,
            children,
            roots,
            order,
        })
    }

    /// How many steps there are.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// The parents of `step` (empty for an index out of range).
    pub fn parents(&self, step: usize) -> &[usize] {
        self.parents.get(step).map_or(&[], Vec::as_slice)
    }

    /// The steps that depend on `step`, in declaration order.
    pub fn children(&self, step: usize) -> &[usize] {
        self.children.get(step).map_or(&[], Vec::as_slice)
    }

    /// Steps with no parents: they start with the run.
    pub fn roots(&self) -> &[usize] {
        &self.roots
    }

    /// Whether `step` has several parents (it waits for a count of them).
    pub fn is_join(&self, step: usize) -> bool {
        self.parents(step).len() > 1
    }

    /// The joins and their parent counts.
    pub fn joins(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.parents
            .iter()
            .enumerate()
            .filter(|(_, ps)| ps.len() > 1)
            .map(|(i, ps)| (i, ps.len()))
    }

    /// Parents before children; among steps ready together, declaration order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The single step nothing depends on, if there is exactly one.
    pub fn terminal(&self) -> Option<usize> {
        let mut leaves = self
            .children
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_empty());
        match (leaves.next(), leaves.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    /// Whether another step depends on `step`.
    pub fn has_children(&self, step: usize) -> bool {
        !self.children(step).is_empty()
    }
}

/// Kahn's algorithm, always taking the lowest ready index. `None` on a cycle.
fn topological_order(parents: &[Vec<usize>], children: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = parents.len();
    let mut missing: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| missing[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for &child in &children[next] {
            missing[child] -= 1;
            if missing[child] == 0 {
                ready.insert(child);
            }
        }
    }
    (order.len() == n).then_some(order)
}

impl fmt::Display for Definition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_parents_first_then_declaration_order() {
        // 0 <- 2, 1 <- 0 and 2: declared out of order.
        let plan = Plan::new(vec![vec![2], vec![0, 2], vec![]]).unwrap();
        assert_eq!(plan.order(), [2, 0, 1]);
        let diamond = Plan::new(vec![vec![], vec![0], vec![0], vec![1, 2]]).unwrap();
        assert_eq!(diamond.order(), [0, 1, 2, 3]);
        assert_eq!(Plan::new(vec![vec![1], vec![0]]), Err(PlanError::Cycle));
        assert!(matches!(
            Plan::new(vec![vec![5]]),
            Err(PlanError::OutOfRange { .. })
        ));
    }

    #[test]
    fn stored_definitions_take_the_defaults_and_tolerate_unknown_keys() {
        let def: Definition = serde_json::from_value(serde_json::json!({
            "name": "w", "version": 1, "queue": "llm", "future": true,
            "steps": [
                {"name": "a", "kind": "single", "parents": [], "max_attempts": 5, "priority": 2},
                {"name": "b", "parents": ["a"]},
            ]
        }))
        .unwrap();
        assert_eq!(def.queue, "llm");
        let plan = def.plan().unwrap();
        assert_eq!(plan.parents(1), [0]);
        assert!(plan.has_children(0) && !plan.has_children(1));
        assert_eq!(def.steps[1].max_attempts, StepOptions::DEFAULT.max_attempts);
        assert_eq!(def.steps[1].options(), StepOptions::DEFAULT);
        let bad: Definition = serde_json::from_value(serde_json::json!({
            "name": "w", "steps": [{"name": "a", "parents": ["zz"]}]
        }))
        .unwrap();
        assert!(
            bad.plan()
                .unwrap_err()
                .to_string()
                .contains("unknown parent `zz`")
        );
        let unknown_kind = serde_json::from_value::<Definition>(serde_json::json!({
            "name": "w", "steps": [{"name": "a", "kind": "loop"}]
        }));
        assert!(unknown_kind.is_err());
    }
}
