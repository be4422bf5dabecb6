//! Replaying a recorded run in process: [`replay`] runs a workflow in the in-process
//! executor on a [`Recorded`] run's input, with the stored outputs of chosen steps
//! injected instead of calling those steps, so a test reproduces a production run
//! offline — the failure first, then the fix.
//!
//! A [`Recorded`] is what `pgflow export <run>` prints (and
//! `pgflow_runtime::admin::export` returns): the run's input, status, output or
//! error, and per step its status, output, skip reason, attempt history and the
//! outputs of a map step's completed elements.
//!
//! ```
//! use pgflow::{workflow, Recorded, StepError};
//!
//! pub struct Quote;
//!
//! #[workflow(name = "quote", max_attempts = 1)]
//! impl Quote {
//!     #[step]
//!     async fn fetch_price(sku: String) -> Result<u32, StepError> {
//!         unreachable!("injected: the replay never calls it")
//!     }
//!
//!     #[step]
//!     async fn apply_discount(fetch_price: u32) -> Result<u32, StepError> {
//!         fetch_price
//!             .checked_sub(500)
//!             .ok_or_else(|| StepError::permanent("discount larger than the price"))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // What `pgflow export 42` printed for the production run that failed.
//! let json = r#"{
//!     "format": 1, "run_id": 42, "workflow": "quote", "version": 1, "status": "failed",
//!     "input": "sku-7",
//!     "steps": [
//!         { "name": "fetch_price", "status": "completed", "output": 300 },
//!         { "name": "apply_discount", "status": "failed" }
//!     ]
//! }"#;
//! let recorded: Recorded = serde_json::from_str(json).unwrap();
//! let err = pgflow::replay::<Quote>(recorded).inject_completed().run().await.unwrap_err();
//! assert_eq!(err.run_error().and_then(|e| e.failed_step()), Some("apply_discount"));
//! # }
//! ```
//!
//! # What an injected step does
//!
//! An injected step is not called — neither its body nor its `when` predicate — and
//! its retries, timeout and cost are not spent: when its parents are done, it
//! completes at once with its recorded output (or is skipped, if it was recorded as
//! skipped), and its children run on that. Steps that are not injected run as usual,
//! including the ancestors of an injected step: inject them too (as
//! [`Replay::inject_completed`] does) to keep them from running.
//!
//! A map step recorded mid-way (`running` or `failed`) with some elements completed
//! can be injected too: those elements take their recorded outputs, and only the
//! others run. An element index the replayed step does not produce is ignored.
//!
//! The terminal step is never injected whole: its output is the run's output
//! ([`Recorded::output`]), and injecting it would replay nothing.
//!
//! # Versions
//!
//! A recording names its workflow version; the workflow replayed may be another
//! version of the same workflow — typically the next one, with the fix. The replay
//! does not compare versions: it checks what it uses. Each injected step must exist
//! (by name) in the workflow replayed, its recorded output must deserialize into that
//! step's output type, a recorded skip needs a conditional step, recorded elements a
//! map step, and the recorded input must deserialize into the workflow's input type;
//! otherwise [`Replay::run`] fails with a [`ReplayError`] naming the step and the
//! serde path. Compare [`Recorded::version`] with [`Workflow::VERSION`] in the test
//! where the version must match.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::engine::{StepOutput, StepValue, from_json};
use crate::execute::{Injected, Injection, run_definition};
use crate::{ExecuteOptions, RunError, RunId, StepDef, StepKind, Workflow, WorkflowDef};

/// A recorded run: what `pgflow export <run>` prints as JSON and [`replay`] reads.
///
/// Unknown fields are ignored on read, so a recording made by a newer pgflow that
/// adds fields still replays; [`Recorded::format`] changes only when a field changes
/// meaning.
///
/// ```
/// use pgflow::{Recorded, RecordedStatus};
///
/// let recorded: Recorded = serde_json::from_str(r#"{
///     "format": 1, "run_id": 42, "workflow": "quote", "version": 3, "status": "succeeded",
///     "input": {"sku": "sku-7"}, "output": 280, "error": null,
///     "steps": [
///         {"name": "fetch_price", "status": "completed", "output": 300, "errors": null},
///         {"name": "gift_wrap", "status": "skipped", "reason": "`when = Self::is_gift` was false"}
///     ],
///     "exported_at": "a field this version does not know"
/// }"#).unwrap();
/// assert_eq!(recorded.step("fetch_price").unwrap().output, Some(serde_json::json!(300)));
/// assert_eq!(recorded.step("gift_wrap").unwrap().status, RecordedStatus::Skipped);
/// assert_eq!(recorded.output, Some(serde_json::json!(280)));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The layout of this document: [`Recorded::FORMAT`].
    pub format: u32,
    /// The run's id; the replayed steps see it as `ctx.run_id()`.
    pub run_id: i64,
    /// The workflow's durable name.
    pub workflow: String,
    /// The workflow version the run ran.
    pub version: u32,
    /// The run's status: `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// The run's input.
    pub input: Value,
    /// The run's output, once succeeded (the terminal step's output: that step has
    /// no entry in [`steps`](Self::steps)).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub output: Option<Value>,
    /// The run's error as stored (a serialized [`RunError`]), once failed or
    /// cancelled; see [`Recorded::run_error`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// The steps with a recorded state, in declaration order.
    #[serde(default)]
    pub steps: Vec<RecordedStep>,
    /// The signals the run accepted (the first of each name), oldest first: a replay
    /// sends them to the run again, so a step that waited for one receives the same
    /// payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<RecordedSignal>,
}

