//! What a connection is doing, for the listener's idle and stall rules
//! ([`super::server`]): requests in flight ([`InFlight`], held until a
//! response body is sent, [`Tracked`]), when an HTTP/1.1 head starts
//! ([`Watched`]), and when the connection is due to close ([`idle`]).

use super::{Limits, ResponseBody};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio::time::Instant;

/// What a connection is doing, for the idle rule.
#[derive(Debug, Clone, Copy)]
pub(super) struct Activity {
    /// Requests whose responses are not yet sent.
    in_flight: usize,
    /// When `in_flight` last became 0 (or the connection opened).
    since: Instant,
    /// Whether a request head has arrived yet.
    served: bool,
    /// When the first byte of the next HTTP/1.1 request head arrived, while
    /// nothing was in flight.
    head_since: Option<Instant>,
    /// Responses with data ready that the peer has not taken (sent a frame,
    /// or never polled): the peer's receive window or socket is closed.
    waiting: usize,
    /// When a response body was last polled (not notified: read when a
    /// deadline passes).
    progress_at: Instant,
}

impl Activity {
    /// A connection just opened at `at`: nothing served yet.
    pub(super) fn opened(at: Instant) -> Self {
        Self {
            in_flight: 0,
            since: at,
            served: false,
            head_since: None,
            waiting: 0,
            progress_at: at,
        }
    }
}

/// When the connection is due to close if nothing changes: with nothing
/// in flight, the header timeout before its first request (or from the
/// first byte of a later HTTP/1.1 head) and the idle timeout otherwise;
/// with responses the peer does not take (a closed HTTP/2 window, an
/// unread socket), the idle timeout after the last progress. `None`:
/// requests in flight that are working (a quiet Watch stream waits on its
/// source, not on the peer).
pub(super) fn deadline(a: &Activity, limits: Limits) -> Option<Instant> {
    if a.in_flight == 0 {
        return Some(match (a.served, a.head_since) {
            (false, _) => a.since + limits.header_timeout,
            (true, Some(head)) => head + limits.header_timeout,
            (true, None) => a.since + limits.idle_timeout,
        });
    }
    (a.waiting > 0).then(|| a.progress_at + limits.idle_timeout)
}

/// Resolves when the connection is idle or stalled past its bound (see
/// [`deadline`]).
pub(super) async fn idle(mut activity: watch::Receiver<Activity>, limits: Limits) {
    loop {
        let due = deadline(&activity.borrow_and_update(), limits);
        let Some(due) = due else {
            if activity.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {
                // Progress is recorded without a wake-up: look again.
                let now = deadline(&activity.borrow(), limits);
                if now.is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            changed = activity.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
        }
    }
}

/// Counts one request as in flight until dropped (with its response
/// body).
pub(super) struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    pub(super) fn start(activity: Arc<watch::Sender<Activity>>) -> Self {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.served = true;
            a.head_since = None;
        });
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.since = Instant::now();
            }
        });
    }
}

/// Which protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// The connection's byte stream, noting when an HTTP/1.1 request head
/// starts while nothing is in flight, so a slow head is held to the
/// header timeout and an idle keep-alive connection to the idle timeout.
/// (HTTP/2 sends frames with no request open, pings and window updates;
/// its request heads are bounded by the header list size.)
pub(super) struct Watched<I> {
    io: I,
    activity: Arc<watch::Sender<Activity>>,
    protocol: Protocol,
}

impl<I> Watched<I> {
    /// `io`, reporting to `activity`.
    pub(super) fn new(io: I, activity: Arc<watch::Sender<Activity>>) -> Self {
        Self {
            io,
            activity,
            protocol: Protocol::Unknown,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return result;
        }
        if self.protocol == Protocol::Unknown {
            self.protocol = if read.starts_with(b"PRI ") {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
        }
        if self.protocol == Protocol::Http1 {
            let starts_head = {
                let a = self.activity.borrow();
                a.served && a.in_flight == 0 && a.head_since.is_none()
            };
            if starts_head {
                self.activity.send_modify(|a| {
                    if a.in_flight == 0 && a.head_since.is_none() {
                        a.head_since = Some(Instant::now());
                    }
                });
            }
        }
        result
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that keeps its request in flight until it is sent
/// (or dropped), and tells the connection whether it waits on the peer.
pub(super) struct Tracked<B> {
    body: Pin<Box<B>>,
    guard: InFlight,
    /// Data is ready and the peer has not taken it yet.
    waiting: bool,
}

impl<B> Tracked<B> {
    /// Counts as waiting from the start: until hyper polls it, the peer
    /// has taken nothing.
    pub(super) fn new(body: B, guard: InFlight) -> Self {
        let mut tracked = Self {
            body: Box::pin(body),
            guard,
            waiting: false,
        };
        tracked.update(true);
        tracked
    }

    /// Records a poll, and whether the body now waits on the peer;
    /// wakes the idle watch only when "some response waits" changes.
    fn update(&mut self, waiting: bool) {
        let was = std::mem::replace(&mut self.waiting, waiting);
        self.guard.0.send_if_modified(|a| {
            a.progress_at = Instant::now();
            let before = a.waiting > 0;
            match (was, waiting) {
                (false, true) => a.waiting += 1,
                (true, false) => a.waiting = a.waiting.saturating_sub(1),
                _ => {}
            }
            before != (a.waiting > 0)
        });
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.waiting {
            self.guard
                .0
                .send_modify(|a| a.waiting = a.waiting.saturating_sub(1));
        }
    }
}

impl<B: ResponseBody> hyper::body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.body.as_mut().poll_frame(cx);
        // A frame handed out: the next poll comes when the peer takes it.
        // Pending: the body waits on its own source, not on the peer.
        let waiting = matches!(polled, Poll::Ready(Some(Ok(_))));
        self.update(waiting);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
