//! The workspace root package: it owns `examples/` and `tests/`, and the workflows
//! they share ([`llm`], [`embedding`], [`agents`]; [`flows`] for the process tests) — all linked into the `worker` example (the binary a user
//! deploys), the chaos program and the multi-process tests — and the [`guide`], whose
//! Rust blocks `cargo test` compiles.

pub mod agents;
pub mod embedding;
pub mod flows;
pub mod guide;
pub mod llm;
pub mod support;
