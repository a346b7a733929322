//! Joining two byte streams (a CONNECT tunnel, an upgraded WebSocket)
//! with an idle bound: once upgraded, a connection has left the server
//! loop's timeouts, so a tunnel nobody sends on would otherwise hold its
//! sockets forever.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// One side closed (or failed).
    Closed,
    /// Neither side sent a byte for the idle bound.
    Idle,
}

/// Copies bytes both ways between `a` and `b` until either closes, or
/// neither has sent anything for `idle`.
pub async fn join<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Counted {
        io: a,
        start,
        last: Arc::clone(&last),
    };
    let mut b = Counted {
        io: b,
        start,
        last: Arc::clone(&last),
    };
    let watchdog = async {
        loop {
            let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = seen + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => Ended::Closed,
        () = watchdog => Ended::Idle,
    }
}

/// A stream that notes when it last read a byte.
struct Counted<'a, T> {
    io: &'a mut T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_ends_at_the_idle_bound_and_a_busy_one_does_not() {
        let (mut a, mut a_far) = tokio::io::duplex(64);
        let (mut b, mut b_far) = tokio::io::duplex(64);
        let tunnel =
            tokio::spawn(async move { join(&mut a, &mut b, Duration::from_secs(10)).await });
        // Busy: a byte every 6 s for 30 s keeps it open.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            a_far.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            b_far.read_exact(&mut got).await.unwrap();
        }
        assert!(!tunnel.is_finished());
        // Quiet: it ends 10 s after the last byte.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(tunnel.await.unwrap(), Ended::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn both_sides_closing_ends_the_tunnel_before_the_idle_bound() {
        let (mut a, a_far) = tokio::io::duplex(64);
        let (mut b, b_far) = tokio::io::duplex(64);
        drop(a_far);
        drop(b_far);
        let started = Instant::now();
        let ended = join(&mut a, &mut b, Duration::from_secs(3600)).await;
        assert_eq!(ended, Ended::Closed);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
