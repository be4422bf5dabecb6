//! Not public API: what `#[workflow]` expansions name, through `::pgflow::__private`.
//! Anything here may change in any release.

pub use futures_util::future::BoxFuture;

/// What a step entry returns.
pub type StepFuture = BoxFuture<'static, Result<crate::value::StepOutput, StepError>>;

/// The future of an attempt that failed before the step's function was called (an
/// input that does not fit its parameter).
#[cold]
pub fn failed(e: StepError) -> StepFuture {
    Box::pin(std::future::ready(Err(e)))
}
pub use inventory;
pub use serde_json;

pub use crate::registry::Registration;
pub use crate::transaction::Borrowed;
pub use crate::value::{
    CloneFn, Dup, DupFn, DupNoClone, DupResult, DupViaClone, StepInputs, StepOutput, StepValue,
    ValueOps, collect_vec, finish_optional, split_vec,
};

use std::sync::OnceLock;

pub use crate::workflow::{ContextSource, MapOps};
use crate::workflow::{Param, StepFn, StepOptions};
use crate::{StepDef, StepError, WorkflowDef};

/// The fields of a [`StepDef`], built by the expansion.
pub struct StepParts {
    pub name: &'static str,
    pub index: usize,
    pub parents: &'static [usize],
    pub params: &'static [Param],
    pub takes_context: bool,
    /// Whether it takes a transaction (a `&mut T` parameter).
    pub takes_transaction: bool,
    /// The names of the runtime's limits it counts against.
    pub limits: &'static [&'static str],
    /// The `when` predicate as written, for a conditional step.
    pub when: Option<&'static str>,
    /// How a map step maps.
    pub map: Option<&'static MapOps>,
    /// The signal the step waits for.
    pub signal: Option<&'static crate::SignalDef>,
    /// For a step returning `Subflow<W>`: `W::definition`.
    pub subflow: Option<fn() -> &'static WorkflowDef>,
    pub options: StepOptions,
    pub output: &'static ValueOps,
    pub run: StepFn,
}

/// A run's key from its JSON input (`#[workflow(key = ..)]`).
pub type KeyFn = fn(&str) -> Result<String, StepError>;

/// The fields of a [`WorkflowDef`], built by the expansion.
pub struct WorkflowParts {
    pub name: &'static str,
    pub version: u32,
    pub queue: &'static str,
    pub rust_type: &'static str,
    pub file: &'static str,
    pub line: u32,
    pub defaults: StepOptions,
    pub input: &'static ValueOps,
    /// The operations of the workflow's output type.
    pub output: &'static ValueOps,
    /// For a conditional terminal step: its output (or skip) as the workflow's
    /// `Option<T>` output.
    pub finish: Option<fn(StepOutput) -> Result<StepValue, StepError>>,
    pub steps: &'static [StepDef],
    pub terminal: usize,
    /// `#[workflow(key = ..)]`: a run's key from its JSON input.
    pub key: Option<KeyFn>,
}

/// The fields of a [`MapOps`], built by the expansion.
pub struct MapParts {
    pub param: usize,
    pub item: &'static ValueOps,
    pub element_output: &'static ValueOps,
    pub split: fn(StepValue) -> Result<Vec<StepValue>, StepError>,
    pub collect: fn(Vec<StepValue>) -> Result<StepValue, StepError>,
}

/// The typed marker of signal `name` of workflow `W` (the constant `W::<name>`).
pub const fn signal<W, T>(name: &'static str) -> crate::Signal<W, T> {
    crate::Signal::new(name)
}

/// What a step returning `Subflow<W>` hands its executor.
#[inline]
pub fn subflow_start<W: crate::Workflow>(subflow: crate::Subflow<W>) -> crate::SubflowStart {
    subflow.into_start()
}

/// A run's key from its JSON input, through the workflow's key fn.
///
/// # Errors
///
/// When the input does not deserialize.
pub fn key_from_json<W: crate::Workflow>(input: &str) -> Result<String, StepError> {
    let input: W::Input = crate::engine::from_json(input)?;
    Ok(W::key(&input).unwrap_or_default())
}

/// Builds the map operations of a map step.
pub const fn map_ops(parts: MapParts) -> MapOps {
    MapOps { parts }
}

/// Builds a step row.
pub const fn step_def(parts: StepParts) -> StepDef {
    StepDef { parts }
}

/// Builds a workflow definition.
pub const fn workflow_def(parts: WorkflowParts) -> WorkflowDef {
    WorkflowDef {
        parts,
        plan: OnceLock::new(),
        consumers: OnceLock::new(),
    }
}

/// Converts a step's error type; spanned at the user's error type so a type that is
/// not `Into<StepError>` is reported there.
#[inline]
pub fn into_step_error<E: Into<StepError>>(e: E) -> StepError {
    e.into()
}

/// Implemented only for `T: SameType<T>`: the expansion asserts that a parameter's
/// type is its source's output type, spanned at the parameter.
#[diagnostic::on_unimplemented(
    message = "step parameter of type `{T}` is fed a `{Self}`",
    label = "expected `{T}`, found `{Self}`",
    note = "a parameter takes the output type of the step it is bound to (the previous step, the parent it is named after, or the workflow input for `input`)"
)]
pub trait SameType<T> {}

impl<T> SameType<T> for T {}

/// Compile-time check that `Source` (a step's output) is `Param` (a parameter's type).
pub const fn same_type<Source: SameType<Param>, Param>() {}

/// Implemented only for `Option<T>`: a parameter bound to a conditional step's output
/// `T` must be an `Option<T>` (`None` when the step was skipped). The expansion
/// converts through it, spanned at the parameter.
#[diagnostic::on_unimplemented(
    message = "parameter of type `{Self}` takes the output of a conditional step: use `Option<{T}>`",
    label = "use `Option<{T}>` here: it is `None` when the step it is bound to was skipped",
    note = "a step with `when = ..` is skipped when its predicate is false, so the steps that take its output receive an `Option`"
)]
pub trait OptionalInput<T> {
    /// Wraps the value (or its absence).
    fn from_option(value: Option<T>) -> Self;
}

impl<T> OptionalInput<T> for Option<T> {
    #[inline]
    fn from_option(value: Option<T>) -> Self {
        value
    }
}

/// A parameter bound to a conditional step's output, from what the step produced.
#[inline]
pub fn optional_input<P: OptionalInput<T>, T>(value: Option<T>) -> P {
    P::from_option(value)
}

/// Implemented only for `Vec<T>`: what a map step maps over.
#[diagnostic::on_unimplemented(
    message = "a map step maps over a `Vec<T>`, but this one is given a `{Self}`",
    label = "`{Self}` is not a `Vec`",
    note = "`#[step(map)]` runs once per element of its parent's `Vec<T>` output (or of the workflow input, for a root step) and takes one `T`; remove `map` to take the whole value"
)]
pub trait MapSource {
    /// The element type.
    type Item;
}

impl<T> MapSource for Vec<T> {
    type Item = T;
}

/// Compile-time check that `Source` is a `Vec<Item>` (a map step's source and element
/// parameter).
pub const fn map_item<Source: MapSource<Item = Item>, Item>() {}
