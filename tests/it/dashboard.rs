//! The dashboard in a real browser (issue #12): Debian's headless Chromium driven over
//! WebDriver by `chromedriver`, against the real service on loopback. Chromium's own
//! traffic to the outside (preconnects, component updates) goes to a loopback port that
//! is bound but not listening, so it is refused at once and never leaves the machine.
//!
//! `DASHBOARD_SCREENSHOTS=DIR cargo test dashboard` also saves each page at 1280×800 to
//! DIR (how `docs/screenshots/` is made).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use opsagent_audit::bench::workload::Workload;
use opsagent_audit::config::{Role, TokenConfig};
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall};
use serde_json::{json, Value};

use sha2::{Digest, Sha256};

use crate::common::{fast_config, free_port, spawn_app_with, TestApp, TestDb};

both_backends! {
    a_person_can_find_read_and_analyse_interactions,
}

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page may take to be ready; generous for a shared machine, never a
/// measurement.
const PAGE_WAIT: Duration = Duration::from_secs(20);

/// A headless Chromium session and the driver behind it, both stopped on drop.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    _blackhole: tokio::net::TcpSocket,
}

impl Browser {
    async fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: the browser tests need Debian's chromium and chromium-driver \
                 (`apt-get install chromium chromium-driver`; .ci/run installs them)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        // Bound, not listening: Chromium's proxy for everything but loopback.
        let blackhole = tokio::net::TcpSocket::new_v4().expect("socket");
        blackhole.bind("127.0.0.1:0".parse().unwrap()).expect("bind the black hole");
        let proxy = blackhole.local_addr().expect("black hole address");
        let profile = tempfile::tempdir().expect("profile dir");
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,800", "--no-first-run", "--no-default-browser-check",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    format!("--proxy-server=http://{proxy}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!("an object literal"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver on port {port} did not start a session: {e}"),
            }
        };
        Browser { client, driver, _profile: profile, _blackhole: blackhole }
    }

    /// Opens `url` and waits until the page says it is ready (or asks for a token).
    async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
        self.settle().await;
    }

    /// Waits for the current view to finish loading.
    async fn settle(&self) {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css("body[data-state=ready], body[data-state=login], body[data-state=error]"))
            .await
            .expect("the page became ready");
    }

    async fn state(&self) -> String {
        self.js("return document.body.dataset.state").await.as_str().unwrap_or_default().to_owned()
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.expect("run script")
    }

    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await.expect("find") {
            out.push(e.text().await.expect("text"));
        }
        out
    }

    async fn attrs(&self, css: &str, attr: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await.expect("find") {
            out.push(e.attr(attr).await.expect("attribute").unwrap_or_default());
        }
        out
    }

    /// Sets a filter field and applies the filter as a person would.
    async fn filter(&self, name: &str, value: &str) {
        let input = self.client.find(Locator::Css(&format!("form[data-filters] [name={name}]"))).await.expect("field");
        input.clear().await.expect("clear");
        input.send_keys(value).await.expect("type");
        let before = self.js("return location.hash").await;
        self.client.find(Locator::Css("form[data-filters] button[type=submit]")).await.unwrap().click().await.unwrap();
        self.wait_for_js("return location.hash !== arguments[0]", vec![before]).await;
        self.settle().await;
    }

    async fn wait_for_js(&self, script: &str, args: Vec<Value>) {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        loop {
            if self.client.execute(script, args.clone()).await.expect("run script") == Value::Bool(true) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "waited {PAGE_WAIT:?} for `{script}`");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves the page when `DASHBOARD_SCREENSHOTS` names a directory.
    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("DASHBOARD_SCREENSHOTS") {
            let png = self.client.screenshot().await.expect("screenshot");
            std::fs::create_dir_all(&dir).expect("screenshot dir");
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).expect("write screenshot");
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A question in Chinese whose tool calls and session the test follows.
const CHINESE_QUESTION: &str = "订单服务的数据库连接池耗尽了吗？";
/// Text that would run script if it ever reached the page as HTML.
const XSS_QUESTION: &str =
    "<script>window.__xss=1;document.title='pwned'</script><img src=x onerror=\"window.__xss=2\"> why?";

/// The standard workload, plus a two-turn session in Chinese and a hostile record.
async fn load(app: &TestApp) -> (Interaction, Interaction) {
    let mut workload = Workload::new(7);
    // Spread over the last day, so the charts have hours to draw.
    let now = chrono::Utc::now();
    let mut records: Vec<Interaction> = (0..30)
        .map(|i| {
            let mut r = workload.record(i);
            r.created_at = now - chrono::Duration::minutes(47 * i as i64 + 10);
            r
        })
        .collect();
    let session = uuid::Uuid::now_v7();
    let mut first = Interaction::new("订单服务最近有报错吗？");
    first.session_id = session;
    first.user_id = Some("li.wei".into());
    first.model_name = Some("qwen-max".into());
    first.created_at = chrono::Utc::now() - chrono::Duration::minutes(5);
    first.final_answer = Some("最近一小时有 **12** 次 `ConnectionTimeout`。".into());
    let mut chinese = Interaction::new(CHINESE_QUESTION);
    chinese.session_id = session;
    chinese.user_id = Some("li.wei".into());
    chinese.model_name = Some("qwen-max".into());
    chinese.cluster = Some("prod-cn".into());
    chinese.total_duration_ms = Some(4200);
    chinese.thoughts = vec![Thought::new("先看订单服务的 Pod"), Thought::new("再看数据库连接数")];
    for (i, (name, input, ms)) in [
        ("kubectl", "get pods -n orders", 300),
        ("kubectl", "logs deploy/orders -n orders --tail=50", 800),
        ("psql", "SELECT count(*) FROM pg_stat_activity", 120),
    ]
    .into_iter()
    .enumerate()
    {
        let mut call = ToolCall::new(name, input);
        call.duration_ms = Some(ms);
        call.tool_observation = Some(format!("output of step {}", i + 1));
        call.thought_sequence_number = Some(if i == 0 { 1 } else { 2 });
        chinese.tool_calls.push(call);
    }
    chinese.final_answer = Some("连接池已满：`max_connections` 为 100，当前 100。".into());
    let mut hostile = Interaction::new(XSS_QUESTION);
    hostile.model_name = Some("gpt-4o".into());
    hostile.status = Status::Error;
    hostile.error = Some("<img src=x onerror=\"window.__xss=3\">".into());
    hostile.final_answer =
        Some("[click me](javascript:window.__xss=4) <script>window.__xss=5</script> **bold**".into());
    let mut call = ToolCall::new("kubectl", "get pods");
    call.tool_observation = Some("<svg onload=\"window.__xss=6\"></svg>\n<a href=\"javascript:alert(1)\">x</a>".into());
    hostile.tool_calls.push(call);
    records.extend([first, chinese.clone(), hostile.clone()]);
    let count = records.len() as u64;
    for record in records {
        app.logger.log(record);
    }
    app.wait_for_count(count).await;
    (chinese, hostile)
}

async fn a_person_can_find_read_and_analyse_interactions(db: &TestDb) {
    let app = spawn_app_with(db, fast_config()).await;
    let (chinese, hostile) = load(&app).await;
    let browser = Browser::start().await;

    // The list, newest first, every record on the first page.
    browser.open(&app.url("/")).await;
    assert_eq!(browser.state().await, "ready");
    assert_eq!(browser.texts("table[data-list] tbody tr").await.len(), 33);
    browser.screenshot("interactions").await;

    // Filter by model: the filter lands in the URL and every row has that model.
    browser.filter("model_name", "qwen-max").await;
    let hash = browser.js("return location.hash").await;
    assert!(hash.as_str().unwrap().contains("model_name=qwen-max"), "{hash}");
    let models = browser.texts("table[data-list] tbody tr td:nth-child(4)").await;
    assert!(!models.is_empty() && models.iter().all(|m| m == "qwen-max"), "{models:?}");

    // Filter by a Chinese word (full text), from a fresh form.
    browser.open(&app.url("/#/")).await;
    browser.filter("q", "数据库").await;
    let ids = browser.attrs("table[data-list] tbody tr", "data-id").await;
    assert_eq!(ids, [chinese.interaction_id.to_string()]);

    // Open it: the tool calls in order, each after its thought; the waterfall.
    browser.client.find(Locator::Css("table[data-list] tbody tr td.question a")).await.unwrap().click().await.unwrap();
    browser.wait_for_js("return document.body.dataset.view === 'detail'", vec![]).await;
    browser.settle().await;
    let order = browser.attrs("ol[data-timeline] li.step", "class").await;
    assert_eq!(
        order.iter().map(|c| c.trim_start_matches("step ").split(' ').next().unwrap()).collect::<Vec<_>>(),
        ["question", "thought", "tool", "thought", "tool", "tool", "answer"]
    );
    assert_eq!(browser.attrs("[data-tool-seq]", "data-tool-seq").await, ["1", "2", "3"]);
    assert_eq!(browser.attrs("[data-tool-seq]", "data-tool-name").await, ["kubectl", "kubectl", "psql"]);
    assert_eq!(browser.texts("[data-waterfall] .bar-row").await.len(), 3);
    let answer = browser.texts("[data-markdown] code").await;
    assert_eq!(answer, ["max_connections"], "the answer's Markdown is rendered");
    browser.screenshot("interaction").await;

    // Its session: both questions, in the order they were asked.
    browser.client.find(Locator::Css("[data-session-link]")).await.unwrap().click().await.unwrap();
    browser.wait_for_js("return document.body.dataset.view === 'session'", vec![]).await;
    browser.settle().await;
    let turns = browser.texts("li.turn .ask p").await;
    assert_eq!(turns, ["订单服务最近有报错吗？", CHINESE_QUESTION]);
    browser.screenshot("session").await;

    // Analysis: the charts are drawn (uPlot canvases) and the top lists filled.
    browser.open(&app.url("/#/analysis?range=24h")).await;
    assert_eq!(browser.state().await, "ready", "{:?}", browser.texts("main").await);
    browser
        .wait_for_js(
            "return ['volume','error_rate','p95'].every(n => { const f = document.querySelector(`[data-chart=${n}]`); \
             return f && f.dataset.drawn === 'true' && f.querySelector('canvas') !== null; })",
            vec![],
        )
        .await;
    assert!(!browser.texts("[data-top=most_used_tools] tr").await.is_empty());
    assert!(!browser.texts("[data-top=busiest_users] tr").await.is_empty());
    browser.screenshot("analysis").await;

    // The hostile record renders as text and runs nothing.
    browser.open(&app.url(&format!("/#/i/{}", hostile.interaction_id))).await;
    assert_eq!(browser.state().await, "ready");
    assert_eq!(browser.js("return typeof window.__xss").await, "undefined");
    assert_eq!(browser.js("return document.title").await, "opsagent-audit · interaction");
    let heading = browser.texts(".detail h1").await;
    assert_eq!(heading, [XSS_QUESTION], "shown as the text it is");
    let links = browser.attrs("[data-markdown] a", "href").await;
    assert!(links.is_empty(), "a javascript: link is not made a link: {links:?}");
    assert_eq!(browser.js("return document.querySelectorAll('main script, main img, main svg').length").await, 0);
    browser.open(&app.url("/#/?status=error")).await;
    assert_eq!(browser.js("return typeof window.__xss").await, "undefined");
    browser.close().await;
    app.stop().await;
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_dashboard_asks_for_one_and_names_the_role() {
    let db = TestDb::sqlite();
    let mut config = fast_config();
    let token = |name: &str, role: Role, secret: &str| TokenConfig {
        name: name.into(),
        role,
        token_env: None,
        token_sha256: Some(digest(secret)),
    };
    config.auth.tokens =
        vec![token("agent", Role::Ingest, "ingest-secret-1"), token("auditor", Role::Read, "read-secret-1")];
    let app = spawn_app_with(&db, config).await;
    let browser = Browser::start().await;

    // No token: asked for one.
    browser.open(&app.url("/")).await;
    assert_eq!(browser.state().await, "login");
    browser.screenshot("sign-in").await;

    // A token of the wrong role: told which role is needed.
    let sign_in = |secret: &'static str| async {
        let field = browser.client.find(Locator::Css("form[data-login] input[name=token]")).await.unwrap();
        field.send_keys(secret).await.unwrap();
        browser.client.find(Locator::Css("form[data-login] button")).await.unwrap().click().await.unwrap();
        browser.wait_for_js("return document.body.dataset.state !== 'login'", vec![]).await;
        browser.settle().await;
    };
    sign_in("ingest-secret-1").await;
    assert_eq!(browser.state().await, "error");
    let message = browser.texts("[data-error=forbidden]").await.join(" ");
    assert!(message.contains("read"), "names the role needed: {message}");

    // The right one: the list; dead letters need admin, and the page says so.
    browser.open(&app.url("/#/login")).await;
    sign_in("read-secret-1").await;
    assert_eq!(browser.state().await, "ready");
    assert_eq!(browser.js("return document.body.dataset.view").await, "list");
    browser.open(&app.url("/#/dead-letters")).await;
    assert_eq!(browser.state().await, "error");
    assert!(browser.texts("[data-error=forbidden]").await.join(" ").contains("admin"));
    // The token lives in this tab's session storage, nowhere the server would log it.
    assert_eq!(browser.js("return sessionStorage.getItem('opsagent-audit.token')").await, "read-secret-1");
    assert_eq!(browser.js("return document.cookie").await, "");
    browser.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_carry_a_strict_content_security_policy() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, fast_config()).await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let script = app.client.get(app.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    let etag = script.headers()["etag"].clone();
    let again = app.client.get(app.url("/assets/app.js")).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(app.client.get(app.url("/assets/../Cargo.toml")).send().await.unwrap().status(), 404);
    assert_eq!(app.client.get(app.url("/assets/nothing.js")).send().await.unwrap().status(), 404);
    app.stop().await;
}

/// Time from navigation to a rendered page, in milliseconds, read in the browser: assets
/// fetched, script run, the API answered, the page built.
async fn time_to_ready(browser: &Browser, url: &str) -> f64 {
    // A blank page first, so every measurement is a fresh load and not a hash change.
    browser.client.goto("about:blank").await.expect("blank");
    browser.open(url).await;
    assert_eq!(browser.state().await, "ready", "{:?}", browser.texts("main").await);
    browser.js("return performance.now()").await.as_f64().expect("a number")
}

/// The list's first page and a detail page against a large database (the issue asks
/// for 1M interactions on PostgreSQL). A benchmark, not a test: it prints timings.
///
/// ```text
/// opsagent-audit bench query --database-url postgres://…/audit_1m --records 1000000
/// AUDIT_DASHBOARD_BENCH_URL=postgres://…/audit_1m \
///     cargo test --release --test it dashboard_timings -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark over a loaded database: set AUDIT_DASHBOARD_BENCH_URL"]
async fn dashboard_timings_at_scale() {
    let url = std::env::var("AUDIT_DASHBOARD_BENCH_URL")
        .expect("AUDIT_DASHBOARD_BENCH_URL: a database loaded by `bench query --records 1000000`");
    let mut config = fast_config();
    config.database.url = Some(url);
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.spool.enabled = false;
    let app = opsagent_audit::api::Application::build(config, false).await.expect("build");
    let address = format!("http://{}", app.local_addr());
    let store = app.store();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    let count = store.count_interactions().await.expect("count");
    let browser = Browser::start().await;
    let mut list = Vec::new();
    let mut detail = Vec::new();
    for _ in 0..10 {
        list.push(time_to_ready(&browser, &format!("{address}/")).await);
        let id = browser.attrs("table[data-list] tbody tr", "data-id").await.remove(3);
        detail.push(time_to_ready(&browser, &format!("{address}/#/i/{id}")).await);
    }
    let summary = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        format!("p50={:.0}ms max={:.0}ms", v[v.len() / 2], v[v.len() - 1])
    };
    println!("interactions={count} list_first_page {} detail {}", summary(list), summary(detail));
    browser.close().await;
    stop.cancel();
    let _ = server.await;
}
