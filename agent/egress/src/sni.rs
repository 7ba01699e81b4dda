//! Reading the server name (SNI) from the first bytes of a TLS connection.
//!
//! A `CONNECT api.example.com:443` tunnel could carry a TLS session for any other name the
//! same address serves (shared CDNs and hosting make that common), so the proxy reads the
//! client's first flight before it forwards a byte and requires the SNI to name the CONNECT
//! host. Only what is needed is parsed: TLS records of type handshake (a ClientHello may be
//! split over several records), the ClientHello's fixed fields, and the `server_name`
//! extension. Anything that does not parse is refused, never guessed at.

/// The largest ClientHello we buffer. Real ones are a few hundred bytes to a few KiB
/// (post-quantum key shares make them ~1.5 KiB); TLS allows 16 MiB, a proxy need not.
pub const MAX_HELLO: usize = 64 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// TLSPlaintext.length must not exceed 2^14.
const MAX_RECORD: usize = 1 << 14;

/// Why the first bytes of a tunnel are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("the tunnel does not start with a TLS handshake record")]
    NotTls,
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("the ClientHello is larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// What the ClientHello says: `Ok(None)` while more bytes are needed, then
/// `Ok(Some(sni))` with the lowercase server name if the client sent one.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<Option<String>>, SniError> {
    // Reassemble the handshake stream from the records seen so far.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < RECORD_HEADER {
            if rest.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
                return Err(SniError::NotTls);
            }
            break;
        }
        if rest[0] != CONTENT_HANDSHAKE {
            return Err(SniError::NotTls);
        }
        // Record versions are 3.x (SSL 3.0 .. TLS 1.3's legacy 3.1/3.3).
        if rest[1] != 3 {
            return Err(SniError::NotTls);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed("record length out of range"));
        }
        if rest.len() < RECORD_HEADER + len {
            handshake.extend_from_slice(&rest[RECORD_HEADER..]);
            break;
        }
        handshake.extend_from_slice(&rest[RECORD_HEADER..RECORD_HEADER + len]);
        rest = &rest[RECORD_HEADER + len..];
        if handshake.len() >= 4 && handshake.len() >= 4 + hello_len(&handshake) {
            break;
        }
    }
    if handshake.is_empty() {
        return Ok(None);
    }
    if handshake[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(SniError::NotClientHello);
    }
    if handshake.len() < 4 {
        return Ok(None);
    }
    let len = hello_len(&handshake);
    if len > MAX_HELLO {
        return Err(SniError::TooLarge);
    }
    if handshake.len() < 4 + len {
        return Ok(None);
    }
    parse_hello_body(&handshake[4..4 + len]).map(Some)
}

fn hello_len(h: &[u8]) -> usize {
    u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize
}

/// A cursor that fails with a reason instead of panicking on short input.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.buf.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

fn parse_hello_body(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { buf: body };
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session = r.vec8("legacy_session_id")?;
    if session.len() > 32 {
        return Err(SniError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    r.vec16("cipher_suites")?;
    r.vec8("legacy_compression_methods")?;
    if r.buf.is_empty() {
        // A ClientHello without extensions (SSL 3.0 style) names no server.
        return Ok(None);
    }
    let mut exts = Reader {
        buf: r.vec16("extensions")?,
    };
    if !r.buf.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut sni = None;
    while !exts.buf.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            return Err(SniError::Malformed("two server_name extensions"));
        }
        sni = Some(parse_server_name(data)?);
    }
    Ok(sni)
}

