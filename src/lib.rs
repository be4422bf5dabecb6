//! The workspace root package: it owns `examples/` and `tests/`, and the workflows
//! they share — [`flows`] is linked into the `worker` example (the binary a user
//! deploys), the chaos program and the multi-process tests.

pub mod flows;
pub mod support;
