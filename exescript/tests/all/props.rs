//! Property tests: random batches and random constraint lists never panic, and the gate's
//! verdict is exactly "the rendering equals a constraint" under strict matching (and under
//! regex matching of escaped renderings, which would fail if a prefix or infix sufficed).

use std::collections::{BTreeMap, HashSet};

use exescript::{
    compile, parse_batch, Command, Deploy, Gate, Match, Run, Sign, Start, Terminate, Transfer,
};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Words chosen to collide often (so constraints do match) and to contain what breaks naive
/// matching: spaces, empty strings, regex metacharacters, a newline, non-ASCII.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("a b".to_owned()),
        Just("/bin/sh".to_owned()),
        Just("-c".to_owned()),
        Just(".*".to_owned()),
        Just("(".to_owned()),
        Just("|".to_owned()),
        Just("x\ny".to_owned()),
        Just("é".to_owned()),
        Just("http://a/x".to_owned()),
        Just("http://a/../x".to_owned()),
        Just("container:/in/x".to_owned()),
        Just("/bin/../sh".to_owned()),
        "[a-c ]{0,3}",
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let env = prop::collection::btree_map(
        prop_oneof![Just("A".to_owned()), Just("B".to_owned())],
        prop_oneof![Just("1".to_owned()), Just("2".to_owned())],
        0..2,
    );
    let run =
        (word(), prop::collection::vec(word(), 0..4), env).prop_map(|(entry_point, args, env)| {
            Command::Run(Run {
                entry_point,
                args,
                env,
                capture: None,
            })
        });
    let transfer = (word(), word()).prop_map(|(from, to)| {
        Command::Transfer(Transfer {
            from,
            to,
            format: None,
            depth: None,
            fileset: Vec::new(),
        })
    });
    prop_oneof![
        4 => run,
        3 => transfer,
        1 => Just(Command::Deploy(Deploy::default())),
        1 => prop::option::of(prop::collection::vec(word(), 0..2)).prop_map(|args| Command::Start(Start { args })),
        1 => Just(Command::Terminate(Terminate {})),
        1 => Just(Command::Sign(Sign {})),
    ]
}

fn gated(command: &Command) -> bool {
    matches!(command, Command::Run(_) | Command::Transfer(_))
}

/// Whether the command passes the checks made before any constraint (canonical transfer
/// locations, entry points that run what they say); a gate without a script makes only
/// those.
fn canonical(command: &Command) -> bool {
    Gate::allow_all().check(command).is_ok()
}

/// The three written forms of a constraint for the rendering of `source`, under `how`; for
/// regex the text is escaped so it means exactly the rendering.
fn constraint_for(source: &Command, form: u8, how: Match) -> Value {
    let lit = |text: &str| match how {
        Match::Strict => text.to_owned(),
        Match::Regex => regex::escape(text),
    };
    let how_name = match how {
        Match::Strict => "strict",
        Match::Regex => "regex",
    };
    let object = match source {
        Command::Run(run) => {
            let rendering = run.render();
            json!({"run": {"args": lit(&rendering["run ".len()..]), "match": how_name}})
        }
        Command::Transfer(t) => {
            json!({"transfer": {"from": lit(&t.from), "to": lit(&t.to), "match": how_name}})
        }
        other => unreachable!("only run and transfer are constrained: {other:?}"),
    };
    match form % 3 {
        0 => Value::String(lit(&source.render())),
        1 => object,
        _ => Value::String(object.to_string()),
    }
}

