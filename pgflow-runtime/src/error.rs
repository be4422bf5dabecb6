//! The runtime's error type: one for the engine, the API and the operator
//! functions of [`admin`](crate::admin).

use pgflow::{RegistryError, RunError, RunId};

/// What the runtime's operations can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database could not be reached at start.
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}. {}",
        connect_hint(source)
    )]
    Connect {
        /// The URL, password masked.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The database has no (or an incomplete) pgflow schema.
    #[error(
        "the pgflow schema is missing in this database ({0}); run `pgflow migrate` or start a \
         runtime against it first"
    )]
    NotMigrated(#[source] sqlx::Error),
    /// Applying the migrations failed.
    #[error("applying pgflow migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Two linked workflows share a name and version.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A workflow's definition changed but its version did not.
    #[error(
        "workflow `{workflow}` version {version} is already registered with a different definition \
         ({difference}); bump its `version` when you change its steps"
    )]
    DefinitionChanged {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: u32,
        /// What differs, e.g. `steps[1].timeout_ms: 30000 -> 10000`.
        difference: String,
    },
    /// A by-name start named a workflow this binary does not link.
    #[error("no workflow `{name}`{} is registered in this binary; registered: {registered}",
        version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownWorkflow {
        /// The name asked for.
        name: String,
        /// The version asked for, if any.
        version: Option<u32>,
        /// What is registered, for the message.
        registered: String,
    },
    /// An input does not fit the workflow's input type (or does not serialize).
    #[error("invalid input for workflow `{workflow}`: {message}")]
    InvalidInput {
        /// The workflow.
        workflow: String,
        /// What is wrong, with the serde path.
        message: String,
    },
    /// A value stored in the database (a run's output) does not deserialize into the
    /// type asked for: the workflow's output type changed, or the wrong type was named.
    #[error("workflow `{workflow}`: the stored {what} does not fit: {message}")]
    StoredValue {
        /// The workflow.
        workflow: String,
        /// What was read (`output`).
        what: &'static str,
        /// What is wrong, with the serde path.
        message: String,
    },
    /// The run failed or was cancelled.
    #[error(transparent)]
    Run(#[from] RunError),
    /// No run has this id.
    #[error("no run with id {0}")]
    RunNotFound(RunId),
    /// A signal was sent to a run that is finished or cancelled.
    #[error("run {id} has status `{status}`: it takes no more signals")]
    RunNotRunning {
        /// The run.
        id: RunId,
        /// Its status (`succeeded`, `failed` or `cancelled`).
        status: String,
    },
    /// A signal was sent by a name no step of the run waits for.
    #[error(
        "no step of run {id} waits for a signal named `{name}`; {}",
        if known.is_empty() { "its workflow waits for no signal".to_owned() } else { format!("it waits for {known}") }
    )]
    UnknownSignal {
        /// The run.
        id: RunId,
        /// The name sent.
        name: String,
        /// The names its steps wait for (`` `approval`, `payment` ``), empty if none.
        known: String,
    },
    /// Another live instance holds this instance id.
    #[error(
        "instance id `{id}` is in use by a live instance (host {host}, pid {pid}, last heartbeat {heartbeat_secs_ago:.1}s ago); \
         give this instance another id (INSTANCE_ID) or stop the other one"
    )]
    InstanceIdInUse {
        /// The id.
        id: String,
        /// The holder's host.
        host: String,
        /// The holder's pid.
        pid: i32,
        /// Seconds since the holder's last heartbeat.
        heartbeat_secs_ago: f64,
    },
    /// The builder was given an unusable setting.
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    /// The runtime was shut down.
    #[error("the runtime is shut down")]
    ShutDown,
    /// A retry was asked for a run that is neither failed nor cancelled.
    #[error("run {id} has status `{status}`: only a failed or cancelled run can be retried")]
    NotFailed {
        /// The run.
        id: RunId,
        /// Its status.
        status: String,
    },
    /// A fork named a step its target workflow version does not have.
    #[error("workflow `{workflow}` version {version} has no step `{step}`; its steps: {known}")]
    UnknownStep {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
        /// The step asked for.
        step: String,
        /// Its steps, comma-separated.
        known: String,
    },
    /// A fork into another workflow version would reuse outputs whose types changed.
    #[error(
        "run {id} cannot be forked into `{workflow}` version {to}: {}",
        differences.join("; ")
    )]
    Incompatible {
        /// The run forked from.
        id: RunId,
        /// The workflow.
        workflow: String,
        /// The version of the run forked from.
        from: i32,
        /// The version asked for.
        to: i32,
        /// What differs, one entry per reused step (or the input).
        differences: Vec<String>,
    },
    /// A typed call named a run of another workflow.
    #[error("run {id} is a run of `{actual}`, not of `{expected}`")]
    WrongWorkflow {
        /// The run.
        id: RunId,
        /// The workflow the caller expected.
        expected: String,
        /// The run's workflow.
        actual: String,
    },
    /// A cancel was asked for a run that already finished.
    #[error("run {id} has already {status}: only a running run can be cancelled")]
    NotRunning {
        /// The run.
        id: RunId,
        /// Its status.
        status: String,
    },
    /// A run's workflow version has no row in `pgflow.workflows`.
    #[error(
        "workflow `{workflow}` version {version} has no stored definition in pgflow.workflows \
         (a runtime that links it stores it at start)"
    )]
    MissingDefinition {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
    },
    /// A stored definition cannot be read, or a repair cannot use it.
    #[error("workflow `{workflow}` version {version}: {message}")]
    Definition {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
        /// What is wrong.
        message: String,
    },
    /// A schedule cannot be registered: a bad cron expression or time zone, or a
    /// name given twice.
    #[error("schedule `{name}`: {message}")]
    InvalidSchedule {
        /// The schedule.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// No schedule has this name.
    #[error("no schedule named `{name}`; schedules: {known}")]
    UnknownSchedule {
        /// The name asked for.
        name: String,
        /// The stored schedules, comma-separated (`none` when there are none).
        known: String,
    },
    /// A run status did not parse.
    #[error(
        "invalid run status {0:?}: expected one of running, succeeded, failed, cancelled (or \
         success and failure, the words of `pgflow results`)"
    )]
    InvalidStatus(String),
}

