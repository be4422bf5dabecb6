//! The [`Workflow`] trait and the static definition (`WorkflowDef`, the step table)
//! that `#[workflow]` generates for each workflow.
//!
//! A definition is plain data plus one type-erased entry per step: the in-process
//! executor and the durable runtime both walk the same table. A step's
//! [`StepKind`] says how it runs: once (`single`), once per element of a `Vec`
//! (`map`, with its [`MapOps`]), or only when its predicate holds (`conditional`).
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

use crate::Plan;
use crate::engine::{StepInputs, StepOutput, StepValue, ValueOps};
use crate::{StepContext, StepData, StepError};
use futures_util::future::BoxFuture;

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
    /// The key of a run on `input` (`#[workflow(key = Self::tenant)]`; `None`
    /// without one): the tenant, customer or provider its usage, costs and budgets are
    /// counted under. A start's own key (`StartOptions::key`) takes precedence.
    fn key(input: &Self::Input) -> Option<String> {
        let _ = input;
        None
    }
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
    /// How long after its parents complete (a root step: after the run's start) the
    /// step becomes due; nothing holds a worker slot meanwhile.
    pub delay: Duration,
    /// How many times the step may [snooze](crate::StepError::snooze) before one
    /// more snooze fails it permanently.
    pub max_snoozes: u32,
    /// What one attempt is expected to cost, in cents: reserved against the run's
    /// budget when it starts, settled to what it reported when it completes.
    pub estimate_cents: u64,
    /// What one attempt is expected to consume, in tokens (in + out): likewise.
    pub estimate_tokens: u64,
}

impl StepOptions {
    /// The defaults: 3 attempts, 30 s timeout, 1 s backoff, priority 0, no delay,
    /// 1000 snoozes, no estimates.
    pub const DEFAULT: Self = Self {
        max_attempts: 3,
        timeout: Duration::from_secs(30),
        backoff: Duration::from_secs(1),
        priority: 0,
        delay: Duration::ZERO,
        max_snoozes: 1000,
        estimate_cents: 0,
        estimate_tokens: 0,
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
    /// The payload of the signal the step waits for (see [`StepDef::signal`]).
    Signal,
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
    /// `#[step(map)]`: one task per element of the `Vec` it maps over; its children
    /// see the elements' outputs as a `Vec`, in element order.
    Map,
    /// `#[step(when = ..)]`: runs only when its predicate holds, else is skipped and
    /// its children receive `None`.
    Conditional,
}

impl StepKind {
    /// The name stored in definitions: `single`, `map` or `conditional`.
    ///
    /// ```
    /// assert_eq!(pgflow::StepKind::Map.as_str(), "map");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Map => "map",
            Self::Conditional => "conditional",
        }
    }

    /// The kind stored under `name` (the inverse of [`as_str`](Self::as_str)).
    ///
    /// ```
    /// assert_eq!(pgflow::StepKind::from_name("map"), Some(pgflow::StepKind::Map));
    /// assert_eq!(pgflow::StepKind::from_name("loop"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "single" => Some(Self::Single),
            "map" => Some(Self::Map),
            "conditional" => Some(Self::Conditional),
            _ => None,
        }
    }
}

/// What the executors need to run a map step: which parameter takes the element,
/// the operations of the element and of its output, and how to split the mapped
/// `Vec` and collect the outputs. Generated by `#[workflow]` for each `#[step(map)]`.
///
/// ```
/// # use pgflow::{workflow, StepError, Workflow};
/// # use pgflow::engine::StepValue;
/// pub struct Doubling;
/// #[workflow]
/// impl Doubling {
///     #[step(map)]
///     async fn double(n: u32) -> Result<u32, StepError> { Ok(n * 2) }
/// }
/// let map = Doubling::definition().steps()[0].map().unwrap();
/// let json = serde_json::value::RawValue::from_string("[1, 2]".to_owned()).unwrap();
/// let items = map.split(StepValue::Json(json)).unwrap();
/// assert_eq!(items.len(), 2);
/// let outputs = map.collect(items).unwrap();
/// assert_eq!(outputs.to_json().unwrap().get(), "[1,2]");
/// ```
pub struct MapOps {
    pub(crate) parts: crate::__private::MapParts,
}

