//! Errors: [`StepError`] is what a step returns; [`RunError`] is what a failed run
//! reports, with the history of every failed attempt of the step that failed it.
//!
//! A step's error is *retryable* unless it says otherwise: an ordinary error turned
//! into a [`StepError`] by `?` is retried with backoff up to the step's
//! `max_attempts`, while [`StepError::permanent`] fails the run at once.
//!
//! ```
//! use pgflow::StepError;
//!
//! fn parse(s: &str) -> Result<u32, StepError> {
//!     if s.is_empty() {
//!         return Err(StepError::permanent("empty input"));
//!     }
//!     Ok(s.parse::<u32>()?) // a `ParseIntError` becomes a retryable `StepError`
//! }
//! assert!(parse("").unwrap_err().is_permanent());
//! assert!(parse("x").unwrap_err().is_retryable());
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a failed attempt is classified, which decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// An ordinary failure; retried with backoff while attempts remain.
    Retryable,
    /// A failure that retrying cannot fix; fails the run at once.
    Permanent,
    /// The step outlived its timeout and was dropped; retried like [`Retryable`](Self::Retryable).
    Timeout,
    /// The step panicked; the message is the panic payload. Retried like [`Retryable`](Self::Retryable).
    Panic,
    /// The run was cancelled while the step ran; never retried.
    Cancelled,
}

impl ErrorKind {
    /// Whether an error of this kind may be retried.
    ///
    /// ```
    /// use pgflow::ErrorKind;
    /// assert!(ErrorKind::Timeout.is_retryable());
    /// assert!(!ErrorKind::Permanent.is_retryable());
    /// ```
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Retryable | Self::Timeout | Self::Panic)
    }

    /// The lowercase name stored in the database and shown in messages.
    ///
    /// ```
    /// assert_eq!(pgflow::ErrorKind::Panic.as_str(), "panic");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a step returns.
///
/// `?` converts any `std::error::Error + Send + Sync + 'static` into a retryable
/// `StepError` (keeping it as the source), so step bodies read like ordinary code.
/// Like `anyhow::Error`, `StepError` itself does not implement `std::error::Error`
/// (that would make the blanket conversion overlap with `From<T> for T`); use
/// [`StepError::into_std`] where a `std::error::Error` is needed.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use pgflow::{ErrorKind, StepError};
///
/// let e = StepError::retry_after(Duration::from_secs(2), "rate limited (429)");
/// assert_eq!(e.kind(), ErrorKind::Retryable);
/// assert_eq!(e.retry_delay(), Some(Duration::from_secs(2)));
///
/// let e = StepError::permanent("unknown recipient `bob`");
/// assert!(!e.is_retryable());
/// assert_eq!(e.to_string(), "permanent: unknown recipient `bob`");
/// ```
pub struct StepError(Box<Inner>);

/// A [`StepError`]'s parts, behind one pointer: a step's `Result` is then no
/// larger than its output plus a word, and it is moved several times per step while
/// errors are rare.
struct Inner {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
    /// Set by [`StepError::snooze`]: back to the queue after this, no attempt counted.
    snooze: Option<Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StepError {
    fn new(kind: ErrorKind, message: String) -> Self {
        Self(Box::new(Inner {
            kind,
            message,
            retry_after: None,
            snooze: None,
            source: None,
        }))
    }

    /// A failure that is retried with backoff while attempts remain.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Retryable, message.to_string())
    }

