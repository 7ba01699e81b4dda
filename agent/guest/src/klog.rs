//! The kernel's own reasons: with `loglevel=3` the console shows no `pr_err` line, so when a
//! mount or a module load fails the agent quotes the kernel log's last matching lines.

/// `; kernel: line | line` with the last `n` lines of the kernel log that contain one of
/// `needles` and none of `unless` (case-insensitive), or an empty string when none does
/// or the log cannot be read.
pub fn tail(needles: &[&str], unless: &[&str], n: usize) -> String {
    let mut buf = vec![0u8; 1 << 17];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: SYSLOG_ACTION_READ_ALL (3) copies at most `len` bytes into `buf`, which is
    // valid and writable for that many bytes for the whole call.
    let got = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast::<libc::c_char>(), len) };
    let Ok(got) = usize::try_from(got) else {
        return String::new();
    };
    matching(&String::from_utf8_lossy(&buf[..got]), needles, unless, n)
}

/// The pure part of [`tail`]: strips the `<level>` and `[timestamp]` prefixes.
pub fn matching(log: &str, needles: &[&str], unless: &[&str], n: usize) -> String {
    let low = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_ascii_lowercase()).collect() };
    let (needles, unless) = (low(needles), low(unless));
    let lines: Vec<&str> = log
        .lines()
        .map(|l| {
            let l = match l.strip_prefix('<').and_then(|r| r.split_once('>')) {
                Some((lvl, rest)) if lvl.bytes().all(|b| b.is_ascii_digit()) => rest,
                _ => l,
            };
            match l
                .trim_start()
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
            {
                Some((_, rest)) => rest.trim(),
                None => l.trim(),
            }
        })
        .filter(|l| {
            let low = l.to_ascii_lowercase();
            needles.iter().any(|nd| low.contains(nd.as_str()))
                && !unless.iter().any(|u| low.contains(u.as_str()))
        })
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "; kernel: {}",
        lines[lines.len().saturating_sub(n)..].join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_matching_lines_lose_their_prefixes() {
        // As the 6.1 kernel logs a mount of an lzma image.
        let log = "<6>[    0.100000] Linux version 6.1\n\
                   <5>[    1.724042] squashfs: version 4.0 (2009/01/31) Phillip Lougher\n\
                   <3>[    1.753211] Filesystem uses \"lzma\" compression. This is not supported\n\
                   <3>[    1.800000] SQUASHFS error: second\n\
                   <6>[    1.900000] other\n";
        let sq = ["squashfs", "compression"];
        assert_eq!(
            matching(log, &sq, &[], 1),
            "; kernel: SQUASHFS error: second"
        );
        assert_eq!(
            matching(log, &sq, &["Lougher"], 5),
            "; kernel: Filesystem uses \"lzma\" compression. This is not supported | \
             SQUASHFS error: second"
        );
        assert_eq!(matching(log, &["overlay"], &[], 3), "");
    }
}
