//! The [`Workflow`] trait and the static definition (`WorkflowDef`, the step table)
//! that `#[workflow]` generates for each workflow.
//!
//! A definition is plain data plus one type-erased entry per step: the in-process
//! executor and the durable runtime both walk the same table.
//!
//! ```
//! use pgflow::{workflow, StepError, Workflow};
//!
//! pub struct Greet;
//!
//! #[workflow(name = "greet", version = 2)]
//! impl Greet {
//!     #[step]
//!     async fn hello(name: String) -> Result<String, StepError> {
//!         Ok(format!("hello {name}"))
//!     }
//!
//!     #[step(max_attempts = 1)]
//!     async fn shout(greeting: String) -> Result<String, StepError> {
//!         Ok(greeting.to_uppercase())
//!     }
//! }
//!
//! let def = Greet::definition();
//! assert_eq!((Greet::NAME, Greet::VERSION), ("greet", 2));
//! assert_eq!(def.steps().iter().map(|s| s.name()).collect::<Vec<_>>(), ["hello", "shout"]);
//! assert_eq!(def.step("shout").unwrap().parents(), [0]);
//! assert_eq!(def.step("shout").unwrap().options().max_attempts, 1);
//! assert_eq!(def.terminal().name(), "shout");
//! ```

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::json;

use crate::{StepContext, StepData, StepError, StepInputs, StepValue, ValueOps};

/// A workflow: a type whose `impl` block is annotated with `#[workflow]`.
///
/// Never implement it by hand; the macro checks the step graph and generates the
/// step table that [`definition`](Workflow::definition) returns.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a workflow",
    note = "annotate an `impl {Self}` block with `#[pgflow::workflow]` and its steps with `#[step]`"
)]
pub trait Workflow: 'static {
    /// The workflow's input: what its root step(s) take.
    type Input: StepData;
    /// The workflow's output: what its single terminal step returns.
    type Output: StepData;
    /// The durable name (the `name` option, else the type name in snake_case).
    const NAME: &'static str;
    /// The definition version (the `version` option, else 1).
    const VERSION: u32;
    /// The step table.
    fn definition() -> &'static WorkflowDef;
}

/// Retry, timeout and priority settings of a step (workflow defaults merged with the
/// step's own options at compile time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepOptions {
    /// Attempts before the step (and its run) fails; at least 1.
    pub max_attempts: u32,
    /// How long one attempt may run before it is dropped and counted as failed.
    pub timeout: Duration,
    /// Base delay of the exponential backoff between attempts.
    pub backoff: Duration,
    /// Higher runs first among tasks that are due.
    pub priority: i16,
}

impl StepOptions {
    /// The defaults of DESIGN §2: 3 attempts, 30 s timeout, 1 s backoff, priority 0.
    pub const DEFAULT: Self = Self {
        max_attempts: 3,
        timeout: Duration::from_secs(30),
        backoff: Duration::from_secs(1),
        priority: 0,
    };
}

impl Default for StepOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where a step's data parameter gets its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamSource {
    /// The workflow input.
    Input,
    /// The output of the step with this index.
    Step(usize),
}

/// One data parameter of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Param {
    /// The parameter's name in the step function.
    pub name: &'static str,
    /// Where its value comes from.
    pub source: ParamSource,
    /// The parameter's Rust type, as written.
    pub type_name: &'static str,
}

/// How a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StepKind {
    /// One task per run.
    Single,
}

impl StepKind {
    /// The name stored in definitions: `single`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
        }
    }
}

/// The type-erased entry of a step: takes its inputs and context, deserializes each
/// input into its typed parameter, calls the user's function and wraps the output.
pub type StepFn = fn(StepInputs, StepContext) -> BoxFuture<'static, Result<StepValue, StepError>>;

/// One row of a workflow's step table.
pub struct StepDef {
    pub(crate) parts: crate::__private::StepParts,
}

impl StepDef {
    /// The step's name (its function name).
    pub fn name(&self) -> &'static str {
        self.parts.name
    }
    /// The step's position in declaration order.
    pub fn index(&self) -> usize {
        self.parts.index
    }
    /// The indices of the steps it depends on, in declaration order.
    pub fn parents(&self) -> &'static [usize] {
        self.parts.parents
    }
    /// Its data parameters, in signature order.
    pub fn params(&self) -> &'static [Param] {
        self.parts.params
    }
    /// Whether it takes a `&StepContext`.
    pub fn takes_context(&self) -> bool {
        self.parts.takes_context
    }
    /// How it runs.
    pub fn kind(&self) -> StepKind {
        self.parts.kind
    }
    /// Its effective options.
    pub fn options(&self) -> &StepOptions {
        &self.parts.options
    }
    /// The operations of its output type.
    pub fn output(&self) -> &'static ValueOps {
        self.parts.output
    }
    /// Its type-erased entry.
    pub fn entry(&self) -> StepFn {
        self.parts.run
    }
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.parts.name)
            .field("parents", &self.parts.parents)
            .field("params", &self.parts.params)
            .field("kind", &self.parts.kind)
            .field("options", &self.parts.options)
            .field("output", &self.parts.output.type_name)
            .finish()
    }
}