    /// A failure that no retry can fix (bad input, a rejected request): the run fails
    /// at once with this error.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Permanent, message.to_string())
    }

    /// A retryable failure that asks for the next attempt no sooner than `delay`
    /// (a `Retry-After` header, a rate limit window). It replaces the computed backoff.
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        let mut e = Self::retryable(message);
        e.0.retry_after = Some(delay);
        e
    }

    /// Not a failure: "not yet, ask me again in `delay`". The step goes back to the
    /// queue and runs again after `delay` **without counting an attempt** and
    /// without holding a worker slot meanwhile — how a step polls something slow
    /// (a provider's batch job, an export being built). The attempt number and error
    /// history are unchanged. A step may snooze at most its `max_snoozes` times
    /// (1000 unless set, see `#[step(max_snoozes = N)]`); one more fails it
    /// permanently, so a bug cannot snooze forever.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow::{StepError, workflow};
    ///
    /// pub struct Batch;
    /// #[workflow]
    /// impl Batch {
    ///     #[step(max_snoozes = 200)]
    ///     async fn wait_for_batch(job: String) -> Result<String, StepError> {
    ///         let done = job.len() > 3; // ask the provider
    ///         if !done {
    ///             return Err(StepError::snooze(Duration::from_secs(30)));
    ///         }
    ///         Ok(format!("results of {job}"))
    ///     }
    /// }
    /// let e = StepError::snooze(Duration::from_secs(30));
    /// assert_eq!(e.snoozed_for(), Some(Duration::from_secs(30)));
    /// assert_eq!(e.to_string(), "snooze: not ready, again in 30s");
    /// ```
    pub fn snooze(delay: Duration) -> Self {
        let mut e = Self::retryable(format!("not ready, again in {delay:?}"));
        e.0.snooze = Some(delay);
        e
    }

    /// The delay of a [`StepError::snooze`], or `None` for a real error.
    pub fn snoozed_for(&self) -> Option<Duration> {
        self.0.snooze
    }

    /// The error recorded when a step outlives its timeout.
    ///
    /// ```
    /// let e = pgflow::StepError::timeout(std::time::Duration::from_millis(1500));
    /// assert_eq!(e.to_string(), "timeout: step timed out after 1.5s");
    /// ```
    pub fn timeout(after: Duration) -> Self {
        Self::new(
            ErrorKind::Timeout,
            format!("step timed out after {after:?}"),
        )
    }

    /// The error recorded when a step panics; `message` is the panic payload.
    pub fn panic(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Panic, format!("step panicked: {message}"))
    }

    /// The error recorded when the run is cancelled while the step runs.
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "run cancelled".to_owned())
    }

    /// Rebuilds an error from its stored parts (kind, message, retry delay), as the
    /// durable runtime does when it reads an attempt's error back from the database.
    pub fn from_parts(kind: ErrorKind, message: String, retry_after: Option<Duration>) -> Self {
        let mut e = Self::new(kind, message);
        e.0.retry_after = retry_after;
        e
    }

    /// Makes this error permanent, keeping its message and source.
    ///
    /// ```
    /// let e = pgflow::StepError::retryable("bad json").into_permanent();
    /// assert!(e.is_permanent());
    /// ```
    pub fn into_permanent(mut self) -> Self {
        self.0.kind = ErrorKind::Permanent;
        self.0.retry_after = None;
        self.0.snooze = None;
        self
    }

    /// Adds context in front of the message: `"{context}: {message}"`.
    ///
    /// ```
    /// let e = pgflow::StepError::permanent("missing field `a`").context("decoding input");
    /// assert_eq!(e.message(), "decoding input: missing field `a`");
    /// ```
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.0.message = format!("{context}: {}", self.0.message);
        self
    }

    /// The classification of this error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The delay asked for by [`StepError::retry_after`], if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// Whether this error may be retried (retryable, timeout or panic).
    pub fn is_retryable(&self) -> bool {
        self.0.kind.is_retryable()
    }

    /// Whether this error fails the run at once.
    pub fn is_permanent(&self) -> bool {
        self.0.kind == ErrorKind::Permanent
    }

    /// The error this one was converted from by `?`, if any.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.0.source.as_deref()
    }

    /// Converts into a boxed `std::error::Error`.
    ///
    /// ```
    /// let e: Box<dyn std::error::Error + Send + Sync> =
    ///     pgflow::StepError::permanent("nope").into_std();
    /// assert_eq!(e.to_string(), "permanent: nope");
    /// ```
    pub fn into_std(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        Box::new(StdStepError(self))
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.snooze.is_some() {
            return write!(f, "snooze: {}", self.0.message);
        }
        write!(f, "{}: {}", self.0.kind, self.0.message)
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StepError");
        d.field("kind", &self.0.kind)
            .field("message", &self.0.message);
        if let Some(r) = self.0.retry_after {
            d.field("retry_after", &r);
        }
        if let Some(r) = self.0.snooze {
            d.field("snooze", &r);
        }
        if let Some(s) = &self.0.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl<E> From<E> for StepError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let mut e = Self::retryable(&error);
        e.0.source = Some(Box::new(error));
        e
    }
}

