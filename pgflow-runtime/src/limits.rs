//! [`Limit`]: rate limits and budgets per period that steps count against
//! (`#[step(limits = ["openai"])]`), across every instance.
//!
//! A limit counts requests, tokens or cents in fixed windows of its period (aligned
//! to the epoch: per minute, per day, ..), globally or per run key. Before an attempt
//! of a step that declares limits starts, its weight — 1 request, or the step's
//! `estimate_tokens` / `estimate_cents` — is reserved in the current window of each,
//! all or nothing; when the attempt ends, the reservation is settled to what it
//! reported (`ctx.add_usage`), so a limit of 90,000 tokens a minute holds against
//! measured usage, not estimates. When a window has no room:
//!
//! - a **rate limit** (the default) makes the step wait, without a worker slot and
//!   without counting an attempt or a snooze, until the window ends;
//! - a **budget** (`fail_when_exceeded`) fails the run with
//!   `RunError::BudgetExceeded`, naming the limit, the key and the window's spend.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgflow_runtime::{Limit, Runtime};
//!
//! # async fn demo() -> Result<(), pgflow_runtime::Error> {
//! let rt = Runtime::builder()
//!     .queue("llm", 32)
//!     // the provider's quota: 90,000 tokens a minute, all tenants together
//!     .limit(Limit::tokens("openai", 90_000).per(Duration::from_secs(60)))
//!     // 500 cents a day per tenant (the run's key); past it, runs fail
//!     .limit(Limit::cents("tenant_daily", 500).per(Duration::from_secs(86_400)).per_key().fail_when_exceeded())
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

/// What a [`Limit`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitUnit {
    /// Attempts started (each weighs 1).
    Requests,
    /// Tokens in and out: reserved as the step's `estimate_tokens`, settled to what
    /// it reported.
    Tokens,
    /// Cost in cents: reserved as `estimate_cents`, settled to what it reported.
    Cents,
}

impl LimitUnit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Cents => "cents",
        }
    }
}

/// A named rate limit or budget per period (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub(crate) name: String,
    pub(crate) unit: LimitUnit,
    pub(crate) max: u64,
    pub(crate) period: Duration,
    pub(crate) per_key: bool,
    pub(crate) fail: bool,
}

impl Limit {
    fn new(name: impl Into<String>, unit: LimitUnit, max: u64) -> Self {
        Self {
            name: name.into(),
            unit,
            max,
            period: Duration::from_secs(60),
            per_key: false,
            fail: false,
        }
    }

    /// At most `max` attempts started per period (default period: a minute).
    pub fn requests(name: impl Into<String>, max: u64) -> Self {
        Self::new(name, LimitUnit::Requests, max)
    }

    /// At most `max` tokens (in + out) per period.
    pub fn tokens(name: impl Into<String>, max: u64) -> Self {
        Self::new(name, LimitUnit::Tokens, max)
    }

    /// At most `max` cents per period.
    pub fn cents(name: impl Into<String>, max: u64) -> Self {
        Self::new(name, LimitUnit::Cents, max)
    }

    /// The window's length (whole seconds, at least 1; windows are aligned to the
    /// epoch, so a day is a UTC day).
    pub fn per(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// Counts each run key (tenant) apart; runs without a key share the key `""`.
    pub fn per_key(mut self) -> Self {
        self.per_key = true;
        self
    }

    /// A budget: a step with no room fails its run (`RunError::BudgetExceeded`)
    /// instead of waiting for the next window.
    pub fn fail_when_exceeded(mut self) -> Self {
        self.fail = true;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn period_secs(&self) -> i64 {
        i64::try_from(self.period.as_secs()).unwrap_or(i64::MAX)
    }

    pub(crate) fn max_i64(&self) -> i64 {
        i64::try_from(self.max).unwrap_or(i64::MAX)
    }

    /// A mistake in the limit itself, if any.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.name.is_empty() {
            return Some("a limit needs a name".to_owned());
        }
        if self.period.as_secs() == 0 {
            return Some(format!(
                "limit `{}`: its period must be at least 1 s",
                self.name
            ));
        }
        if self.max == 0 {
            return Some(format!(
                "limit `{}`: its maximum must be at least 1",
                self.name
            ));
        }
        None
    }
}