/// What the executors derive once from a step table: children and consumer counts.
#[derive(Debug)]
pub(crate) struct Plan {
    /// For each step, the steps that depend on it.
    pub(crate) children: Vec<Vec<usize>>,
    /// For each value slot (steps, then the input at `steps.len()`), how many
    /// parameters consume it.
    pub(crate) uses: Vec<u32>,
    /// Steps with no parents.
    pub(crate) roots: Vec<usize>,
}

/// A workflow's static definition: identity, options and step table.
pub struct WorkflowDef {
    pub(crate) parts: crate::__private::WorkflowParts,
    pub(crate) plan: OnceLock<Plan>,
}

impl WorkflowDef {
    /// The durable name.
    pub fn name(&self) -> &'static str {
        self.parts.name
    }
    /// The definition version.
    pub fn version(&self) -> u32 {
        self.parts.version
    }
    /// The queue its tasks go to.
    pub fn queue(&self) -> &'static str {
        self.parts.queue
    }
    /// The Rust path of the workflow type (`module::Type`).
    pub fn rust_type(&self) -> &'static str {
        self.parts.rust_type
    }
    /// Where the `#[workflow]` attribute stands (`file:line`).
    pub fn location(&self) -> String {
        format!("{}:{}", self.parts.file, self.parts.line)
    }
    /// The workflow-level default options.
    pub fn defaults(&self) -> &StepOptions {
        &self.parts.defaults
    }
    /// The operations of the input type.
    pub fn input(&self) -> &'static ValueOps {
        self.parts.input
    }
    /// The steps, in declaration order.
    pub fn steps(&self) -> &'static [StepDef] {
        self.parts.steps
    }
    /// The step called `name`.
    pub fn step(&self, name: &str) -> Option<&'static StepDef> {
        self.parts.steps.iter().find(|s| s.name() == name)
    }
    /// The single step nothing depends on; its output is the workflow's output.
    pub fn terminal(&self) -> &'static StepDef {
        &self.parts.steps[self.parts.terminal]
    }

    pub(crate) fn plan(&self) -> &Plan {
        self.plan.get_or_init(|| {
            let steps = self.steps();
            let mut children = vec![Vec::new(); steps.len()];
            let mut uses = vec![0_u32; steps.len() + 1];
            let mut roots = Vec::new();
            for s in steps {
                for &p in s.parents() {
                    children[p].push(s.index());
                }
                if s.parents().is_empty() {
                    roots.push(s.index());
                }
                for param in s.params() {
                    match param.source {
                        ParamSource::Input => uses[steps.len()] += 1,
                        ParamSource::Step(i) => uses[i] += 1,
                    }
                }
            }
            Plan {
                children,
                uses,
                roots,
            }
        })
    }

    /// A canonical JSON description of the definition: what the durable runtime
    /// stores in `pgflow.workflows` and compares to detect a definition that changed
    /// without a version bump.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Workflow};
    /// # pub struct One;
    /// # #[workflow]
    /// # impl One { #[step] async fn only(x: u8) -> Result<u8, StepError> { Ok(x) } }
    /// let d = One::definition().describe();
    /// assert_eq!(d["name"], "one");
    /// assert_eq!(d["steps"][0]["name"], "only");
    /// assert_eq!(d["steps"][0]["timeout_ms"], 30000);
    /// ```
    pub fn describe(&self) -> serde_json::Value {
        let steps: Vec<_> = self
            .steps()
            .iter()
            .map(|s| {
                let o = s.options();
                let params: Vec<_> = s
                    .params()
                    .iter()
                    .map(|p| {
                        let from = match p.source {
                            ParamSource::Input => "input".to_owned(),
                            ParamSource::Step(i) => self.steps()[i].name().to_owned(),
                        };
                        json!({ "name": p.name, "from": from, "type": p.type_name })
                    })
                    .collect();
                let parents: Vec<_> = s
                    .parents()
                    .iter()
                    .map(|&p| self.steps()[p].name())
                    .collect();
                json!({
                    "name": s.name(),
                    "kind": s.kind().as_str(),
                    "parents": parents,
                    "params": params,
                    "output": s.output().type_name,
                    "max_attempts": o.max_attempts,
                    "timeout_ms": duration_ms(o.timeout),
                    "backoff_ms": duration_ms(o.backoff),
                    "priority": o.priority,
                })
            })
            .collect();
        json!({
            "name": self.name(),
            "version": self.version(),
            "queue": self.queue(),
            "input": self.input().type_name,
            "output": self.terminal().output().type_name,
            "steps": steps,
        })
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Debug for WorkflowDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowDef")
            .field("name", &self.parts.name)
            .field("version", &self.parts.version)
            .field("queue", &self.parts.queue)
            .field("rust_type", &self.parts.rust_type)
            .field("steps", &self.parts.steps)
            .finish()
    }
}
