//! A run as a [`Recorded`] document: [`export`], what `pgflow export` prints and
//! [`pgflow::replay()`] reads.

use pgflow::{Recorded, RecordedElement, RecordedSignal, RecordedStatus, RecordedStep, RunId};
use sqlx::PgPool;

use super::runs::load_definition;
use crate::store::{StepState, export as store, step_index};
use crate::{Error, RunStatus};

/// Run `id` with everything a replay needs: its input, status, output or error
/// and, for each step with a stored state (in declaration order), its status,
/// output, skip reason and attempt history, plus the outputs of the completed
/// elements of map steps that had not completed. Steps are named from the stored
/// definition of the run's workflow version, so no workflow needs to be linked.
///
/// The terminal step has no entry once the run succeeded: its output is the run's
/// ([`Recorded::output`]). Steps not started have none either, except joins still
/// waiting for some of their parents (`waiting`). Serialized with `serde_json`, the
/// result is what `pgflow export <run>` prints.
///
/// ```no_run
/// use pgflow::{workflow, RunId, StepError};
/// use pgflow_runtime::admin;
///
/// pub struct Echo;
/// #[workflow(name = "echo_export")]
/// impl Echo {
///     #[step]
///     async fn echo(s: String) -> Result<String, StepError> { Ok(s) }
/// }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = admin::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
/// let recorded = admin::export(&pool, RunId(42)).await?;
/// std::fs::write("run42.json", serde_json::to_string_pretty(&recorded)?)?;
/// // later, offline
/// let recorded = serde_json::from_str(&std::fs::read_to_string("run42.json")?)?;
/// let output = pgflow::replay::<Echo>(recorded).inject_completed().run().await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::MissingDefinition`] / [`Error::Definition`] when
/// the stored step table is missing or unreadable, or does not have a step the run
/// has a state for; [`Error::NotMigrated`]; database errors.
pub async fn export(pool: &PgPool, id: RunId) -> Result<Recorded, Error> {
    // One snapshot for the run, its steps and its elements.
    let mut tx = pool.begin().await?;
    crate::store::read_snapshot(&mut tx).await?;
    let run = store::run(&mut tx, id.0)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    let (def, _) = load_definition(&mut tx, &run.workflow, run.version).await?;
    let states = store::steps(&mut tx, id.0).await?;
    // A succeeded run's open elements can only be its terminal map step's: its output
    // is the run's.
    let elements = if run.status == RunStatus::Succeeded.as_str() {
        Vec::new()
    } else {
        store::open_elements(&mut tx, id.0).await?
    };
    let signals = store::accepted_signals(&mut tx, id.0).await?;
    tx.commit().await?;

    let name_of = |step: i16| {
        step_index(step)
            .and_then(|i| def.steps.get(i))
            .map(|s| s.name.clone())
            .ok_or_else(|| Error::Definition {
                workflow: run.workflow.clone(),
                version: run.version,
                message: format!(
                    "run {id} has a state for step {step}, but the stored definition has {} \
                     step(s)",
                    def.steps.len()
                ),
            })
    };
    let mut steps: Vec<(i16, RecordedStep)> = Vec::with_capacity(states.len());
    for s in states {
        steps.push((
            s.step,
            RecordedStep {
                name: name_of(s.step)?,
                status: recorded_status(&s.status),
                output: s.output.map(json),
                reason: s.reason,
                errors: s.errors.map(json),
                elements: None,
            },
        ));
    }
    for e in elements {
        let element = RecordedElement {
            element: u32::try_from(e.element).unwrap_or_default(),
            output: json(e.output),
        };
        let at = match steps.iter().position(|(step, _)| *step == e.step) {
            Some(at) => at,
            None => {
                // Elements completed, but no state: a map step whose state a repair
                // cleared. Its elements run.
                let at = steps.partition_point(|(step, _)| *step < e.step);
                let step = RecordedStep {
                    name: name_of(e.step)?,
                    status: RecordedStatus::Running,
                    output: None,
                    reason: None,
                    errors: None,
                    elements: None,
                };
                steps.insert(at, (e.step, step));
                at
            }
        };
        steps[at]
            .1
            .elements
            .get_or_insert_with(Vec::new)
            .push(element);
    }
    Ok(Recorded {
        format: Recorded::FORMAT,
        run_id: id.0,
        workflow: run.workflow,
        version: u32::try_from(run.version).unwrap_or_default(),
        status: run.status,
        input: json(run.input),
        output: run.output.map(json),
        error: run.error.map(json),
        steps: steps.into_iter().map(|(_, s)| s).collect(),
        signals: signals
            .into_iter()
            .map(|s| RecordedSignal {
                name: s.name,
                payload: json(s.payload),
            })
            .collect(),
    })
}

fn recorded_status(stored: &str) -> RecordedStatus {
    match StepState::from_name(stored) {
        Some(StepState::Completed) => RecordedStatus::Completed,
        Some(StepState::Skipped) => RecordedStatus::Skipped,
        Some(StepState::Failed) => RecordedStatus::Failed,
        Some(StepState::Running) => RecordedStatus::Running,
        Some(StepState::Waiting) => RecordedStatus::Waiting,
        None => RecordedStatus::Unknown,
    }
}

/// A stored `jsonb` as a value (Postgres wrote it, so it parses; were it not to, it
/// is kept as a string rather than lost).
fn json(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}
