//! Byte streams with an idle timeout and a job-wide byte budget.
//!
//! Every stream the proxy touches is wrapped in [`Metered`]: the client's side for the idle
//! timeout (hyper's header timeout only covers waiting for a request head), the upstream
//! side for the idle timeout and for counting tunnel bytes against the job's budget. The
//! timer is re-armed lazily: a read or write only records the time, and the timer is looked
//! at when the stream would block, so busy transfers pay for a clock read, not for timer
//! wheel updates.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes a job has moved, against its budget.
#[derive(Debug)]
pub struct Usage {
    used: AtomicU64,
    max: u64,
}

impl Usage {
    pub fn new(max: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            max,
        }
    }

    /// Counts `n` bytes; `false` once the budget is exceeded.
    pub fn add(&self, n: u64) -> bool {
        self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n) <= self.max
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn spent(&self) -> bool {
        self.used() >= self.max
    }

    pub fn max(&self) -> u64 {
        self.max
    }
}

pub fn budget_error(usage: &Usage) -> io::Error {
    io::Error::other(format!(
        "the job's egress byte budget of {} bytes is spent",
        usage.max()
    ))
}

/// A stream that fails with `TimedOut` after `idle` without progress in either direction
/// and, when given a [`Usage`], counts what it carries and fails once the budget is spent.
/// As the upstream side of a tunnel, reads are "down" (towards the client) and writes "up".
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    usage: Option<Arc<Usage>>,
    /// Bytes written to `inner`.
    pub written: u64,
    /// Bytes read from `inner`.
    pub read: u64,
}

impl<S> Metered<S> {
    pub fn new(inner: S, idle: Duration, usage: Option<Arc<Usage>>) -> Self {
        let last = Instant::now();
        Self {
            inner,
            idle,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + idle)),
            usage,
            written: 0,
            read: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Called when `inner` would block: fails if nothing moved for `idle`, else makes sure
    /// this task is woken by the idle deadline. The timer is only moved when it fires, so
    /// it fires at most once per idle period however busy the stream is.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last + self.idle;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {} s", self.idle.as_secs_f32()),
                ));
            }
            self.timer.as_mut().reset(deadline);
        }
        Ok(())
    }

    fn check_budget(&self) -> io::Result<()> {
        match &self.usage {
            Some(u) if u.spent() => Err(budget_error(u)),
            _ => Ok(()),
        }
    }

    fn count(&mut self, n: usize, written: bool) {
        if n == 0 {
            return;
        }
        self.last = Instant::now();
        if written {
            self.written += n as u64;
        } else {
            self.read += n as u64;
        }
        if let Some(u) = &self.usage {
            u.add(n as u64);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_budget()?;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.count(buf.filled().len() - before, false);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.poll_idle(cx)?;
                Poll::Pending
            }
        }
    }
}

impl<S> Metered<S> {
    /// Counts what a write moved, or arms the idle timer while it waits.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.count(n, true);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.poll_idle(cx)?;
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_budget()?;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_budget()?;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_stream_times_out_and_activity_postpones_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut m = Metered::new(a, Duration::from_secs(10), None);
        let mut buf = [0u8; 8];
        // Activity at 6 s pushes the deadline to 16 s.
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            b.write_all(b"x").await.unwrap();
            b
        });
        let start = Instant::now();
        assert_eq!(m.read(&mut buf).await.unwrap(), 1);
        let _b = writer.await.unwrap();
        let err = m.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(16));
    }

    #[tokio::test]
    async fn counts_both_directions_and_stops_at_the_budget() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let usage = Arc::new(Usage::new(10));
        let mut m = Metered::new(a, Duration::from_secs(60), Some(usage.clone()));
        m.write_all(b"hello").await.unwrap();
        b.write_all(b"world!").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(m.read(&mut buf).await.unwrap(), 6);
        assert_eq!((m.written, m.read, usage.used()), (5, 6, 11));
        assert!(usage.spent());
        let err = m.write_all(b"more").await.unwrap_err();
        assert!(err.to_string().contains("byte budget"), "{err}");
        assert!(m.read(&mut buf).await.is_err());
    }
}
