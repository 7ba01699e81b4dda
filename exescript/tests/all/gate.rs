//! Table tests for the gate: one row per constraint list, command and expected verdict.
//! The semantics they pin down are written out in `docs/exescript.md`.

use crate::util::{run, run_env, transfer};
use exescript::{compile, Command, CompileError, DenialReason, Gate, Kind, Match};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
enum Want {
    Allow,
    NoMatch,
    /// Denied because the env differs from the env of these constraints.
    EnvDiffers(Vec<usize>),
    /// Refused before any constraint: the entry point is not one the gate can vouch for.
    BadEntryPoint,
    /// Refused before any constraint: a transfer location is not in canonical form.
    NotCanonical,
}
use Want::{Allow, BadEntryPoint, EnvDiffers, NoMatch, NotCanonical};

struct Case {
    name: &'static str,
    script: Vec<Value>,
    default: Match,
    command: Command,
    want: Want,
}

fn case(
    name: &'static str,
    script: Vec<Value>,
    default: Match,
    command: Command,
    want: Want,
) -> Case {
    Case {
        name,
        script,
        default,
        command,
        want,
    }
}

/// Runs every row and reports all failing rows at once.
fn check_table(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in cases {
        let gate = match compile(&c.script, c.default) {
            Ok(gate) => gate,
            Err(err) => {
                failures.push(format!("{}: does not compile: {err}", c.name));
                continue;
            }
        };
        let got = match gate.check(&c.command) {
            Ok(()) => Allow,
            Err(denial) => match denial.reason {
                DenialReason::NoMatch { .. } => NoMatch,
                DenialReason::EnvDiffers { constraints } => EnvDiffers(constraints),
                DenialReason::EntryPointInvalid { .. } => BadEntryPoint,
                DenialReason::TransferNotCanonical { .. } => NotCanonical,
            },
        };
        if got != c.want {
            failures.push(format!(
                "{}: `{}` got {got:?}, want {:?}",
                c.name, c.command, c.want
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "failing rows:\n{}",
        failures.join("\n")
    );
}

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

#[test]
fn strict_and_regex() {
    use Match::{Regex, Strict};
    check_table(vec![
        case(
            "strict equal",
            vec![s("run /bin/date -R")],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "strict other arg",
            vec![s("run /bin/date -R")],
            Strict,
            run("/bin/date", &["-u"]),
            NoMatch,
        ),
        case(
            "strict extra arg",
            vec![s("run /bin/date -R")],
            Strict,
            run("/bin/date", &["-R", "-u"]),
            NoMatch,
        ),
        case(
            "strict is case-sensitive",
            vec![s("run /bin/Date -R")],
            Strict,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "strict metacharacters are literal",
            vec![s("run /bin/date.*")],
            Strict,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "strict metacharacters match themselves",
            vec![s("run /bin/date.*")],
            Strict,
            run("/bin/date.*", &[]),
            Allow,
        ),
        case(
            "strict unbalanced regex text is fine",
            vec![s("run /bin/date)|(.*")],
            Strict,
            run("/bin/date)|(.*", &[]),
            Allow,
        ),
        case(
            "regex wildcard",
            vec![s("run /bin/date.*")],
            Regex,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "regex class allows",
            vec![s("run /bin/date -[RU]")],
            Regex,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "regex class denies",
            vec![s("run /bin/date -[RU]")],
            Regex,
            run("/bin/date", &["-u"]),
            NoMatch,
        ),
        case(
            "second entry allows",
            vec![s("run /bin/ls"), s("run /bin/date -R")],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "object strict",
            vec![json!({"run": {"args": "/bin/date -R"}})],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "encoded object strict",
            vec![s(r#"{"run":{"args":"/bin/date -R"}}"#)],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "encoded object with leading space",
            vec![s(r#"  {"run":{"args":"/bin/date -R"}}"#)],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "args as an array",
            vec![json!({"run": {"args": ["/bin/date", "-R"]}})],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
    ]);
}

#[test]
fn per_command_match_overrides_the_list_default() {
    use Match::{Regex, Strict};
    check_table(vec![
        case(
            "strict object in a regex list: literal",
            vec![json!({"run": {"args": "/bin/date.*", "match": "strict"}})],
            Regex,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "strict object in a regex list: equal",
            vec![json!({"run": {"args": "/bin/date.*", "match": "strict"}})],
            Regex,
            run("/bin/date.*", &[]),
            Allow,
        ),
        case(
            "regex object in a strict list",
            vec![json!({"run": {"args": "/bin/date .*", "match": "regex"}})],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "encoded regex object in a strict list",
            vec![s(r#"{"run":{"args":"/bin/date .*","match":"regex"}}"#)],
            Strict,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "object without match takes the regex default",
            vec![json!({"run": {"args": "/bin/date .*"}})],
            Regex,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        case(
            "object without match takes the strict default",
            vec![json!({"run": {"args": "/bin/date .*"}})],
            Strict,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "plain strings always take the default",
            vec![
                s("run /bin/date .*"),
                json!({"run": {"args": "/bin/ls", "match": "regex"}}),
            ],
            Strict,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "mixed list: strict entry allows",
            vec![
                json!({"run": {"args": "/bin/ls -l", "match": "strict"}}),
                s("run /bin/date .*"),
            ],
            Regex,
            run("/bin/ls", &["-l"]),
            Allow,
        ),
        case(
            "mixed list: regex entry allows",
            vec![
                json!({"run": {"args": "/bin/ls -l", "match": "strict"}}),
                s("run /bin/date .*"),
            ],
            Regex,
            run("/bin/date", &["-u"]),
            Allow,
        ),
        case(
            "transfer object override",
            vec![
                json!({"transfer": {"from": "http://a/.*", "to": "container:/in/x", "match": "regex"}}),
            ],
            Strict,
            transfer("http://a/data", "container:/in/x"),
            Allow,
        ),
    ]);
}

#[test]
fn env_constraints() {
    use Match::{Regex, Strict};
    let a1 = || vec![json!({"run": {"args": "/bin/env", "env": {"A": "1"}}})];
    check_table(vec![
        case(
            "env equal",
            a1(),
            Strict,
            run_env("/bin/env", &[], &[("A", "1")]),
            Allow,
        ),
        case(
            "env value differs",
            a1(),
            Strict,
            run_env("/bin/env", &[], &[("A", "2")]),
            EnvDiffers(vec![0]),
        ),
        case(
            "env missing",
            a1(),
            Strict,
            run("/bin/env", &[]),
            EnvDiffers(vec![0]),
        ),
        case(
            "env has an extra variable",
            a1(),
            Strict,
            run_env("/bin/env", &[], &[("A", "1"), ("B", "2")]),
            EnvDiffers(vec![0]),
        ),
        case(
            "env equal but rendering differs",
            a1(),
            Strict,
            run_env("/bin/env", &["-0"], &[("A", "1")]),
            NoMatch,
        ),
        case(
            "no env in the constraint: any env",
            vec![s("run /bin/env")],
            Strict,
            run_env("/bin/env", &[], &[("A", "9")]),
            Allow,
        ),
        case(
            "empty env in the constraint: only an empty env",
            vec![json!({"run": {"args": "/bin/env", "env": {}}})],
            Strict,
            run("/bin/env", &[]),
            Allow,
        ),
        case(
            "empty env in the constraint denies a set env",
            vec![json!({"run": {"args": "/bin/env", "env": {}}})],
            Strict,
            run_env("/bin/env", &[], &[("A", "1")]),
            EnvDiffers(vec![0]),
        ),
        case(
            "null env means no env constraint",
            vec![json!({"run": {"args": "/bin/env", "env": null}})],
            Strict,
            run_env("/bin/env", &[], &[("A", "1")]),
            Allow,
        ),
        case(
            "one of two envs",
            vec![
                json!({"run": {"args": "/bin/env", "env": {"A": "1"}}}),
                json!({"run": {"args": "/bin/env", "env": {"A": "2"}}}),
            ],
            Strict,
            run_env("/bin/env", &[], &[("A", "2")]),
            Allow,
        ),
        case(
            "neither of two envs",
            vec![
                json!({"run": {"args": "/bin/env", "env": {"A": "1"}}}),
                json!({"run": {"args": "/bin/env", "env": {"A": "2"}}}),
            ],
            Strict,
            run_env("/bin/env", &[], &[("A", "3")]),
            EnvDiffers(vec![0, 1]),
        ),
        case(
            "env mismatch, but an env-free entry allows",
            vec![
                json!({"run": {"args": "/bin/env", "env": {"A": "1"}}}),
                s("run /bin/env"),
            ],
            Strict,
            run_env("/bin/env", &[], &[("A", "3")]),
            Allow,
        ),
        case(
            "regex with env: equal",
            vec![json!({"run": {"args": "/bin/env .*", "env": {"A": "1"}, "match": "regex"}})],
            Strict,
            run_env("/bin/env", &["x"], &[("A", "1")]),
            Allow,
        ),
        case(
            "regex with env: differs",
            vec![json!({"run": {"args": "/bin/env .*", "env": {"A": "1"}, "match": "regex"}})],
            Strict,
            run_env("/bin/env", &["x"], &[("A", "2")]),
            EnvDiffers(vec![0]),
        ),
        case(
            "regex with env: no match is NoMatch",
            vec![json!({"run": {"args": "/bin/env .*", "env": {"A": "1"}, "match": "regex"}})],
            Strict,
            run_env("/bin/ls", &["x"], &[("A", "2")]),
            NoMatch,
        ),
        case(
            "strict and regex both differ",
            vec![
                json!({"run": {"args": "/bin/env x", "env": {"A": "1"}}}),
                s("{\"run\":{\"args\":\"/bin/env .*\",\"env\":{\"A\":\"2\"}}}"),
            ],
            Regex,
            run_env("/bin/env", &["x"], &[("A", "3")]),
            EnvDiffers(vec![0, 1]),
        ),
        case(
            "encoded env",
            vec![s(
                r#"{"run":{"args":"/bin/date -R","env":{"A":"1"},"match":"regex"}}"#,
            )],
            Strict,
            run_env("/bin/date", &["-R"], &[("A", "1")]),
            Allow,
        ),
    ]);
}

#[test]
fn args_with_spaces_and_empty_args() {
    use Match::{Regex, Strict};
    check_table(vec![
        // The rendering joins with one space, so word boundaries are not visible to it:
        // both splits below render as `run /bin/sh -c echo hi` (see docs/exescript.md).
        case(
            "space inside an argument",
            vec![s("run /bin/sh -c echo hi")],
            Strict,
            run("/bin/sh", &["-c", "echo hi"]),
            Allow,
        ),
        case(
            "same text split differently",
            vec![s("run /bin/sh -c echo hi")],
            Strict,
            run("/bin/sh", &["-c", "echo", "hi"]),
            Allow,
        ),
        case(
            "array constraint joins the same way",
            vec![json!({"run": {"args": ["/bin/sh", "-c", "echo hi"]}})],
            Strict,
            run("/bin/sh", &["-c", "echo", "hi"]),
            Allow,
        ),
        case(
            "an empty argument shows as a double space",
            vec![s("run /bin/echo a  b")],
            Strict,
            run("/bin/echo", &["a", "", "b"]),
            Allow,
        ),
        case(
            "double space is not a single space",
            vec![s("run /bin/echo a b")],
            Strict,
            run("/bin/echo", &["a", "", "b"]),
            NoMatch,
        ),
        case(
            "no args: no trailing space",
            vec![s("run /bin/date")],
            Strict,
            run("/bin/date", &[]),
            Allow,
        ),
        case(
            "one empty arg is a trailing space",
            vec![s("run /bin/date")],
            Strict,
            run("/bin/date", &[""]),
            NoMatch,
        ),
        case(
            "trailing space constraint wants one empty arg",
            vec![s("run /bin/date ")],
            Strict,
            run("/bin/date", &[""]),
            Allow,
        ),
        case(
            "trailing space constraint denies no args",
            vec![s("run /bin/date ")],
            Strict,
            run("/bin/date", &[]),
            NoMatch,
        ),
        case(
            "optional args by regex: none",
            vec![s("run /bin/date( .*)?")],
            Regex,
            run("/bin/date", &[]),
            Allow,
        ),
        case(
            "optional args by regex: some",
            vec![s("run /bin/date( .*)?")],
            Regex,
            run("/bin/date", &["-R"]),
            Allow,
        ),
        // It would render exactly like `/opt/my` run with the arguments `app/run`.
        case(
            "an entry point with a space",
            vec![s("run /opt/my app/run")],
            Strict,
            run("/opt/my app/run", &[]),
            BadEntryPoint,
        ),
    ]);
}

#[test]
fn transfers() {
    use Match::{Regex, Strict};
    check_table(vec![
        case(
            "strict transfer",
            vec![s("transfer http://a/x container:/in/x")],
            Strict,
            transfer("http://a/x", "container:/in/x"),
            Allow,
        ),
        case(
            "strict transfer other target",
            vec![s("transfer http://a/x container:/in/x")],
            Strict,
            transfer("http://a/x", "container:/in/y"),
            NoMatch,
        ),
        case(
            "strict transfer swapped",
            vec![s("transfer http://a/x container:/in/x")],
            Strict,
            transfer("container:/in/x", "http://a/x"),
            NoMatch,
        ),
        case(
            "object transfer strict",
            vec![json!({"transfer": {"from": "http://a/x", "to": "container:/in/x"}})],
            Strict,
            transfer("http://a/x", "container:/in/x"),
            Allow,
        ),
        case(
            "regex over the whole rendering: target ends in output.txt",
            vec![s("transfer .*output.txt")],
            Regex,
            transfer("container:/out/x", "http://r/output.txt"),
            Allow,
        ),
        case(
            "regex over the whole rendering: source alone is not enough",
            vec![s("transfer .*output.txt")],
            Regex,
            transfer("container:/out/output.txt", "http://r/upload"),
            NoMatch,
        ),
        case(
            "object regex from and to",
            vec![
                json!({"transfer": {"from": "container:/out/[a-z]+\\.txt", "to": "http://req/.*", "match": "regex"}}),
            ],
            Strict,
            transfer("container:/out/result.txt", "http://req/up"),
            Allow,
        ),
        case(
            "object regex: from must match all of from",
            vec![
                json!({"transfer": {"from": "container:/out/[a-z]+\\.txt", "to": "http://req/.*", "match": "regex"}}),
            ],
            Strict,
            transfer("container:/out/../etc/passwd.txt", "http://req/up"),
            NotCanonical,
        ),
        case(
            "object regex alternation stays in its field",
            vec![json!({"transfer": {"from": "a|b", "to": "c", "match": "regex"}})],
            Strict,
            transfer("b", "c"),
            Allow,
        ),
        case(
            "run constraints do not allow transfers",
            vec![s("run .*")],
            Regex,
            transfer("a", "b"),
            NoMatch,
        ),
        case(
            "transfer constraints do not allow runs",
            vec![s("transfer .*")],
            Regex,
            run("/bin/sh", &[]),
            NoMatch,
        ),
        case(
            "a run pattern cannot reach a transfer",
            vec![s("run .*|transfer .*")],
            Regex,
            transfer("a", "b"),
            NoMatch,
        ),
    ]);
}

/// The URL crate removes dot segments, decodes `%2e` and turns `\\` into `/` before a
/// fetch; a server may decode `%2f` or a double-encoded `%252e`. A transfer is gated on
/// the text that is fetched, so any of these is refused before the constraints.
#[test]
fn transfers_are_gated_on_their_canonical_text() {
    use Match::Regex;
    let public = || {
        vec![s(
            r"transfer http://127\.0\.0\.1:8080/public/.* container:/in/.*",
        )]
    };
    let mut rows = vec![case(
        "a canonical URL under the prefix",
        public(),
        Regex,
        transfer("http://127.0.0.1:8080/public/a.txt", "container:/in/a.txt"),
        Allow,
    )];
    for (name, from) in [
        (
            "dot segments",
            "http://127.0.0.1:8080/public/../private/secret.txt",
        ),
        (
            "encoded dot segments",
            "http://127.0.0.1:8080/public/%2e%2e/private/secret.txt",
        ),
        (
            "backslashes",
            "http://127.0.0.1:8080/public/..\\private\\secret.txt",
        ),
        (
            "an encoded slash",
            "http://127.0.0.1:8080/public/..%2Fprivate/secret.txt",
        ),
        (
            "double encoding",
            "http://127.0.0.1:8080/public/%252e%252e/private/secret.txt",
        ),
        (
            "a single dot segment",
            "http://127.0.0.1:8080/public/./a.txt",
        ),
    ] {
        rows.push(case(
            name,
            public(),
            Regex,
            transfer(from, "container:/in/a.txt"),
            NotCanonical,
        ));
    }
    rows.push(case(
        "dot segments in the destination",
        public(),
        Regex,
        transfer(
            "http://127.0.0.1:8080/public/a.txt",
            "container:/in/../etc/passwd",
        ),
        NotCanonical,
    ));
    rows.push(case(
        "without a script section too",
        Vec::new(),
        Regex,
        transfer("http://127.0.0.1:8080/public/../private", "container:/in/a"),
        NotCanonical,
    ));
    check_table(rows);
}

/// `/bin/.*` must not admit `/bin/../tmp/evil`; an entry point with a space must not
/// render like an entry point plus an argument; a relative path is never resolved.
#[test]
fn entry_points_are_gated_on_what_runs() {
    use Match::{Regex, Strict};
    let bin = || vec![s("run /bin/.*")];
    check_table(vec![
        case(
            "an absolute path",
            bin(),
            Regex,
            run("/bin/date", &[]),
            Allow,
        ),
        case(
            "dot-dot",
            bin(),
            Regex,
            run("/bin/../tmp/evil", &[]),
            BadEntryPoint,
        ),
        case("dot", bin(), Regex, run("/bin/./date", &[]), BadEntryPoint),
        case(
            "empty segment",
            bin(),
            Regex,
            run("/bin//date", &[]),
            BadEntryPoint,
        ),
        case(
            "a space renders like an argument",
            vec![s("run /bin/echo hi")],
            Strict,
            run("/bin/echo hi", &[]),
            BadEntryPoint,
        ),
        case(
            "the same with the argument where it belongs",
            vec![s("run /bin/echo hi")],
            Strict,
            run("/bin/echo", &["hi"]),
            Allow,
        ),
        case(
            "relative with a slash",
            vec![s("run .*")],
            Regex,
            run("./evil", &[]),
            BadEntryPoint,
        ),
        case(
            "a bare name is looked up in the guest's fixed PATH",
            vec![s("run date")],
            Strict,
            run("date", &[]),
            Allow,
        ),
        case(
            "without a script section too",
            Vec::new(),
            Regex,
            run("/bin/../tmp/evil", &[]),
            BadEntryPoint,
        ),
    ]);
}

/// yagna matches regex constraints with an unanchored search, so any prefix or infix
/// match allows the command. Here the whole rendering must match.
#[test]
fn anchoring_prefix_infix_suffix_never_suffice() {
    use Match::Regex;
    check_table(vec![
        case(
            "prefix: entry point runs on into a shell separator",
            vec![s("run /bin/date")],
            Regex,
            run("/bin/date;", &["reboot"]),
            NoMatch,
        ),
        case(
            "prefix: extra argument",
            vec![s("run /bin/date")],
            Regex,
            run("/bin/date", &["; reboot"]),
            NoMatch,
        ),
        case(
            "prefix: object args",
            vec![json!({"run": {"args": "/bin/date"}})],
            Regex,
            run("/bin/date", &["-R"]),
            NoMatch,
        ),
        case(
            "echo pattern does not allow a shell that mentions echo",
            vec![s("run /bin/echo.*")],
            Regex,
            run("/bin/sh", &["-c", "/bin/echo x; rm -rf /"]),
            NoMatch,
        ),
        case(
            "echo pattern allows echo with any words (no shell runs them)",
            vec![s("run /bin/echo.*")],
            Regex,
            run("/bin/echo", &["x;", "rm", "-rf", "/"]),
            Allow,
        ),
        case(
            "infix",
            vec![s("run /bin/echo hi")],
            Regex,
            run("/bin/sh", &["-c", "run /bin/echo hi; reboot"]),
            NoMatch,
        ),
        case(
            "suffix",
            vec![s("run /bin/date")],
            Regex,
            run("/bin/sh", &["-c", "run /bin/date"]),
            NoMatch,
        ),
        case(
            "transfer prefix",
            vec![s("transfer http://a/x container:/in/x")],
            Regex,
            transfer("http://a/x", "container:/in/x/../../etc/shadow"),
            NotCanonical,
        ),
        case(
            "top-level alternation covers the whole string: first",
            vec![s("run /bin/a|/bin/b")],
            Regex,
            run("/bin/a", &[]),
            Allow,
        ),
        case(
            "top-level alternation covers the whole string: second is not a run",
            vec![s("run /bin/a|/bin/b")],
            Regex,
            run("/bin/b", &[]),
            NoMatch,
        ),
        case(
            "top-level alternation is still anchored",
            vec![s("run /bin/a|/bin/b")],
            Regex,
            run("/bin/a", &["; reboot"]),
            NoMatch,
        ),
        case(
            "object alternation is grouped",
            vec![json!({"run": {"args": "/bin/a|/bin/b"}})],
            Regex,
            run("/bin/b", &[]),
            Allow,
        ),
        case(
            "object alternation is anchored",
            vec![json!({"run": {"args": "/bin/a|/bin/b"}})],
            Regex,
            run("/bin/b", &["-x"]),
            NoMatch,
        ),
        case(
            "inner multi-line flag does not unanchor",
            vec![s("run (?m)/bin/echo x$")],
            Regex,
            run("/bin/echo", &["x\nreboot"]),
            NoMatch,
        ),
        case(
            "explicit anchors are harmless",
            vec![s("^run /bin/date$")],
            Regex,
            run("/bin/date", &[]),
            Allow,
        ),
        case(
            "$ is the end of the text, not of a line",
            vec![s("run /bin/echo x")],
            Regex,
            run("/bin/echo", &["x\n"]),
            NoMatch,
        ),
    ]);
}

/// `run .*curl.*` allows every run whose rendering contains `curl` on one line: it is a
/// wide allowance, not "curl only" (docs/exescript.md says so).
#[test]
fn curl_pattern_semantics() {
    use Match::Regex;
    let curl = || vec![s("run .*curl.*")];
    check_table(vec![
        case(
            "curl itself",
            curl(),
            Regex,
            run("/usr/bin/curl", &["https://example.com"]),
            Allow,
        ),
        case(
            "curl in an argument of anything",
            curl(),
            Regex,
            run("/bin/sh", &["-c", "rm -rf / # curl"]),
            Allow,
        ),
        case(
            "curl in the entry point name",
            curl(),
            Regex,
            run("/tmp/notcurl", &[]),
            Allow,
        ),
        case(
            "no curl",
            curl(),
            Regex,
            run("/usr/bin/wget", &["https://example.com"]),
            NoMatch,
        ),
        case(
            "`.` does not cross a newline",
            curl(),
            Regex,
            run("/bin/sh", &["-c", "curl x\nreboot"]),
            NoMatch,
        ),
        case(
            "(?s) lets `.` cross a newline",
            vec![s("run (?s).*curl.*")],
            Regex,
            run("/bin/sh", &["-c", "curl x\nreboot"]),
            Allow,
        ),
        case(
            "curl, exactly",
            vec![s(r"run /usr/bin/curl https://example\.com/[a-z]+")],
            Regex,
            run("/usr/bin/curl", &["https://example.com/data"]),
            Allow,
        ),
        case(
            "curl, exactly: no extra flags",
            vec![s(r"run /usr/bin/curl https://example\.com/[a-z]+")],
            Regex,
            run(
                "/usr/bin/curl",
                &["https://example.com/data", "-o", "/etc/passwd"],
            ),
            NoMatch,
        ),
    ]);
}

#[test]
fn unconstrained_commands_always_pass() {
    let gate = compile(&[], Match::Strict).unwrap();
    for command in [
        r#"{"deploy":{}}"#,
        r#"{"start":{"args":["x"]}}"#,
        r#"{"start":{}}"#,
        r#"{"terminate":{}}"#,
        r#"{"sign":{}}"#,
    ] {
        let batch = exescript::parse_batch(&format!("[{command}]")).unwrap();
        assert_eq!(gate.check_batch(&batch), Ok(()), "{command}");
    }
}

#[test]
fn empty_script_allows_no_run_and_no_transfer() {
    let gate = compile(&[], Match::Regex).unwrap();
    let denial = gate.check(&run("/bin/date", &[])).unwrap_err();
    assert_eq!(
        denial.reason,
        DenialReason::NoMatch {
            kind: Kind::Run,
            constraints: 0
        }
    );
    assert!(gate.check(&transfer("a", "b")).is_err());
}

#[test]
fn without_a_script_everything_passes() {
    let gate = Gate::allow_all();
    assert_eq!(gate.check(&run("/bin/sh", &["-c", "reboot"])), Ok(()));
    assert_eq!(gate.check(&transfer("/etc/shadow", "http://x/")), Ok(()));
}

#[test]
fn denial_names_the_command_its_rendering_and_the_reason() {
    let gate = compile(
        &[
            s("run /bin/date -R"),
            json!({"run": {"args": "/bin/env", "env": {"A": "1"}}}),
        ],
        Match::Strict,
    )
    .unwrap();
    let batch = vec![
        Command::Deploy(Default::default()),
        run("/bin/date", &["-R"]),
        run("/bin/date", &["-u"]),
        run_env("/bin/env", &[], &[("A", "2")]),
    ];

    let first = gate.check_batch(&batch).unwrap_err();
    assert_eq!(first.index, 2);
    assert_eq!(first.command, "run /bin/date -u");
    assert_eq!(first.reason.code(), "script-no-match");
    assert_eq!(
        first.to_string(),
        "command 2 (`run /bin/date -u`) is denied: none of the manifest's 2 `run` constraint(s) \
         matches the whole rendering"
    );

    let each: Vec<_> = gate.check_each(&batch).collect();
    assert_eq!(each.len(), 4);
    assert!(each[0].is_ok() && each[1].is_ok());
    assert_eq!(each[2].as_ref().unwrap_err(), &first);
    let env = each[3].as_ref().unwrap_err();
    assert_eq!(env.index, 3);
    assert_eq!(env.command, "run /bin/env");
    assert_eq!(
        env.reason,
        DenialReason::EnvDiffers {
            constraints: vec![1]
        }
    );
    assert_eq!(env.reason.code(), "script-env-differs");
    assert!(
        env.to_string().contains("commands[1]") && env.to_string().contains("env differs"),
        "{env}"
    );

    let none = compile(&[s("run /bin/date")], Match::Strict).unwrap();
    let denial = none.check(&transfer("a", "b")).unwrap_err();
    assert_eq!(denial.index, 0);
    assert_eq!(
        denial.reason.to_string(),
        "the manifest's script lists no `transfer` constraint, so no transfer is allowed"
    );
}

fn compile_err(entries: Vec<Value>, default: Match) -> CompileError {
    compile(&entries, default).expect_err("must not compile")
}

#[test]
fn invalid_regex_fails_at_compile_time_with_pattern_and_error() {
    match compile_err(vec![s("run /bin/date"), s("run /bin/(date")], Match::Regex) {
        CompileError::InvalidRegex {
            index,
            pattern,
            error,
        } => {
            assert_eq!(index, 1);
            assert_eq!(pattern, "run /bin/(date");
            assert!(error.to_string().contains("unclosed group"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    match compile_err(
        vec![json!({"run": {"args": "/bin/[date", "match": "regex"}})],
        Match::Strict,
    ) {
        CompileError::InvalidRegex { pattern, .. } => assert_eq!(pattern, "/bin/[date"),
        other => panic!("{other:?}"),
    }
    match compile_err(
        vec![json!({"transfer": {"from": "a", "to": "b(", "match": "regex"}})],
        Match::Strict,
    ) {
        CompileError::InvalidRegex { pattern, .. } => assert_eq!(pattern, "b("),
        other => panic!("{other:?}"),
    }
    // Strict text is never compiled, so the same text is a fine strict constraint.
    assert!(compile(&[s("run /bin/(date")], Match::Strict).is_ok());
}

/// A pattern that would close our anchoring group and open an unanchored alternative must
/// be an error, never an allow-everything.
#[test]
fn a_pattern_cannot_escape_the_anchors() {
    for entry in [
        s("run /bin/date)|(.*"),
        json!({"run": {"args": "/bin/date)|(.*", "match": "regex"}}),
        json!({"transfer": {"from": "a)|(.*", "to": "b", "match": "regex"}}),
    ] {
        assert!(
            matches!(
                compile_err(vec![entry.clone()], Match::Regex),
                CompileError::InvalidRegex { .. }
            ),
            "{entry}"
        );
    }
    // An (?x) comment would swallow the closing parenthesis: reported, not reinterpreted.
    assert!(matches!(
        compile_err(vec![s("run (?x) /bin/date # note")], Match::Regex),
        CompileError::InvalidRegex { .. }
    ));
}

#[test]
fn unreadable_constraints_are_errors_that_say_what_and_where() {
    let message = |entries: Vec<Value>| compile_err(entries, Match::Strict).to_string();

    let m = message(vec![s("run /bin/date"), s(r#"{"run":{"args":"/bin/date""#)]);
    assert!(
        m.starts_with("commands[1]: the string is meant as a JSON object but is not valid JSON"),
        "{m}"
    );

    let m = message(vec![json!({"deploy": {}})]);
    assert!(
        m.starts_with("commands[0]: unknown variant `deploy`"),
        "{m}"
    );

    let m = message(vec![
        json!({"run": {"args": "/bin/date", "entrypoint": "/bin/date"}}),
    ]);
    assert!(
        m.starts_with("commands[0].run.entrypoint: unknown field `entrypoint`"),
        "{m}"
    );

    let m = message(vec![s(r#"{"run":{"args":"/bin/date","enviroment":{}}}"#)]);
    assert!(
        m.starts_with("commands[0].run.enviroment: unknown field `enviroment`"),
        "{m}"
    );

    let m = message(vec![json!({"run": {"env": {"A": "1"}}})]);
    assert_eq!(m, "commands[0].run: missing field `args`");

    let m = message(vec![json!({"transfer": {"from": "a"}})]);
    assert_eq!(m, "commands[0].transfer: missing field `to`");

    let m = message(vec![json!({"run": {"args": "/bin/date", "match": "glob"}})]);
    assert!(
        m.starts_with("commands[0].run.match: unknown variant `glob`"),
        "{m}"
    );

    let m = message(vec![json!({"run": {"args": "/bin/env", "env": {"A": 1}}})]);
    assert!(
        m.starts_with("commands[0].run.env.A: invalid type: integer `1`"),
        "{m}"
    );

    let m = message(vec![json!({"run": {"args": 5}})]);
    assert!(
        m.starts_with("commands[0].run.args: invalid type: integer `5`"),
        "{m}"
    );

    let m = message(vec![
        json!({"run": {"args": "a"}, "transfer": {"from": "a", "to": "b"}}),
    ]);
    assert!(m.starts_with("commands[0]: "), "{m}");

    for (entry, word) in [
        ("runaway /bin/x", "runaway"),
        ("deploy", "deploy"),
        (" run /bin/x", ""),
        ("run.* x", "run.*"),
    ] {
        assert_eq!(
            compile_err(vec![s(entry)], Match::Regex),
            CompileError::UnknownKind {
                index: 0,
                word: word.to_owned()
            },
            "{entry}"
        );
    }

    // Only regex mode skips a leading `^`; in strict mode it is a literal character.
    assert_eq!(
        compile_err(vec![s("^run /bin/date")], Match::Strict),
        CompileError::UnknownKind {
            index: 0,
            word: "^run".to_owned()
        }
    );

    for (entry, found) in [
        (json!(1), "a number"),
        (json!(null), "null"),
        (json!(true), "a boolean"),
        (json!(["run /x"]), "an array"),
    ] {
        assert_eq!(
            compile_err(vec![entry], Match::Strict),
            CompileError::NotAConstraint { index: 0, found }
        );
    }
}
