//! Calls between actors: one helper for "find the actor by its registered name, send, await
//! the answer", and the typed failures every caller matches on.
//!
//! A failure has a [`Severity`], and the loop acts on it by one rule:
//!
//! - **Transient**: the call itself failed — the actor is not running, stopped before
//!   answering (a crash: the supervisor restarts it), or did not answer in time (a slow
//!   evaluation on a loaded machine). Retrying can succeed, so the loop retries, and each such
//!   failure counts against the actor's restart budget (`[supervisor] max_restarts` per
//!   `window_seconds`); a spent budget stops the daemon with exit 70.
//! - **Persistent**: the actor ran and answered with an error that a retry would only repeat
//!   (a `logs_dir` that does not exist, exhausted templates, a refused setting, a failed
//!   write of the loop's own files). The loop stops cleanly at once — final checkpoint if
//!   the trainer still answers, an `alarm` event, status `failed`, exit 78 — with the error
//!   in the log, instead of waiting for a restart that never comes. (Checkpoint write
//!   errors are the one exception: `[checkpoint] on_write_error` decides.)
//!
//! An actor's own error answer is a [`ReplyError`]; it says which of the two it is.

use std::fmt::Display;
use std::time::Duration;

use ractor::concurrency::OneshotReceiver;
use ractor::{ActorRef, Message, RpcReplyPort};

/// How the loop treats a failure (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Retry; counts against the restart budget.
    Transient,
    /// Stop cleanly with the error.
    Persistent,
}

/// An actor's error answer: what went wrong, and whether a retry can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ReplyError {
    /// Transient or persistent.
    pub severity: Severity,
    /// The error with its causes (`{:#}` of the underlying error).
    pub message: String,
}

impl ReplyError {
    /// An error a retry would repeat.
    pub fn persistent(error: impl Display) -> ReplyError {
        ReplyError {
            severity: Severity::Persistent,
            message: format!("{error:#}"),
        }
    }

    /// An actor's failed call to another actor, passed on with the callee's severity.
    pub fn from_call(error: CallError) -> ReplyError {
        ReplyError {
            severity: error.severity(),
            message: error.to_string(),
        }
    }
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No actor is registered under this name (it failed and is being restarted).
    #[error("the {actor} is not running")]
    NotRunning {
        /// Registered name.
        actor: &'static str,
    },
    /// The actor stopped before it answered (a crash; the supervisor restarts it).
    #[error("the {actor} stopped before it answered")]
    Gone {
        /// Registered name.
        actor: &'static str,
    },
    /// No answer within the call timeout (the restart budget was spent waiting).
    #[error("the {actor} did not answer within {timeout:?}")]
    Timeout {
        /// Registered name.
        actor: &'static str,
        /// How long the caller waited in all.
        timeout: Duration,
    },
    /// The actor answered with an error.
    #[error("{actor}: {error}")]
    Replied {
        /// Registered name.
        actor: &'static str,
        /// Its answer.
        error: ReplyError,
    },
}

impl CallError {
    /// Transient unless the actor answered with a persistent error.
    pub fn severity(&self) -> Severity {
        match self {
            CallError::Replied { error, .. } => error.severity,
            _ => Severity::Transient,
        }
    }

    /// The registered name of the actor called.
    pub fn actor(&self) -> &'static str {
        match self {
            CallError::NotRunning { actor }
            | CallError::Gone { actor }
            | CallError::Timeout { actor, .. }
            | CallError::Replied { actor, .. } => actor,
        }
    }
}

/// The actor registered as `name`.
pub fn lookup<M: Message>(name: &'static str) -> Result<ActorRef<M>, CallError> {
    ractor::registry::where_is(name)
        .map(ActorRef::from)
        .ok_or(CallError::NotRunning { actor: name })
}

/// A sent request whose answer has not been awaited yet (the loop waits on it in slices of
/// the call timeout, see `driver::Driver::wait`).
pub struct Pending<T> {
    /// Registered name of the callee.
    pub actor: &'static str,
    /// The answer.
    pub answer: OneshotReceiver<T>,
}

/// Sends the message `build` makes to the actor registered as `name`.
pub fn send<M: Message, T: Send + 'static>(
    name: &'static str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<Pending<T>, CallError> {
    let actor = lookup::<M>(name)?;
    let (tx, rx) = ractor::concurrency::oneshot();
    actor
        .send_message(build(tx.into()))
        .map_err(|_| CallError::Gone { actor: name })?;
    Ok(Pending {
        actor: name,
        answer: rx,
    })
}

/// Calls the actor registered as `name` and awaits its answer for at most `timeout`.
pub async fn call<M: Message, T: Send + 'static>(
    name: &'static str,
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, CallError> {
    let pending = send(name, build)?;
    match tokio::time::timeout(timeout, pending.answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(CallError::Gone { actor: name }),
        Err(_) => Err(CallError::Timeout {
            actor: name,
            timeout,
        }),
    }
}

/// Both layers of a `Result<T, ReplyError>` answer in one error.
pub fn flatten<T>(
    name: &'static str,
    answer: Result<Result<T, ReplyError>, CallError>,
) -> Result<T, CallError> {
    answer?.map_err(|error| CallError::Replied { actor: name, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_persistent_answer_is_persistent() {
        let replied = |error| CallError::Replied {
            actor: "mixer",
            error,
        };
        assert_eq!(
            replied(ReplyError::persistent("no such directory")).severity(),
            Severity::Persistent
        );
        assert_eq!(
            replied(ReplyError {
                severity: Severity::Transient,
                message: "busy".into(),
            })
            .severity(),
            Severity::Transient
        );
        for e in [
            CallError::NotRunning { actor: "mixer" },
            CallError::Gone { actor: "mixer" },
            CallError::Timeout {
                actor: "mixer",
                timeout: Duration::from_secs(1),
            },
        ] {
            assert_eq!(e.severity(), Severity::Transient, "{e}");
        }
    }

    #[test]
    fn a_passed_on_call_failure_keeps_its_severity() {
        let inner = CallError::Timeout {
            actor: "labeler",
            timeout: Duration::from_secs(1),
        };
        let e = ReplyError::from_call(inner);
        assert_eq!(e.severity, Severity::Transient);
        assert!(e.message.contains("labeler"), "{e}");
    }
}
