//! A transactional step takes a `&mut T` parameter anywhere in its signature (next to
//! the context), in a chain, a map step and a conditional one; `StepDef::transactional`
//! says which do.
use pgflow::{workflow, StepContext, StepError, Workflow};

/// Stands in for `sqlx::PgConnection`.
pub struct Conn {
    pub writes: u32,
}

pub struct Orders;

#[workflow]
impl Orders {
    #[step]
    async fn split(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(map)]
    async fn reserve(item: u32, tx: &mut Conn, ctx: &StepContext) -> Result<u32, StepError> {
        tx.writes += 1;
        let _ = ctx.attempt();
        Ok(item)
    }

    #[step(when = Self::any)]
    async fn charge(tx: &mut Conn, reserve: Vec<u32>) -> Result<u32, StepError> {
        tx.writes += 1;
        Ok(reserve.iter().sum())
    }

    #[step]
    async fn notify(charge: Option<u32>) -> Result<u32, StepError> {
        Ok(charge.unwrap_or(0))
    }

    fn any(reserve: &[u32]) -> bool {
        !reserve.is_empty()
    }
}

fn main() {
    let def = Orders::definition();
    let transactional: Vec<bool> = def.steps().iter().map(|s| s.transactional()).collect();
    assert_eq!(transactional, [false, true, true, false]);
    // the transaction is not a data parameter
    assert_eq!(def.step("charge").unwrap().params().len(), 1);
}
