//! Bodies the proxy sends: short refusal texts, and upstream bodies counted on the way.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::io::{budget_error, Usage};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs once when a counted body ends or is dropped, whichever comes first: the point at
/// which an allowed request is finished and its audit line can be written.
pub trait OnClose: Send + Sync + 'static {
    fn close(self: Box<Self>, error: Option<String>);
}

/// A body that counts its data bytes into `counter` and the job's [`Usage`], failing the
/// transfer once the job's budget is spent.
pub struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
    usage: Arc<Usage>,
    on_close: Option<Box<dyn OnClose>>,
    /// An empty body may be dropped without ever being polled; that is its normal end.
    empty: bool,
}

impl<B: Body> Counted<B> {
    pub fn new(
        inner: B,
        counter: Arc<AtomicU64>,
        usage: Arc<Usage>,
        on_close: Option<Box<dyn OnClose>>,
    ) -> Self {
        let empty = inner.is_end_stream();
        Self {
            inner,
            counter,
            usage,
            on_close,
            empty,
        }
    }
}

impl<B> Counted<B> {
    fn finish(&mut self, error: Option<String>) {
        if let Some(c) = self.on_close.take() {
            c.close(error);
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        // Still open here means the client or the upstream went away mid-body.
        let error = (!self.empty).then(|| "closed before the body was complete".to_owned());
        self.finish(error);
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.usage.spent() {
            let e = budget_error(&this.usage);
            this.finish(Some(e.to_string()));
            return Poll::Ready(Some(Err(e.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.finish(Some(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.counter.fetch_add(n, Ordering::Relaxed);
                    this.usage.add(n);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the proxy answers with.
pub enum ProxyBody {
    /// Nothing (a CONNECT's 200, a 101).
    Empty,
    /// A refusal's short text.
    Text(Option<Bytes>),
    /// The upstream's response body.
    Upstream(Counted<hyper::body::Incoming>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Text(t) => t.is_none(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(b) => b.size_hint(),
        }
    }
}
