//! `pipewatch web`: a real agent fills the database, the server runs as a `pipewatch_reader`
//! login, and a headless Chromium looks at every page: the live progress moves without a
//! reload, the charts have their series, hostile log text shows as text and injects nothing,
//! logs follow live. The JSON API answers in the shapes of the CLI's `--json`. Access rules:
//! loopback by default, a token elsewhere, refusal without one.

use crate::support::agent::{append, wait_until, Env};
use crate::support::web::{browser_available, Browser, WebServer};
use crate::support::{pipewatch, text};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const EXP: &str = "7e57e57e-0000-4000-8000-00000000a11e";

/// Log text an attacker controls, as a daemon would write it.
const CORPUS: &[&str] = &[
    "<script>window.pwned='script'</script>",
    "\"><img src=x onerror=\"window.pwned='img'\">",
    "'><svg onload=window.pwned='svg'>",
    "javascript:window.pwned='link'",
    "invoice_\u{202E}fdp.exe",
    "{{ 7*7 }} {% raw %} ${7*7}",
    "</td></tr></table><iframe src=\"javascript:window.pwned='iframe'\"></iframe>",
    "&lt;b&gt;already escaped&lt;/b&gt; &amp;",
];

/// How a corpus entry must read on the page: the same text, with the direction override
/// shown rather than obeyed.
fn shown(s: &str) -> String {
    s.replace('\u{202E}', "\\u{202E}")
}

static LOGIN: AtomicUsize = AtomicUsize::new(0);

/// A login role that is only a member of `pipewatch_reader`; its URL for the test database.
fn reader_url(env: &Env) -> String {
    let name = format!(
        "pw_web_{}_{}",
        std::process::id(),
        LOGIN.fetch_add(1, Ordering::SeqCst)
    );
    env.sql(&format!(
        "CREATE ROLE {name} LOGIN IN ROLE pipewatch_reader"
    ));
    env.db
        .replacen("postgres://postgres@", &format!("postgres://{name}@"), 1)
}

fn line(level: &str, msg: &str, extra: serde_json::Value) -> String {
    let mut o = serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "level": level,
        "event": msg,
        "experiment_id": EXP,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (o.as_object_mut(), extra) {
        o.extend(e);
    }
    o.to_string()
}

fn progress(node: &str, parent: Option<&str>, percent: f64) -> String {
    line(
        "info",
        &format!("{node} at {percent}"),
        serde_json::json!({"node_id": node, "progress": {
            "node_id": node, "parent_node_id": parent, "level": if parent.is_some() { "step" } else { "pipeline" },
            "name": format!("{node} work"), "status": "running", "percent": percent,
        }}),
    )
}

const DAEMONS: &str = r#"
[daemons.alpha]
logs = ["$DIR/alpha/*.jsonl"]
metrics_interval = "1s"

[daemons.beta]
logs = ["$DIR/beta/*.jsonl"]
metrics_interval = "1s"
"#;

/// The JS that finds anything a hostile line could have injected.
const INJECTED: &str = "return (typeof window.pwned !== 'undefined') \
    || document.querySelectorAll('main img, main iframe, [onerror], [onload], a[href^=\"javascript\"]').length > 0 \
    || Array.from(document.scripts).some(s => s.getAttribute('src') !== '/static/app.js');";