/// What to check, for the cause of a failed connection.
fn connect_hint(e: &sqlx::Error) -> &'static str {
    match e
        .as_database_error()
        .and_then(|d| d.code())
        .as_deref()
        .map(|c| c.to_owned())
        .as_deref()
    {
        Some("28P01" | "28000") => {
            "The server refused the user or password: check the user and password in \
             DATABASE_URL (and pg_hba.conf)"
        }
        Some("3D000") => {
            "The database does not exist: create it (`createdb NAME`) or fix its name in \
             DATABASE_URL"
        }
        Some("53300") => {
            "The role, the database or the server is at its connection limit: close other \
             connections or raise the limit (ALTER ROLE .. CONNECTION LIMIT, max_connections)"
        }
        Some(_) => "Check the settings in DATABASE_URL",
        None => {
            "Check that the server is running and accepts connections there (e.g. \
             `pg_isready -h HOST -p PORT`), and that DATABASE_URL names the right host, port, \
             user and database"
        }
    }
}

impl Error {
    /// Whether this is a failure to reach the server at all (refused, no answer,
    /// unknown host), rather than the server refusing the connection (a wrong
    /// password, an unknown database, a connection limit).
    ///
    /// ```
    /// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    /// let e = pgflow_runtime::Error::Connect { url: "postgres://h/db".into(), source: sqlx::Error::Io(refused) };
    /// assert!(e.is_unreachable());
    /// ```
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect { source, .. } if source.as_database_error().is_none()
            && !matches!(source, sqlx::Error::Configuration(_)))
    }

    /// Whether the error is the database being away for a while (a lost
    /// connection, a restart, a failover, too many connections, a pool that could
    /// not get a connection in time, a deadlock): the same call can succeed later.
    ///
    /// ```
    /// let e = pgflow_runtime::Error::Database(sqlx::Error::PoolTimedOut);
    /// assert!(e.is_transient());
    /// assert!(!pgflow_runtime::Error::ShutDown.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => crate::store::is_transient(e),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        // undefined_table, invalid_schema_name: the migrations were never applied.
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            Some("42P01" | "3F000") => Self::NotMigrated(e),
            _ => Self::Database(e),
        }
    }
}
