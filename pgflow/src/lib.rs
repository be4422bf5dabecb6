//! # pgflow
//!
//! Durable workflows for Rust on PostgreSQL. Write steps as plain `async fn`s, group
//! them under `#[workflow]`, and the compiler checks the step graph: every step's
//! parameter types are the output types of the steps that feed it.
//!
//! This crate is what a library that *defines* workflows depends on: the
//! [`Workflow`] trait, the step table types, [`StepError`], [`StepContext`], the
//! [`registry()`] of linked workflows, the in-process executor [`execute`] and
//! [`replay()`], which re-runs a recorded run in process. It has no database code;
//! the durable engine is the `pgflow-runtime` crate.
//!
//! ```
//! use pgflow::{workflow, StepContext, StepError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Request { pub prompt: String, pub complexity: u8 }
//! #[derive(Serialize, Deserialize)]
//! pub struct Routed { pub model: String, pub prompt: String }
//!
//! pub struct LlmRequest;
//!
//! #[workflow(name = "llm_request", version = 1, queue = "llm", max_attempts = 3, timeout = "30s")]
//! impl LlmRequest {
//!     #[step]
//!     async fn select_model(req: Request) -> Result<Routed, StepError> {
//!         let model = if req.complexity > 5 { "large" } else { "small" };
//!         Ok(Routed { model: model.into(), prompt: req.prompt })
//!     }
//!
//!     #[step(max_attempts = 5, timeout = "10s", backoff = "500ms")]
//!     async fn call_provider(routed: Routed, ctx: &StepContext) -> Result<String, StepError> {
//!         ctx.add_cost_cents(1);
//!         Ok(format!("[{}] {}", routed.model, routed.prompt))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let req = Request { prompt: "hi".into(), complexity: 9 };
//! assert_eq!(pgflow::execute::<LlmRequest>(req).await.unwrap(), "[large] hi");
//! # }
//! ```
//!
//! See [`workflow`] for the rules of the step graph.
//!
//! ## Conditional steps
//!
//! `#[step(when = Self::predicate)]` runs a step only when the predicate, a plain
//! `fn` over references to the step's inputs, is true; otherwise the step is
//! skipped, and the parameters bound to it (which must be `Option<T>`) get `None`.
//! A step whose parents were all skipped still runs. A conditional terminal step
//! makes the workflow's output an `Option`.
//!
//! ```
//! use pgflow::{workflow, StepError};
//!
//! pub struct Review;
//!
//! #[workflow]
//! impl Review {
//!     #[step]
//!     async fn draft(text: String) -> Result<String, StepError> {
//!         Ok(text)
//!     }
//!
//!     #[step(when = Self::is_long)]
//!     async fn review(draft: String) -> Result<String, StepError> {
//!         Ok(format!("reviewed: {draft}"))
//!     }
//!
//!     #[step(depends_on = [draft, review])]
//!     async fn publish(draft: String, review: Option<String>) -> Result<String, StepError> {
//!         Ok(review.unwrap_or(draft))
//!     }
//!
//!     fn is_long(draft: &str) -> bool {
//!         draft.len() > 10
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! assert_eq!(pgflow::execute::<Review>("short".into()).await.unwrap(), "short");
//! assert_eq!(
//!     pgflow::execute::<Review>("a longer text".into()).await.unwrap(),
//!     "reviewed: a longer text"
//! );
//! # }
//! ```
//!
//! ## Map steps
//!
//! `#[step(map)]` runs a step once per element of its parent's `Vec<T>` (or of the
//! workflow input, for a root step): the body takes one `T`, each element is its own
//! task, retried on its own, and the children see the outputs as a `Vec`, in element
//! order.
//!
//! ```
//! use pgflow::{workflow, StepError};
//!
//! pub struct WordLengths;
//!
//! #[workflow]
//! impl WordLengths {
//!     #[step]
//!     async fn split(text: String) -> Result<Vec<String>, StepError> {
//!         Ok(text.split_whitespace().map(str::to_owned).collect())
//!     }
//!
//!     #[step(map)]
//!     async fn measure(word: String) -> Result<usize, StepError> {
//!         Ok(word.len())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let lengths = pgflow::execute::<WordLengths>("map each word".into()).await.unwrap();
//! assert_eq!(lengths, [3, 4, 4]);
//! # }
//! ```

#[allow(unused_extern_crates)]
extern crate self as pgflow;

mod context;
mod definition;
pub mod engine;
mod error;
mod execute;
mod finite;
pub mod registry;
pub mod replay;
mod signal;
mod subflow;
mod transaction;
mod value;
mod workflow;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use context::{CancelToken, CostMeter, Data, RunId, StepContext, StepContextBuilder, Usage};
pub use definition::{
    Definition, MapDefinition, ParamDefinition, Plan, PlanError, SignalDefinition, StepDefinition,
    SubflowDefinition,
};
pub use error::{
    AttemptFailure, BudgetScope, BudgetUnit, ErrorKind, LimitScope, RunError, StepError,
};
pub use execute::{ExecuteOptions, execute, execute_with};
pub use pgflow_macros::{step, workflow};
pub use registry::{Registry, RegistryError, registry};
pub use replay::{
    Recorded, RecordedElement, RecordedSignal, RecordedStatus, RecordedStep, Replay, ReplayError,
    replay,
};
pub use signal::{Signal, SignalDef, SignalOutcome, Signals};
pub use subflow::{Subflow, SubflowStart};
pub use transaction::{Transaction, Transactional};
pub use value::StepData;
pub use workflow::{Param, ParamSource, StepDef, StepKind, StepOptions, Workflow, WorkflowDef};