/// A signal a [`Recorded`] run accepted.
///
/// ```
/// let s: pgflow::RecordedSignal =
///     serde_json::from_str(r#"{"name": "approval", "payload": {"by": "ada"}}"#).unwrap();
/// assert_eq!(s.name, "approval");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedSignal {
    /// The signal's name.
    pub name: String,
    /// Its payload.
    pub payload: Value,
}

/// One step of a [`Recorded`] run.
///
/// ```
/// use pgflow::{RecordedStatus, RecordedStep};
///
/// let step: RecordedStep = serde_json::from_str(
///     r#"{"name": "embed", "status": "failed", "elements": [{"element": 0, "output": [0.5]}]}"#,
/// ).unwrap();
/// assert_eq!(step.status, RecordedStatus::Failed);
/// assert_eq!(step.elements.unwrap()[0].element, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedStep {
    /// The step's name.
    pub name: String,
    /// Where it stood.
    pub status: RecordedStatus,
    /// Its output, when completed (`null` is an output: that of a `()` or `None`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub output: Option<Value>,
    /// Why it was skipped (`` `when = Self::pred` was false ``).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its failed attempts, oldest first, as stored (a JSON array of
    /// [`AttemptFailure`](crate::AttemptFailure)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Value>,
    /// For a map step that had not completed: the outputs of the elements that had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<Vec<RecordedElement>>,
}

/// The output of one completed element of a map step.
///
/// ```
/// let e: pgflow::RecordedElement = serde_json::from_str(r#"{"element": 3, "output": "x"}"#).unwrap();
/// assert_eq!((e.element, e.output), (3, serde_json::json!("x")));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedElement {
    /// Its index among the step's elements.
    pub element: u32,
    /// Its output.
    pub output: Value,
}

/// Where a step of a [`Recorded`] run stood.
///
/// ```
/// use pgflow::RecordedStatus;
/// let s: RecordedStatus = serde_json::from_str(r#""completed""#).unwrap();
/// assert_eq!(s, RecordedStatus::Completed);
/// // a status a later pgflow may add
/// let s: RecordedStatus = serde_json::from_str(r#""paused""#).unwrap();
/// assert_eq!(s, RecordedStatus::Unknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecordedStatus {
    /// Its output is recorded.
    Completed,
    /// A conditional step whose predicate was false.
    Skipped,
    /// It failed for good; see [`RecordedStep::errors`].
    Failed,
    /// A map step whose elements were running.
    Running,
    /// A join waiting for its parents.
    Waiting,
    /// A status this version of pgflow does not know.
    #[serde(other)]
    Unknown,
}

impl RecordedStatus {
    /// The stored name: `completed`, `skipped`, ..
    ///
    /// ```
    /// assert_eq!(pgflow::RecordedStatus::Waiting.as_str(), "waiting");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for RecordedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A field that is `Some` whenever present, `Some(Value::Null)` for an explicit
/// `null`: a completed step's `null` output is an output.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Recorded {
    /// The layout [`Recorded::format`] names, and the only one this pgflow reads.
    pub const FORMAT: u32 = 1;

    /// The recorded step called `name`.
    ///
    /// ```
    /// # let recorded: pgflow::Recorded = serde_json::from_value(serde_json::json!({
    /// #     "format": 1, "run_id": 1, "workflow": "w", "version": 1, "status": "running",
    /// #     "input": 1, "steps": [{"name": "a", "status": "completed", "output": 2}]})).unwrap();
    /// assert_eq!(recorded.step("a").unwrap().output, Some(serde_json::json!(2)));
    /// assert!(recorded.step("b").is_none());
    /// ```
    pub fn step(&self, name: &str) -> Option<&RecordedStep> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The run's error as a [`RunError`] (`None` when there is none, or when it does
    /// not read as one).
    ///
    /// ```
    /// use pgflow::{AttemptFailure, Recorded, RunError, StepError};
    /// let error = RunError::step_failed("w", "a", None, vec![AttemptFailure::new(1, &StepError::permanent("no"))]);
    /// let recorded: Recorded = serde_json::from_value(serde_json::json!({
    ///     "format": 1, "run_id": 1, "workflow": "w", "version": 1, "status": "failed",
    ///     "input": 1, "error": error, "steps": []})).unwrap();
    /// assert_eq!(recorded.run_error(), Some(error));
    /// ```
    pub fn run_error(&self) -> Option<RunError> {
        self.error
            .as_ref()
            .and_then(|e| serde_json::from_value(e.clone()).ok())
    }
}

