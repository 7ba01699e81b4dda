//! What a command must look like before its rendering is compared with any constraint.
//!
//! The gate compares text, but the guest and the host act on what they *parse* from that
//! text. Wherever parsing could turn one text into another meaning — a URL whose dot
//! segments, backslashes or encoded separators a URL parser or an upstream server folds
//! away, an entry point with `..` segments, a relative path resolved against a directory
//! or a `PATH` the requestor chose, whitespace that makes an entry point render like an
//! entry point plus an argument — the command is refused here, so the text the gate
//! matched is exactly what runs or is fetched. The rules are in `docs/exescript.md`.

use url::Url;

/// Why a transfer's `from` or `to` is not in the one form the gate matches.
pub(crate) fn transfer_problem(from: &str, to: &str) -> Option<String> {
    if let Some(why) = location_problem(from) {
        return Some(format!("`from` {why}"));
    }
    location_problem(to).map(|why| format!("`to` {why}"))
}

/// A `container:` path must be written without dot or empty segments; a URL must be in
/// the form the URL parser gives it. Text that is neither is no location the provider
/// acts on (the activity refuses it with its own reason), so the gate leaves it alone.
fn location_problem(text: &str) -> Option<String> {
    if let Some(path) = text.strip_prefix("container:") {
        return path_problem(path, "path");
    }
    let url = Url::parse(text).ok()?;
    if url.as_str() != text {
        // Dot segments, `\`, `%2e`, a default port, upper-case host or scheme, a missing
        // `/` after the host: the parser's form differs, so what would be fetched is not
        // what the constraint saw.
        return Some(format!(
            "is not in canonical form: it would be fetched as `{}`; send that text instead",
            url.as_str()
        ));
    }
    // The URL parser keeps these encodings, but the upstream server may decode them into
    // separators or dot segments (once, or twice for `%25…`) after the gate has matched.
    if let Some(enc) = encoded_separator(url.path()) {
        return Some(format!(
            "has `{enc}` in its path, an encoded `.`, `/` or `\\` that a server may decode into a path separator or dot segment; name the file without it"
        ));
    }
    None
}

/// The first `%2e`, `%2f`, `%5c` (any case), or the same behind `%25`, in `path`.
fn encoded_separator(path: &str) -> Option<&str> {
    let bytes = path.as_bytes();
    let lower = |i: usize| bytes.get(i).map(u8::to_ascii_lowercase);
    for start in (0..bytes.len()).filter(|&i| bytes[i] == b'%') {
        // `%25` is an encoded `%`: look at what it introduces.
        let mut j = start + 1;
        while lower(j) == Some(b'2') && lower(j + 1) == Some(b'5') {
            j += 2;
        }
        let pair = (lower(j), lower(j + 1));
        if matches!(
            pair,
            (Some(b'2'), Some(b'e' | b'f')) | (Some(b'5'), Some(b'c'))
        ) {
            return Some(&path[start..j + 2]);
        }
    }
    None
}

/// Why `entry_point` cannot be run as the gate sees it.
pub(crate) fn entry_point_problem(entry_point: &str) -> Option<String> {
    if entry_point.is_empty() {
        return Some("is empty".into());
    }
    if let Some(c) = entry_point
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Some(format!(
            "contains {c:?}: an entry point with whitespace or control characters would render like an entry point followed by arguments; put arguments in `args`"
        ));
    }
    if !entry_point.contains('/') {
        if entry_point == "." || entry_point == ".." {
            return Some("is a dot segment, not a program".into());
        }
        // A bare name: the guest looks it up in its fixed PATH, never the requestor's.
        return None;
    }
    if !entry_point.starts_with('/') {
        return Some(
            "is a relative path, resolved against whatever directory the command runs in; use an absolute path (or a bare program name, looked up in the guest's fixed PATH)"
                .into(),
        );
    }
    path_problem(entry_point, "entry point")
}

/// An absolute path must be written without `.`, `..` or empty segments, so a pattern such
/// as `/bin/.*` cannot admit `/bin/../tmp/evil`.
fn path_problem(path: &str, what: &str) -> Option<String> {
    if !path.starts_with('/') {
        return Some(format!("must be an absolute {what} (`/…`)"));
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => {
                return Some(format!(
                    "has an empty segment (`//` or a trailing `/`); write the {what} without it"
                ))
            }
            "." | ".." => {
                return Some(format!(
                    "has a `{segment}` segment; write the {what} without dot segments"
                ))
            }
            _ => {}
        }
    }
    if path.contains('\0') {
        return Some(format!("contains a NUL byte; no {what} does"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_urls_pass() {
        for from in [
            "http://127.0.0.1:8080/public/a.txt",
            "https://example.com/data/v1.2/file.tar.gz",
            "http://example.com/a%20b?x=%2F",
            "https://example.com/",
        ] {
            assert_eq!(location_problem(from), None, "{from}");
        }
    }

    #[test]
    fn path_tricks_are_refused() {
        for from in [
            "http://127.0.0.1:8080/public/../private/secret.txt",
            "http://127.0.0.1:8080/public/%2e%2e/private/secret.txt",
            "http://127.0.0.1:8080/public/%2E%2E/private/secret.txt",
            "http://127.0.0.1:8080/public/..\\private\\secret.txt",
            "http://127.0.0.1:8080/public/./a",
            "http://127.0.0.1:8080/public/..%2fprivate",
            "http://127.0.0.1:8080/public/%252e%252e/private",
            "http://127.0.0.1:8080/public/%25252e%25252e/private",
            "http://127.0.0.1:8080/public/a%5cb",
            "http://127.0.0.1:80/public/a",
            "HTTP://127.0.0.1/public/a",
            "http://Example.com/public/a",
            "http://example.com",
            "http://127.1/public/a",
            "http://example.com\\@evil.com/",
        ] {
            assert!(location_problem(from).is_some(), "{from}");
        }
    }

    #[test]
    fn destinations() {
        assert_eq!(location_problem("container:/data/in.txt"), None);
        for to in [
            "container:/data/../etc/passwd",
            "container:/data/./x",
            "container://x",
            "container:/data/",
            "container:relative",
        ] {
            assert!(location_problem(to).is_some(), "{to}");
        }
        // Not a location at all: the activity refuses it with its own reason.
        assert_eq!(location_problem("not a url"), None);
    }

    #[test]
    fn entry_points() {
        for ok in ["/bin/sh", "/usr/bin/python3", "date", "busybox"] {
            assert_eq!(entry_point_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "/bin/../tmp/evil",
            "/bin/./sh",
            "/bin//sh",
            "./evil",
            "bin/sh",
            "..",
            "/bin/sh -c",
            "/bin/sh\t",
            "/bin/s\u{0}h",
            "/bin/\u{a0}sh",
        ] {
            assert!(entry_point_problem(bad).is_some(), "{bad:?}");
        }
    }
}
