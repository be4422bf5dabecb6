//! The guide (`docs/guide/`), one module per chapter, so that every Rust block in it
//! is compiled (and, unless marked `no_run`, run) by `cargo test`.

#[doc = include_str!("../docs/guide/README.md")]
pub mod contents {}

#[doc = include_str!("../docs/guide/first-workflow.md")]
pub mod first_workflow {}

#[doc = include_str!("../docs/guide/step-graph.md")]
pub mod step_graph {}

#[doc = include_str!("../docs/guide/conditional-and-map.md")]
pub mod conditional_and_map {}

#[doc = include_str!("../docs/guide/running-durably.md")]
pub mod running_durably {}

#[doc = include_str!("../docs/guide/instances-and-deploys.md")]
pub mod instances_and_deploys {}

#[doc = include_str!("../docs/guide/delays.md")]
pub mod delays {}

#[doc = include_str!("../docs/guide/schedules.md")]
pub mod schedules {}

#[doc = include_str!("../docs/guide/signals.md")]
pub mod signals {}

#[doc = include_str!("../docs/guide/subflows.md")]
pub mod subflows {}

#[doc = include_str!("../docs/guide/transactional-steps.md")]
pub mod transactional_steps {}

#[doc = include_str!("../docs/guide/costs-and-budgets.md")]
pub mod costs_and_budgets {}

#[doc = include_str!("../docs/guide/flow-control.md")]
pub mod flow_control {}

#[doc = include_str!("../docs/guide/operating.md")]
pub mod operating {}

#[doc = include_str!("../docs/guide/testing.md")]
pub mod testing {}

#[doc = include_str!("../docs/guide/configuration.md")]
pub mod configuration {}

#[doc = include_str!("../docs/guide/logging.md")]
pub mod logging {}
