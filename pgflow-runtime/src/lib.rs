//! # pgflow-runtime
//!
//! The durable engine of pgflow: migrations, the Postgres task queue, workers,
//! leases, the instance registry and results. This crate is a skeleton until the
//! durable-runtime issue lands; today it re-exports the definition crate so that
//! binaries can already depend on it.
//!
//! ```
//! // Every workflow linked into the binary, as the runtime will register them.
//! let registry = pgflow_runtime::pgflow::registry().unwrap();
//! for def in registry.workflows() {
//!     println!("{} v{}", def.name(), def.version());
//! }
//! ```

pub use pgflow;
