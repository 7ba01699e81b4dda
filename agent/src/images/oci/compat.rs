//! Node Feature Discovery's image compatibility artifact
//! (`application/vnd.nfd.image-compatibility.v1alpha1`, experimental): an image's author
//! states what the host must have (cpu flags, kernel version, modules…) as NFD rules, and
//! the provider checks them before it downloads a layer.
//!
//! Decisions (docs/payload-runtime.md, "Compatibility artifacts"):
//! - The YAML is parsed strictly: an unknown field anywhere is an error, so this reader and
//!   another tool cannot read different requirements out of the same artifact.
//! - A compatibility set without `weight` is a requirement; one with a `weight` is a
//!   preference (as in Kubernetes node affinity, where only preferred terms have weights):
//!   it is reported, it refuses nothing.
//! - Each rule is judged pass, fail or unknown. Features this host cannot evaluate
//!   (`pci.device`, `usb.device`, …) make a rule unknown, and an unknown required set
//!   refuses the image like a failed one, with a message that says it was not evaluated
//!   rather than failed: unknown is not compatible.
//! - `InRegexp` is NFD's: a regex that matches anywhere in the value (these are the image's
//!   requirements, not an allowlist).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// The artifact's type and its one layer's media type.
pub const ARTIFACT_TYPE: &str = "application/vnd.nfd.image-compatibility.v1alpha1";
pub const SPEC_MEDIA_TYPE: &str = "application/vnd.nfd.image-compatibility.spec.v1alpha1+yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub version: String,
    pub compatibilities: Vec<Compatibility>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compatibility {
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    pub name: String,
    /// Set when the rule matches; later rules of the set see them as `rule.matched`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// A Go template of more vars: not evaluated here; a rule that has one is unknown.
    #[serde(default)]
    pub vars_template: Option<String>,
    #[serde(default)]
    pub match_features: Vec<Term>,
    #[serde(default)]
    pub match_any: Vec<AnyTerm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnyTerm {
    pub match_features: Vec<Term>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Term {
    pub feature: String,
    #[serde(default)]
    pub match_expressions: BTreeMap<String, Expr>,
    #[serde(default)]
    pub match_name: Option<Expr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expr {
    pub op: Op,
    #[serde(default, deserialize_with = "scalars")]
    pub value: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Op {
    In,
    NotIn,
    InRegexp,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
    GtLt,
    IsTrue,
    IsFalse,
}

/// NFD's values are strings; YAML writes `["4"]` and `[4]` alike.
fn scalars<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        B(bool),
    }
    let v: Vec<Scalar> = Vec::deserialize(d)?;
    Ok(v.into_iter()
        .map(|s| match s {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::B(b) => b.to_string(),
        })
        .collect())
}

/// Largest artifact layer read.
pub const MAX_SPEC_BYTES: u64 = 256 * 1024;

impl Spec {
    pub fn parse(yaml: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(yaml)
            .map_err(|_| "the compatibility spec is not UTF-8".to_string())?;
        let spec: Spec = serde_yaml_ng::from_str(text)
            .map_err(|e| format!("the compatibility spec is not valid: {e}"))?;
        if spec.version != "v1alpha1" {
            return Err(format!(
                "compatibility spec version `{}` is not one this provider reads (v1alpha1)",
                spec.version
            ));
        }
        Ok(spec)
    }
}

/// A feature set of the host: elements by name, each with a value (empty for flags).
pub type FeatureSet = BTreeMap<String, String>;

/// What this host can say about itself, in NFD's feature names.
#[derive(Debug, Clone, Default)]
pub struct HostFeatures {
    pub sets: BTreeMap<String, FeatureSet>,
}

/// `/proc/cpuinfo` flag names as NFD's `cpu.cpuid` spells them where they differ (NFD
/// takes its names from the cpuid library it uses); every flag is also present
/// upper-cased as the kernel spells it.
const CPUID_ALIASES: &[(&str, &str)] = &[
    ("sse4_1", "SSE4"),
    ("sse4_2", "SSE42"),
    ("pni", "SSE3"),
    ("aes", "AESNI"),
    ("sha_ni", "SHA"),
    ("fma", "FMA3"),
    ("pclmulqdq", "CLMUL"),
    ("lm", "X64"),
];

impl HostFeatures {
    /// Read from `/proc/cpuinfo`, `uname`, `/proc/modules` and `/etc/os-release`.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        Self::from_sources(&cpuinfo, &release, &modules, &os_release)
    }

    pub fn from_sources(cpuinfo: &str, release: &str, modules: &str, os_release: &str) -> Self {
        let mut sets = BTreeMap::new();
        let first_cpu = cpuinfo.split("\n\n").next().unwrap_or_default();
        let field = |name: &str| {
            first_cpu.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        };
        let mut cpuid = FeatureSet::new();
        for flag in field("flags").unwrap_or_default().split_whitespace() {
            cpuid.insert(flag.to_ascii_uppercase(), String::new());
            if let Some((_, alias)) = CPUID_ALIASES.iter().find(|(k, _)| *k == flag) {
                cpuid.insert((*alias).to_owned(), String::new());
            }
        }
        if !cpuid.is_empty() {
            sets.insert("cpu.cpuid".to_owned(), cpuid);
        }
        let mut model = FeatureSet::new();
        if let Some(v) = field("vendor_id") {
            let vendor = match v.as_str() {
                "GenuineIntel" => "Intel".to_owned(),
                "AuthenticAMD" => "AMD".to_owned(),
                other => other.to_owned(),
            };
            model.insert("vendor_id".into(), vendor);
        }
        if let Some(v) = field("cpu family") {
            model.insert("family".into(), v);
        }
        if let Some(v) = field("model") {
            model.insert("id".into(), v);
        }
        if !model.is_empty() {
            sets.insert("cpu.model".to_owned(), model);
        }
        if !release.is_empty() {
            let mut k = FeatureSet::new();
            k.insert("full".into(), release.to_owned());
            let numeric: Vec<&str> = release
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .take(3)
                .collect();
            for (name, v) in ["major", "minor", "revision"].iter().zip(numeric) {
                k.insert((*name).into(), v.to_owned());
            }
            sets.insert("kernel.version".to_owned(), k);
        }
        let loaded: FeatureSet = modules
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|m| (m.to_owned(), String::new()))
            .collect();
        sets.insert("kernel.loadedmodule".to_owned(), loaded);
        let os: FeatureSet = os_release
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once('=')?;
                Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            })
            .collect();
        if !os.is_empty() {
            sets.insert("system.osrelease".to_owned(), os);
        }
        Self { sets }
    }
}

