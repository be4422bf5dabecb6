//! # pgflow
//!
//! Durable workflows for Rust on PostgreSQL. Write steps as plain `async fn`s, group
//! them under `#[workflow]`, and the compiler checks the step graph: every step's
//! parameter types are the output types of the steps that feed it.
//!
//! This crate is what a library that *defines* workflows depends on: the
//! [`Workflow`] trait, the step table types, [`StepError`], [`StepContext`], the
//! [`registry()`] of linked workflows and the in-process executor [`execute`]. It has
//! no database code; the durable engine is the `pgflow-runtime` crate.
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

#[allow(unused_extern_crates)]
extern crate self as pgflow;

mod context;
mod error;
mod execute;
pub mod policy;
pub mod registry;
mod value;
mod workflow;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use context::{CancelToken, CostMeter, Data, RunId, StepContext, StepContextBuilder};
pub use error::{AttemptFailure, ErrorKind, RunError, StepError};
pub use execute::{ExecuteOptions, execute, execute_definition, execute_with};
pub use pgflow_macros::{step, workflow};
pub use registry::{Registry, RegistryError, registry};
pub use value::{StepData, StepInputs, StepOutput, StepValue, ValueOps, from_json, split_json};
pub use workflow::{
    MapOps, Param, ParamSource, StepDef, StepFn, StepKind, StepOptions, Workflow, WorkflowDef,
};