impl MapOps {
    /// The index (among the step's data parameters) of the parameter that takes one
    /// element; the step maps over the value bound to it.
    pub fn param(&self) -> usize {
        self.parts.param
    }
    /// The operations of the element type `T` (the parameter's type).
    pub fn item(&self) -> &'static ValueOps {
        self.parts.item
    }
    /// The operations of one element's output `U` (the children see `Vec<U>`).
    pub fn element_output(&self) -> &'static ValueOps {
        self.parts.element_output
    }
    /// Splits the mapped `Vec<T>` (typed or JSON) into one value per element.
    ///
    /// # Errors
    ///
    /// A permanent error when a JSON value is not an array.
    pub fn split(&self, value: StepValue) -> Result<Vec<StepValue>, StepError> {
        (self.parts.split)(value)
    }
    /// Collects the elements' outputs, in element order, into the `Vec<U>` the
    /// children see.
    ///
    /// # Errors
    ///
    /// When an output does not convert (a type confusion, or a JSON failure).
    pub fn collect(&self, outputs: Vec<StepValue>) -> Result<StepValue, StepError> {
        (self.parts.collect)(outputs)
    }
}

impl fmt::Debug for MapOps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapOps")
            .field("param", &self.parts.param)
            .field("item", &self.parts.item.type_name)
            .field("element_output", &self.parts.element_output.type_name)
            .finish_non_exhaustive()
    }
}

/// The type-erased entry of a step: takes its inputs and context, deserializes each
/// input into its typed parameter (moving it out of the inputs, or cloning it when
/// they are kept for a next attempt: see [`StepInputs::prepare`]), evaluates the
/// `when` predicate of a conditional step (returning [`StepOutput::Skipped`] when it
/// is false), calls the user's function and wraps the output. For a map step it is
/// called once per element.
pub type StepFn =
    fn(&mut StepInputs, ContextSource<'_>) -> BoxFuture<'static, Result<StepOutput, StepError>>;

/// Where a step's entry gets the attempt's [`StepContext`]: given, or made by the
/// entry only when the step takes a context (or a transaction), so that a step that
/// takes neither costs no context at all.
///
/// ```
/// use pgflow::StepContext;
/// use pgflow::engine::ContextSource;
///
/// let given = ContextSource::Given(StepContext::builder("wf", "step").attempt(2).build());
/// assert_eq!(given.into_context().attempt(), 2);
/// let make = || StepContext::builder("wf", "step").attempt(3).build();
/// assert_eq!(ContextSource::Make(&make).into_context().attempt(), 3);
/// ```
pub enum ContextSource<'a> {
    /// A context built already (the durable runtime builds each attempt's).
    Given(StepContext),
    /// Builds the context when the entry needs it.
    Make(&'a dyn Fn() -> StepContext),
}

impl ContextSource<'_> {
    /// The context: the given one, or one made now.
    pub fn into_context(self) -> StepContext {
        match self {
            Self::Given(ctx) => ctx,
            Self::Make(make) => make(),
        }
    }
}

