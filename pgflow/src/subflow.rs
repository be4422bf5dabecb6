//! Subflows: a step that runs another workflow as a child run and hands the child's
//! output to its own children.
//!
//! A step returns [`Subflow<W>`] with the child's input; the steps that take its
//! output receive `W::Output` (checked at compile time like every other edge). A map
//! step returning `Subflow<W>` starts one child run per element, and its children
//! see a `Vec<W::Output>`, in element order.
//!
//! ```
//! use pgflow::{workflow, StepError, Subflow};
//!
//! pub struct Research;
//! #[workflow]
//! impl Research {
//!     #[step]
//!     async fn search(topic: String) -> Result<Vec<String>, StepError> {
//!         Ok(vec![format!("{topic}: source 1"), format!("{topic}: source 2")])
//!     }
//!     #[step]
//!     async fn count(search: Vec<String>) -> Result<usize, StepError> {
//!         Ok(search.len())
//!     }
//! }
//!
//! pub struct Report;
//! #[workflow]
//! impl Report {
//!     // one child run of `Research` per topic
//!     #[step(map)]
//!     async fn research(topic: String) -> Result<Subflow<Research>, StepError> {
//!         Ok(Subflow::new(topic))
//!     }
//!     #[step]
//!     async fn total(research: Vec<usize>) -> Result<usize, StepError> {
//!         Ok(research.iter().sum())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let topics = vec!["cats".to_owned(), "dogs".to_owned()];
//! assert_eq!(pgflow::execute::<Report>(topics).await.unwrap(), 4);
//! # }
//! ```
//!
//! In process, the child runs in the same task as its parent, with the parent's
//! data, cost meter, cancel token and signals. In the durable runtime the child is a
//! run of its own (linked to its parent: parent run, step and element), started in
//! the same transaction that parks the parent's step; nothing holds a worker slot
//! while the child runs; the parent's step completes with the child's output when the
//! child succeeds, and fails (permanently, with the child's error and its path) when
//! the child fails or is cancelled. A step that started a child never starts a
//! second one (the child's idempotency key is the parent's run, step and element), and
//! cancelling the parent cancels its children.

use std::fmt;
use std::marker::PhantomData;

use crate::engine::StepValue;
use crate::{Workflow, WorkflowDef};

/// What a step returns to run workflow `W` as a child run on `input`: the steps
/// that take this step's output receive the child's `W::Output`.
///
/// ```
/// use pgflow::{workflow, StepError, Subflow};
///
/// pub struct Child;
/// #[workflow]
/// impl Child {
///     #[step]
///     async fn double(n: u32) -> Result<u32, StepError> { Ok(n * 2) }
/// }
///
/// pub struct Parent;
/// #[workflow]
/// impl Parent {
///     #[step]
///     async fn delegate(n: u32) -> Result<Subflow<Child>, StepError> {
///         Ok(Subflow::new(n + 1))
///     }
///     #[step]
///     async fn describe(delegate: u32) -> Result<String, StepError> {
///         Ok(format!("child said {delegate}"))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(pgflow::execute::<Parent>(20).await.unwrap(), "child said 42");
/// # }
/// ```
pub struct Subflow<W: Workflow> {
    input: W::Input,
    workflow: PhantomData<fn() -> W>,
}

impl<W: Workflow> Subflow<W> {
    /// A child run of `W` on `input`.
    pub fn new(input: W::Input) -> Self {
        Self {
            input,
            workflow: PhantomData,
        }
    }

    /// The child's input.
    pub fn input(&self) -> &W::Input {
        &self.input
    }

    /// Takes the child's input back.
    pub fn into_input(self) -> W::Input {
        self.input
    }

    /// The type-erased start of the child: its definition and input.
    pub(crate) fn into_start(self) -> SubflowStart {
        let def = W::definition();
        SubflowStart {
            def,
            input: StepValue::typed(self.input, def.input()),
        }
    }
}

impl<W: Workflow> fmt::Debug for Subflow<W>
where
    W::Input: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subflow")
            .field("workflow", &W::NAME)
            .field("input", &self.input)
            .finish()
    }
}

/// A child run a step asked for (what [`Subflow`] becomes in the step's entry): the
/// child's definition and its input. The executors run it and complete the step
/// with its output.
pub struct SubflowStart {
    def: &'static WorkflowDef,
    input: StepValue,
}

impl SubflowStart {
    /// The child workflow's definition.
    pub fn definition(&self) -> &'static WorkflowDef {
        self.def
    }

    /// The child's input.
    pub fn input(&self) -> &StepValue {
        &self.input
    }

    /// The definition and the input, by value.
    pub fn into_parts(self) -> (&'static WorkflowDef, StepValue) {
        (self.def, self.input)
    }
}

impl fmt::Debug for SubflowStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubflowStart")
            .field("workflow", &self.def.name())
            .field("version", &self.def.version())
            .field("input", &self.input)
            .finish()
    }
}

/// The permanent error of a step whose child run failed or was cancelled: the
/// child's error, prefixed with the child's workflow and (in the durable runtime)
/// run id, so the parent's error reads as a path down to the step that failed.
///
/// ```
/// use pgflow::{AttemptFailure, RunError, StepError};
/// let child = RunError::step_failed("research", "search", None, vec![AttemptFailure::new(1, &StepError::permanent("no results"))]);
/// let e = pgflow::engine::child_failed("research", Some(17), &child);
/// assert!(e.is_permanent());
/// assert_eq!(e.message(), "subflow `research` (run 17) failed: workflow `research` failed at step `search` after 1 attempt(s): attempt 1 permanent: no results");
/// ```
pub fn child_failed(
    workflow: &str,
    run_id: Option<i64>,
    error: &crate::RunError,
) -> crate::StepError {
    let run = run_id.map(|id| format!(" (run {id})")).unwrap_or_default();
    let what = if matches!(error, crate::RunError::Cancelled { .. }) {
        "was cancelled"
    } else {
        "failed"
    };
    crate::StepError::permanent(format!("subflow `{workflow}`{run} {what}: {error}"))
}