/// Why a [`Replay`] could not run, or how the replayed run failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The recording has a layout this pgflow does not read.
    #[error(
        "the recording has format {found}; this version of pgflow reads format {}",
        Recorded::FORMAT
    )]
    Format {
        /// The recording's format.
        found: u32,
    },
    /// The recording is of another workflow.
    #[error("the recording is of workflow `{recorded}`, not `{workflow}`")]
    OtherWorkflow {
        /// The workflow recorded.
        recorded: String,
        /// The workflow replayed.
        workflow: String,
    },
    /// A step to inject does not exist in the workflow replayed.
    #[error(
        "cannot inject step `{step}`: workflow `{workflow}` has no such step; its steps: {steps}"
    )]
    UnknownStep {
        /// The workflow replayed.
        workflow: String,
        /// The step asked for.
        step: String,
        /// The workflow's steps, comma-separated.
        steps: String,
    },
    /// A step to inject has no recorded output (nor skip, nor completed element).
    #[error("cannot inject step `{step}`: {why}")]
    NotRecorded {
        /// The step.
        step: String,
        /// Why: what the recording says about it.
        why: String,
    },
    /// The terminal step was asked for: its output is the run's.
    #[error(
        "cannot inject step `{step}`: it is the terminal step of workflow `{workflow}`, whose \
         output is the run's output (`Recorded::output`), so nothing would be replayed"
    )]
    Terminal {
        /// The workflow replayed.
        workflow: String,
        /// The terminal step.
        step: String,
    },
    /// A recorded value does not fit the workflow replayed: the input, or the output
    /// of an injected step (or element), does not deserialize into its type, or a
    /// recorded skip or map elements meet a step of another kind.
    #[error(
        "the recorded {what} does not fit workflow `{workflow}` version {version}{}: {message}",
        recorded_version_note(*version, *recorded_version)
    )]
    Mismatch {
        /// The workflow replayed.
        workflow: String,
        /// Its version.
        version: u32,
        /// The version recorded.
        recorded_version: u32,
        /// What: ``input``, ``output of step `x` ``, ``output of element 3 of step `x` ``.
        what: String,
        /// What is wrong, with the serde path.
        message: String,
    },
    /// The replayed run failed (or was cancelled): what [`execute`](crate::execute)
    /// would have returned.
    #[error(transparent)]
    Run(#[from] RunError),
}

fn recorded_version_note(version: u32, recorded: u32) -> String {
    if version == recorded {
        String::new()
    } else {
        format!(" (the run was recorded with version {recorded})")
    }
}

impl ReplayError {
    /// How the replayed run failed, when it ran and failed.
    ///
    /// ```
    /// use pgflow::{ReplayError, RunError};
    /// let e = ReplayError::Run(RunError::Cancelled { workflow: "w".into() });
    /// assert!(e.run_error().is_some());
    /// let e = ReplayError::Format { found: 9 };
    /// assert!(e.run_error().is_none());
    /// ```
    pub fn run_error(&self) -> Option<&RunError> {
        match self {
            Self::Run(e) => Some(e),
            _ => None,
        }
    }
}

/// Replays `recorded` with workflow `W` in process; choose what to inject, then
/// [`run`](Replay::run) it.
///
/// Nothing is injected by default: `replay::<W>(recorded).run()` is
/// [`execute`](crate::execute) on the recorded input (with the recorded run id).
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use pgflow::{workflow, ExecuteOptions, Recorded, StepContext, StepError};
///
/// pub struct Greet;
///
/// #[workflow(name = "greet_replay")]
/// impl Greet {
///     #[step]
///     async fn lookup(id: u32, ctx: &StepContext) -> Result<String, StepError> {
///         ctx.data::<AtomicU32>()?.fetch_add(1, Ordering::SeqCst);
///         Ok(format!("user{id}"))
///     }
///     #[step]
///     async fn greet(lookup: String, ctx: &StepContext) -> Result<String, StepError> {
///         Ok(format!("hello {lookup} (run {})", ctx.run_id().0))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let recorded: Recorded = serde_json::from_value(serde_json::json!({
///     "format": 1, "run_id": 42, "workflow": "greet_replay", "version": 1,
///     "status": "failed", "input": 7,
///     "steps": [{"name": "lookup", "status": "completed", "output": "ada"}]
/// })).unwrap();
///
/// // `lookup` is not called: `greet` gets its recorded output.
/// let out = pgflow::replay::<Greet>(recorded.clone())
///     .inject("lookup")
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(out, "hello ada (run 42)");
///
/// // Nothing injected: every step runs, here on another input.
/// let out = pgflow::replay::<Greet>(recorded)
///     .input(8)
///     .options(ExecuteOptions::new().data(AtomicU32::new(0)))
///     .run()
///     .await
///     .unwrap();
/// assert_eq!(out, "hello user8 (run 42)");
/// # }
/// ```
pub fn replay<W: Workflow>(recorded: Recorded) -> Replay<W> {
    Replay {
        recorded,
        inject: Vec::new(),
        inject_completed: false,
        input: None,
        options: ExecuteOptions::default(),
        workflow: PhantomData,
    }
}

/// A replay of a [`Recorded`] run with workflow `W`, made by [`replay`].
#[must_use = "a replay does nothing until `.run().await`"]
pub struct Replay<W: Workflow> {
    recorded: Recorded,
    inject: Vec<String>,
    inject_completed: bool,
    input: Option<W::Input>,
    options: ExecuteOptions,
    workflow: PhantomData<fn() -> W>,
}

impl<W: Workflow> fmt::Debug for Replay<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("workflow", &W::NAME)
            .field("run_id", &self.recorded.run_id)
            .field("inject", &self.inject)
            .field("inject_completed", &self.inject_completed)
            .field("input_overridden", &self.input.is_some())
            .field("options", &self.options)
            .finish()
    }
}

