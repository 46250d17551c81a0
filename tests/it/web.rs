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
    append(&beta, &[progress("other", Some("root"), 10.0)]);
    let cfg = env.config(DAEMONS);
    let agent = env.spawn(&cfg);
    let logs_expected = CORPUS.len() as i64 + 3;
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
    // "op:correct-horse-battery-staple"
    let basic = "Basic b3A6Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5LXN0YXBsZQ==";
    let r = web.get("/agents", &[("Authorization", basic)]);
    assert_eq!(r.status, 200);
    assert!(r.header("content-security-policy").is_some());
}