impl fmt::Debug for ContextSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Given(ctx) => f.debug_tuple("Given").field(ctx).finish(),
            Self::Make(_) => f.write_str("Make(..)"),
        }
    }
}

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
    /// Whether it takes a transaction (a `&mut T` parameter, e.g. `tx: &mut
    /// sqlx::PgConnection`): its writes commit with its completion (see
    /// [`Transaction`](crate::Transaction)).
    pub fn transactional(&self) -> bool {
        self.parts.takes_transaction
    }
    /// The names of the durable runtime's limits it counts against
    /// (`#[step(limits = ["openai"])]`): rate limits and budgets per period, defined
    /// on the runtime (`RuntimeBuilder::limit`). The in-process executor ignores them.
    pub fn limits(&self) -> &'static [&'static str] {
        self.parts.limits
    }
    /// How it runs.
    pub fn kind(&self) -> StepKind {
        if self.parts.map.is_some() {
            StepKind::Map
        } else if self.parts.when.is_some() {
            StepKind::Conditional
        } else {
            StepKind::Single
        }
    }
    /// For a conditional step, its predicate as written (`Self::needs_review`).
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, StepKind, Workflow};
    /// pub struct Gate;
    /// #[workflow]
    /// impl Gate {
    ///     #[step(when = Self::positive)]
    ///     async fn only(n: i32) -> Result<i32, StepError> { Ok(n) }
    ///     fn positive(n: &i32) -> bool { *n > 0 }
    /// }
    /// let step = Gate::definition().step("only").unwrap();
    /// assert_eq!(step.kind(), StepKind::Conditional);
    /// assert_eq!(step.predicate(), Some("Self::positive"));
    /// // a conditional terminal step: the workflow's output is an `Option`
    /// assert_eq!(Gate::definition().output().type_name, "Option<i32>");
    /// ```
    pub fn predicate(&self) -> Option<&'static str> {
        self.parts.when
    }
    /// For a map step, how it maps.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, StepKind, Workflow};
    /// pub struct Lengths;
    /// #[workflow]
    /// impl Lengths {
    ///     #[step(map)]
    ///     async fn len(word: String) -> Result<usize, StepError> { Ok(word.len()) }
    /// }
    /// let def = Lengths::definition();
    /// let step = def.step("len").unwrap();
    /// assert_eq!(step.kind(), StepKind::Map);
    /// let map = step.map().unwrap();
    /// assert_eq!((map.param(), map.item().type_name, map.element_output().type_name), (0, "String", "usize"));
    /// assert_eq!(step.output().type_name, "Vec<usize>");
    /// assert_eq!(def.input().type_name, "Vec<String>");
    /// ```
    pub fn map(&self) -> Option<&'static MapOps> {
        self.parts.map
    }
    /// The signal it waits for (`#[step(signal = ..)]`), if any.
    ///
    /// ```
    /// # use pgflow::{workflow, ParamSource, StepError, Workflow};
    /// # use std::time::Duration;
    /// pub struct Review;
    /// #[workflow(name = "step_signal_doc")]
    /// impl Review {
    ///     #[step(signal = approval, signal_timeout = "72h")]
    ///     async fn publish(input: String, approval: Option<bool>) -> Result<String, StepError> { Ok(input) }
    /// }
    /// let step = Review::definition().step("publish").unwrap();
    /// let signal = step.signal().unwrap();
    /// assert_eq!((signal.name, signal.param, signal.payload_type), ("approval", 1, "bool"));
    /// assert_eq!(signal.timeout, Some(Duration::from_secs(72 * 3600)));
    /// assert_eq!(step.params()[1].source, ParamSource::Signal);
    /// ```
    pub fn signal(&self) -> Option<&'static crate::SignalDef> {
        self.parts.signal
    }
    /// The workflow it runs as a child run, for a step returning
    /// [`Subflow<W>`](crate::Subflow): `W`'s definition.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Subflow, Workflow};
    /// pub struct Child;
    /// #[workflow(name = "step_subflow_doc_child")]
    /// impl Child { #[step] async fn only(n: u8) -> Result<u8, StepError> { Ok(n) } }
    /// pub struct Parent;
    /// #[workflow(name = "step_subflow_doc_parent")]
    /// impl Parent {
    ///     #[step]
    ///     async fn delegate(n: u8) -> Result<Subflow<Child>, StepError> { Ok(Subflow::new(n)) }
    /// }
    /// let step = Parent::definition().step("delegate").unwrap();
    /// assert_eq!(step.subflow().unwrap().name(), "step_subflow_doc_child");
    /// assert_eq!(step.output().type_name, "Child::Output");
    /// ```
    pub fn subflow(&self) -> Option<&'static WorkflowDef> {
        self.parts.subflow.map(|def| def())
    }
    /// Its effective options.
    pub fn options(&self) -> &StepOptions {
        &self.parts.options
    }
    /// The operations of its output type as its children see it: `Vec<U>` for a map
    /// step whose elements return `U`; `T` for a conditional step (its children take
    /// `Option<T>`).
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
            .field("kind", &self.kind())
            .field("when", &self.parts.when)
            .field("signal", &self.parts.signal)
            .field("subflow", &self.subflow().map(WorkflowDef::name))
            .field("options", &self.parts.options)
            .field("output", &self.parts.output.type_name)
            .finish()
    }
}

