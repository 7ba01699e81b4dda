//! Golem's LDAP-style constraint language, evaluated over a peer's properties.
//!
//! ```text
//! (&(golem.inf.mem.gib>=0.5)(golem.runtime.name=vm)(!(golem.node.id.name=bad*)))
//! ```
//!
//! - `&`, `|` combine one or more filters; `!` negates one.
//! - `attr=value`, `attr<value`, `attr<=value`, `attr>value`, `attr>=value`; `attr=*` tests
//!   presence. In `=` values, `*` matches any run of characters (`vm*`, `*nvidia*`); `\`
//!   escapes `(`, `)`, `*` and `\`.
//! - A number property compares numerically with a value that parses as a number; strings
//!   compare as strings (ordering is byte-wise); `true`/`false` match booleans; a list
//!   property matches when any element does.
//! - A comparison on a property that is absent is false, so `(!(x=1))` holds when `x` is
//!   absent: say `(&(x=*)(!(x=1)))` to require it.
//!
//! Filters are parsed once (bounded depth and length, so a demand cannot make the provider
//! recurse without limit) and evaluated many times.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// Deeper nesting than this is refused: real constraints nest two or three levels.
const MAX_DEPTH: usize = 32;
/// Longer constraint texts are refused before parsing.
const MAX_LEN: usize = 64 * 1024;

/// Properties of an offer or a demand: flat dotted names to JSON values.
pub type Properties = BTreeMap<String, Value>;

/// Why a constraint text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint parse error at byte {offset}: {message}")]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// One piece of an `=` value: literal text or a `*` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Star,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Present(String),
    Compare {
        attr: String,
        op: Op,
        value: Vec<Piece>,
    },
}

impl Filter {
    /// Parses a whole constraint text; trailing input is an error.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        if text.len() > MAX_LEN {
            return Err(ParseError {
                offset: MAX_LEN,
                message: format!("constraints longer than {MAX_LEN} bytes"),
            });
        }
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        p.ws();
        let f = p.filter(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(p.err("unexpected text after the filter"));
        }
        Ok(f)
    }

    /// Whether `props` satisfy the filter.
    pub fn matches(&self, props: &Properties) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(props)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(props)),
            Filter::Not(f) => !f.matches(props),
            Filter::Present(attr) => props.contains_key(attr),
            Filter::Compare { attr, op, value } => {
                props.get(attr).is_some_and(|v| compare(v, *op, value))
            }
        }
    }

    /// The simple comparisons in this filter that `props` fail, rendered, for a reject
    /// message a requestor can act on (`golem.inf.mem.gib>=64`).
    pub fn unmet(&self, props: &Properties) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_unmet(props, &mut out);
        out
    }

    fn collect_unmet(&self, props: &Properties, out: &mut Vec<String>) {
        if self.matches(props) {
            return;
        }
        match self {
            Filter::And(fs) => fs.iter().for_each(|f| f.collect_unmet(props, out)),
            _ => out.push(self.to_string()),
        }
    }
}

fn compare(prop: &Value, op: Op, pattern: &[Piece]) -> bool {
    match prop {
        Value::Array(items) => items.iter().any(|i| compare(i, op, pattern)),
        Value::Number(n) => {
            let Some(want) = literal(pattern).and_then(|t| t.trim().parse::<f64>().ok()) else {
                return false;
            };
            let Some(have) = n.as_f64() else {
                return false;
            };
            match op {
                Op::Eq => have == want,
                Op::Lt => have < want,
                Op::Le => have <= want,
                Op::Gt => have > want,
                Op::Ge => have >= want,
            }
        }
        Value::Bool(b) => {
            op == Op::Eq && literal(pattern) == Some(if *b { "true" } else { "false" })
        }
        Value::String(s) => match op {
            Op::Eq => wildcard_match(pattern, s),
            _ => {
                let Some(want) = literal(pattern) else {
                    return false;
                };
                let ord = s.as_str().cmp(want);
                match op {
                    Op::Lt => ord.is_lt(),
                    Op::Le => ord.is_le(),
                    Op::Gt => ord.is_gt(),
                    Op::Ge => ord.is_ge(),
                    Op::Eq => unreachable!("handled above"),
                }
            }
        },
        Value::Null | Value::Object(_) => false,
    }
}

