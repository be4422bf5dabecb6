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
    /// when the stored output does not deserialize; database errors.
    pub async fn wait(&self) -> Result<O, Error> {
        let mut poll = Duration::from_millis(20);
        loop {
            let done = self.rt.engine.register_waiter(self.id.0);
            if let (workflow, Some(outcome)) = self.rt.outcome::<O>(self.id).await? {
                return outcome.into_result(&workflow);
            }
            let _ = tokio::time::timeout(poll, done).await;
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

    /// ```
    /// use pgflow_runtime::RunStatus;
    /// assert_eq!("failed".parse::<RunStatus>().unwrap(), RunStatus::Failed);
    /// assert!("done".parse::<RunStatus>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
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
