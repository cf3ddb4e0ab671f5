//! Restore points: a multi-source daemon job writes one snapshot per source
//! in one point, complete only when every source succeeded; `labctl points`
//! lists them; `forget` never splits a complete point.

use crate::common::daemon_config as config;
use crate::common::*;
use std::fs;
use std::path::Path;

fn points(env: &Env) -> Vec<serde_json::Value> {
    serde_json::from_slice(&env.ok(&["--json", "points"]).stdout).unwrap()
}

fn job(name: &str, data: &Path, third: &str) -> String {
    format!(
        "[[job]]\nname = \"{name}\"\nschedule = \"0 2 * * *\"\nbackup = [\n  {{ source = \"path\", path = \"{}\" }},\n  {{ source = \"stream\", name = \"db\", command = [\"sh\", \"-c\", \"echo dump\"] }},\n  {third},\n]\n",
        data.display()
    )
}

#[test]
fn a_multi_source_job_writes_one_point_partial_until_every_source_succeeds() {
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    write(&data.join("a"), b"alpha");
    let failing = r#"{ source = "stream", name = "kfp", command = ["sh", "-c", "echo half; echo 'mysqldump: Got error: 2002' >&2; exit 2"] }"#;
    let cfg = config(&env, &job("platform", &data, failing));
    let c = cfg.to_str().unwrap();
    env.ok(&["config", "validate", "--config", c]);

    // The third source fails: the others are written, the point is partial
    // and the run fails naming the source that failed.
    let out = env.run(&["jobs", "run", "platform", "--config", c]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("is partial: 1 of 3 source(s) failed: #3 stream"),
        "{e}"
    );
    assert!(e.contains("mysqldump: Got error: 2002"), "{e}");
    let p = points(&env);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["complete"], false);
    assert_eq!(p[0]["missing"], serde_json::json!(["#3 stream"]));
    assert_eq!(p[0]["members"].as_array().unwrap().len(), 2);
    assert_eq!(
        p[0]["expected"],
        serde_json::json!(["path", "stream", "stream"])
    );

    // All three succeed: a complete point, listed and shown.
    let ok = r#"{ source = "stream", name = "kfp", command = ["sh", "-c", "echo kfp"] }"#;
    config(&env, &job("platform", &data, ok));
    env.ok(&["jobs", "run", "platform", "--config", c]);
    let p = points(&env);
    assert_eq!(p.len(), 2);
    let complete = &p[1];
    assert_eq!(complete["complete"], true, "{complete}");
    assert!(complete["id"].as_str().unwrap().starts_with("platform-"));
    let members = complete["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members[0]["kind"], "path");
    assert_eq!(members[2]["name"], "kfp");
    let shown = env.ok(&["points", "show", "latest"]);
    let text = stdout(&shown);
    assert!(
        text.contains("complete") && text.contains("#3 stream"),
        "{text}"
    );
    let listed = stdout(&env.ok(&["points"]));
    assert!(listed.contains("partial (missing #3 stream)"), "{listed}");
    let out = env.run(&["points", "show", "nope"]);
    assert_eq!(out.status.code(), Some(2));

    // An empty list and a bad source inside the list are config errors
    // naming the field.
    config(
        &env,
        "[[job]]\nname = \"x\"\nschedule = \"0 2 * * *\"\nbackup = []\n",
    );
    let out = env.run(&["config", "validate", "--config", c]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("lists no source"), "{}", stderr(&out));
    config(
        &env,
        "[[job]]\nname = \"x\"\nschedule = \"0 2 * * *\"\nbackup = [ { source = \"path\", path = \"/etc\" }, { source = \"stream\", name = \"\" } ]\n",
    );
    let out = env.run(&["config", "validate", "--config", c]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("job[0].backup[1].name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn forget_keeps_a_complete_point_whole_and_says_why() {
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    write(&data.join("a"), b"alpha");
    let third = r#"{ source = "stream", name = "kfp", command = ["sh", "-c", "echo kfp"] }"#;
    let cfg = config(&env, &job("platform", &data, third));
    let c = cfg.to_str().unwrap();
    env.ok(&["jobs", "run", "platform", "--config", c]);
    // A newer snapshot of the path alone: by its own rule (keep the last
    // one per source) the point's path snapshot would go, but the point's
    // stream snapshots are still the newest of theirs, so it stays whole.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.backup(&data);
    let forget = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec!["--json", "forget", "--keep-last", "1", "--dry-run"];
        a.extend_from_slice(extra);
        serde_json::from_slice(&env.ok(&a).stdout).unwrap()
    };
    let point = points(&env)[0]["id"].as_str().unwrap().to_string();
    let path_snap = points(&env)[0]["members"][0]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let d = forget(&[]);
    let of = |d: &serde_json::Value, id: &str| {
        d["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .cloned()
            .unwrap()
    };
    let dec = of(&d, &path_snap);
    assert_eq!(dec["keep"], true, "{d}");
    assert!(
        dec["reasons"]
            .to_string()
            .contains(&format!("restore point {point} is kept whole")),
        "{dec}"
    );
    // Forgetting only the path source: the point's other snapshots are
    // outside the selection, so it is kept, and the reason says how to
    // forget it.
    let d = forget(&["--source", data.to_str().unwrap()]);
    let dec = of(&d, &path_snap);
    assert_eq!(dec["keep"], true, "{d}");
    assert!(
        dec["reasons"]
            .to_string()
            .contains("outside this selection"),
        "{dec}"
    );

    // A second run of the job: now the first point's every snapshot is
    // superseded in its own source, and the point goes whole.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.ok(&["jobs", "run", "platform", "--config", c]);
    let d = forget(&[]);
    let first: Vec<_> = points(&env)[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["snapshot"].as_str().unwrap().to_string())
        .collect();
    for id in &first {
        assert_eq!(of(&d, id)["keep"], false, "{d}");
    }
    env.ok(&["forget", "--keep-last", "1"]);
    let p = points(&env);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["complete"], true);
}