/// A judgement in three values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    Pass,
    /// Why not.
    Fail(String),
    /// What could not be evaluated.
    Unknown(String),
}

fn all(items: impl IntoIterator<Item = Judged>) -> Judged {
    let mut unknown = None;
    for j in items {
        match j {
            Judged::Pass => {}
            Judged::Fail(w) => return Judged::Fail(w),
            Judged::Unknown(w) => {
                unknown.get_or_insert(w);
            }
        }
    }
    unknown.map_or(Judged::Pass, Judged::Unknown)
}

fn any(items: impl IntoIterator<Item = Judged>) -> Judged {
    let mut unknown = None;
    let mut fail = None;
    for j in items {
        match j {
            Judged::Pass => return Judged::Pass,
            Judged::Fail(w) => {
                fail.get_or_insert(w);
            }
            Judged::Unknown(w) => {
                unknown.get_or_insert(w);
            }
        }
    }
    match (unknown, fail) {
        (Some(u), _) => Judged::Unknown(u),
        (None, Some(f)) => Judged::Fail(f),
        (None, None) => Judged::Fail("matchAny lists no alternative".into()),
    }
}

fn int(s: &str) -> Option<i64> {
    s.trim().parse().ok()
}

/// `expr` on the element `key` of a set (`value` is `None` when the element is absent).
fn judge_expr(feature: &str, key: &str, value: Option<&str>, expr: &Expr) -> Judged {
    let what = format!("{feature} {key}");
    let fail = |why: String| Judged::Fail(format!("{what}: {why}"));
    let bad = |why: &str| Judged::Unknown(format!("{what}: {why}"));
    let Some(v) = value else {
        return match expr.op {
            Op::DoesNotExist => Judged::Pass,
            _ => fail("not present on this host".into()),
        };
    };
    match expr.op {
        Op::Exists => Judged::Pass,
        Op::DoesNotExist => fail(format!("present (`{v}`), the image wants it absent")),
        Op::In => {
            if expr.value.iter().any(|x| x == v) {
                Judged::Pass
            } else {
                fail(format!("`{v}` is not in {:?}", expr.value))
            }
        }
        Op::NotIn => {
            if expr.value.iter().any(|x| x == v) {
                fail(format!("`{v}` is in {:?}", expr.value))
            } else {
                Judged::Pass
            }
        }
        Op::InRegexp => {
            let mut matched = false;
            for r in &expr.value {
                match regex::Regex::new(r) {
                    Ok(re) => matched |= re.is_match(v),
                    Err(_) => return bad(&format!("`{r}` is not a regex this provider reads")),
                }
            }
            if matched {
                Judged::Pass
            } else {
                fail(format!("`{v}` matches none of {:?}", expr.value))
            }
        }
        Op::Gt | Op::Lt => {
            let (Some(want), Some(have)) = (expr.value.first().and_then(|x| int(x)), int(v)) else {
                return bad("Gt/Lt takes one integer, and the host's value must be one");
            };
            let ok = if expr.op == Op::Gt {
                have > want
            } else {
                have < want
            };
            if ok {
                Judged::Pass
            } else {
                let rel = if expr.op == Op::Gt { ">" } else { "<" };
                fail(format!("{have} is not {rel} {want}"))
            }
        }
        Op::GtLt => {
            let bounds: Vec<i64> = expr.value.iter().filter_map(|x| int(x)).collect();
            let (Some(have), [lo, hi]) = (int(v), bounds.as_slice()) else {
                return bad("GtLt takes two integers, and the host's value must be one");
            };
            if have > *lo && have < *hi {
                Judged::Pass
            } else {
                fail(format!("{have} is not between {lo} and {hi}"))
            }
        }
        Op::IsTrue | Op::IsFalse => {
            let want = expr.op == Op::IsTrue;
            match v {
                "true" if want => Judged::Pass,
                "false" if !want => Judged::Pass,
                "true" | "false" => fail(format!("is {v}")),
                other => bad(&format!("`{other}` is not a boolean")),
            }
        }
    }
}