/// The value as plain text, if it has no wildcard.
fn literal(pattern: &[Piece]) -> Option<&str> {
    match pattern {
        [] => Some(""),
        [Piece::Text(t)] => Some(t),
        _ => None,
    }
}

/// Glob match where `*` spans any run of characters; linear in practice (greedy with
/// backtracking to the last star only).
fn wildcard_match(pattern: &[Piece], s: &str) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut resume: Option<(usize, usize)> = None;
    let bytes = s.as_bytes();
    while si <= bytes.len() {
        match pattern.get(pi) {
            Some(Piece::Star) => {
                pi += 1;
                resume = Some((pi, si));
                continue;
            }
            Some(Piece::Text(t)) if bytes[si..].starts_with(t.as_bytes()) => {
                pi += 1;
                si += t.len();
                continue;
            }
            None if si == bytes.len() => return true,
            _ => {}
        }
        match resume {
            Some((rp, rs)) if rs < bytes.len() => {
                resume = Some((rp, rs + 1));
                pi = rp;
                si = rs + 1;
            }
            _ => return false,
        }
    }
    false
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, message: &str) -> ParseError {
        ParseError {
            offset: self.i,
            message: message.to_owned(),
        }
    }

    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), ParseError> {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected `{}`", b as char)))
        }
    }

    fn filter(&mut self, depth: usize) -> Result<Filter, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err(&format!("filters nest deeper than {MAX_DEPTH} levels")));
        }
        self.expect(b'(')?;
        self.ws();
        let f = match self.s.get(self.i) {
            Some(b'&') | Some(b'|') => {
                let and = self.s[self.i] == b'&';
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'(') {
                        break;
                    }
                    items.push(self.filter(depth + 1)?);
                }
                if items.is_empty() {
                    return Err(self.err("`&` and `|` need at least one filter"));
                }
                if and {
                    Filter::And(items)
                } else {
                    Filter::Or(items)
                }
            }
            Some(b'!') => {
                self.i += 1;
                Filter::Not(Box::new(self.filter(depth + 1)?))
            }
            _ => self.item()?,
        };
        self.expect(b')')?;
        Ok(f)
    }

    fn item(&mut self) -> Result<Filter, ParseError> {
        let start = self.i;
        // Golem property names: dotted words, with `-`, `_` and `!` (`golem.!exp.gap-31…`).
        while self.s.get(self.i).is_some_and(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'!' | b' ')
        }) {
            self.i += 1;
        }
        let attr = std::str::from_utf8(&self.s[start..self.i])
            .map_err(|_| self.err("attribute is not UTF-8"))?
            .trim()
            .to_owned();
        if attr.is_empty() {
            return Err(self.err("expected an attribute name"));
        }
        let op = match (self.s.get(self.i), self.s.get(self.i + 1)) {
            (Some(b'<'), Some(b'=')) => Op::Le,
            (Some(b'>'), Some(b'=')) => Op::Ge,
            (Some(b'<'), _) => Op::Lt,
            (Some(b'>'), _) => Op::Gt,
            (Some(b'='), _) => Op::Eq,
            _ => return Err(self.err("expected =, <, <=, > or >=")),
        };
        self.i += op.as_str().len();
        let value = self.value()?;
        if op == Op::Eq && value == [Piece::Star] {
            return Ok(Filter::Present(attr));
        }
        if op != Op::Eq && value.contains(&Piece::Star) {
            return Err(self.err("wildcards are only allowed with `=`"));
        }
        Ok(Filter::Compare { attr, op, value })
    }

    fn value(&mut self) -> Result<Vec<Piece>, ParseError> {
        let mut pieces = Vec::new();
        let mut text = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err(self.err("unterminated filter: expected `)`")),
                Some(b')') => break,
                Some(b'(') => return Err(self.err("`(` in a value must be escaped as `\\(`")),
                Some(b'*') => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(self.utf8(std::mem::take(&mut text))?));
                    }
                    if pieces.last() != Some(&Piece::Star) {
                        pieces.push(Piece::Star);
                    }
                    self.i += 1;
                }
                Some(b'\\') => {
                    let Some(&c) = self.s.get(self.i + 1) else {
                        return Err(self.err("`\\` at the end of the value"));
                    };
                    text.push(c);
                    self.i += 2;
                }
                Some(&c) => {
                    text.push(c);
                    self.i += 1;
                }
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(self.utf8(text)?));
        }
        Ok(pieces)
    }

    fn utf8(&self, bytes: Vec<u8>) -> Result<String, ParseError> {
        String::from_utf8(bytes).map_err(|_| self.err("value is not UTF-8"))
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::And(fs) | Filter::Or(fs) => {
                f.write_str(if matches!(self, Filter::And(_)) {
                    "(&"
                } else {
                    "(|"
                })?;
                for x in fs {
                    write!(f, "{x}")?;
                }
                f.write_str(")")
            }
            Filter::Not(x) => write!(f, "(!{x})"),
            Filter::Present(a) => write!(f, "({a}=*)"),
            Filter::Compare { attr, op, value } => {
                write!(f, "({attr}{}", op.as_str())?;
                for (i, p) in value.iter().enumerate() {
                    match p {
                        Piece::Star => f.write_str("*")?,
                        Piece::Text(t) => {
                            for (j, c) in t.chars().enumerate() {
                                // `<` or `>` then a literal `=` would read back as `<=`/`>=`.
                                let after_op = i == 0 && j == 0 && matches!(op, Op::Lt | Op::Gt);
                                if matches!(c, '(' | ')' | '*' | '\\') || (after_op && c == '=') {
                                    f.write_str("\\")?;
                                }
                                write!(f, "{c}")?;
                            }
                        }
                    }
                }
                f.write_str(")")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn offer() -> Properties {
        serde_json::from_value(json!({
            "golem.inf.mem.gib": 8.0,
            "golem.inf.cpu.threads": 4,
            "golem.runtime.name": "vm",
            "golem.runtime.capabilities": ["vpn", "manifest-support"],
            "golem.srv.caps.payload-manifest": true,
            "golem.node.id.name": "provider (1)*",
        }))
        .unwrap()
    }

    fn eval(text: &str) -> bool {
        Filter::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .matches(&offer())
    }

    #[test]
    fn comparisons_and_combinators() {
        for (text, want) in [
            ("(golem.inf.mem.gib>=0.5)", true),
            ("(golem.inf.mem.gib>=8)", true),
            ("(golem.inf.mem.gib>8)", false),
            ("(golem.inf.cpu.threads<4)", false),
            ("(golem.inf.cpu.threads<=4)", true),
            ("(golem.runtime.name=vm)", true),
            ("(golem.runtime.name=wasmtime)", false),
            ("(&(golem.inf.mem.gib>=0.5)(golem.runtime.name=vm))", true),
            (
                "(&(golem.inf.mem.gib>=0.5)(golem.runtime.name=wasm))",
                false,
            ),
            ("(|(golem.runtime.name=wasm)(golem.runtime.name=vm))", true),
            ("(!(golem.runtime.name=vm))", false),
            ("(golem.srv.caps.payload-manifest=true)", true),
            ("(golem.srv.caps.payload-manifest=false)", false),
            ("(golem.runtime.capabilities=vpn)", true),
            ("(golem.runtime.capabilities=gpu)", false),
            ("(golem.runtime.name=*)", true),
            ("(golem.missing=*)", false),
            ("(golem.missing=1)", false),
            ("(!(golem.missing=1))", true),
            ("(golem.inf.mem.gib=eight)", false),
            (
                "  ( & (golem.runtime.name=vm) ( golem.inf.mem.gib >= 1 ) )  ",
                true,
            ),
        ] {
            assert_eq!(eval(text), want, "{text}");
        }
    }

    #[test]
    fn wildcards_and_escapes() {
        for (text, want) in [
            ("(golem.runtime.name=v*)", true),
            ("(golem.runtime.name=*m)", true),
            ("(golem.runtime.name=*v*m*)", true),
            ("(golem.runtime.name=vm*x)", false),
            ("(golem.runtime.capabilities=manifest*)", true),
            (r"(golem.node.id.name=provider \(1\)\*)", true),
            (r"(golem.node.id.name=provider \(2\)\*)", false),
            (r"(golem.node.id.name=*\(1\)*)", true),
            ("(golem.node.id.name=provider*)", true),
        ] {
            assert_eq!(eval(text), want, "{text}");
        }
    }

    #[test]
    fn bad_filters_name_the_offset() {
        for (text, offset) in [
            ("", 0),
            ("golem.runtime.name=vm", 0),
            ("(golem.runtime.name=vm", 22),
            ("(&)", 2),
            ("(=vm)", 1),
            ("(golem.runtime.name~vm)", 19),
            ("(golem.inf.mem.gib>=*)", 21),
            ("(a=b))", 5),
            ("(a=(b))", 3),
        ] {
            let e = Filter::parse(text).unwrap_err();
            assert_eq!(e.offset, offset, "{text}: {e}");
        }
        let deep = format!("{}(a=1){}", "(!".repeat(40), ")".repeat(40));
        assert!(Filter::parse(&deep).unwrap_err().message.contains("nest"));
    }

    #[test]
    fn display_round_trips_and_unmet_names_the_failing_parts() {
        let text = r"(&(golem.inf.mem.gib>=64)(golem.runtime.name=vm)(golem.node.id.name=a\*b*))";
        let f = Filter::parse(text).unwrap();
        assert_eq!(f.to_string(), text);
        assert_eq!(Filter::parse(&f.to_string()).unwrap(), f);
        assert_eq!(
            f.unmet(&offer()),
            ["(golem.inf.mem.gib>=64)", r"(golem.node.id.name=a\*b*)"]
        );
    }

    /// Found by fuzzing (`fuzz/`, target `constraints`): `(n<\=5)` compares `n < "=5"`,
    /// but it printed as `(n<=5)`, which is `n <= 5`: a reject message (and anything else
    /// that prints a filter) named a different constraint than the one applied.
    #[test]
    fn an_escaped_equals_after_less_or_greater_survives_printing() {
        for text in [r"(n<\=5)", r"(n>\=5)", r"(&(a<\==)(b>\=))"] {
            let f = Filter::parse(text).unwrap();
            assert_eq!(f.to_string(), text);
            assert_eq!(Filter::parse(&f.to_string()).unwrap(), f, "{text}");
        }
        // `<=` and `>=` followed by `=` need no escape: the operator already took it.
        let f = Filter::parse("(n<==5)").unwrap();
        assert_eq!(f.to_string(), "(n<==5)");
        assert_eq!(Filter::parse(&f.to_string()).unwrap(), f);
    }

    /// Found by fuzzing (`fuzz/`, target `wire`): serde_json read `1.2222222222222221e+33`
    /// one ulp off unless its `float_roundtrip` feature is on, while the constraint's own
    /// literal parses exactly, so a property compared `=` with the very text it was sent as
    /// did not match.
    #[test]
    fn a_property_equals_the_literal_it_was_written_as() {
        for text in [
            "1.2222222222222221e+33",
            "0.30000000000000004",
            "2.2250738585072014e-308",
        ] {
            let props: Properties = serde_json::from_str(&format!(r#"{{"x":{text}}}"#)).unwrap();
            let f = Filter::parse(&format!("(x={text})")).unwrap();
            assert!(f.matches(&props), "{text}");
        }
    }

    #[test]
    fn wildcard_matching_is_not_exponential() {
        let pattern = format!("(golem.runtime.name={}b)", "*a".repeat(30));
        let mut props = Properties::new();
        props.insert("golem.runtime.name".into(), json!("a".repeat(5000)));
        assert!(!Filter::parse(&pattern).unwrap().matches(&props));
    }
}
