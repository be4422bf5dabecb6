//! A started run: [`RunHandle`] (wait for its output), [`RunOutcome`] (where it
//! stands) and [`RunStatus`] (its stored status).

use std::marker::PhantomData;
use std::time::Duration;

use pgflow::{RunError, RunId};

use crate::{Error, Runtime};

/// A started run; [`RunHandle::wait`] returns its output.
#[derive(Debug)]
pub struct RunHandle<O> {
    pub(crate) id: RunId,
    pub(crate) created: bool,
    pub(crate) rt: Runtime,
    pub(crate) _output: PhantomData<fn() -> O>,
}

impl<O> Clone for RunHandle<O> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            created: self.created,
            rt: self.rt.clone(),
            _output: PhantomData,
        }
    }
}

impl<O: serde::de::DeserializeOwned> RunHandle<O> {
    /// The run's id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// False when an idempotency key matched an earlier run, which this handle is.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Waits for the run to finish and returns its output.
    ///
    /// # Errors
    ///
    /// [`Error::Run`] when the run failed or was cancelled; [`Error::StoredValue`]
    /// when the stored output does not deserialize; [`Error::RunNotFound`]. A
    /// database that is unreachable for a while (a restart, a failover) is waited
    /// out with backoff, not returned.
    pub async fn wait(&self) -> Result<O, Error> {
        // A run finished by another instance is seen by polling (one row by primary
        // key), from 5 ms on, doubling up to 1 s: a run of a few milliseconds is
        // seen within about its own time (at 20 ms first, a 5 ms chain3 started by
        // a runtime that does not run it was seen after 23 ms at the median).
        let mut poll = Duration::from_millis(5);
        let mut backoff = crate::engine::Backoff::new();
        loop {
            // Registered before reading, so a finish in between is not missed; the
            // waiter unregisters itself when this iteration ends.
            let mut waiter = self.rt.engine.register_waiter(self.id.0);
            match self.rt.outcome::<O>(self.id).await {
                Ok((workflow, Some(outcome))) => return outcome.into_result(&workflow),
                Ok((_, None)) => backoff.reset(),
                // The database is away (restart, failover, a lost connection): the
                // run goes on; keep waiting, as the engine's loops do.
                Err(e) if e.is_transient() => {
                    let pause = backoff.next();
                    tracing::debug!(run = self.id.0, error = %e, "pgflow: wait: database unavailable; retrying");
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let _ = tokio::time::timeout(poll, &mut waiter.rx).await;
            poll = (poll * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where a run stands.
#[derive(Debug)]
pub enum RunOutcome<O> {
    /// Not finished.
    Running,
    /// Finished with this output.
    Succeeded(O),
    /// Failed; the error has the failing step's attempt history.
    Failed(RunError),
    /// Cancelled.
    Cancelled,
}

impl<O> RunOutcome<O> {
    pub(crate) fn into_result(self, workflow: &str) -> Result<O, Error> {
        match self {
            Self::Succeeded(o) => Ok(o),
            Self::Failed(e) => Err(Error::Run(e)),
            Self::Cancelled | Self::Running => Err(Error::Run(RunError::Cancelled {
                workflow: workflow.to_owned(),
            })),
        }
    }
}

/// The status of a run, as stored in `pgflow.runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Not finished.
    Running,
    /// Finished with an output.
    Succeeded,
    /// A step failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl RunStatus {
    /// The name stored in `pgflow.runs.status`.
    ///
    /// ```
    /// assert_eq!(pgflow_runtime::RunStatus::Failed.as_str(), "failed");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = Error;

    /// The stored names, and the words of `pgflow.job_results` (`success`,
    /// `failure`) for the finished states.
    ///
    /// ```
    /// use pgflow_runtime::RunStatus;
    /// assert_eq!("failed".parse::<RunStatus>().unwrap(), RunStatus::Failed);
    /// assert_eq!("success".parse::<RunStatus>().unwrap(), RunStatus::Succeeded);
    /// assert!("done".parse::<RunStatus>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "success" => return Ok(Self::Succeeded),
            "failure" => return Ok(Self::Failed),
            _ => {}
        }
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| Error::InvalidStatus(s.to_owned()))
    }
}