fn judge_term(term: &Term, set: Option<&FeatureSet>) -> Judged {
    let Some(set) = set else {
        return Judged::Unknown(format!(
            "feature `{}` is not one this provider can evaluate",
            term.feature
        ));
    };
    let mut parts: Vec<Judged> = term
        .match_expressions
        .iter()
        .map(|(k, e)| judge_expr(&term.feature, k, set.get(k).map(String::as_str), e))
        .collect();
    if let Some(e) = &term.match_name {
        let names: Vec<&String> = set.keys().collect();
        let j = match e.op {
            Op::In => names.iter().any(|n| e.value.contains(n)),
            Op::NotIn => names.iter().any(|n| !e.value.contains(n)),
            Op::Exists => !names.is_empty(),
            Op::InRegexp => {
                let res: Result<Vec<regex::Regex>, _> =
                    e.value.iter().map(|r| regex::Regex::new(r)).collect();
                match res {
                    Ok(res) => names.iter().any(|n| res.iter().any(|r| r.is_match(n))),
                    Err(_) => {
                        parts.push(Judged::Unknown(format!(
                            "{} matchName: a regex this provider cannot read",
                            term.feature
                        )));
                        true
                    }
                }
            }
            other => {
                parts.push(Judged::Unknown(format!(
                    "{} matchName with {other:?} is not evaluated",
                    term.feature
                )));
                true
            }
        };
        if !j {
            parts.push(Judged::Fail(format!(
                "{}: no element name satisfies matchName {:?} {:?}",
                term.feature, e.op, e.value
            )));
        }
    }
    all(parts)
}