fn parse_server_name(data: &[u8]) -> Result<String, SniError> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec16("server_name_list")?,
    };
    if !r.buf.is_empty() {
        return Err(SniError::Malformed("bytes after server_name_list"));
    }
    let mut host = None;
    while !list.buf.is_empty() {
        let kind = list.u8("name_type")?;
        let name = list.vec16("server name")?;
        if kind != NAME_TYPE_HOST {
            continue;
        }
        // RFC 6066: at most one name of each type. Two would let the client pick later.
        if host.is_some() {
            return Err(SniError::Malformed("two host names in server_name"));
        }
        let ok = !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !ok {
            return Err(SniError::Malformed("server name is not a DNS host name"));
        }
        host = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    host.ok_or(SniError::Malformed("server_name without a host name"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello body with the given extensions.
    fn hello_body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([7u8; 32]);
        b.push(32);
        b.extend([1u8; 32]);
        b.extend([0, 2, 0x13, 0x01]);
        b.extend([1, 0]);
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend(t.to_be_bytes());
            e.extend((d.len() as u16).to_be_bytes());
            e.extend(d);
        }
        b.extend((e.len() as u16).to_be_bytes());
        b.extend(e);
        b
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(*n);
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend(list);
        (EXT_SERVER_NAME, d)
    }

    /// Wraps a ClientHello body in a handshake header and records of at most `chunk` bytes.
    pub(crate) fn records(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut out = Vec::new();
        for part in hs.chunks(chunk) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((part.len() as u16).to_be_bytes());
            out.extend(part);
        }
        out
    }

    pub(crate) fn hello_with_sni(name: &str) -> Vec<u8> {
        records(
            &hello_body(&[(10, vec![0, 2, 0, 29]), sni_ext(&[(0, name.as_bytes())])]),
            1 << 14,
        )
    }

    #[test]
    fn reads_sni_and_lowercases_it() {
        let buf = hello_with_sni("Api.Example.COM");
        assert_eq!(
            parse_client_hello(&buf),
            Ok(Some(Some("api.example.com".into())))
        );
    }

    #[test]
    fn asks_for_more_until_the_hello_is_complete_even_across_records() {
        let body = hello_body(&[sni_ext(&[(0, b"a.example")]), (21, vec![0; 300])]);
        let buf = records(&body, 50);
        for cut in 0..buf.len() {
            assert_eq!(parse_client_hello(&buf[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_client_hello(&buf), Ok(Some(Some("a.example".into()))));
    }

    #[test]
    fn no_sni_is_reported_as_none() {
        let buf = records(&hello_body(&[(10, vec![0, 2, 0, 29])]), 1 << 14);
        assert_eq!(parse_client_hello(&buf), Ok(Some(None)));
        // Without an extensions block at all.
        let mut body = hello_body(&[]);
        body.truncate(body.len() - 2);
        assert_eq!(parse_client_hello(&records(&body, 1 << 14)), Ok(Some(None)));
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(parse_client_hello(b"G"), Err(SniError::NotTls));
        // SSLv2-compatible hello.
        assert_eq!(
            parse_client_hello(&[0x80, 0x2e, 1, 3, 1]),
            Err(SniError::NotTls)
        );
        let mut server_hello = records(&hello_body(&[]), 1 << 14);
        server_hello[5] = 2;
        assert_eq!(
            parse_client_hello(&server_hello),
            Err(SniError::NotClientHello)
        );
    }

    #[test]
    fn refuses_ambiguous_or_broken_names() {
        let two_names = records(
            &hello_body(&[sni_ext(&[(0, b"a.example"), (0, b"b.example")])]),
            1 << 14,
        );
        assert!(matches!(
            parse_client_hello(&two_names),
            Err(SniError::Malformed(_))
        ));
        let two_exts = records(
            &hello_body(&[sni_ext(&[(0, b"a.example")]), sni_ext(&[(0, b"a.example")])]),
            1 << 14,
        );
        assert!(matches!(
            parse_client_hello(&two_exts),
            Err(SniError::Malformed(_))
        ));
        let nul = records(
            &hello_body(&[sni_ext(&[(0, b"a.example\0b.example")])]),
            1 << 14,
        );
        assert!(matches!(
            parse_client_hello(&nul),
            Err(SniError::Malformed(_))
        ));
        let mut truncated = hello_body(&[sni_ext(&[(0, b"a.example")])]);
        let n = truncated.len();
        truncated[n - 11] = 0xff; // the name length now runs past the extension
        assert!(matches!(
            parse_client_hello(&records(&truncated, 1 << 14)),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversized_hello() {
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend(&((MAX_HELLO + 1) as u32).to_be_bytes()[1..]);
        let mut buf = vec![CONTENT_HANDSHAKE, 3, 1, 0, 4];
        buf.extend(hs);
        assert_eq!(parse_client_hello(&buf), Err(SniError::TooLarge));
    }
}
