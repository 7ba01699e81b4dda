//! The network wire codec: each protocol's request and response decoded from one JSON
//! document, as `net`'s codec does for every inbound stream (`serde_json::from_slice` on
//! at most the protocol's size limit). A message that decodes re-encodes to one that
//! decodes to the same value, so nothing a peer sends is changed in passing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::wire::{ActivityRequest, ActivityResponse, MarketRequest, MarketResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<M: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(message) = serde_json::from_slice::<M>(data) else {
        return;
    };
    let bytes = serde_json::to_vec(&message).expect("a decoded message encodes");
    let again: M = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "re-encoded message does not decode ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    // Compare the encodings: JSON numbers in open property maps may not survive as
    // the same f64 bits, but their text must be stable after one pass.
    let bytes_again = serde_json::to_vec(&again).expect("encodes");
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&bytes_again)
    );
}

fuzz_target!(|data: &[u8]| {
    round_trip::<MarketRequest>(data);
    round_trip::<MarketResponse>(data);
    round_trip::<ActivityRequest>(data);
    round_trip::<ActivityResponse>(data);
    // What the provider does with a demand's fields right after decoding.
    if let Ok(MarketRequest::Demand {
        properties,
        constraints,
    }) = serde_json::from_slice::<MarketRequest>(data)
    {
        let _ = provider::market::constraints::Filter::parse(&constraints);
        if let Some(serde_json::Value::String(payload)) = properties.get(net::wire::props::PAYLOAD)
        {
            let _ = policies::ReceivedManifest::from_base64(payload);
        }
    }
    if let Ok(ActivityRequest::Exec { batch, .. }) = serde_json::from_slice::<ActivityRequest>(data)
    {
        let _ = exescript::parse_batch(&batch.to_string());
    }
});