/// One compatibility set's outcome.
#[derive(Debug, Clone)]
pub struct SetOutcome {
    pub description: String,
    pub required: bool,
    /// The first rule that did not pass, and how.
    pub result: Judged,
    pub rule: Option<String>,
}

/// Judges every set of `spec` on `host`.
pub fn evaluate(spec: &Spec, host: &HostFeatures) -> Vec<SetOutcome> {
    let mut out = Vec::new();
    for (i, c) in spec.compatibilities.iter().enumerate() {
        let mut matched_vars = FeatureSet::new();
        let mut first_bad: Option<(String, Judged)> = None;
        for rule in &c.rules {
            let mut sets = host.sets.clone();
            sets.insert("rule.matched".into(), matched_vars.clone());
            let mut parts: Vec<Judged> = rule
                .match_features
                .iter()
                .map(|t| judge_term(t, sets.get(&t.feature)))
                .collect();
            if !rule.match_any.is_empty() {
                parts.push(any(rule.match_any.iter().map(|a| {
                    all(a
                        .match_features
                        .iter()
                        .map(|t| judge_term(t, sets.get(&t.feature))))
                })));
            }
            if rule.vars_template.is_some() {
                parts.push(Judged::Unknown("varsTemplate is not evaluated".into()));
            }
            let j = all(parts);
            if j == Judged::Pass {
                matched_vars.extend(rule.vars.clone());
            } else if first_bad.is_none() {
                first_bad = Some((rule.name.clone(), j));
            }
        }
        let description = c
            .description
            .clone()
            .or_else(|| c.tag.clone())
            .unwrap_or_else(|| format!("compatibility set {}", i + 1));
        let (rule, result) = match first_bad {
            Some((r, j)) => (Some(r), j),
            None => (None, Judged::Pass),
        };
        out.push(SetOutcome {
            description,
            required: c.weight.is_none(),
            result,
            rule,
        });
    }
    out
}

/// The first required set that did not pass, as the refusal's text.
pub fn refusal(outcomes: &[SetOutcome]) -> Option<String> {
    outcomes.iter().filter(|o| o.required).find_map(|o| {
        let rule = o.rule.as_deref().unwrap_or("?");
        match &o.result {
            Judged::Pass => None,
            Judged::Fail(why) => Some(format!(
                "`{}`, rule `{rule}` fails on this host: {why}",
                o.description
            )),
            Judged::Unknown(why) => Some(format!(
                "`{}`, rule `{rule}` cannot be evaluated on this host ({why}), so compatibility is not established",
                o.description
            )),
        }
    })
}

