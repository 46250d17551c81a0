//! Rules in the config file, through the real binary: every bad rule is a located configuration
//! error (exit 2), `check-config` lists the rules, and `--sample FILE` shows what they produce.

#![allow(clippy::unwrap_used)]

use crate::support::{self, pg};
use std::path::{Path, PathBuf};

/// A config whose daemon section is followed by `rules`.
fn config_with_rules(dir: &Path, rules: &str) -> PathBuf {
    let path = dir.join("pipewatch.toml");
    let text = format!(
        "[daemons.clusterer]\nlogs = [\"{}/*.jsonl\"]\n\n{rules}",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `pipewatch --config FILE check-config ARGS…`: (exit code, stdout, stderr).
fn check_config(config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", config.to_str().unwrap(), "check-config"];
    all.extend_from_slice(args);
    let out = support::pipewatch(&all);
    let (stdout, stderr) = support::text(&out);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// Asserts that the config fails with exit code 2 and exactly these error lines, where each
/// line is `LINE: KEY…` and gets the `pipewatch: FILE:` prefix.
fn assert_errors(rules: &str, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_rules(dir.path(), rules);
    let (code, stdout, stderr) = check_config(&config, &[]);
    let expected: String = expected
        .iter()
        .map(|l| format!("pipewatch: {}:{l}\n", config.display()))
        .collect();
    assert_eq!(stderr, expected);
    assert_eq!(stdout, "");
    assert_eq!(code, 2);
}

#[test]
fn invalid_regex_names_the_daemon_rule_index_and_text() {
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+/(?P<items_total>\d+) tiles'
progress = { node_id = "tiles" }
"#,
        &["6: daemons.clusterer.rules[0].match = 'Processed (?P<items_done>\\d+/(?P<items_total>\\d+) tiles': invalid regex: unclosed group"],
    );
}

#[test]
fn template_naming_a_missing_capture_is_an_error() {
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
match = 'MemoryError'
event = { event_type = "out_of_memory", severity = "CRITICAL" }

[[daemons.clusterer.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = { stage = "{stgae}" }
sticky = true
"#,
        &["11: daemons.clusterer.rules[1].set.stage = \"{stgae}\": `{stgae}` names a capture that the regex does not define (did you mean `{stage}`?); its captures: stage; `{record.PATH}` reads a record field"],
    );
}

#[test]
fn progress_rule_without_node_id_is_an_error() {
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
progress = { parent_node_id = "clustering", level = "step" }
"#,
        &["7: daemons.clusterer.rules[0].progress.node_id: is required: give `node_id` in the progress table or name a capture `(?P<node_id>…)` in `match`"],
    );
}

#[test]
fn unknown_keys_in_a_rule_and_in_its_tables_suggest_the_right_one() {
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
match = 'a'
set = { x = "1" }

[[daemons.clusterer.rules]]
match = 'b'
set = { x = "1" }
stiky = true
"#,
        &["12: daemons.clusterer.rules[1].stiky: unknown key `stiky` (did you mean `sticky`?); valid keys here: match, field, progress, event, set, sticky, stop"],
    );
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+) tiles'
progress = { node_id = "tiles", parnet_node_id = "clustering", levle = "step" }
"#,
        &[
            "7: daemons.clusterer.rules[0].progress.levle: unknown key `levle` (did you mean `level`?); valid keys here: node_id, parent_node_id, level, name, status, percent, items_done, items_total, details",
            "7: daemons.clusterer.rules[0].progress.parnet_node_id: unknown key `parnet_node_id` (did you mean `parent_node_id`?); valid keys here: node_id, parent_node_id, level, name, status, percent, items_done, items_total, details",
        ],
    );
}