impl<W: Workflow> Replay<W> {
    /// Injects step `step`: it is not called; it completes with its recorded output
    /// (or is skipped, if it was recorded as skipped). For a map step recorded
    /// mid-way, its completed elements are injected and the others run.
    ///
    /// [`run`](Replay::run) fails when `W` has no such step, when the step is the
    /// terminal one, or when nothing is recorded for it to inject.
    ///
    /// ```
    /// # use pgflow::{workflow, Recorded, StepError};
    /// # pub struct Two;
    /// # #[workflow(name = "two_inject")]
    /// # impl Two {
    /// #     #[step] async fn a(x: u32) -> Result<u32, StepError> { Ok(x) }
    /// #     #[step] async fn b(a: u32) -> Result<u32, StepError> { Ok(a + 1) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let recorded: Recorded = serde_json::from_value(serde_json::json!({
    ///     "format": 1, "run_id": 1, "workflow": "two_inject", "version": 1, "status": "failed",
    ///     "input": 1, "steps": [{"name": "a", "status": "completed", "output": 10}]
    /// })).unwrap();
    /// assert_eq!(pgflow::replay::<Two>(recorded.clone()).inject("a").run().await.unwrap(), 11);
    /// let err = pgflow::replay::<Two>(recorded).inject("nope").run().await.unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "cannot inject step `nope`: workflow `two_inject` has no such step; its steps: a, b"
    /// );
    /// # }
    /// ```
    pub fn inject(mut self, step: impl Into<String>) -> Self {
        self.inject.push(step.into());
        self
    }

    /// Injects every step recorded as completed or skipped, and the completed
    /// elements of map steps recorded mid-way: only what had not completed runs.
    /// Recorded steps that `W` no longer has are left out (there is nothing to call
    /// in their place); the terminal step always runs.
    ///
    /// ```
    /// # use pgflow::{workflow, Recorded, StepError};
    /// # pub struct Two;
    /// # #[workflow(name = "two_completed")]
    /// # impl Two {
    /// #     #[step] async fn a(x: u32) -> Result<u32, StepError> { unreachable!() }
    /// #     #[step] async fn b(a: u32) -> Result<u32, StepError> { Ok(a + 1) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let recorded: Recorded = serde_json::from_value(serde_json::json!({
    ///     "format": 1, "run_id": 1, "workflow": "two_completed", "version": 1, "status": "failed",
    ///     "input": 1, "steps": [{"name": "a", "status": "completed", "output": 10}]
    /// })).unwrap();
    /// assert_eq!(pgflow::replay::<Two>(recorded).inject_completed().run().await.unwrap(), 11);
    /// # }
    /// ```
    pub fn inject_completed(mut self) -> Self {
        self.inject_completed = true;
        self
    }

    /// Runs on `input` instead of the recorded input.
    ///
    /// ```
    /// # use pgflow::{workflow, Recorded, StepError};
    /// # pub struct One;
    /// # #[workflow(name = "one_input")]
    /// # impl One { #[step] async fn a(x: u32) -> Result<u32, StepError> { Ok(x * 2) } }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let recorded: Recorded = serde_json::from_value(serde_json::json!({
    /// #     "format": 1, "run_id": 1, "workflow": "one_input", "version": 1, "status": "failed",
    /// #     "input": 1, "steps": []})).unwrap();
    /// assert_eq!(pgflow::replay::<One>(recorded).input(21).run().await.unwrap(), 42);
    /// # }
    /// ```
    pub fn input(mut self, input: W::Input) -> Self {
        self.input = Some(input);
        self
    }