/// The names `cpu.cpuid` holds on this host, for the operator's `provider self-test`-style
/// reports and the docs' examples.
pub fn cpuid_names(host: &HostFeatures) -> BTreeSet<String> {
    host.sets
        .get("cpu.cpuid")
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFeatures {
        HostFeatures::from_sources(
            "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nflags\t\t: fpu sse4_2 avx2 aes\n\nprocessor\t: 1\n",
            "6.1.0-28-cloud-amd64",
            "virtio_blk 20480 0 - Live 0x0\nsquashfs 1 0 - Live 0x0\n",
            "ID=debian\nVERSION_ID=\"12\"\n",
        )
    }

    fn judge(yaml: &str) -> Vec<SetOutcome> {
        evaluate(&Spec::parse(yaml.as_bytes()).unwrap(), &host())
    }

    #[test]
    fn host_features_read_from_their_sources() {
        let h = host();
        let cpuid = cpuid_names(&h);
        for f in ["AVX2", "SSE4_2", "SSE42", "AES", "AESNI"] {
            assert!(cpuid.contains(f), "{f}: {cpuid:?}");
        }
        assert_eq!(h.sets["cpu.model"]["vendor_id"], "Intel");
        assert_eq!(h.sets["kernel.version"]["major"], "6");
        assert_eq!(h.sets["kernel.version"]["minor"], "1");
        assert_eq!(h.sets["kernel.version"]["revision"], "0");
        assert!(h.sets["kernel.loadedmodule"].contains_key("squashfs"));
        assert_eq!(h.sets["system.osrelease"]["VERSION_ID"], "12");
    }

    #[test]
    fn a_passing_spec_passes_and_a_failing_rule_is_named() {
        let ok = judge(
            r#"
version: v1alpha1
compatibilities:
- description: "avx2 and a 6.x kernel"
  rules:
  - name: cpu
    matchFeatures:
    - feature: cpu.cpuid
      matchExpressions:
        AVX2: {op: Exists}
        AVX512F: {op: DoesNotExist}
    - feature: cpu.model
      matchExpressions:
        vendor_id: {op: In, value: ["Intel", "AMD"]}
  - name: kernel
    matchFeatures:
    - feature: kernel.version
      matchExpressions:
        major: {op: Gt, value: [5]}
        minor: {op: GtLt, value: ["0", "10"]}
        full: {op: InRegexp, value: ["cloud"]}
"#,
        );
        assert_eq!(refusal(&ok), None, "{ok:?}");

        let bad = judge(
            r#"
version: v1alpha1
compatibilities:
- description: needs avx512
  rules:
  - name: avx512 cpu
    matchFeatures:
    - feature: cpu.cpuid
      matchExpressions:
        AVX512F: {op: Exists}
"#,
        );
        let why = refusal(&bad).unwrap();
        assert!(
            why.contains("avx512 cpu") && why.contains("AVX512F"),
            "{why}"
        );
    }

    #[test]
    fn unknown_features_refuse_as_unknown_and_preferences_refuse_nothing() {
        let o = judge(
            r#"
version: v1alpha1
compatibilities:
- rules:
  - name: nic
    matchFeatures:
    - feature: pci.device
      matchExpressions:
        vendor: {op: In, value: ["8086"]}
"#,
        );
        let why = refusal(&o).unwrap();
        assert!(
            why.contains("cannot be evaluated") && why.contains("pci.device"),
            "{why}"
        );

        let o = judge(
            r#"
version: v1alpha1
compatibilities:
- weight: 10
  tag: fast
  rules:
  - name: avx512
    matchFeatures:
    - feature: cpu.cpuid
      matchExpressions: {AVX512F: {op: Exists}}
"#,
        );
        assert!(!o[0].required);
        assert!(matches!(o[0].result, Judged::Fail(_)));
        assert_eq!(refusal(&o), None);
    }

    #[test]
    fn match_any_and_rule_vars() {
        let o = judge(
            r#"
version: v1alpha1
compatibilities:
- rules:
  - name: first
    vars: {simd: "yes"}
    matchAny:
    - matchFeatures:
      - feature: pci.device
        matchExpressions: {vendor: {op: Exists}}
    - matchFeatures:
      - feature: cpu.cpuid
        matchExpressions: {AVX2: {op: Exists}}
  - name: second
    matchFeatures:
    - feature: rule.matched
      matchExpressions: {simd: {op: IsTrue}}
"#,
        );
        // `first` passes through its second alternative; `second` sees `simd` but its
        // value is not a boolean: unknown, so the set refuses.
        let why = refusal(&o).unwrap();
        assert!(
            why.contains("second") && why.contains("not a boolean"),
            "{why}"
        );
    }

    #[test]
    fn unknown_fields_and_versions_are_errors() {
        for (yaml, needle) in [
            ("version: v1alpha1\ncompatibilities: []\nextra: 1\n", "unknown field"),
            (
                "version: v1alpha1\ncompatibilities:\n- rules: []\n  labels: {a: b}\n",
                "unknown field",
            ),
            (
                "version: v1alpha1\ncompatibilities:\n- rules:\n  - name: r\n    matchFeatures:\n    - feature: cpu.cpuid\n      matchExpressions: {AVX: {op: Exists, valeu: []}}\n",
                "unknown field",
            ),
            (
                "version: v1alpha1\ncompatibilities:\n- rules:\n  - name: r\n    matchFeatures:\n    - feature: cpu.cpuid\n      matchExpressions: {AVX: {op: Maybe}}\n",
                "unknown variant",
            ),
            ("version: v2\ncompatibilities: []\n", "v1alpha1"),
        ] {
            let e = Spec::parse(yaml.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