#[test]
fn every_bad_rule_is_reported_at_once() {
    assert_errors(
        r#"
[[daemons.clusterer.rules]]
progress = { node_id = "x" }

[[daemons.clusterer.rules]]
match = 'nothing to do'

[[daemons.clusterer.rules]]
match = 'oom'
event = { severity = "FATAL" }
stop = true
"#,
        &[
            "5: daemons.clusterer.rules[0].match: is required: a regex over the rule's field, e.g. match = 'Processed (?P<items_done>\\d+)'",
            "9: daemons.clusterer.rules[1].match = \"nothing to do\": the rule produces nothing: give it `progress`, `event` or `set`",
            "13: daemons.clusterer.rules[2].event.event_type: is required: name the event, e.g. event_type = \"out_of_memory\"",
            "13: daemons.clusterer.rules[2].event.severity = \"FATAL\": not a severity; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ],
    );
}

const GOOD_RULES: &str = r#"
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
field = "message"
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

[[daemons.clusterer.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = { stage = "{stage}" }
sticky = true

[[daemons.clusterer.rules]]
match = 'MemoryError|Killed process|Out of memory'
event = { event_type = "out_of_memory", severity = "CRITICAL" }
"#;

#[test]
fn check_config_lists_rules_and_sample_shows_what_they_produce() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_rules(dir.path(), GOOD_RULES);
    let sample = dir.path().join("sample.jsonl");
    std::fs::write(
        &sample,
        concat!(
            "{\"event\": \"=== Stage: tiling ===\", \"level\": \"info\"}\n",
            "\n",
            "{\"message\": \"Processed 5/10 tiles\", \"level\": \"info\"}\n",
            "not json at all\n",
            "{\"msg\": \"worker 3: MemoryError\", \"level\": \"error\"}\n",
        ),
    )
    .unwrap();
    let url = crate::support::agent::Env::new().db; // migrated: check-config checks the schema
    let (code, stdout, stderr) = check_config(
        &config,
        &["--database-url", &url, "--sample", sample.to_str().unwrap()],
    );
    assert_eq!(stderr, "");
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains(concat!(
            "  rules = 3\n",
            "    #0 match 'Processed (?P<items_done>\\d+)/(?P<items_total>\\d+) tiles' on message → progress tiles\n",
            "    #1 match '^=== Stage: (?P<stage>\\w+) ===' on message → set stage (sticky)\n",
            "    #2 match 'MemoryError|Killed process|Out of memory' on message → event out_of_memory (CRITICAL)\n",
        )),
        "{stdout}"
    );
    let report = format!(
        concat!(
            "\nsample {} with the 3 rule(s) of daemons.clusterer:\n",
            "line 1: === Stage: tiling ===\n",
            "  #1 → set stage=\"tiling\" (sticky)\n",
            "line 3: Processed 5/10 tiles\n",
            "  #0 → progress node_id=\"tiles\" parent_node_id=\"clustering\" level=\"step\" name=\"Tile processing\" items_done=5 items_total=10\n",
            "line 5: worker 3: MemoryError\n",
            "  #2 → event out_of_memory CRITICAL\n",
            "3 of 4 lines matched at least one rule\n",
            "  #0: 1 match(es)\n",
            "  #1: 1 match(es)\n",
            "  #2: 1 match(es)\n",
        ),
        sample.display()
    );
    assert!(stdout.ends_with(&report), "{stdout}");
}

#[test]
fn sample_rules_work_on_text_lines_parsed_with_text_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemons.mapper]
logs = ["{}/*.log"]
format = "text"
text_pattern = '^(?P<ts>\S+ \S+) (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$'

[[daemons.mapper.rules]]
match = '^geo\.tiles'
field = "logger"
set = {{ component = "tiles" }}

[[daemons.mapper.rules]]
match = 'tile (?P<node_id>\S+) (?P<status>\w+)'
progress = {{ parent_node_id = "{{record.component}}", level = "substep" }}
"#,
            dir.path().display()
        ),
    )
    .unwrap();
    let sample = dir.path().join("mapper.log");
    std::fs::write(
        &sample,
        "2024-05-01 12:00:00,123 INFO geo.tiles: tile t-7 Completed\n\
         2024-05-01 12:00:01,000 WARNING geo.io: tile t-8 unknown\n",
    )
    .unwrap();
    let url = crate::support::agent::Env::new().db; // migrated: check-config checks the schema
    let (code, stdout, stderr) = check_config(
        &config,
        &["--database-url", &url, "--sample", sample.to_str().unwrap()],
    );
    assert_eq!(stderr, "");
    assert_eq!(code, 0, "{stdout}");
    // Rules match against the record as it was before any rule applied, so the first line's
    // progress reads `component` from the record only where the record itself carries it.
    let report = format!(
        concat!(
            "\nsample {} with the 2 rule(s) of daemons.mapper:\n",
            "line 1: tile t-7 Completed\n",
            "  #0 → set component=\"tiles\"\n",
            "  #1 → progress node_id=\"t-7\" level=\"substep\" status=\"completed\"\n",
            "line 2: tile t-8 unknown\n",
            "  #1 → progress node_id=\"t-8\" level=\"substep\"\n",
            "  error: rule #1: progress.status = \"unknown\": not a status; use one of pending, running, completed, failed, cancelled\n",
            "2 of 2 lines matched at least one rule\n",
            "  #0: 1 match(es)\n",
            "  #1: 2 match(es)\n",
        ),
        sample.display()
    );
    assert!(stdout.ends_with(&report), "{stdout}");
}

#[test]
fn sample_with_an_unknown_daemon_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_rules(dir.path(), GOOD_RULES);
    let sample = dir.path().join("sample.jsonl");
    std::fs::write(&sample, "x\n").unwrap();
    let url = pg::fresh_db();
    let (code, _stdout, stderr) = check_config(
        &config,
        &[
            "--database-url",
            &url,
            "--sample",
            sample.to_str().unwrap(),
            "--daemon",
            "clusterr",
        ],
    );
    assert_eq!(
        stderr,
        format!(
            "pipewatch: --daemon clusterr: no such daemon in {} (configured: clusterer)\n",
            config.display()
        )
    );
    assert_eq!(code, 2);
}
