//! The TLS ClientHello / SNI peek (`egress::sni::parse_client_hello`) on raw bytes.
//!
//! The proxy calls it on a growing buffer until it stops asking for more, so the parse
//! must be consistent across prefixes: once the whole input gives an answer, no prefix
//! may give a different answer or an error (it may only ask for more bytes).
#![no_main]

use egress::sni::parse_client_hello;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    if let Ok(Some(Some(name))) = &full {
        assert!(!name.is_empty());
        assert_eq!(
            name,
            &name.to_ascii_lowercase(),
            "the SNI is reported lowercase"
        );
    }
    let Ok(Some(answer)) = full else {
        return;
    };
    // Prefixes at a few cut points (every byte would make the target quadratic).
    let step = (data.len() / 16).max(1);
    for cut in (0..data.len()).step_by(step) {
        match parse_client_hello(&data[..cut]) {
            Ok(None) => {}
            Ok(Some(early)) => assert_eq!(early, answer, "prefix of {cut} bytes"),
            Err(e) => panic!("prefix of {cut} bytes fails ({e}) where the whole hello parses"),
        }
    }
});
