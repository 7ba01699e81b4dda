//! The JSON codec of both protocols: one JSON document per stream, written and then the
//! stream closed, read to its end with a size limit.
//!
//! Wire-compatible with libp2p's `json::codec::Codec`; ours exists because that one
//! reports an inbound request it cannot decode only at debug level (inside libp2p) and
//! cannot tell an oversized message from a malformed one. Here a refused request is
//! logged as a warning saying which protocol and why, then the stream is dropped (the
//! requestor sees its request fail); the event loop carries on.

use std::io;
use std::marker::PhantomData;

use async_trait::async_trait;
use futures::prelude::*;
use libp2p::request_response;
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) struct JsonCodec<Req, Resp> {
    max_request: u64,
    max_response: u64,
    phantom: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> JsonCodec<Req, Resp> {
    pub(crate) fn new(max_request: u64, max_response: u64) -> Self {
        Self {
            max_request,
            max_response,
            phantom: PhantomData,
        }
    }
}

// Not derived: a derive would demand `Req: Clone`, which the codec does not need.
impl<Req, Resp> Clone for JsonCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request, self.max_response)
    }
}

/// Reads the stream to its end, refusing more than `max` bytes, and decodes the JSON.
async fn read_json<T, M>(what: &str, max: u64, io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: DeserializeOwned,
{
    let mut buf = Vec::new();
    // One byte past the limit tells "too large" apart from "exactly the limit".
    io.take(max + 1).read_to_end(&mut buf).await?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} exceeds {max} bytes"),
        ));
    }
    serde_json::from_slice(&buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is not a valid message: {e}"),
        )
    })
}

/// Serialised before the first await, so the future holds bytes, not a `&M` (which would
/// need `M: Sync`).
async fn write_json<T>(io: &mut T, data: io::Result<Vec<u8>>) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    io.write_all(&data?).await
}

#[async_trait]
impl<Req, Resp> request_response::Codec for JsonCodec<Req, Resp>
where
    Req: Send + Serialize + DeserializeOwned,
    Resp: Send + Serialize + DeserializeOwned,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let result = read_json("request", self.max_request, io).await;
        if let Err(error) = &result {
            // libp2p drops the stream on this error without telling the behaviour, so
            // this is the only place the refusal can be seen.
            tracing::warn!(protocol = %protocol, %error, "inbound request dropped");
        }
        result
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_json("response", self.max_response, io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Req,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_json(io, serde_json::to_vec(&request).map_err(Into::into)).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_json(io, serde_json::to_vec(&response).map_err(Into::into)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limit_is_inclusive_and_oversize_is_named() {
        let exact = br#"{"a":"12"}"#; // 10 bytes
        let mut io = futures::io::Cursor::new(exact.to_vec());
        let v: serde_json::Value = read_json("request", 10, &mut io).await.unwrap();
        assert_eq!(v["a"], "12");

        let mut io = futures::io::Cursor::new(br#"{"a":"123"}"#.to_vec());
        let err = read_json::<_, serde_json::Value>("request", 10, &mut io)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "request exceeds 10 bytes");

        let mut io = futures::io::Cursor::new(b"{".to_vec());
        let err = read_json::<_, serde_json::Value>("response", 10, &mut io)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("response is not a valid message"),
            "{err}"
        );
    }
}
