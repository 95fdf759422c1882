//! Bounds on engine calls: how long each kind may take ([`limits`]), a
//! timeout around one call ([`within`]), progress bounds for streams
//! ([`idle_bounded`], [`collect_within`]), and telling "the engine did not
//! answer" from "the engine answered no" ([`NoAnswer`]). Part of
//! `docker.rs`, the only module that imports bollard.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::DockerError;

/// How long each kind of engine call may take.
pub mod limits {
    use std::time::Duration;

    /// Calls the engine answers from memory: ping, version, info, inspect,
    /// list, tag, the tail of a container's log.
    pub const QUICK: Duration = Duration::from_secs(10);
    /// The health monitor's ping (a healthy engine answers in milliseconds).
    pub const PING: Duration = Duration::from_secs(5);
    /// Calls that change a container or an image: create, start, remove
    /// (a forced remove stops the container first), untag, a whole log.
    pub const CHANGE: Duration = Duration::from_secs(120);
    /// Committing an installer container (tars its whole diff). Builds are
    /// bounded as a whole by the recipe's `timeout` as well.
    pub const COMMIT: Duration = Duration::from_secs(30 * 60);
    /// A load fails when the engine takes no byte of the archive and
    /// reports no progress for this long.
    pub const LOAD_IDLE: Duration = Duration::from_secs(60);
    /// A load fails after this long however steady its progress (a backstop;
    /// 2 h is 360 GB at 50 MB/s).
    pub const LOAD_MAX: Duration = Duration::from_secs(2 * 3600);
    /// A save (`docker save`) writes the whole image to a temp directory
    /// before its first byte: the first chunk may take this long...
    pub const SAVE_FIRST_BYTE: Duration = Duration::from_secs(30 * 60);
    /// ...and each later chunk this long.
    pub const SAVE_IDLE: Duration = Duration::from_secs(60);
}

/// Why the engine did not answer a call (as opposed to answering no).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// Nothing listens: the socket is missing, refuses or drops the
    /// connection (the engine is not running). A short reason.
    Unreachable(&'static str),
    /// Connected, but no answer within the call's limit (a frozen engine).
    Hung,
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Unreachable(why) => write!(f, "unreachable ({why})"),
            NoAnswer::Hung => write!(f, "hung (no answer in time)"),
        }
    }
}

/// Classifies a bollard error: `None` when the engine answered.
pub(super) fn transport_failure(e: &bollard::errors::Error) -> Option<NoAnswer> {
    use bollard::errors::Error as B;
    // Some variants are `#[error(transparent)]`: their `source()` skips
    // the inner error, so the walk starts at the inner error itself.
    let start: &(dyn std::error::Error + 'static) = match e {
        B::RequestTimeoutError => return Some(NoAnswer::Hung),
        B::SocketNotFoundError(_) => return Some(NoAnswer::Unreachable("socket missing")),
        B::HyperResponseError { err } => err,
        B::HyperLegacyError { err } => err,
        B::IOError { err } => err,
        _ => return None,
    };
    let mut cause = Some(start);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return Some(NoAnswer::Unreachable(match io.kind() {
                K::ConnectionRefused => "connection refused",
                K::NotFound => "socket missing",
                K::PermissionDenied => "permission denied on the socket",
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    "connection lost"
                }
                _ => "connection failed",
            }));
        }
        cause = c.source();
    }
    Some(NoAnswer::Unreachable("connection failed"))
}

/// Runs one engine call under `limit`. The outer error is the timeout;
/// the inner result is the engine's (so callers can still match 404s).
pub(super) async fn within<T>(
    op: &'static str,
    limit: Duration,
    call: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<Result<T, bollard::errors::Error>, DockerError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| DockerError::Timeout { op, after: limit })
}

impl super::Engine {
    /// [`within`], with the call's latency and error kind counted in the
    /// node's metrics (`shoal_engine_call_*`): every bounded engine call
    /// goes through here.
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<Result<T, bollard::errors::Error>, DockerError> {
        let started = tokio::time::Instant::now();
        let r = within(op, limit, call).await;
        self.metrics
            .engine_call(op, started.elapsed(), error_kind(&r));
        r
    }
}

/// What kind of failure a bounded call's result is, for the metrics:
/// `timeout` (no answer in time), `unreachable` (nothing listens),
/// `not_found` (the engine answered 404, often expected), `refused` (any
/// other answer no); `None` when it succeeded.
pub(super) fn error_kind<T>(
    r: &Result<Result<T, bollard::errors::Error>, DockerError>,
) -> Option<&'static str> {
    use bollard::errors::Error as B;
    match r {
        Ok(Ok(_)) => None,
        Err(_) => Some("timeout"),
        Ok(Err(e)) => Some(match transport_failure(e) {
            Some(NoAnswer::Hung) => "timeout",
            Some(NoAnswer::Unreachable(_)) => "unreachable",
            None => match e {
                B::DockerResponseServerError {
                    status_code: 404, ..
                } => "not_found",
                _ => "refused",
            },
        }),
    }
}