struct StdStepError(StepError);

impl fmt::Debug for StdStepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for StdStepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for StdStepError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// One failed attempt of a step: what a run's error history is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFailure {
    /// The attempt number, starting at 1.
    pub attempt: u32,
    /// How the attempt failed.
    pub kind: ErrorKind,
    /// The error message.
    pub message: String,
}

impl AttemptFailure {
    /// Records `error` as the failure of attempt `attempt`.
    ///
    /// ```
    /// use pgflow::{AttemptFailure, ErrorKind, StepError};
    /// let f = AttemptFailure::new(2, &StepError::permanent("no"));
    /// assert_eq!((f.attempt, f.kind, f.message.as_str()), (2, ErrorKind::Permanent, "no"));
    /// // PostgreSQL cannot store a NUL byte: it is replaced, and the message says so
    /// let f = AttemptFailure::new(1, &StepError::retryable("bad\0byte"));
    /// assert_eq!(f.kind, ErrorKind::Retryable);
    /// assert_eq!(f.message, "bad\u{FFFD}byte (NUL bytes replaced with U+FFFD: they cannot be stored)");
    /// ```
    pub fn new(attempt: u32, error: &StepError) -> Self {
        Self {
            attempt,
            kind: error.kind(),
            message: storable_message(error.message()),
        }
    }
}

/// A message as it can be stored: PostgreSQL text and `jsonb` cannot hold a NUL
/// byte, so each is replaced with U+FFFD and the message says so.
fn storable_message(message: &str) -> String {
    if message.contains('\0') {
        format!(
            "{} (NUL bytes replaced with U+FFFD: they cannot be stored)",
            message.replace('\0', "\u{FFFD}")
        )
    } else {
        message.to_owned()
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempt {} {}: {}",
            self.attempt, self.kind, self.message
        )
    }
}