/// A workflow's static definition: identity, options and step table.
pub struct WorkflowDef {
    pub(crate) parts: crate::__private::WorkflowParts,
    pub(crate) plan: OnceLock<Plan>,
    /// For each value (the steps' outputs, then the input), how many parameters
    /// consume it: counted once, for the in-process executor.
    pub(crate) consumers: OnceLock<Box<[u32]>>,
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
    /// The operations of the workflow's output type: the terminal step's output, or
    /// `Option` of it when the terminal step is conditional (`None`: it was skipped).
    pub fn output(&self) -> &'static ValueOps {
        self.parts.output
    }

    /// The key of a run on `input` (JSON), as [`Workflow::key`] computes it: `None`
    /// for a workflow without `#[workflow(key = ..)]`.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Workflow};
    /// pub struct Billed;
    /// #[workflow(name = "key_of_doc", key = Self::tenant)]
    /// impl Billed {
    ///     #[step] async fn only(input: (String, u32)) -> Result<u32, StepError> { Ok(input.1) }
    ///     fn tenant(input: &(String, u32)) -> &str { &input.0 }
    /// }
    /// assert_eq!(Billed::key(&("acme".into(), 1)), Some("acme".to_owned()));
    /// assert_eq!(Billed::definition().key_of(r#"["acme", 1]"#).unwrap(), Some("acme".to_owned()));
    /// assert!(Billed::definition().key_of("7").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// When `input` does not deserialize into the input type.
    pub fn key_of(&self, input: &str) -> Result<Option<String>, StepError> {
        self.parts.key.map(|key| key(input)).transpose()
    }

    /// The workflow's output from what its terminal step produced.
    pub(crate) fn finish(&self, terminal: StepOutput) -> Result<StepValue, StepError> {
        match (self.parts.finish, terminal) {
            (Some(finish), out) => finish(out),
            (None, StepOutput::Completed(v)) => Ok(v),
            (None, StepOutput::Skipped) => Err(StepError::permanent(format!(
                "internal: terminal step `{}` was skipped but is not conditional",
                self.terminal().name()
            ))),
            (None, StepOutput::Subflow(s)) => Err(crate::value::unstarted_subflow(&s)),
        }
    }

    /// The step graph: children, joins, roots, topological order.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError, Workflow};
    /// # pub struct Two;
    /// # #[workflow]
    /// # impl Two {
    /// #     #[step] async fn a(x: u8) -> Result<u8, StepError> { Ok(x) }
    /// #     #[step] async fn b(a: u8) -> Result<u8, StepError> { Ok(a) }
    /// # }
    /// let plan = Two::definition().plan();
    /// assert_eq!((plan.roots(), plan.children(0), plan.terminal()), (&[0][..], &[1][..], Some(1)));
    /// ```
    pub fn plan(&self) -> &Plan {
        self.plan.get_or_init(|| {
            let parents = self.steps().iter().map(|s| s.parents().to_vec()).collect();
            // `#[workflow]` rejects unknown parents and cycles at compile time.
            Plan::new(parents).expect("a step graph checked by #[workflow]")
        })
    }
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