/// Constraint-shaped JSON, random enough to reach every error path of `compile`.
fn json_value() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        "(run|transfer|deploy|\\^run) [a-z/ .*+?()\\[\\]|^$\\\\{}\n-]{0,12}",
        "\\{[\"a-z:{}, \\[\\]]{0,16}",
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        text.prop_map(Value::String),
        Just(json!("strict")),
        Just(json!("regex")),
    ];
    let key = prop_oneof![
        Just("run".to_owned()),
        Just("transfer".to_owned()),
        Just("args".to_owned()),
        Just("env".to_owned()),
        Just("match".to_owned()),
        Just("from".to_owned()),
        Just("to".to_owned()),
        Just("A".to_owned()),
        "[a-z]{1,4}",
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn any_match() -> impl Strategy<Value = Match> {
    prop_oneof![Just(Match::Strict), Just(Match::Regex)]
}

proptest! {
    #[test]
    fn strict_allows_exactly_the_listed_renderings(
        sources in prop::collection::vec((command().prop_filter("gated", gated), any::<u8>()), 0..8),
        commands in prop::collection::vec(command(), 0..12),
    ) {
        let listed: HashSet<String> = sources.iter().map(|(c, _)| c.render()).collect();
        let script: Vec<Value> = sources.iter().map(|(c, form)| constraint_for(c, *form, Match::Strict)).collect();
        let gate = compile(&script, Match::Strict).unwrap();
        for command in &commands {
            let allowed = gate.check(command).is_ok();
            prop_assert_eq!(allowed, !gated(command) || (canonical(command) && listed.contains(&command.render())), "{}", command);
        }
    }

    #[test]
    fn escaped_regex_allows_exactly_the_listed_renderings(
        sources in prop::collection::vec((command().prop_filter("gated", gated), any::<u8>()), 0..8),
        commands in prop::collection::vec(command(), 0..12),
    ) {
        let listed: HashSet<String> = sources.iter().map(|(c, _)| c.render()).collect();
        let script: Vec<Value> = sources.iter().map(|(c, form)| constraint_for(c, *form, Match::Regex)).collect();
        let gate = compile(&script, Match::Regex).unwrap();
        for command in &commands {
            let allowed = gate.check(command).is_ok();
            prop_assert_eq!(allowed, !gated(command) || (canonical(command) && listed.contains(&command.render())), "{}", command);
        }
    }

    #[test]
    fn random_constraint_lists_and_batches_never_panic(
        script in prop::collection::vec(json_value(), 0..6),
        default in any_match(),
        batch in prop::collection::vec(command(), 0..8),
    ) {
        if let Ok(gate) = compile(&script, default) {
            let each: Vec<_> = gate.check_each(&batch).collect();
            // The batch verdict is the first per-command denial, with its position.
            let first = each.iter().find_map(|v| v.as_ref().err()).cloned();
            prop_assert_eq!(gate.check_batch(&batch).err(), first);
            for (index, verdict) in each.iter().enumerate() {
                if let Err(denial) = verdict {
                    prop_assert_eq!(denial.index, index);
                    prop_assert!(gated(&batch[index]));
                }
            }
        }
    }

    #[test]
    fn random_batch_text_never_panics(text in any::<String>(), value in json_value()) {
        let _ = parse_batch(&text);
        let _ = parse_batch(&value.to_string());
        let _ = parse_batch(&Value::Array(vec![value]).to_string());
    }

    #[test]
    fn batches_round_trip(batch in prop::collection::vec(command(), 0..8)) {
        let text = serde_json::to_string(&batch).unwrap();
        prop_assert_eq!(parse_batch(&text).unwrap(), batch);
    }

    #[test]
    fn env_must_equal_when_named(
        source in command().prop_filter("run", |c| matches!(c, Command::Run(_))),
        wanted in prop::collection::btree_map("[AB]", "[12]", 0..3),
        how in any_match(),
    ) {
        let Command::Run(run) = &source else { unreachable!() };
        let mut constraint = constraint_for(&source, 1, how);
        constraint["run"]["env"] = json!(wanted);
        let gate = compile(&[constraint], Match::Strict).unwrap();
        let wanted: BTreeMap<String, String> = wanted;
        prop_assert_eq!(gate.check(&source).is_ok(), run.env == wanted && canonical(&source));
    }
}

/// Regex fragments as authors write them, from pieces that compile often and match the
/// words above often: literals, `.`, `*`, `+`, `?`, alternation, groups, classes, and a
/// few that try to break out of the anchors (`$`, `^`, `\n`, `(?m)`).
fn fragment() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just(" ".to_owned()),
        Just("/bin/sh".to_owned()),
        Just(".".to_owned()),
        Just(".*".to_owned()),
        Just("+".to_owned()),
        Just("?".to_owned()),
        Just("|".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("[a-c ]".to_owned()),
        Just("$".to_owned()),
        Just("^".to_owned()),
        Just("\n".to_owned()),
        Just("(?m)".to_owned()),
        Just("-c".to_owned()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

proptest! {
    /// The gate's promise, for any regex constraints: a `run` it allows is matched by at
    /// least one constraint's anchored pattern (`^(?:run <fragment>)$`, compiled here on
    /// its own, so a wrapping that let a fragment escape its anchors would show), and a
    /// `run` that one of them matches is allowed unless it is not canonical.
    #[test]
    fn regex_gate_allows_only_what_an_anchored_pattern_matches(
        fragments in prop::collection::vec((fragment(), any::<bool>()), 0..6),
        commands in prop::collection::vec(command(), 0..12),
    ) {
        let mut script = Vec::new();
        let mut anchored = Vec::new();
        for (fragment, plain) in &fragments {
            if *plain {
                script.push(json!(format!("run {fragment}")));
                anchored.push(format!("^(?:run {fragment})$"));
            } else {
                script.push(json!({"run": {"args": fragment}}));
                anchored.push(format!("^(?:run (?:{fragment}))$"));
            }
        }
        let Ok(gate) = compile(&script, Match::Regex) else {
            return Ok(());
        };
        let patterns: Vec<regex::Regex> = anchored
            .iter()
            .map(|p| regex::Regex::new(p).expect("the gate compiled every constraint"))
            .collect();
        for command in commands.iter().filter(|c| matches!(c, Command::Run(_))) {
            let rendering = command.render();
            let matched = patterns.iter().any(|p| p.is_match(&rendering));
            let allowed = gate.check(command).is_ok();
            if allowed {
                prop_assert!(matched, "allowed {:?}, which no anchored pattern of {:?} matches", rendering, anchored);
            }
            if matched && canonical(command) && env_free(command) {
                prop_assert!(allowed, "denied {:?}, which {:?} matches", rendering, anchored);
            }
        }
    }
}

fn env_free(command: &Command) -> bool {
    matches!(command, Command::Run(r) if r.env.is_empty())
}
