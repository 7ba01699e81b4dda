//! Inbound requests as the application sees them, and the [`Responder`] that answers one.

use libp2p::PeerId;
use tokio::sync::oneshot;

use super::wire::{
    ActivityRequest, ActivityResponse, MarketRequest, MarketResponse, Reason, ACTIVITY_PROTOCOL,
    MARKET_PROTOCOL, MAX_RESPONSE_BYTES,
};
use super::{encoded_len, NetError, REASON_RESPONSE_TOO_LARGE};

/// A request a peer sent; answer it with [`Responder::respond`].
#[derive(Debug)]
pub struct Inbound {
    /// The requesting peer, authenticated by noise.
    pub peer: PeerId,
    pub request: InboundRequest,
    pub responder: Responder,
}

/// The request, by protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum InboundRequest {
    Market(MarketRequest),
    Activity(ActivityRequest),
}

/// A response to either protocol; `From` both response types so
/// `responder.respond(MarketResponse::...)` reads naturally.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Market(MarketResponse),
    Activity(ActivityResponse),
}

impl From<MarketResponse> for Response {
    fn from(r: MarketResponse) -> Self {
        Response::Market(r)
    }
}

impl From<ActivityResponse> for Response {
    fn from(r: ActivityResponse) -> Self {
        Response::Activity(r)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Market,
    Activity,
}

impl Kind {
    pub(crate) fn protocol(self) -> &'static str {
        match self {
            Kind::Market => MARKET_PROTOCOL,
            Kind::Activity => ACTIVITY_PROTOCOL,
        }
    }
}

impl Response {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Response::Market(_) => Kind::Market,
            Response::Activity(_) => Kind::Activity,
        }
    }

    /// The protocol's `error` response with `reason`.
    pub(crate) fn error(kind: Kind, reason: Reason) -> Self {
        match kind {
            Kind::Market => Response::Market(MarketResponse::Error { reason }),
            Kind::Activity => Response::Activity(ActivityResponse::Error { reason }),
        }
    }

    fn encoded_len(&self) -> Result<u64, NetError> {
        match self {
            Response::Market(r) => encoded_len(MARKET_PROTOCOL, r),
            Response::Activity(r) => encoded_len(ACTIVITY_PROTOCOL, r),
        }
    }
}

/// Answers one inbound request. Dropping it unanswered makes the requestor's request fail
/// at once (the stream is closed without a response) rather than wait for its timeout.
#[derive(Debug)]
pub struct Responder {
    pub(crate) kind: Kind,
    pub(crate) tx: oneshot::Sender<Response>,
}

impl Responder {
    /// Sends `response` to the requestor.
    ///
    /// Fails when the response is of the other protocol (the requestor then sees its
    /// request fail), when it is larger than the requestor reads (the requestor is sent a
    /// `response-too-large` error instead), or when the request no longer waits.
    pub fn respond(self, response: impl Into<Response>) -> Result<(), NetError> {
        let response = response.into();
        let protocol = self.kind.protocol();
        if response.kind() != self.kind {
            return Err(NetError::WrongResponse {
                expected: protocol,
                got: response.kind().protocol(),
            });
        }
        // Checked here, on the application's task, so the event loop never serialises a
        // large response twice; a response the requestor would truncate is useless to it.
        let size = response.encoded_len()?;
        if size > MAX_RESPONSE_BYTES {
            let reason = Reason::new(
                REASON_RESPONSE_TOO_LARGE,
                format!(
                    "the response was {size} bytes, more than the {MAX_RESPONSE_BYTES} allowed"
                ),
            );
            let _ = self.tx.send(Response::error(self.kind, reason));
            return Err(NetError::ResponseTooLarge {
                protocol,
                size,
                max: MAX_RESPONSE_BYTES,
            });
        }
        self.tx
            .send(response)
            .map_err(|_| NetError::NotWaiting { protocol })
    }

    /// The protocol of the request this answers (`/provider/market/1` or
    /// `/provider/activity/1`).
    pub fn protocol(&self) -> &'static str {
        self.kind.protocol()
    }
}
