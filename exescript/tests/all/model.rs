//! The command model: what parses, what round-trips, and how bad input is reported.

use std::net::{IpAddr, Ipv4Addr};

use exescript::{
    parse_batch, ArchiveFormat, AtEnd, BatchError, CaptureFormat, CaptureMode, CapturePart,
    Command, FileSetEntry, FileSetRule, NetworkPeer, Start,
};

fn error(json: &str) -> String {
    parse_batch(json).expect_err("must not parse").to_string()
}

#[test]
fn every_command_parses() {
    let batch = parse_batch(
        r#"[
          {"deploy": {}},
          {"start": {"args": []}},
          {"run": {"entry_point": "/bin/sh", "args": ["-c", "date"], "env": {"TZ": "UTC"},
                   "capture": {"stdout": {"atEnd": {"format": "str"}}, "stderr": {"stream": {"limit": 4096}}}}},
          {"transfer": {"from": "container:/out/r.txt", "to": "http://req/r.txt"}},
          {"sign": {}},
          {"terminate": {}}
        ]"#,
    )
    .unwrap();
    let names: Vec<_> = batch.iter().map(Command::name).collect();
    assert_eq!(
        names,
        ["deploy", "start", "run", "transfer", "sign", "terminate"]
    );
    let Command::Run(run) = &batch[2] else {
        panic!()
    };
    assert_eq!(run.entry_point, "/bin/sh");
    assert_eq!(run.args, ["-c", "date"]);
    assert_eq!(run.env["TZ"], "UTC");
    let capture = run.capture.as_ref().unwrap();
    assert_eq!(
        capture.stdout,
        Some(CaptureMode::AtEnd(AtEnd {
            part: None,
            format: Some(CaptureFormat::Str)
        }))
    );
    assert!(matches!(&capture.stderr, Some(CaptureMode::Stream(s)) if s.limit == Some(4096)));
    assert_eq!(batch[2].render(), "run /bin/sh -c date");
    assert_eq!(
        batch[3].render(),
        "transfer container:/out/r.txt http://req/r.txt"
    );
    assert_eq!(batch[1].render(), "start");
}

#[test]
fn defaults_and_absent_fields() {
    let batch =
        parse_batch(r#"[{"run":{"entry_point":"/bin/date"}},{"start":{}},{"start":{"args":[]}}]"#)
            .unwrap();
    let Command::Run(run) = &batch[0] else {
        panic!()
    };
    assert!(run.args.is_empty() && run.env.is_empty() && run.capture.is_none());
    // Absent start args (image defaults) and an empty list are different requests.
    assert_eq!(batch[1], Command::Start(Start { args: None }));
    assert_eq!(batch[2], Command::Start(Start { args: Some(vec![]) }));
    assert!(parse_batch("[]").unwrap().is_empty());
}

/// The transfer and deploy forms yagna's activity API documents must keep working.
#[test]
fn yagna_transfer_and_deploy_forms() {
    let batch = parse_batch(
        r#"[
          {"transfer": {"from": "http://some-site/data.zip", "to": "container:/app//in/data.zip"}},
          {"transfer": {"from": "http://some-site/data.zip", "to": "container:/app//in/", "format": "zip"}},
          {"transfer": {"from": "http://some-site/data.zip", "to": "container:/app//in/", "depth": 0,
                        "format": "zip.0", "fileset": "*.o"}},
          {"transfer": {"from": "http://some-site/data.zip", "to": "container:/app//in/", "format": "tar.gz",
                        "fileset": [{"includes": "out/*", "excludes": ["*.tmp", ".gitignore"]}, {"includes": "gen-spec/*"}]}},
          {"deploy": {"net": [{"id": "n1", "ip": "192.168.0.0", "mask": "255.255.255.0", "nodeIp": "192.168.0.2",
                               "nodes": {"192.168.0.3": "0xabc", "192.168.0.4": ["0xdef", "act-1"]}}],
                      "hosts": {"db": "192.168.0.3"}}},
          {"run": {"entry_point": "x", "capture": {"stdout": {"atEnd": {"headTail": 1024, "format": "string"}},
                                                   "stderr": {"atEnd": {"tail": 10, "format": "binary"}}}}}
        ]"#,
    )
    .unwrap();
    let Command::Transfer(t) = &batch[2] else {
        panic!()
    };
    assert_eq!(t.format, Some(ArchiveFormat::ZipStored));
    assert_eq!(t.depth, Some(0));
    assert_eq!(t.fileset, [FileSetEntry::Pattern("*.o".into())]);
    let Command::Transfer(t) = &batch[3] else {
        panic!()
    };
    assert_eq!(
        t.fileset,
        [
            FileSetEntry::Rule(FileSetRule {
                desc: None,
                includes: vec!["out/*".into()],
                excludes: vec!["*.tmp".into(), ".gitignore".into()],
            }),
            FileSetEntry::Rule(FileSetRule {
                desc: None,
                includes: vec!["gen-spec/*".into()],
                excludes: vec![]
            }),
        ]
    );
    let Command::Deploy(d) = &batch[4] else {
        panic!()
    };
    assert_eq!(d.net[0].node_ip, Ipv4Addr::new(192, 168, 0, 2));
    assert_eq!(
        d.net[0].nodes[&Ipv4Addr::new(192, 168, 0, 4)],
        NetworkPeer::Activity("0xdef".into(), "act-1".into())
    );
    assert_eq!(d.hosts["db"], IpAddr::V4(Ipv4Addr::new(192, 168, 0, 3)));
    let Command::Run(r) = &batch[5] else { panic!() };
    let capture = r.capture.as_ref().unwrap();
    assert_eq!(
        capture.stdout,
        Some(CaptureMode::AtEnd(AtEnd {
            part: Some(CapturePart::HeadTail(1024)),
            format: Some(CaptureFormat::Str)
        }))
    );
    assert_eq!(
        capture.stderr,
        Some(CaptureMode::AtEnd(AtEnd {
            part: Some(CapturePart::Tail(10)),
            format: Some(CaptureFormat::Bin)
        }))
    );
}