/// A stream that fails when its next item takes longer than `first` (the
/// first item) or `idle` (every later one).
pub(super) fn idle_bounded<S>(
    op: &'static str,
    inner: S,
    first: Duration,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, DockerError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, DockerError>> + Send + Unpin + 'static,
{
    futures::stream::unfold(Some((inner, first)), move |state| async move {
        let (mut inner, limit) = state?;
        match tokio::time::timeout(limit, inner.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), Some((inner, idle)))),
            Ok(Some(Err(e))) => Some((Err(e), None)),
            Ok(None) => None,
            Err(_) => Some((Err(DockerError::Timeout { op, after: limit }), None)),
        }
    })
}

/// Milliseconds since `base`, for progress stamps shared across tasks.
pub(super) fn millis_since(base: tokio::time::Instant) -> u64 {
    base.elapsed().as_millis() as u64
}

/// The items a stream yields within `limit` (a log of a container whose
/// engine froze halfway ends where it stopped).
pub(super) async fn collect_within<S: Stream + Unpin>(
    limit: Duration,
    mut stream: S,
) -> Vec<S::Item> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while let Some(item) = stream.next().await {
            out.push(item);
        }
    })
    .await;
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_kinds() {
        use bollard::errors::Error as B;
        type R = Result<Result<(), B>, super::DockerError>;
        let answer = |code| -> R {
            Ok(Err(B::DockerResponseServerError {
                status_code: code,
                message: "no".into(),
            }))
        };
        let cases: Vec<(&str, R, Option<&str>)> = vec![
            ("ok", Ok(Ok(())), None),
            (
                "timed out",
                Err(super::DockerError::Timeout {
                    op: "ping",
                    after: std::time::Duration::from_secs(1),
                }),
                Some("timeout"),
            ),
            (
                "client timeout",
                Ok(Err(B::RequestTimeoutError)),
                Some("timeout"),
            ),
            (
                "no socket",
                Ok(Err(B::SocketNotFoundError("/x".into()))),
                Some("unreachable"),
            ),
            ("404", answer(404), Some("not_found")),
            ("409", answer(409), Some("refused")),
            ("500", answer(500), Some("refused")),
        ];
        for (name, r, want) in cases {
            assert_eq!(super::error_kind(&r), want, "{name}");
        }
    }

    use super::*;
    use bollard::errors::Error as B;

    fn io(kind: std::io::ErrorKind) -> B {
        B::IOError {
            err: std::io::Error::new(kind, "x"),
        }
    }

    #[test]
    fn no_answer_tells_silence_from_a_refusal() {
        let api = |source| DockerError::Api { op: "x", source };
        let cases: Vec<(DockerError, Option<NoAnswer>)> = vec![
            (
                api(B::DockerResponseServerError {
                    status_code: 404,
                    message: "no such container".into(),
                }),
                None,
            ),
            (
                api(B::DockerResponseServerError {
                    status_code: 500,
                    message: "boom".into(),
                }),
                None,
            ),
            (api(B::RequestTimeoutError), Some(NoAnswer::Hung)),
            (
                DockerError::Timeout {
                    op: "inspect container",
                    after: limits::QUICK,
                },
                Some(NoAnswer::Hung),
            ),
            (
                api(io(std::io::ErrorKind::ConnectionRefused)),
                Some(NoAnswer::Unreachable("connection refused")),
            ),
            (
                api(io(std::io::ErrorKind::NotFound)),
                Some(NoAnswer::Unreachable("socket missing")),
            ),
            (
                api(io(std::io::ErrorKind::BrokenPipe)),
                Some(NoAnswer::Unreachable("connection lost")),
            ),
            (
                api(B::SocketNotFoundError("/run/docker.sock".into())),
                Some(NoAnswer::Unreachable("socket missing")),
            ),
            (
                DockerError::Connect("refused".into()),
                Some(NoAnswer::Unreachable("cannot connect")),
            ),
            (DockerError::Load("bad layer".into()), None),
            (DockerError::Build("step 3 failed".into()), None),
        ];
        for (e, want) in cases {
            assert_eq!(e.no_answer(), want, "{e}");
        }
        assert_eq!(
            DockerError::Timeout {
                op: "inspect container",
                after: limits::QUICK
            }
            .to_string(),
            "docker inspect container: no answer within 10s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_fail_when_the_engine_stops_sending() {
        let chunks = futures::stream::iter(vec![Ok(Bytes::from_static(b"a"))])
            .chain(futures::stream::pending())
            .boxed();
        let mut s = Box::pin(idle_bounded(
            "save",
            chunks,
            Duration::from_secs(30),
            Duration::from_secs(5),
        ));
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"a"));
        let e = s.next().await.unwrap().unwrap_err();
        assert!(
            matches!(e, DockerError::Timeout { op: "save", after } if after == Duration::from_secs(5)),
            "{e}"
        );
        assert!(s.next().await.is_none(), "a timed-out stream ends");
    }
}
