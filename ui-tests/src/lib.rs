//! The compile-time checks of `#[workflow]`/`#[step]` (`tests/ui.rs`): a crate of its
//! own so that trybuild builds only what the cases use.
