//! What executors are built from: type-erased step values and inputs, the
//! operations of a value type and of a map step, the policy of one attempt, and the
//! type-erased in-process executor. The durable runtime (`pgflow-runtime`) and the
//! code `#[workflow]` generates use it.
//!
//! **Not covered by semver**: anything here may change in any release. A workflow
//! author needs none of it; the crate root is the user's API.
//!
//! ```
//! use pgflow::engine::{StepValue, from_json};
//! let v: Vec<u8> = from_json("[1, 2]").unwrap();
//! assert_eq!(v, [1, 2]);
//! let json = StepValue::Json(serde_json::value::RawValue::from_string("7".into()).unwrap());
//! assert_eq!(json.into_typed::<u8>().unwrap(), 7);
//! ```

pub use crate::execute::execute_definition;
pub use crate::subflow::child_failed;
pub use crate::value::{
    StepInputs, StepOutput, StepValue, ValueOps, check_finite, from_json, split_json,
};
pub use crate::workflow::{ContextSource, MapOps, StepFn};

#[path = "policy.rs"]
pub mod policy;