    /// The executor's options: shared data, the cost meter, a cancel token, JSON
    /// round trips (see [`ExecuteOptions`]). The default: none of them.
    ///
    /// ```
    /// # use pgflow::{workflow, ExecuteOptions, Recorded, StepContext, StepError};
    /// # pub struct Paid;
    /// # #[workflow(name = "paid_options")]
    /// # impl Paid {
    /// #     #[step] async fn a(x: u32, ctx: &StepContext) -> Result<u32, StepError> { ctx.add_cost_cents(3); Ok(x) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let recorded: Recorded = serde_json::from_value(serde_json::json!({
    /// #     "format": 1, "run_id": 1, "workflow": "paid_options", "version": 1, "status": "failed",
    /// #     "input": 1, "steps": []})).unwrap();
    /// let cost = pgflow::CostMeter::new();
    /// let opts = ExecuteOptions::new().cost(cost.clone()).json_roundtrip(true);
    /// pgflow::replay::<Paid>(recorded).options(opts).run().await.unwrap();
    /// assert_eq!(cost.total(), 3);
    /// # }
    /// ```
    pub fn options(mut self, options: ExecuteOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs the replay: checks the recording against `W`, then runs `W` in process
    /// with the chosen steps injected.
    ///
    /// # Errors
    ///
    /// Before anything runs: [`ReplayError::Format`], [`ReplayError::OtherWorkflow`],
    /// [`ReplayError::UnknownStep`], [`ReplayError::Terminal`],
    /// [`ReplayError::NotRecorded`], [`ReplayError::Mismatch`] (see their docs).
    /// Then [`ReplayError::Run`] with what [`execute`](crate::execute) would return:
    /// the failing step and its attempts, to compare with [`Recorded::run_error`].
    ///
    /// # Panics
    ///
    /// As [`execute`](crate::execute): outside a tokio runtime with the time driver.
    pub async fn run(mut self) -> Result<W::Output, ReplayError> {
        let def = W::definition();
        let (input, injection) = self.prepare(def)?;
        // The recorded signals reach the replayed run as they reached the original.
        for signal in &self.recorded.signals {
            let payload = serde_json::value::to_raw_value(&signal.payload).map_err(|e| {
                ReplayError::Mismatch {
                    workflow: def.name().to_owned(),
                    version: def.version(),
                    recorded_version: self.recorded.version,
                    what: format!("signal `{}`", signal.name),
                    message: e.to_string(),
                }
            })?;
            // An outcome other than `Kept` (a second recorded signal of one name)
            // changes nothing: the first one stays.
            let signals = self.options.signals.get_or_insert_with(crate::Signals::new);
            let _ = signals.send_json(&signal.name, payload);
        }
        let out = run_definition(def, input, &self.options, Some(injection)).await?;
        out.into_typed::<W::Output>().map_err(|e| {
            ReplayError::Run(RunError::Serde {
                workflow: def.name().to_owned(),
                message: format!("output: {}", e.message()),
            })
        })
    }

    /// Checks the recording against `def` and makes the input and what to inject.
    fn prepare(
        &mut self,
        def: &'static WorkflowDef,
    ) -> Result<(StepValue, Injection), ReplayError> {
        let recorded = &self.recorded;
        if recorded.format != Recorded::FORMAT {
            return Err(ReplayError::Format {
                found: recorded.format,
            });
        }
        if recorded.workflow != def.name() {
            return Err(ReplayError::OtherWorkflow {
                recorded: recorded.workflow.clone(),
                workflow: def.name().to_owned(),
            });
        }
        let mut steps: Vec<Option<Injected>> = def.steps().iter().map(|_| None).collect();
        for name in &self.inject {
            let step = def.step(name).ok_or_else(|| ReplayError::UnknownStep {
                workflow: def.name().to_owned(),
                step: name.clone(),
                steps: def
                    .steps()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            let rec = recorded.step(name);
            let injected = self.injected(def, step, rec)?;
            let is_terminal = step.index() == def.terminal().index();
            steps[step.index()] = match injected {
                Some(Injected::Output(_)) | None if is_terminal => {
                    return Err(ReplayError::Terminal {
                        workflow: def.name().to_owned(),
                        step: name.clone(),
                    });
                }
                Some(i) => Some(i),
                None => {
                    return Err(ReplayError::NotRecorded {
                        step: name.clone(),
                        why: not_recorded_why(recorded.run_id, rec),
                    });
                }
            };
        }
        if self.inject_completed {
            for rec in &recorded.steps {
                let Some(step) = def.step(&rec.name) else {
                    continue;
                };
                let whole = matches!(
                    rec.status,
                    RecordedStatus::Completed | RecordedStatus::Skipped
                );
                let is_terminal = step.index() == def.terminal().index();
                if steps[step.index()].is_some() || (whole && is_terminal) {
                    continue;
                }
                steps[step.index()] = self.injected(def, step, Some(rec))?;
            }
        }
        let run_id = RunId(recorded.run_id);
        let input = match self.input.take() {
            Some(input) => input,
            None => from_json::<W::Input>(&recorded.input.to_string())
                .map_err(|e| self.mismatch(def, "input".to_owned(), e.message()))?,
        };
        Ok((
            StepValue::typed(input, def.input()),
            Injection { run_id, steps },
        ))
    }

    /// What the recording injects for `step` (`None`: nothing to inject).
    fn injected(
        &self,
        def: &'static WorkflowDef,
        step: &'static StepDef,
        rec: Option<&RecordedStep>,
    ) -> Result<Option<Injected>, ReplayError> {
        let Some(rec) = rec else {
            return Ok(None);
        };
        let name = step.name();
        match rec.status {
            RecordedStatus::Completed => {
                let json = rec.output.as_ref().unwrap_or(&Value::Null).to_string();
                let value = (step.output().from_json)(&json).map_err(|e| {
                    self.mismatch(def, format!("output of step `{name}`"), e.message())
                })?;
                Ok(Some(Injected::Output(StepOutput::Completed(
                    StepValue::Typed(value, step.output()),
                ))))
            }
            RecordedStatus::Skipped if step.kind() == StepKind::Conditional => {
                Ok(Some(Injected::Output(StepOutput::Skipped)))
            }
            RecordedStatus::Skipped => Err(self.mismatch(
                def,
                format!("skip of step `{name}`"),
                &format!(
                    "the step is not conditional (it is a {} step)",
                    step.kind().as_str()
                ),
            )),
            _ => {
                let Some(elements) = rec.elements.as_ref().filter(|e| !e.is_empty()) else {
                    return Ok(None);
                };
                let Some(map) = step.map() else {
                    return Err(self.mismatch(
                        def,
                        format!("elements of step `{name}`"),
                        &format!(
                            "the step is not a map step (it is a {} step)",
                            step.kind().as_str()
                        ),
                    ));
                };
                let ops = map.element_output();
                let mut given: Vec<Option<StepValue>> = Vec::new();
                for e in elements {
                    let value = (ops.from_json)(&e.output.to_string()).map_err(|err| {
                        self.mismatch(
                            def,
                            format!("output of element {} of step `{name}`", e.element),
                            err.message(),
                        )
                    })?;
                    let i = e.element as usize;
                    if given.len() <= i {
                        given.resize_with(i + 1, || None);
                    }
                    given[i] = Some(StepValue::Typed(value, ops));
                }
                Ok(Some(Injected::Elements(given)))
            }
        }
    }

    fn mismatch(&self, def: &WorkflowDef, what: String, message: &str) -> ReplayError {
        ReplayError::Mismatch {
            workflow: def.name().to_owned(),
            version: def.version(),
            recorded_version: self.recorded.version,
            what,
            message: message.to_owned(),
        }
    }
}

fn not_recorded_why(run_id: i64, rec: Option<&RecordedStep>) -> String {
    match rec.map(|r| r.status) {
        None => format!("run {run_id} recorded nothing for it (it had not started)"),
        Some(RecordedStatus::Failed) => format!("it failed in run {run_id}, with no output"),
        Some(RecordedStatus::Running) => {
            format!("it was still running in run {run_id}, with no element completed")
        }
        Some(RecordedStatus::Waiting) => {
            format!("it was waiting for its parents in run {run_id}")
        }
        Some(s) => format!("its recorded status `{s}` has no output"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use serde_json::json;

    use super::*;
    use crate::{StepContext, StepError, workflow};

    /// How often each step body (and predicate) ran.
    #[derive(Default)]
    struct Calls {
        fetch: AtomicU32,
        price: AtomicU32,
        total: AtomicU32,
        measure: AtomicU32,
    }

    thread_local! {
        /// Calls of `Words::is_long` on this thread (a `#[tokio::test]` runs its
        /// steps on its own thread).
        static PREDICATE_CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    impl Calls {
        fn of(c: &AtomicU32) -> u32 {
            c.load(Ordering::SeqCst)
        }
    }

    fn calls(ctx: &StepContext) -> Result<&Arc<Calls>, StepError> {
        ctx.data::<Arc<Calls>>()
    }

    /// Options whose data counts the calls.
    fn counted() -> (ExecuteOptions, Arc<Calls>) {
        let c = Arc::new(Calls::default());
        (ExecuteOptions::new().data(Arc::clone(&c)), c)
    }

    /// fetch -> price -> total; `price` fails on an empty cart (the bug).
    pub(super) struct Checkout;

    #[workflow(name = "replay_checkout", max_attempts = 1)]
    impl Checkout {
        #[step]
        async fn fetch(cart: u32, ctx: &StepContext) -> Result<Vec<u32>, StepError> {
            calls(ctx)?.fetch.fetch_add(1, Ordering::SeqCst);
            Ok((1..=cart).collect())
        }

        #[step]
        async fn price(fetch: Vec<u32>, ctx: &StepContext) -> Result<u32, StepError> {
            calls(ctx)?.price.fetch_add(1, Ordering::SeqCst);
            let first = fetch
                .first()
                .ok_or_else(|| StepError::permanent("empty cart"))?;
            Ok(fetch.iter().sum::<u32>() * first)
        }

        #[step]
        async fn total(price: u32, ctx: &StepContext) -> Result<String, StepError> {
            calls(ctx)?.total.fetch_add(1, Ordering::SeqCst);
            Ok(format!("{price} cents (run {})", ctx.run_id().0))
        }
    }

    /// The same steps, version 2: `price` is fixed.
    pub(super) struct CheckoutFixed;

    #[workflow(name = "replay_checkout", version = 2, max_attempts = 1)]
    impl CheckoutFixed {
        #[step]
        async fn fetch(cart: u32, ctx: &StepContext) -> Result<Vec<u32>, StepError> {
            calls(ctx)?.fetch.fetch_add(1, Ordering::SeqCst);
            Ok((1..=cart).collect())
        }

        #[step]
        async fn price(fetch: Vec<u32>, ctx: &StepContext) -> Result<u32, StepError> {
            calls(ctx)?.price.fetch_add(1, Ordering::SeqCst);
            Ok(fetch.iter().sum::<u32>() * fetch.first().copied().unwrap_or(0))
        }

        #[step]
        async fn total(price: u32, ctx: &StepContext) -> Result<String, StepError> {
            calls(ctx)?.total.fetch_add(1, Ordering::SeqCst);
            Ok(format!("{price} cents (run {})", ctx.run_id().0))
        }
    }

    /// A map step between two single steps, and a conditional step.
    pub(super) struct Words;

    #[workflow(name = "replay_words", max_attempts = 1)]
    impl Words {
        #[step]
        async fn split(text: String) -> Result<Vec<String>, StepError> {
            Ok(text.split_whitespace().map(str::to_owned).collect())
        }

        #[step(map)]
        async fn measure(word: String, ctx: &StepContext) -> Result<usize, StepError> {
            calls(ctx)?.measure.fetch_add(1, Ordering::SeqCst);
            if word == "boom" {
                return Err(StepError::permanent("boom"));
            }
            Ok(word.len())
        }

        #[step(when = Self::is_long)]
        async fn shout(measure: Vec<usize>) -> Result<String, StepError> {
            Ok(format!("{measure:?}!"))
        }

        #[step(depends_on = [measure, shout])]
        async fn report(measure: Vec<usize>, shout: Option<String>) -> Result<String, StepError> {
            Ok(shout.unwrap_or_else(|| format!("{measure:?}")))
        }

        fn is_long(measure: &[usize]) -> bool {
            PREDICATE_CALLS.with(|c| c.set(c.get() + 1));
            measure.len() > 3
        }
    }

    fn recorded(workflow: &str, input: Value, steps: Value) -> Recorded {
        serde_json::from_value(json!({
            "format": 1, "run_id": 42, "workflow": workflow, "version": 1,
            "status": "failed", "input": input, "error": null, "steps": steps,
        }))
        .unwrap()
    }

    /// A run of `replay_checkout` v1 that failed at `price`: `fetch` returned an
    /// empty cart.
    fn failed_checkout() -> Recorded {
        recorded(
            "replay_checkout",
            json!(3),
            json!([
                {"name": "fetch", "status": "completed", "output": []},
                {"name": "price", "status": "failed",
                 "errors": [{"attempt": 1, "kind": "permanent", "message": "empty cart"}]},
            ]),
        )
    }

    #[tokio::test]
    async fn injected_steps_are_not_called_and_the_others_run_on_their_outputs() {
        let rec = recorded(
            "replay_checkout",
            json!(3),
            json!([
                {"name": "fetch", "status": "completed", "output": [2, 5]},
                {"name": "price", "status": "completed", "output": 70},
            ]),
        );
        let (opts, c) = counted();
        let out = replay::<Checkout>(rec.clone())
            .inject("fetch")
            .options(opts)
            .run()
            .await
            .unwrap();
        // fetch's recorded [2, 5], not its real [1, 2, 3]; the recorded run id
        assert_eq!(out, "14 cents (run 42)");
        assert_eq!(Calls::of(&c.fetch), 0);
        assert_eq!(Calls::of(&c.price), 1);
        assert_eq!(Calls::of(&c.total), 1);

        // Both injected (twice is harmless), through JSON: only the terminal step runs.
        let (opts, c) = counted();
        let out = replay::<Checkout>(rec)
            .inject("fetch")
            .inject("price")
            .inject("price")
            .options(opts.json_roundtrip(true))
            .run()
            .await
            .unwrap();
        assert_eq!(out, "70 cents (run 42)");
        assert_eq!(Calls::of(&c.fetch) + Calls::of(&c.price), 0);
        assert_eq!(Calls::of(&c.total), 1);
    }

    #[tokio::test]
    async fn inject_completed_reproduces_the_failure_then_the_fix_runs_on_the_same_data() {
        let (opts, c) = counted();
        let err = replay::<Checkout>(failed_checkout())
            .inject_completed()
            .options(opts)
            .run()
            .await
            .unwrap_err();
        let run = err.run_error().unwrap();
        assert_eq!(run.failed_step(), Some("price"));
        assert_eq!(run.history()[0].message, "empty cart");
        assert_eq!((Calls::of(&c.fetch), Calls::of(&c.price)), (0, 1));

        // Without injection, the real `fetch` runs and the bug does not show.
        let (opts, _) = counted();
        let out = replay::<Checkout>(failed_checkout())
            .options(opts)
            .run()
            .await;
        assert_eq!(out.unwrap(), "6 cents (run 42)");

        // The fix, a new version with the same steps, replays the v1 recording.
        let (opts, c) = counted();
        let out = replay::<CheckoutFixed>(failed_checkout())
            .inject_completed()
            .options(opts)
            .run()
            .await;
        assert_eq!(out.unwrap(), "0 cents (run 42)");
        assert_eq!(Calls::of(&c.fetch), 0);

        // Another input, the same injected outputs.
        let (opts, _) = counted();
        let out = replay::<CheckoutFixed>(failed_checkout())
            .inject("fetch")
            .input(9)
            .options(opts)
            .run()
            .await;
        assert_eq!(out.unwrap(), "0 cents (run 42)");
    }

    #[tokio::test]
    async fn what_cannot_be_injected_is_refused_before_anything_runs() {
        let run = |r: Replay<Checkout>| async {
            let (opts, c) = counted();
            let e = r.options(opts).run().await.unwrap_err();
            assert_eq!(
                Calls::of(&c.fetch) + Calls::of(&c.price) + Calls::of(&c.total),
                0
            );
            e
        };
        let e = run(replay(recorded("other", json!(1), json!([])))).await;
        assert_eq!(
            e.to_string(),
            "the recording is of workflow `other`, not `replay_checkout`"
        );
        let mut rec = failed_checkout();
        rec.format = 2;
        let e = run(replay(rec)).await;
        assert_eq!(e, ReplayError::Format { found: 2 });
        let e = run(replay(failed_checkout()).inject("fetch").inject("charge")).await;
        assert_eq!(
            e.to_string(),
            "cannot inject step `charge`: workflow `replay_checkout` has no such step; \
             its steps: fetch, price, total"
        );
        let e = run(replay(failed_checkout()).inject("price")).await;
        assert_eq!(
            e.to_string(),
            "cannot inject step `price`: it failed in run 42, with no output"
        );
        let e = run(replay(failed_checkout()).inject("total")).await;
        assert!(matches!(e, ReplayError::Terminal { .. }), "{e}");
        assert!(e.to_string().contains("`Recorded::output`"), "{e}");
        // a recorded output of the wrong type names the step and the serde path
        let rec = recorded(
            "replay_checkout",
            json!(3),
            json!([{"name": "fetch", "status": "completed", "output": [1, "two"]}]),
        );
        let e = run(replay(rec.clone()).inject("fetch")).await;
        assert_eq!(
            e.to_string(),
            "the recorded output of step `fetch` does not fit workflow `replay_checkout` \
             version 1: does not deserialize into `alloc::vec::Vec<u32>` at `[1]`: invalid \
             type: string \"two\", expected u32 at line 1 column 8"
        );
        // the same through inject_completed, and with the version noted when it differs
        let e = replay::<CheckoutFixed>(rec)
            .inject_completed()
            .run()
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("version 2 (the run was recorded with version 1): does not"),
            "{e}"
        );
        let e = run(replay(recorded(
            "replay_checkout",
            json!({"cart": 3}),
            json!([]),
        )))
        .await;
        assert!(
            e.to_string().starts_with(
                "the recorded input does not fit workflow `replay_checkout` version 1: \
                 does not deserialize into `u32`"
            ),
            "{e}"
        );
        // a recorded skip needs a conditional step
        let rec = recorded(
            "replay_checkout",
            json!(3),
            json!([{"name": "fetch", "status": "skipped", "reason": "r"}]),
        );
        let e = run(replay(rec).inject("fetch")).await;
        assert!(
            e.to_string().contains(
                "the recorded skip of step `fetch` does not fit workflow `replay_checkout` \
                 version 1: the step is not conditional (it is a single step)"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_skip_is_injected_without_calling_the_predicate() {
        let rec = recorded(
            "replay_words",
            json!("a bb ccc dddd"),
            json!([
                {"name": "split", "status": "completed", "output": ["a", "bb", "ccc", "dddd"]},
                {"name": "measure", "status": "completed", "output": [1, 2, 3, 4]},
                {"name": "shout", "status": "skipped", "reason": "`when = Self::is_long` was false"},
            ]),
        );
        let (opts, c) = counted();
        let out = replay::<Words>(rec.clone())
            .inject_completed()
            .options(opts)
            .run()
            .await
            .unwrap();
        // 4 words would make `is_long` true: the recorded skip wins
        assert_eq!(out, "[1, 2, 3, 4]");
        assert_eq!(Calls::of(&c.measure), 0);
        assert_eq!(PREDICATE_CALLS.with(std::cell::Cell::get), 0);

        // `shout` not injected: it runs (its predicate is true now)
        let (opts, _) = counted();
        let out = replay::<Words>(rec)
            .inject("measure")
            .options(opts)
            .run()
            .await;
        assert_eq!(out.unwrap(), "[1, 2, 3, 4]!");
        assert_eq!(PREDICATE_CALLS.with(std::cell::Cell::get), 1);
    }

    #[tokio::test]
    async fn a_map_step_recorded_mid_way_runs_only_its_missing_elements() {
        let rec = recorded(
            "replay_words",
            json!("a boom ccc"),
            json!([
                {"name": "split", "status": "completed", "output": ["a", "boom", "ccc"]},
                {"name": "measure", "status": "failed",
                 "elements": [{"element": 0, "output": 10}, {"element": 2, "output": 30}]},
            ]),
        );
        let (opts, c) = counted();
        let err = replay::<Words>(rec.clone())
            .inject_completed()
            .options(opts)
            .run()
            .await
            .unwrap_err();
        let RunError::StepFailed { step, element, .. } = err.run_error().unwrap() else {
            panic!("{err}");
        };
        assert_eq!((step.as_str(), *element), ("measure", Some(1)));
        assert_eq!(Calls::of(&c.measure), 1);

        // On another input, the recorded elements still take their places.
        let (opts, c) = counted();
        let out = replay::<Words>(rec)
            .inject("measure")
            .input("a bb ccc".into())
            .options(opts)
            .run()
            .await
            .unwrap();
        assert_eq!(out, "[10, 2, 30]");
        assert_eq!(Calls::of(&c.measure), 1);

        // elements for a step that does not map
        let rec = recorded(
            "replay_checkout",
            json!(3),
            json!([{"name": "price", "status": "running", "elements": [{"element": 0, "output": 1}]}]),
        );
        let e = replay::<Checkout>(rec)
            .inject("price")
            .run()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("the step is not a map step"), "{e}");
    }

    #[test]
    fn a_recording_round_trips_with_null_outputs_and_unknown_fields() {
        let rec: Recorded = serde_json::from_value(json!({
            "format": 1, "run_id": 7, "workflow": "w", "version": 3, "status": "succeeded",
            "input": null, "output": null, "new_field": {"a": 1},
            "steps": [
                {"name": "unit", "status": "completed", "output": null},
                {"name": "later", "status": "paused"},
            ],
        }))
        .unwrap();
        assert_eq!(rec.output, Some(Value::Null));
        assert_eq!(rec.steps[0].output, Some(Value::Null));
        assert_eq!(rec.steps[1].output, None);
        assert_eq!(rec.steps[1].status, RecordedStatus::Unknown);
        assert_eq!(rec.error, None);
        let back: Recorded = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }
}
