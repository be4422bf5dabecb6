//! Not public API: what `#[workflow]` expansions name, through `::pgflow::__private`.
//! Anything here may change in any release.

pub use futures_util::future::BoxFuture;

/// What a step entry returns.
pub type StepFuture = BoxFuture<'static, Result<crate::StepValue, StepError>>;
pub use inventory;
pub use serde_json;

pub use crate::registry::Registration;
pub use crate::value::{Dup, DupFn, DupNoClone, DupResult, DupViaClone};

use std::sync::OnceLock;

use crate::workflow::{Param, StepFn, StepKind, StepOptions};
use crate::{StepDef, StepError, ValueOps, WorkflowDef};

/// The fields of a [`StepDef`], built by the expansion.
pub struct StepParts {
    pub name: &'static str,
    pub index: usize,
    pub parents: &'static [usize],
    pub params: &'static [Param],
    pub takes_context: bool,
    pub kind: StepKind,
    pub options: StepOptions,
    pub output: &'static ValueOps,
    pub run: StepFn,
}

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
    pub steps: &'static [StepDef],
    pub terminal: usize,
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
