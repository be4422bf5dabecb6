#![deny(warnings, clippy::all, missing_docs, unreachable_pub)]
//! Expansions stay free of warnings in a crate that denies them.

use pgflow::{workflow, StepContext, StepError};
use serde::{Deserialize, Serialize};

/// Not `Clone`: duplicated through JSON.
#[derive(Serialize, Deserialize)]
pub struct Doc {
    /// The text.
    pub text: String,
}

/// A workflow with roots, a fan-in and the context.
pub struct Strict;

#[workflow]
impl Strict {
    #[step(depends_on = [])]
    async fn a(input: Doc) -> Result<usize, StepError> {
        Ok(input.text.len())
    }

    #[step(depends_on = [])]
    async fn b(input: Doc, ctx: &StepContext) -> Result<Doc, StepError> {
        ctx.add_cost_cents(1);
        Ok(input)
    }

    #[step(depends_on = [a, b])]
    async fn c(a: usize, b: Doc) -> Result<String, StepError> {
        Ok(format!("{a}{}", b.text))
    }

    /// Not a step: helpers live beside steps.
    pub fn helper() -> u8 {
        1
    }
}

/// A workflow with a root map step, a conditional step and a conditional terminal.
pub struct StrictKinds;

#[workflow]
impl StrictKinds {
    #[step(map)]
    async fn each(item: Doc) -> Result<usize, StepError> {
        Ok(item.text.len())
    }

    #[step(when = Self::any)]
    async fn total(lens: Vec<usize>) -> Result<usize, StepError> {
        Ok(lens.iter().sum())
    }

    #[step(when = Self::large)]
    async fn report(total: Option<usize>, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_cost_cents(1);
        Ok(format!("{total:?}"))
    }

    fn any(lens: &[usize]) -> bool {
        !lens.is_empty()
    }

    fn large(total: &Option<usize>) -> bool {
        total.is_some_and(|t| t > 3)
    }
}

fn main() {
    assert_eq!(Strict::helper(), 1);
    fn output<W: pgflow::Workflow<Input = Vec<Doc>, Output = Option<String>>>() {}
    output::<StrictKinds>();
}