/// Why a run failed: the step that failed it and every failed attempt of that step.
///
/// # Examples
///
/// ```
/// use pgflow::{AttemptFailure, RunError, StepError};
///
/// let err = RunError::step_failed(
///     "llm_request",
///     "call_provider",
///     None,
///     vec![
///         AttemptFailure::new(1, &StepError::retryable("HTTP 500")),
///         AttemptFailure::new(2, &StepError::retryable("HTTP 503")),
///     ],
/// );
/// assert_eq!(
///     err.to_string(),
///     "workflow `llm_request` failed at step `call_provider` after 2 attempt(s): \
///      attempt 1 retryable: HTTP 500; attempt 2 retryable: HTTP 503"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RunError {
    /// A step failed permanently or exhausted its attempts.
    #[error(
        "workflow `{workflow}` failed at step `{step}`{} after {} attempt(s): {}",
        element.map(|i| format!(" (element {i})")).unwrap_or_default(),
        history.len(),
        join_history(history)
    )]
    StepFailed {
        /// The workflow's name.
        workflow: String,
        /// The step that failed the run.
        step: String,
        /// For a map step, the index of the element that failed.
        element: Option<usize>,
        /// Every failed attempt, oldest first.
        history: Vec<AttemptFailure>,
    },
    /// A step was not started: its estimate would have taken the run past its budget
    /// (what was spent plus what running steps reserved plus this step's estimate).
    #[error(
        "workflow `{workflow}`: step `{step}` was not started: {scope} budget of {budget} {unit} would be exceeded ({spent} spent, {reserved} reserved by running steps, {estimate} estimated for this step)"
    )]
    BudgetExceeded {
        /// The workflow's name.
        workflow: String,
        /// The step that was not started.
        step: String,
        /// Whose budget.
        scope: BudgetScope,
        /// Cents or tokens.
        unit: BudgetUnit,
        /// Spent so far (reported by completed attempts).
        spent: i64,
        /// Reserved by attempts running when the step was refused.
        reserved: i64,
        /// The step's estimate (`#[step(estimate_cents = ..)]` or `estimate_tokens`).
        estimate: i64,
        /// The budget.
        budget: i64,
    },
    /// The run was cancelled before it finished.
    #[error("workflow `{workflow}` run was cancelled")]
    Cancelled {
        /// The workflow's name.
        workflow: String,
    },
    /// The workflow's input or output could not be converted to or from JSON.
    #[error("workflow `{workflow}`: {message}")]
    Serde {
        /// The workflow's name.
        workflow: String,
        /// What failed, with the serde path.
        message: String,
    },
    /// An executor broke one of its own invariants (a bug in pgflow: please report
    /// it with the message).
    #[error("workflow `{workflow}`: internal error: {message}")]
    Internal {
        /// The workflow's name.
        workflow: String,
        /// What went wrong.
        message: String,
    },
}

/// Whose budget a [`RunError::BudgetExceeded`] is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BudgetScope {
    /// The run's own (`StartOptions::budget_cents`, `ExecuteOptions::budget_cents`).
    Run,
    /// A runtime's budget per period (`Limit::..().fail_when_exceeded()`), for the
    /// run's key (`""` for a limit over all keys) in the current window.
    Limit(Box<LimitScope>),
}

/// The limit a [`BudgetScope::Limit`] names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitScope {
    /// The limit's name.
    pub name: String,
    /// The key counted (`""` for a limit over all keys).
    pub key: String,
    /// The window's length, in seconds.
    pub period_secs: u64,
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run => f.write_str("the run's"),
            Self::Limit(l) if l.key.is_empty() => {
                write!(f, "limit `{}`'s (per {} s)", l.name, l.period_secs)
            }
            Self::Limit(l) => write!(
                f,
                "limit `{}`'s (key `{}`, per {} s)",
                l.name, l.key, l.period_secs
            ),
        }
    }
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetUnit {
    /// Cost in cents.
    Cents,
    /// Tokens, in and out.
    Tokens,
    /// Attempts started (a budget of requests per period).
    Requests,
}

impl fmt::Display for BudgetUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cents => "cents",
            Self::Tokens => "tokens",
            Self::Requests => "requests",
        })
    }
}

impl RunError {
    /// A step failure with its attempt history.
    pub fn step_failed(
        workflow: impl Into<String>,
        step: impl Into<String>,
        element: Option<usize>,
        history: Vec<AttemptFailure>,
    ) -> Self {
        Self::StepFailed {
            workflow: workflow.into(),
            step: step.into(),
            element,
            history,
        }
    }

    /// The attempt history of the failing step (empty for other failures).
    pub fn history(&self) -> &[AttemptFailure] {
        match self {
            Self::StepFailed { history, .. } => history,
            _ => &[],
        }
    }

    /// The name of the step that failed the run, if a step did (or was refused by
    /// the budget).
    pub fn failed_step(&self) -> Option<&str> {
        match self {
            Self::StepFailed { step, .. } | Self::BudgetExceeded { step, .. } => Some(step),
            _ => None,
        }
    }
}

fn join_history(history: &[AttemptFailure]) -> String {
    history
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
