//! The [`Backend`] trait a tier serves requests through, and the [`Deadline`] each call carries.

use std::time::{Duration, Instant};

use crate::error::BackendError;

/// When a request must be answered by. Each backend call receives the request's deadline and
/// should not run past it (the remote backend shortens its read timeout to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// No deadline: retries are bounded by their count only.
    pub fn none() -> Self {
        Self(None)
    }

    /// A deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        Self(Instant::now().checked_add(d))
    }

    /// A deadline at `at`.
    pub fn at(at: Instant) -> Self {
        Self(Some(at))
    }

    /// The instant, if any.
    pub fn instant(&self) -> Option<Instant> {
        self.0
    }

    /// Time left (zero once passed); `None` when there is no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        self.0.is_some_and(|at| Instant::now() >= at)
    }
}

/// Something that serves a request of type `Req` with a response of type `Resp`: a local
/// model (through its batcher), a remote server, a heuristic.
///
/// For sentence embeddings the types are `Backend<[String], Vec<Vec<f32>>>`
/// (see [`EmbedBackend`]). Any `Fn(&Req, Deadline) -> Result<Resp, BackendError>` closure
/// that is `Send + Sync` is a backend.
///
/// Mark an error [`transient`](BackendError::transient) when a retry may succeed (a busy
/// queue, a timeout) and [`permanent`](BackendError::permanent) otherwise: the router retries
/// only transient errors, with backoff, within the deadline.
pub trait Backend<Req: ?Sized, Resp>: Send + Sync {
    /// Serves one request, returning before `deadline` where it can.
    fn call(&self, request: &Req, deadline: Deadline) -> Result<Resp, BackendError>;

    /// Whether the backend's model is loaded already, its memory reserved: the router then
    /// skips the "does it fit?" check, and may use it under high pressure. Default `false`.
    fn is_loaded(&self) -> bool {
        false
    }
}

impl<Req: ?Sized, Resp, F> Backend<Req, Resp> for F
where
    F: Fn(&Req, Deadline) -> Result<Resp, BackendError> + Send + Sync,
{
    fn call(&self, request: &Req, deadline: Deadline) -> Result<Resp, BackendError> {
        self(request, deadline)
    }
}

/// A backend for sentence embeddings: texts in, one vector per text out.
pub type EmbedBackend = dyn Backend<[String], Vec<Vec<f32>>>;