#[test]
fn web_view_in_a_browser_against_a_real_agent() {
    if !browser_available() {
        return;
    }
    let env = Env::new();
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{EXP}', 'web <i>test</i>')"
    ));
    std::fs::create_dir_all(env.path("alpha")).unwrap();
    std::fs::create_dir_all(env.path("beta")).unwrap();
    let alpha = env.path("alpha/a.jsonl");
    let beta = env.path("beta/b.jsonl");
    let mut lines = vec![
        progress("root", None, 0.0),
        progress("step", Some("root"), 20.0),
    ];
    for (i, c) in CORPUS.iter().enumerate() {
        lines.push(line(
            "error",
            c,
            serde_json::json!({"node_id": format!("<b>n{i}</b>"), "exception": format!("Traceback:\n  {c}")}),
        ));
    }
    append(&alpha, &lines);
    let cfg = env.config(DAEMONS);
    let agent = env.spawn(&cfg);
    // Siblings come in the order they first appeared; two daemons' readers race, so beta's
    // node is written once alpha's are stored.
    assert!(
        wait_until(Duration::from_secs(60), || env.count(
            "SELECT count(*) FROM pipeline_progress WHERE node_id = 'step'"
        ) == 1),
        "alpha's progress was not shipped:\n{}",
        agent.stderr()
    );
    append(&beta, &[progress("other", Some("root"), 10.0)]);
    let logs_expected = CORPUS.len() as i64 + 3; // + the three progress lines
    assert!(
        wait_until(Duration::from_secs(60), || {
            env.count(&format!(
                "SELECT count(*) FROM pipeline_logs WHERE experiment_id = '{EXP}'"
            )) == logs_expected
                && env.count(&format!(
                    "SELECT least(count(*) FILTER (WHERE daemon = 'alpha'), count(*) FILTER (WHERE daemon = 'beta')) \
                     FROM pipeline_metrics WHERE experiment_id = '{EXP}'"
                )) >= 3
        }),
        "the agent did not ship the lines and metrics:\n{}",
        agent.stderr()
    );
    // An event while metrics are sampled: it must be marked on alpha's charts only.
    append(
        &alpha,
        &[line(
            "warning",
            "MemoryError while merging <clusters>",
            serde_json::json!({"event_type": "out_of_memory", "severity": "CRITICAL"}),
        )],
    );
    assert!(
        wait_until(Duration::from_secs(30), || env.count(
            "SELECT count(*) FROM pipeline_metrics m WHERE m.daemon = 'alpha' AND m.ts > \
             (SELECT max(ts) FROM pipeline_events WHERE event_type = 'out_of_memory')"
        ) >= 1),
        "no event or no sample after it:\n{}",
        agent.stderr()
    );
    let url = reader_url(&env);
    let web = WebServer::start(&url, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = Browser::start().await;

        // Experiments: the hostile name is text, the experiment is running.
        b.goto(&web.url("/")).await;
        let names = b
            .js("return Array.from(document.querySelectorAll('#experiments a')).map(a => a.textContent)")
            .await;
        assert_eq!(names, serde_json::json!(["web <i>test</i>"]));
        let status = b.js("return document.querySelector('#experiments .badge').textContent").await;
        assert_eq!(status, "running");
        assert_eq!(b.js(INJECTED).await, false);
        b.screenshot("web-experiments.png").await;

        // One experiment: tree, charts, errors; then the tree moves without a reload.
        b.goto(&web.url(&format!("/experiments/{EXP}"))).await;
        b.js("window.samePage = 1; return 1").await;
        let pct = "return document.querySelector('tr[data-node=\"step\"] .pct').textContent";
        assert_eq!(b.js(pct).await, "20.0 %");
        let nodes = b
            .js("return Array.from(document.querySelectorAll('#progress tr[data-node]')).map(r => r.dataset.node)")
            .await;
        assert_eq!(nodes, serde_json::json!(["root", "step", "other"]));
        // Two daemons × (CPU, RSS, disk read + write, records/s).
        let series = b
            .js("return document.querySelectorAll('#charts polyline.series').length")
            .await;
        assert_eq!(series, 10);
        let daemons = b
            .js("return Array.from(document.querySelectorAll('#charts .daemon')).map(d => d.dataset.daemon)")
            .await;
        assert_eq!(daemons, serde_json::json!(["alpha", "beta"]));
        let oom = "return ['alpha', 'beta'].map(d => document.querySelectorAll(\
            `#charts .daemon[data-daemon=\"${d}\"] line.mark.k-out_of_memory`).length)";
        assert_eq!(b.js(oom).await, serde_json::json!([4, 0]), "OOM marked on alpha's 4 charts");
        let drawn = b
            .js("return document.querySelector('#charts .daemon polyline.s-cpu').getAttribute('points').split(' ').length")
            .await;
        assert!(drawn.as_u64().unwrap_or(0) >= 2, "CPU points: {drawn}");
        let errors = b
            .js("return Array.from(document.querySelectorAll('.error .msg')).map(e => e.textContent)")
            .await;
        for c in CORPUS {
            assert!(
                errors.as_array().unwrap().contains(&serde_json::json!(shown(c))),
                "{c:?} not shown as text among {errors}"
            );
        }
        assert_eq!(
            b.js("return document.querySelectorAll('.error pre.traceback').length").await,
            CORPUS.len(),
            "one traceback per error"
        );
        assert_eq!(b.js(INJECTED).await, false);
        b.screenshot("web-experiment.png").await;
        append(&alpha, &[progress("step", Some("root"), 70.0)]);
        assert!(
            b.wait_for(
                &format!("{pct} === '70.0 %' && window.samePage === 1"),
                Duration::from_secs(30)
            )
            .await,
            "the progress did not move live: {}",
            b.js(pct).await
        );

        // Logs: every hostile message as text; a new line appears while following.
        b.goto(&web.url(&format!("/logs?experiment={EXP}"))).await;
        b.js("window.samePage = 1; return 1").await;
        let msgs = b
            .js("return Array.from(document.querySelectorAll('#logrows td.msg')).map(e => e.firstChild ? e.firstChild.textContent : '')")
            .await;
        for c in CORPUS {
            assert!(
                msgs.as_array().unwrap().contains(&serde_json::json!(shown(c))),
                "{c:?} not shown as text among {msgs}"
            );
        }
        assert_eq!(b.js(INJECTED).await, false);
        append(&alpha, &[line("warning", "follow <me> \u{202E}now", serde_json::json!({}))]);
        assert!(
            b.wait_for(
                "return window.samePage === 1 && Array.from(document.querySelectorAll('#logrows td.msg')).some(e => e.textContent === 'follow <me> \\\\u{202E}now')",
                Duration::from_secs(30)
            )
            .await,
            "the new line did not appear live"
        );
        assert_eq!(b.js(INJECTED).await, false);
        b.screenshot("web-logs.png").await;

        // Agents.
        b.goto(&web.url("/agents")).await;
        let row = b
            .js("return document.querySelector('#agents tbody tr').textContent")
            .await;
        let row = row.as_str().unwrap_or_default().to_string();
        assert!(row.contains("test-host") && row.contains("alpha, beta"), "{row}");
        b.screenshot("web-agents.png").await;
        b.close().await;
    });

    // JSON: the same rows and shapes as `pipewatch logs --json`.
    let out = pipewatch(&[
        "--database-url",
        &url,
        "logs",
        "--experiment",
        EXP,
        "--json",
        "--limit",
        "5",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let mut cli: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    cli.reverse();
    let api = web.get(&format!("/api/logs?experiment={EXP}&limit=5"), &[]);
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(api.json(), serde_json::Value::Array(cli));
    let negotiated = web.get(
        &format!("/logs?experiment={EXP}&limit=5"),
        &[("Accept", "application/json")],
    );
    assert_eq!(negotiated.json(), api.json());
    // Filters and paging.
    let errors = web
        .get(
            &format!("/api/logs?experiment={EXP}&level=error&limit=1000"),
            &[],
        )
        .json();
    assert_eq!(errors.as_array().unwrap().len(), CORPUS.len());
    let found = web
        .get(
            &format!("/api/logs?experiment={EXP}&search=%3Cscript%3E"),
            &[],
        )
        .json();
    assert_eq!(found.as_array().unwrap().len(), 1);
    let node = web
        .get(
            &format!("/api/logs?experiment={EXP}&node=%3Cb%3En3%3C%2Fb%3E"),
            &[],
        )
        .json();
    assert_eq!(node[0]["message"], CORPUS[3]);
    let all = web
        .get(&format!("/api/logs?experiment={EXP}&limit=1000"), &[])
        .json();
    let all = all.as_array().unwrap();
    let first = web
        .get(&format!("/api/logs?experiment={EXP}&limit=4"), &[])
        .json();
    let last = &first[3];
    let next = web
        .get(
            &format!(
                "/api/logs?experiment={EXP}&limit=4&before_id={}&before_ts={}",
                last["id"],
                last["ts"].as_str().unwrap().replace('+', "%2B")
            ),
            &[],
        )
        .json();
    assert_eq!(
        first
            .as_array()
            .unwrap()
            .iter()
            .chain(next.as_array().unwrap())
            .collect::<Vec<_>>(),
        all.iter().take(8).collect::<Vec<_>>(),
        "two pages are the first eight rows"
    );
    let exp = web.get(&format!("/api/experiments/{EXP}"), &[]).json();
    assert_eq!(exp["experiment"]["name"], "web <i>test</i>");
    let step = exp["progress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "step")
        .unwrap()
        .clone();
    assert_eq!(step["progress_percent"], 70.0);
    assert_eq!(exp["errors"].as_array().unwrap().len(), CORPUS.len());
    assert_eq!(exp["metrics"]["daemons"].as_array().unwrap().len(), 2);
    let unknown = web.get("/experiments/no-such-experiment", &[]);
    assert_eq!(unknown.status, 404);
    let (code, _, _) = agent.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn web_access_rules_and_headers() {
    let env = Env::new();
    let url = reader_url(&env);
    // Another address without a credential: refused before anything is bound.
    let out = pipewatch(&["--database-url", &url, "web", "--listen", "0.0.0.0:0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("refusing to serve on 0.0.0.0:0 without a credential")
            && stderr.contains("--token-file"),
        "{stderr}"
    );
    let short = env.path("short-token");
    std::fs::write(&short, "abc\n").unwrap();
    let out = pipewatch(&[
        "--database-url",
        &url,
        "web",
        "--token-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("at least 16 characters"),
        "{:?}",
        text(&out)
    );

    // Loopback: open, with the security headers, and only for requests addressed to it.
    let web = WebServer::start(&url, &[]);
    let r = web.get("/", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("No experiments yet"));
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let rebound = web.get("/", &[("Host", "attacker.example:8080")]);
    assert_eq!(rebound.status, 403);
    assert_eq!(web.get("/api/agents", &[]).json(), serde_json::json!([]));
    drop(web);

    // A token: nothing without it, everything with it (bearer or basic-auth password).
    let token_file = env.path("token");
    std::fs::write(&token_file, "correct-horse-battery-staple\n").unwrap();
    let web = WebServer::start(&url, &["--token-file", token_file.to_str().unwrap()]);
    let r = web.get("/", &[]);
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap_or_default()
        .starts_with("Basic"));
    assert_eq!(
        web.get(
            "/",
            &[("Authorization", "Bearer correct-horse-battery-stapl")]
        )
        .status,
        401
    );
    assert_eq!(
        web.get(
            "/api/experiments",
            &[("Authorization", "Bearer correct-horse-battery-staple")]
        )
        .status,
        200
    );
    // The scheme's name in any case (RFC 9110), as some clients send it.
    for auth in [
        "bearer correct-horse-battery-staple",
        "BEARER  correct-horse-battery-staple",
        "basic b3A6Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5LXN0YXBsZQ==",
    ] {
        assert_eq!(
            web.get("/api/agents", &[("Authorization", auth)]).status,
            200,
            "{auth}"
        );
    }
    assert_eq!(
        web.get(
            "/api/agents",
            &[("Authorization", "Bearercorrect-horse-battery-staple")]
        )
        .status,
        401
    );
    // "op:correct-horse-battery-staple"
    let basic = "Basic b3A6Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5LXN0YXBsZQ==";
    let r = web.get("/agents", &[("Authorization", basic)]);
    assert_eq!(r.status, 200);
    assert!(r.header("content-security-policy").is_some());
}

/// Grafana's PostgreSQL macros, expanded as its SQL data source expands them, after the
/// dashboard variables (`$__interval`, `$experiment`) are replaced.
fn grafana_expand(
    sql: &str,
    vars: &[(&str, &str)],
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut s = sql.to_string();
    // Longest names first, so `$__interval` does not eat `$__interval_ms`.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    for (name, value) in vars {
        s = s.replace(&format!("${name}"), value);
    }
    let t = |d: chrono::DateTime<chrono::Utc>| {
        format!("'{}'", d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let secs = |interval: &str| -> f64 {
        let i = interval.trim().trim_matches('\'');
        let (n, unit) = i.split_at(i.find(|c: char| c.is_alphabetic()).unwrap());
        let n: f64 = n.parse().unwrap();
        n * match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            u => panic!("interval unit {u}"),
        }
    };
    let re = regex::Regex::new(r"\$__(\w+)\(([^)]*)\)").unwrap();
    re.replace_all(&s, |c: &regex::Captures| {
        let args: Vec<&str> = c[2].split(',').map(str::trim).collect();
        match &c[1] {
            "timeFilter" => format!("{} BETWEEN {} AND {}", args[0], t(from), t(to)),
            "timeFrom" => t(from),
            "timeTo" => t(to),
            "time" => format!("{} AS \"time\"", args[0]),
            "timeGroup" | "timeGroupAlias" => {
                let s = secs(args[1]);
                let g = format!("floor(extract(epoch from {})/{s})*{s}", args[0]);
                if &c[1] == "timeGroupAlias" {
                    format!("{g} AS \"time\"")
                } else {
                    g
                }
            }
            m => panic!("macro $__{m} not expanded by this test"),
        }
    })
    .into_owned()
}

/// Runs SQL with psql; the header and rows as CSV fields.
fn csv(url: &str, sql: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let out = std::process::Command::new("psql")
        .args([url, "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_string)
        .collect();
    // Good enough for these results: no field holds a comma except quoted text we only count.
    let rows = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (header, rows)
}

#[test]
fn grafana_dashboard_queries_run_as_reader_on_test_data() {
    let env = Env::new();
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{EXP}', 'grafana test')"
    ));
    let out = pipewatch(&["--database-url", &env.db, "migrate", "--test-data", EXP]);
    assert!(out.status.success(), "{:?}", text(&out));
    let url = reader_url(&env);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("pipewatch-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(std::fs::read_to_string(root.join("datasource.yaml"))
        .unwrap()
        .contains("uid: pipewatch"));
    let now = chrono::Utc::now();
    let (from, to) = (
        now - chrono::Duration::days(1),
        now + chrono::Duration::minutes(5),
    );
    let vars = [
        ("__interval", "5m"),
        ("__interval_ms", "300000"),
        ("experiment", EXP),
    ];
    let run = |sql: &str| csv(&url, &grafana_expand(sql, &vars, from, to));

    // The experiment variable lists the test experiment.
    let var = &dash["templating"]["list"][0];
    assert_eq!(var["name"], "experiment");
    let (h, rows) = run(var["query"].as_str().unwrap());
    assert_eq!(h, ["__text", "__value"]);
    assert!(rows.iter().any(|r| r[1] == EXP), "{rows:?}");

    let mut seen = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        let sql = p["targets"][0]["rawSql"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "pipewatch", "{title}");
        let (h, rows) = run(sql);
        assert!(!rows.is_empty(), "{title}: no rows");
        match p["type"].as_str().unwrap() {
            "table" => assert_eq!(
                h,
                [
                    "node",
                    "level",
                    "status",
                    "percent",
                    "items_done",
                    "items_total",
                    "updated_at"
                ],
                "{title}"
            ),
            "timeseries" => {
                assert_eq!(h[0], "time", "{title}: {h:?}");
                // A numeric time (epoch seconds) and a numeric value in the last column.
                for r in &rows {
                    assert!(r[0].parse::<f64>().is_ok(), "{title}: time {r:?}");
                    assert!(
                        r[r.len() - 1].parse::<f64>().is_ok(),
                        "{title}: value {r:?}"
                    );
                }
                if h.len() == 3 {
                    assert_eq!(h[1], "metric", "{title}");
                }
            }
            t => panic!("{title}: panel type {t} not checked"),
        }
        seen.push(title.to_string());
    }
    assert_eq!(
        seen,
        [
            "Progress",
            "CPU % per daemon",
            "RSS per daemon",
            "Records per second",
            "Errors per minute"
        ]
    );
    // Events as annotations: time, text, tags.
    let anno = &dash["annotations"]["list"][1];
    let (h, rows) = run(anno["target"]["rawSql"].as_str().unwrap());
    assert_eq!(h, ["time", "text", "tags"]);
    assert!(!rows.is_empty(), "no annotations");
}

/// Whatever a client puts in the path or the query, the answer is a page or a 400/404 naming
/// the problem: never a 500, never a dropped connection (a panicking handler).
#[test]
fn web_hostile_parameters_are_answered_400_or_404() {
    let env = Env::new();
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{EXP}', 'probe'); \
         INSERT INTO pipeline_logs (ts, level, message, experiment_id, node_id) \
             VALUES (now(), 'ERROR', 'boom', '{EXP}', 'n1'); \
         INSERT INTO pipeline_metrics (ts, experiment_id, host, daemon, cpu_percent) \
             VALUES (now() - interval '1 minute', '{EXP}', 'h', 'd', 1), (now(), '{EXP}', 'h', 'd', 2), \
                    (now(), '{EXP}', 'h', 'nan', 'NaN'), (now(), '{EXP}', 'h', 'inf', 'Infinity')"
    ));
    let url = reader_url(&env);
    let web = WebServer::start(&url, &[]);
    let probes: &[(&str, &[u16])] = &[
        ("/experiments/not-a-uuid", &[404]),
        ("/experiments/%00", &[404]),
        ("/experiments/%FF", &[400, 404]),
        ("/api/experiments/%E2%80%AE", &[404]),
        (&format!("/experiments/{EXP}?window=-1"), &[400]),
        (&format!("/experiments/{EXP}?window=%00"), &[400]),
        (
            &format!("/api/experiments/{EXP}/metrics?window=all"),
            &[200],
        ),
        (&format!("/experiments/{EXP}"), &[200]),
        (&format!("/experiments/{EXP}/charts?window=15m"), &[200]),
        ("/logs?experiment=%00", &[404]),
        (&format!("/logs?experiment={EXP}&limit=-1"), &[400]),
        (
            &format!("/logs?experiment={EXP}&limit=99999999999999999999"),
            &[400],
        ),
        (&format!("/logs?experiment={EXP}&level=nope"), &[400]),
        (&format!("/logs?experiment={EXP}&since=100000000y"), &[400]),
        (&format!("/logs?experiment={EXP}&since=9000y"), &[400]),
        (&format!("/api/logs?experiment={EXP}&since=300000y"), &[400]),
        (&format!("/logs?experiment={EXP}&search=%00"), &[400]),
        (&format!("/api/logs?experiment={EXP}&node=a%00b"), &[400]),
        (
            &format!("/logs?experiment={EXP}&before_ts=0000-01-01T00:00:00Z&before_id=1"),
            &[200, 400],
        ),
        (
            &format!("/logs?experiment={EXP}&before_ts=9999-12-31T23:59:59Z&before_id=1"),
            &[200, 400],
        ),
        (
            &format!("/logs?experiment={EXP}&before_ts=x&before_id=1"),
            &[400],
        ),
        (
            &format!("/logs?experiment={EXP}&after_id=-9223372036854775808"),
            &[200],
        ),
        (&format!("/logs?experiment={EXP}&search=%25_%5C"), &[200]),
        ("/api/logs", &[400]),
        ("/nope", &[404]),
    ];
    let mut bad = Vec::new();
    for (path, ok) in probes {
        let r = web.get(path, &[]);
        if !ok.contains(&r.status) {
            bad.push(format!("{path}: {} {}", r.status, r.body));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Still serving.
    assert_eq!(web.get("/", &[]).status, 200);
}

/// The database going away: pages answer with an error that says so (not a hang, not a
/// dropped connection), the server keeps running, and it serves again once the database is back.
#[test]
fn web_survives_a_database_outage() {
    let cluster = crate::support::pg::Cluster::start_new();
    let db = cluster.create_db();
    let env = Env::with_db(db.clone());
    let web = WebServer::start(&env.db, &[]);
    assert_eq!(web.get("/", &[]).status, 200);
    cluster.stop();
    for path in [
        "/",
        "/agents",
        "/api/experiments",
        &format!("/experiments/{EXP}"),
    ] {
        let started = std::time::Instant::now();
        let r = web.get(path, &[]);
        eprintln!("{path}: {} {:?} {}", r.status, started.elapsed(), r.body);
        assert!(
            matches!(r.status, 500 | 503),
            "{path}: {} {}",
            r.status,
            r.body
        );
        assert!(!r.body.is_empty(), "{path}: says why");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    cluster.start();
    assert!(
        wait_until(Duration::from_secs(20), || web.get("/", &[]).status == 200),
        "serves again after the outage"
    );
}

/// IPv6 loopback: served without a token, printed as a usable URL, and requests addressed
/// to `[::1]:port` or `localhost` pass the Host check while a foreign name does not.
#[test]
fn web_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let env = Env::new();
    let mut child =
        crate::support::pipewatch_cmd(&["--database-url", &env.db, "web", "--listen", "[::1]:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let get = |host: &str| crate::support::web::http_get(addr, "/", &[("Host", host)]).status;
    let port = addr.port();
    let statuses = [
        get(&format!("[::1]:{port}")),
        get(&format!("localhost:{port}")),
        get(&format!("evil.example:{port}")),
        get(&format!("[::1.evil.example]:{port}")),
    ];
    // SAFETY: our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    assert_eq!(statuses, [200, 200, 403, 403], "{line}");
}