#[test]
fn serialising_and_parsing_again_gives_the_same_batch() {
    let json = r#"[
      {"deploy": {"hosts": {"db": "10.0.0.1"}}},
      {"start": {"args": ["--quiet"]}},
      {"run": {"entry_point": "/bin/sh", "args": ["-c", "a b"], "env": {"A": "1"},
               "capture": {"stdout": {"atEnd": {"head": 5}}}}},
      {"transfer": {"from": "a", "to": "b", "format": "tar.xz", "depth": 2,
                    "fileset": ["*.txt", {"desc": "logs", "includes": "*.log"}]}},
      {"sign": {}},
      {"terminate": {}}
    ]"#;
    let batch = parse_batch(json).unwrap();
    let again = serde_json::to_string(&batch).unwrap();
    assert_eq!(parse_batch(&again).unwrap(), batch, "{again}");
    assert!(
        again.contains(r#"{"run":{"entry_point":"/bin/sh""#),
        "{again}"
    );
}

#[test]
fn unknown_commands_and_fields_are_named() {
    assert_eq!(
        error(r#"[{"deploy":{}},{"run":{"entry_point":"/bin/sh"}},{"run":{"entrypoint":"/bin/sh"}}]"#),
        "batch[2].run.entrypoint: unknown field `entrypoint`, expected one of `entry_point`, `args`, \
         `env`, `capture` at line 1 column 69"
    );
    let m = error(r#"[{"reboot":{}}]"#);
    assert!(
        m.starts_with("batch[0]: unknown command `reboot`, expected one of deploy, start, run"),
        "{m}"
    );
    let m = error(r#"[{"terminate":{"force":true}}]"#);
    assert!(
        m.starts_with("batch[0].terminate.force: unknown field `force`"),
        "{m}"
    );
    let m = error(r#"[{"deploy":{"volumes":{}}}]"#);
    assert!(
        m.starts_with("batch[0].deploy.volumes: unknown field `volumes`"),
        "{m}"
    );
    let m = error(r#"[{"transfer":{"from":"a","to":"b","fileset":[{"include":"*"}]}}]"#);
    assert!(
        m.starts_with("batch[0].transfer.fileset[0].include: unknown field `include`"),
        "{m}"
    );
    let m = error(r#"[{"run":{"entry_point":"x","capture":{"stdout":{"atEnd":{"hed":1}}}}}]"#);
    assert!(
        m.starts_with("batch[0].run.capture.stdout.atEnd.hed: unknown field `hed`"),
        "{m}"
    );
    let m = error(r#"[{"transfer":{"from":"a","to":"b","format":"rar"}}]"#);
    assert!(
        m.starts_with("batch[0].transfer.format: unknown variant `rar`"),
        "{m}"
    );
}

#[test]
fn malformed_batches_say_what_is_wrong() {
    let m = error(r#"[{"run":{"entry_point":"/bin/sh"},"sign":{}}]"#);
    assert!(
        m.contains("`run` is followed by `sign` (one object per command)"),
        "{m}"
    );
    let m = error(r#"["run"]"#);
    assert!(
        m.starts_with("batch[0]: invalid type: string \"run\", expected a command"),
        "{m}"
    );
    let m = error(r#"[{}]"#);
    assert!(
        m.starts_with("batch[0]: a command is an object with one key, its name; this one is empty"),
        "{m}"
    );
    let m = error(r#"{"run":{"entry_point":"x"}}"#);
    assert!(
        m.starts_with("batch: invalid type: map, expected a sequence"),
        "{m}"
    );
    let m = error(r#"[{"run":{"entry_point":"x"}}"#);
    assert!(m.starts_with("batch: EOF while parsing a list"), "{m}");
    let m = error(r#"[] []"#);
    assert!(m.starts_with("batch: trailing characters"), "{m}");
    let m = error(r#"[{"run":{"entry_point":["x"]}}]"#);
    assert!(
        m.starts_with("batch[0].run.entry_point: invalid type: sequence, expected a string"),
        "{m}"
    );
    let m = error(
        r#"[{"run":{"entry_point":"x","capture":{"stdout":{"atEnd":{"head":1,"tail":2}}}}}]"#,
    );
    assert!(
        m.contains("at most one of `head`, `tail`, `headTail`"),
        "{m}"
    );
    assert!(matches!(parse_batch(""), Err(BatchError::Invalid { .. })));
}
