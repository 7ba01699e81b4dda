//! `provider script check`: the ExeScript gate as an operator (or a requestor preparing a
//! batch) uses it.

use serde_json::json;
use tests::util::{manifest, yagna, Provider};

fn with_script(commands: serde_json::Value, match_: &str) -> serde_json::Value {
    let mut m = manifest(&[]);
    m["compManifest"]["script"] = json!({"commands": commands, "match": match_});
    m
}

fn check(p: &Provider, m: &serde_json::Value, batch: &serde_json::Value) -> tests::util::Run {
    let mf = p.write_input("m.json", serde_json::to_vec(m).unwrap());
    let bf = p.write_input("batch.json", serde_json::to_vec(batch).unwrap());
    p.run([
        "--json".as_ref(),
        "script".as_ref(),
        "check".as_ref(),
        "--manifest".as_ref(),
        mf.as_os_str(),
        "--script".as_ref(),
        bf.as_os_str(),
    ])
}

fn verdicts(r: &tests::util::Run) -> Vec<String> {
    r.json()["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verdict"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn goth_manifest_allows_curl_and_denies_the_rest() {
    let p = Provider::new();
    let batch = p.write_input(
        "batch.json",
        json!([
            {"deploy": {}}, {"start": {}},
            {"run": {"entry_point": "/bin/sh", "args": ["-c", "curl -s https://api.coingecko.com"]}},
            {"run": {"entry_point": "/bin/rm", "args": ["-rf", "/"]}},
            {"transfer": {"from": "container:/golem/output/output.txt", "to": "file:///tmp/output.txt"}}
        ])
        .to_string(),
    );
    let r = p.run([
        "--json".as_ref(),
        "script".as_ref(),
        "check".as_ref(),
        "--manifest".as_ref(),
        yagna("goth-outbound/outbound_manifest.json").as_os_str(),
        "--script".as_ref(),
        batch.as_os_str(),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(verdicts(&r), ["allow", "allow", "allow", "deny", "allow"]);
    let denied = &r.json()["commands"][3];
    assert_eq!(denied["index"], 3);
    assert_eq!(denied["command"], "run /bin/rm -rf /");
    assert!(
        denied["reason"].as_str().unwrap().contains("run"),
        "{denied}"
    );
}

#[test]
fn strict_and_anchoring_through_the_cli() {
    let p = Provider::new();
    let date = |args: &[&str]| json!({"run": {"entry_point": "/bin/date", "args": args}});
    let strict = with_script(json!(["run /bin/date -R"]), "strict");
    let r = check(&p, &strict, &json!([date(&["-R"])]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = check(&p, &strict, &json!([date(&["-R;", "reboot"])]));
    assert_eq!(verdicts(&r), ["deny"]);

    let regex = with_script(json!(["run /bin/date"]), "regex");
    assert_eq!(check(&p, &regex, &json!([date(&[])])).code, 0);
    let r = check(&p, &regex, &json!([date(&["; reboot"])]));
    assert_eq!(
        (r.code, verdicts(&r)),
        (1, vec!["deny".to_owned()]),
        "a prefix match alone never passes"
    );
}

#[test]
fn no_script_section_allows_everything() {
    let p = Provider::new();
    let r = check(
        &p,
        &manifest(&[]),
        &json!([{"run": {"entry_point": "/bin/anything", "args": ["at", "all"]}}]),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let table = {
        let mf = p.write_input("m2.json", manifest(&[]).to_string());
        let bf = p.write_input("b2.json", json!([{"terminate": {}}]).to_string());
        p.run([
            "script".as_ref(),
            "check".as_ref(),
            "--manifest".as_ref(),
            mf.as_os_str(),
            "--script".as_ref(),
            bf.as_os_str(),
        ])
        .ok()
        .stdout
    };
    assert!(table.starts_with("#  VERDICT  COMMAND"), "{table}");
}

#[test]
fn bad_input_exits_2_with_a_named_problem() {
    let p = Provider::new();
    let ok_manifest = with_script(json!(["run /bin/date"]), "strict");
    check(&p, &ok_manifest, &json!([{"runn": {}}])).bad_input("unknown command `runn`");
    check(
        &p,
        &ok_manifest,
        &json!([{"run": {"entrypoint": "/bin/date"}}]),
    )
    .bad_input("entrypoint");
    let broken = with_script(json!(["run /bin/(date"]), "regex");
    check(&p, &broken, &json!([])).bad_input("script-invalid");
    let not_json_constraint = with_script(json!(["{\"run\": {\"args\": "]), "strict");
    check(&p, &not_json_constraint, &json!([])).bad_input("compManifest.script");
    let mf = p.write_input("m.json", ok_manifest.to_string());
    let bf = p.write_input("garbage.json", "[{\"run\": ");
    p.run([
        "script".as_ref(),
        "check".as_ref(),
        "--manifest".as_ref(),
        mf.as_os_str(),
        "--script".as_ref(),
        bf.as_os_str(),
    ])
    .bad_input("garbage.json");
}
