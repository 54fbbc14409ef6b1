//! The web console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (the system's `chromedriver`, through `fantoccini`) against `hatchery up`.
//!
//! The playground: the one-click sign-in, code typed into the editor and run with
//! Ctrl+Enter, output streaming while it runs, the progress bar advancing, a data frame
//! shown as a table, a plot shown inline, a re-run in the same tab cancelling the tab's
//! previous run, two tabs running side by side, the history after a reload, a stream
//! resumed after its connection is cut, and sandbox output shown as text, never markup.
//! The monitor: a superadmin sees a running sandbox's CPU climb, cancels it, and edits a
//! user's policy (a bad value refused inline, a good one applied to the user's next run);
//! an org admin signing in with a pasted token sees the host but not another org's
//! sandbox; a bad token is refused with the API's reason. Every test ends by reading the
//! browser's console log: no JavaScript error may appear.
//!
//! Screenshots of the main screens are written to `target/console-screenshots/`.
//!
//! Needs what the end-to-end suite needs, plus `chromium` and `chromium-driver`
//! (installed by scripts/setup-deps.sh); where they are missing the tests are recorded
//! as skipped, or fail under `HATCHERY_REQUIRE_ENGINES`.

mod harness;
use harness::*;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// Longest wait for something to show in the page.
const PAGE_PATIENCE: Duration = Duration::from_secs(90);

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver of this test's own (killed with its browsers on drop).
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(test: &str) -> Option<Driver> {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            if !std::path::Path::new(bin).exists() {
                hatchery_tests::skip(
                    test,
                    &format!("{bin} is not installed (apt-get install chromium chromium-driver)"),
                    "HATCHERY_REQUIRE_ENGINES",
                );
                return None;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        use std::os::unix::process::CommandExt;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: drop kills chromedriver and every browser it started.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Driver { child, url })
    }

    /// A new headless browser session with its own profile (storage, cookies).
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1400,1150",
                    "--no-first-run", "--disable-extensions",
                ],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group this test started (chromedriver and its
        // browsers); the group id is the child's pid.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// chromedriver's log endpoint (not in the W3C protocol): the browser console's entries
/// since the last read.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(r#"{"type":"browser"}"#.to_string()),
        )
    }
}

/// Asserts that the browser logged no error, except network failures whose message
/// contains one of `expected` (a 422 the test provoked, say).
async fn no_console_errors(c: &Client, expected: &[&str]) {
    let log = c.issue_cmd(BrowserLog).await.expect("the browser's log");
    let errors: Vec<&Value> = log
        .as_array()
        .map(|a| a.iter().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter(|e| {
            let msg = e["message"].as_str().unwrap_or("");
            !(e["source"] == "network" && expected.iter().any(|x| msg.contains(x)))
        })
        .collect();
    assert!(
        errors.is_empty(),
        "errors in the browser console: {errors:#?}"
    );
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(name), png).unwrap();
}

/// Evaluates `expr` (a JavaScript expression) in the page.
async fn js(c: &Client, expr: &str) -> Value {
    c.execute(&format!("return ({expr});"), vec![])
        .await
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
}

/// Polls `expr` until it is truthy; returns its value.
async fn until(c: &Client, expr: &str, what: &str) -> Value {
    let deadline = Instant::now() + PAGE_PATIENCE;
    loop {
        let v = js(c, expr).await;
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let body = js(c, "document.body.innerText").await;
            panic!("the page never showed {what} ({expr}); the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Replaces what policy field `field` holds with `text`, and saves the policy.
async fn set_policy_field(c: &Client, field: &str, text: &str) {
    let input = c
        .find(Locator::Css(&format!("#policy-{field}")))
        .await
        .unwrap();
    input.clear().await.unwrap();
    input.send_keys(text).await.unwrap();
    click(c, "#policy-save").await;
}

/// The API's error, shown under policy field `field`.
async fn policy_field_error(c: &Client, field: &str) -> String {
    let error = until(
        c,
        &format!(
            "(e => e && e.textContent)(document.querySelector('#policy-{field} + .field-error'))"
        ),
        &format!("the API's error under {field}"),
    )
    .await;
    error.as_str().unwrap_or_default().to_string()
}

/// Waits for the policy saved, the effective policy shown including `shown`.
async fn policy_saved(c: &Client, shown: &str) {
    until(
        c,
        &format!(
            "document.getElementById('policy-status').textContent.startsWith('Saved') && \
             document.getElementById('policy-effective').textContent.includes({shown:?})"
        ),
        &format!("the saved policy ({shown})"),
    )
    .await;
}

/// WebDriver key codes.
const CONTROL: char = '\u{E009}';
const ENTER: char = '\u{E007}';
const RELEASE: char = '\u{E000}';

/// Replaces the editor's text with `code` (typed, as a user would) and runs it with
/// Ctrl+Enter; returns the new execution's id.
async fn run_code(c: &Client, code: &str) -> String {
    assert!(!code.contains('\n'), "type one line: Enter would indent");
    let before = js(c, "document.getElementById('run-id').textContent").await;
    let editor = c
        .find(Locator::Css(".cm-content"))
        .await
        .expect("the editor");
    editor.click().await.unwrap();
    editor
        .send_keys(&format!("{CONTROL}a{RELEASE}"))
        .await
        .unwrap();
    editor.send_keys(code).await.unwrap();
    // Auto-closed brackets and quotes are typed over, so the text is exactly `code`.
    let typed = js(c, "document.querySelector('.cm-content').innerText").await;
    assert_eq!(typed.as_str().unwrap().trim_end(), code);
    editor
        .send_keys(&format!("{CONTROL}{ENTER}{RELEASE}"))
        .await
        .unwrap();
    let id = until(
        c,
        &format!(
            "(t => t && t !== {before} ? t : null)(document.getElementById('run-id').textContent)"
        ),
        "the new run's id",
    )
    .await;
    id.as_str().unwrap().to_string()
}

async fn open_console(c: &Client, h: &Hatchery) {
    c.goto(&format!("http://{}/", h.addr)).await.unwrap();
}

/// Opens the console at `url`, waits for the one-click sign-in and clicks `button`
/// (`#sign-in-user` or `#sign-in-admin`), with a screenshot of the sign-in first when
/// `shot` names one.
async fn one_click_sign_in(c: &Client, url: &str, button: &str, shot: Option<&str>) {
    c.goto(url).await.unwrap();
    until(
        c,
        "!document.getElementById('local-sign-in').hidden",
        "the one-click sign-in",
    )
    .await;
    if let Some(name) = shot {
        screenshot(c, name).await;
    }
    click(c, button).await;
}

/// What the playground's first run prints.
const PRINTED: &str = "line 1 \nline 2 \nline 3 \nline 4 \n  a b\n1 1 x\n2 2 y\n3 3 z\n";

/// The playground end to end, as the demo user of `hatchery up`'s one-click sign-in.
#[test]
fn the_playground_runs_code_live_with_progress_plots_tabs_and_history() {
    let Some(driver) = Driver::start("console::playground") else {
        return;
    };
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let api_token = h.token("demo", "demo", "user");
        let c = driver.browser().await;

        // Sign in with one click.
        let url = format!("http://{}/", h.addr);
        one_click_sign_in(&c, &url, "#sign-in-user", Some("sign-in.png")).await;
        until(
            &c,
            "!document.getElementById('view-playground').hidden && document.querySelector('.cm-content')",
            "the playground",
        )
        .await;
        let who = js(&c, "document.getElementById('whoami').textContent").await;
        assert!(who.as_str().unwrap().contains("demo"), "{who}");
        assert_eq!(
            js(&c, "document.getElementById('nav-monitor').hidden").await,
            true,
            "a user has no monitor"
        );

        // A newcomer's first click: the example the editor starts with runs as it is.
        click(&c, "#run").await;
        until(
            &c,
            "document.getElementById('run-state').textContent === 'succeeded' && \
             (img => img && img.complete && img.naturalWidth === 800)(document.querySelector('.artifact img')) && \
             document.querySelectorAll('#result-value table tr').length === 7",
            "the example's result: a table of head(cars) and its plot",
        )
        .await;
        screenshot(&c, "example.png").await;

        // Output streams while it runs, the progress bar advances, a data frame comes
        // back as a table and the plot inline.
        let code = "for (i in 1:4) { progress(i / 4, paste(\"step\", i)); cat(\"line\", i, \"\\n\"); Sys.sleep(0.7) }; plot(1:10, main = \"ten\"); write.csv(head(cars, 2), \"/work/out/cars.csv\", row.names = FALSE); data.frame(a = 1:3, b = c(\"x\", \"y\", \"z\"))";
        let first = run_code(&c, code).await;
        // While it runs: a progress fraction below 1 and the first line already shown.
        let during = until(
            &c,
            "(() => { const f = document.getElementById('progress-fill').dataset.fraction; \
              const s = document.getElementById('run-state').textContent; \
              return f && Number(f) < 1 && s === 'running' ? \
                { f: Number(f), out: document.getElementById('output').textContent, \
                  text: document.getElementById('progress-text').textContent } : null })()",
            "progress below 100% while running",
        )
        .await;
        assert!(
            during["out"].as_str().unwrap().contains("line 1"),
            "output is streamed while the code runs: {during}"
        );
        assert!(
            during["text"].as_str().unwrap().contains("step"),
            "{during}"
        );
        let mut seen = vec![during["f"].as_f64().unwrap()];
        until(
            &c,
            "document.getElementById('run-state').textContent === 'succeeded'",
            "the run succeeded",
        )
        .await;
        seen.push(
            js(
                &c,
                "Number(document.getElementById('progress-fill').dataset.fraction)",
            )
            .await
            .as_f64()
            .unwrap(),
        );
        assert!(
            seen[0] < seen[1] && seen[1] == 1.0,
            "the progress bar advanced: {seen:?}"
        );
        // The lines, then the value printed as R's console prints it.
        let out = js(&c, "document.getElementById('output').textContent").await;
        assert_eq!(out.as_str().unwrap(), PRINTED);
        let table = js(
            &c,
            "Array.from(document.querySelectorAll('#result-value table tr')).map(r => Array.from(r.children).map(td => td.textContent))",
        )
        .await;
        assert_eq!(
            table,
            json!([["a", "b"], ["1", "x"], ["2", "y"], ["3", "z"]])
        );
        // The plot: a real 800 x 600 PNG decoded by the browser.
        let width = until(
            &c,
            "(img => img && img.complete && img.naturalWidth)(document.querySelector('.artifact[data-name=\"plot-001.png\"] img'))",
            "the plot",
        )
        .await;
        assert_eq!(width, 800);
        // A file left in /work/out: plain data is previewed as text, with a download.
        let csv = until(
            &c,
            "(p => p && p.textContent)(document.querySelector('.artifact[data-name=\"cars.csv\"] pre'))",
            "the CSV file's preview",
        )
        .await;
        assert_eq!(csv, "\"speed\",\"dist\"\n4,2\n4,10\n");
        assert_eq!(
            js(
                &c,
                "document.querySelectorAll('.artifact[data-name=\"cars.csv\"] button').length"
            )
            .await,
            1
        );
        let timeline = js(&c, "document.getElementById('timeline').textContent").await;
        let timeline = timeline.as_str().unwrap();
        assert!(
            timeline.contains("queued")
                && timeline.contains("start latency")
                && timeline.contains("finished"),
            "{timeline}"
        );
        screenshot(&c, "playground.png").await;

        // A re-run in the same tab cancels the tab's previous run, and the page says so.
        let slow = run_code(&c, "Sys.sleep(60)").await;
        until(
            &c,
            "document.getElementById('run-state').textContent === 'running'",
            "the slow run running",
        )
        .await;
        let quick = run_code(&c, "cat(\"replaced\")").await;
        assert_ne!(slow, quick);
        until(
            &c,
            &format!(
                "(li => li && li.dataset.state === 'cancelled')(document.querySelector('#history li[data-id=\"{slow}\"]'))"
            ),
            "the previous run cancelled in the history",
        )
        .await;
        until(
            &c,
            "(p => !p.hidden && p.textContent.includes('was cancelled'))(document.getElementById('superseded'))",
            "the notice that the previous run was cancelled",
        )
        .await;
        let v = execution(&h, &api_token, &slow).await;
        assert_eq!(state(&v), "cancelled", "{v}");
        assert_eq!(v["result"]["error_code"], "superseded_by_tab", "{v}");
        until(
            &c,
            "document.getElementById('output').textContent === 'replaced'",
            "the new run's output",
        )
        .await;

        // Limits above the user's policy are refused, and the page says why.
        click(&c, "details.limits summary").await;
        c.find(Locator::Css("#limit-memory"))
            .await
            .unwrap()
            .send_keys("999999")
            .await
            .unwrap();
        click(&c, "#run").await;
        let refusal = until(
            &c,
            "(b => !b.hidden && b.textContent)(document.getElementById('banner'))",
            "the refusal of limits above the policy",
        )
        .await;
        assert!(
            refusal.as_str().unwrap().contains("invalid_limits"),
            "{refusal}"
        );
        c.find(Locator::Css("#limit-memory"))
            .await
            .unwrap()
            .clear()
            .await
            .unwrap();
        click(&c, "#banner-close").await;

        // Two tabs of one browser run side by side: each its own tab_id, neither cancels
        // the other.
        let tab_one = c.window().await.unwrap();
        let tab_one_id = js(&c, "document.getElementById('tab-id').textContent").await;
        let second = c.new_window(true).await.unwrap();
        c.switch_to_window(second.handle.clone()).await.unwrap();
        open_console(&c, &h).await;
        until(
            &c,
            "!document.getElementById('view-playground').hidden && document.querySelector('.cm-content')",
            "the playground in a second tab (still signed in)",
        )
        .await;
        let tab_two_id = js(&c, "document.getElementById('tab-id').textContent").await;
        assert_ne!(tab_one_id, tab_two_id);
        let in_two = run_code(&c, "Sys.sleep(2); \"tab two\"").await;
        c.switch_to_window(tab_one.clone()).await.unwrap();
        let in_one = run_code(&c, "Sys.sleep(2); \"tab one\"").await;
        let a = wait_terminal(&h, &api_token, &in_one).await;
        let b = wait_terminal(&h, &api_token, &in_two).await;
        for (v, want) in [(&a, "\"tab one\""), (&b, "\"tab two\"")] {
            assert_eq!(state(v), "succeeded", "{v}");
            assert_eq!(v["result"]["value_json"], want);
        }
        assert_ne!(a["tab_id"], b["tab_id"]);
        let (sa, fa) = (
            a["started_at"].as_u64().unwrap(),
            a["finished_at"].as_u64().unwrap(),
        );
        let (sb, fb) = (
            b["started_at"].as_u64().unwrap(),
            b["finished_at"].as_u64().unwrap(),
        );
        assert!(sa < fb && sb < fa, "the two tabs' runs overlapped");
        c.switch_to_window(second.handle).await.unwrap();
        c.close_window().await.unwrap();
        c.switch_to_window(tab_one).await.unwrap();

        // After a reload: the history with every run and its state, the tab's last run
        // shown again, and an old run's result and plot one click away.
        c.refresh().await.unwrap();
        until(
            &c,
            &format!(
                "document.querySelectorAll('#history li').length >= 6 && \
                 document.getElementById('run-id').textContent === '{in_one}' && \
                 document.getElementById('run-state').textContent === 'succeeded'"
            ),
            "the history and the tab's last run after a reload",
        )
        .await;
        let states = js(
            &c,
            "Object.fromEntries(Array.from(document.querySelectorAll('#history li')).map(li => [li.dataset.id, li.dataset.state]))",
        )
        .await;
        for (id, want) in [
            (&first, "succeeded"),
            (&slow, "cancelled"),
            (&quick, "succeeded"),
            (&in_one, "succeeded"),
            (&in_two, "succeeded"),
        ] {
            assert_eq!(states[id.as_str()], want, "{id} in {states}");
        }
        click(&c, &format!("#history li[data-id=\"{first}\"]")).await;
        until(
            &c,
            "document.querySelectorAll('#result-value table tr').length === 4 && \
             (img => img && img.complete && img.naturalWidth === 800)(document.querySelector('.artifact img'))",
            "the first run's table and plot from the history",
        )
        .await;
        let out = js(&c, "document.getElementById('output').textContent").await;
        assert_eq!(out.as_str().unwrap(), PRINTED);
        screenshot(&c, "history.png").await;

        no_console_errors(&c, &["422"]).await;
        c.close().await.unwrap();
    });
}

/// The monitor, as the superadmin of `hatchery up`'s one-click sign-in: a user's
/// CPU-bound run appears with its CPU climbing, is cancelled from the page; a user policy
/// edit refuses a bad value inline and applies a good one to the user's next run.
#[test]
fn the_monitor_shows_live_cpu_cancels_and_edits_policies() {
    let Some(driver) = Driver::start("console::monitor") else {
        return;
    };
    e2e(async {
        // One static host group, which the host joins.
        let h = Hatchery::started(Setup {
            group: Some("std".into()),
            ..Setup::default()
        })
        .await;
        let user = h.token("demo", "demo", "user");
        let c = driver.browser().await;
        one_click_sign_in(&c, &format!("http://{}/", h.addr), "#sign-in-admin", None).await;
        until(
            &c,
            "!document.getElementById('nav-monitor').hidden",
            "the monitor link",
        )
        .await;
        click(&c, "#nav-monitor").await;
        until(
            &c,
            "!document.getElementById('view-monitor').hidden && document.querySelector('#hosts tr[data-agent=\"e2e\"]')",
            "the host in the monitor",
        )
        .await;
        // The host's machine and what it has for executions are shown; a superadmin
        // cordons it and resumes it from here (it acts at its next heartbeat).
        let host = "#hosts tr[data-agent=\"e2e\"]";
        let machine = until(
            &c,
            &format!("(r => r && r.querySelector('td.machine').textContent.startsWith('CPU ') ? r.querySelector('td.machine').textContent : null)(document.querySelector('{host}'))"),
            "the host's machine figures",
        )
        .await;
        assert!(machine.as_str().unwrap().contains("memory"), "{machine}");
        // The button found now is the one pressed after the page has refreshed the
        // host at least once: rows are updated in place, so a press is never lost.
        let cordon = c
            .find(Locator::Css(&format!("{host} button.host-cordoned")))
            .await
            .expect("the cordon button");
        // The page re-renders every second and at each heartbeat.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        cordon
            .click()
            .await
            .expect("the cordon button, still on the page after a refresh");
        until(
            &c,
            &format!("document.querySelector('{host}[data-state=\"cordoned\"] button.host-ready')"),
            "the host cordoned, with a resume button",
        )
        .await;
        assert_eq!(
            js(
                &c,
                &format!("document.querySelector('{host} button.host-cordoned').hidden")
            )
            .await,
            Value::Bool(true),
            "a cordoned host offers no second cordon"
        );
        click(&c, &format!("{host} button.host-ready")).await;
        until(
            &c,
            &format!("document.querySelector('{host}[data-state=\"ready\"]')"),
            "the host ready again",
        )
        .await;

        // A user's CPU-bound run: its row appears and its CPU climbs.
        let busy = run_r(&h, &user, "x <- 0; repeat { x <- x + 1 }").await;
        wait_running(&h, &user, &busy).await;
        let row = format!("#sandboxes tr[data-id=\"{busy}\"]");
        let cpu = until(
            &c,
            &format!("(r => r && Number(r.querySelector('td.cpu').dataset.cpu) > 0.3 ? Number(r.querySelector('td.cpu').dataset.cpu) : null)(document.querySelector('{row}'))"),
            "the sandbox's CPU above 30%",
        )
        .await;
        assert!(cpu.as_f64().unwrap() <= 1.5, "{cpu}");
        let cells = js(
            &c,
            &format!(
                "Array.from(document.querySelector('{row}').children).map(td => td.textContent)"
            ),
        )
        .await;
        assert_eq!(cells[1], "demo");
        assert_eq!(cells[2], "demo");
        assert_eq!(cells[3], "e2e");
        assert_eq!(cells[4], "running");
        // The sparkline: a point per report, at least five seconds of them.
        until(
            &c,
            &format!(
                "(p => p && p.getAttribute('points').split(' ').length >= 5)(document.querySelector('{row} svg.spark polyline'))"
            ),
            "the CPU sparkline",
        )
        .await;
        // The group: its host, what runs, and the room kept for the active user (the
        // default 2 warm runs at 512 MiB and 1 CPU each).
        let group = "#groups tr[data-group=\"std\"]";
        let kept = until(
            &c,
            &format!("(r => r && r.querySelector('td.reserved').textContent.includes('demo/demo') ? r.textContent : null)(document.querySelector('{group}'))"),
            "the group with the room kept for the active user",
        )
        .await;
        let kept = kept.as_str().unwrap();
        assert!(kept.contains("1 (1 ready)"), "{kept}");
        assert!(
            kept.contains("2 runs (1.00 GiB, 2 cpus) for demo/demo"),
            "{kept}"
        );
        screenshot(&c, "monitor.png").await;

        // An org admin signs in with a pasted token and sees only its org: the host, but
        // not the demo org's sandbox.
        let other = driver.browser().await;
        open_console(&other, &h).await;
        until(
            &other,
            "!document.getElementById('view-signin').hidden",
            "the sign-in",
        )
        .await;
        other
            .find(Locator::Css("#token-input"))
            .await
            .unwrap()
            .send_keys(&h.token("acme", "olga", "org_admin"))
            .await
            .unwrap();
        click(&other, "#sign-in").await;
        until(
            &other,
            "!document.getElementById('nav-monitor').hidden",
            "the monitor link for an org admin",
        )
        .await;
        click(&other, "#nav-monitor").await;
        until(
            &other,
            "document.querySelector('#hosts tr[data-agent=\"e2e\"]') && \
             !document.getElementById('sandboxes-empty').hidden",
            "the host, and no sandbox of another org",
        )
        .await;
        assert_eq!(
            js(&other, "document.getElementById('groups-box').hidden").await,
            Value::Bool(true),
            "the groups are a superadmin's"
        );
        assert_eq!(
            js(
                &other,
                "document.querySelectorAll('#sandboxes tbody tr').length"
            )
            .await,
            0
        );
        // A token that is not one is refused with the API's reason.
        click(&other, "#sign-out").await;
        other
            .find(Locator::Css("#token-input"))
            .await
            .unwrap()
            .send_keys("not-a-token")
            .await
            .unwrap();
        click(&other, "#sign-in").await;
        let refused = until(
            &other,
            "(e => !e.hidden && e.textContent)(document.getElementById('signin-error'))",
            "the refusal",
        )
        .await;
        assert!(
            refused.as_str().unwrap().contains("unauthorized"),
            "{refused}"
        );
        no_console_errors(&other, &["401"]).await;
        other.close().await.unwrap();

        click(&c, &format!("{row} button.cancel")).await;
        let v = wait_terminal(&h, &user, &busy).await;
        assert_eq!(state(&v), "cancelled", "{v}");
        assert_eq!(v["result"]["error_code"], "cancelled", "{v}");
        until(
            &c,
            &format!("!document.querySelector('{row}')"),
            "the cancelled run gone from the table",
        )
        .await;

        // The policy editor: the demo user's time limit.
        click(&c, "input[name=scope][value=user]").await;
        let org = c.find(Locator::Css("#policy-org")).await.unwrap();
        org.clear().await.unwrap();
        org.send_keys("demo").await.unwrap();
        c.find(Locator::Css("#policy-user"))
            .await
            .unwrap()
            .send_keys("demo")
            .await
            .unwrap();
        click(&c, "#policy-load").await;
        until(
            &c,
            "document.getElementById('policy-time_limit_ms')",
            "the policy fields",
        )
        .await;
        set_policy_field(&c, "time_limit_ms", "-5").await;
        let error = policy_field_error(&c, "time_limit_ms").await;
        assert!(error.contains("must not be negative"), "{error}");
        let unchanged = get(
            &h,
            "/v1/admin/orgs/demo/users/demo/policy",
            &h.token("hatchery", "admin", "superadmin"),
        )
        .await
        .json();
        assert!(
            unchanged["policy"]["time_limit_ms"].is_null(),
            "{unchanged}"
        );
        set_policy_field(&c, "time_limit_ms", "1500").await;
        policy_saved(&c, "time_limit_ms 1500").await;
        // The groups the user may use: one that does not exist is refused under the
        // field; the group that does is saved.
        set_policy_field(&c, "groups", "std, gpu").await;
        let error = policy_field_error(&c, "groups").await;
        assert!(error.contains("gpu is not a host group"), "{error}");
        set_policy_field(&c, "groups", "std").await;
        policy_saved(&c, "groups std").await;
        screenshot(&c, "policy.png").await;
        // The user's next run gets it.
        let next = run_r(&h, &user, "Sys.sleep(20)").await;
        let v = wait_terminal(&h, &user, &next).await;
        assert_eq!(state(&v), "timed_out", "{v}");
        assert_eq!(v["limits"]["time_limit_ms"], 1500, "{v}");
        assert_eq!(v["groups"], json!(["std"]), "{v}");

        no_console_errors(&c, &["422"]).await;
        c.close().await.unwrap();
    });
}

/// A TCP relay between the browser and the platform whose connections the test can cut
/// (as a lost Wi-Fi or a restarted load balancer would), while the platform runs on.
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let mut cuts = cuts.clone();
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        // Dropping both sockets resets the connection mid-stream.
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    /// Drops every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A run's stream survives lost connections: the page says it is reconnecting, resumes
/// with `after=<last seq>`, and ends with every line once, in order.
#[test]
fn the_playground_resumes_its_stream_after_the_connection_drops() {
    let Some(driver) = Driver::start("console::reconnect") else {
        return;
    };
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let relay = Relay::start(h.addr).await;
        let c = driver.browser().await;
        one_click_sign_in(
            &c,
            &format!("http://{}/", relay.addr),
            "#sign-in-user",
            None,
        )
        .await;
        until(
            &c,
            "document.querySelector('.cm-content')",
            "the playground",
        )
        .await;
        run_code(
            &c,
            "for (i in 1:10) { cat(\"tick\", i, \"\\n\"); Sys.sleep(0.4) }",
        )
        .await;
        for after in ["tick 2", "tick 5"] {
            until(
                &c,
                &format!("document.getElementById('output').textContent.includes('{after}')"),
                after,
            )
            .await;
            relay.cut();
            until(
                &c,
                "document.getElementById('connection').textContent.includes('reconnecting')",
                "the page saying it reconnects",
            )
            .await;
        }
        until(
            &c,
            "document.getElementById('run-state').textContent === 'succeeded'",
            "the run finished after the reconnections",
        )
        .await;
        let out = js(&c, "document.getElementById('output').textContent").await;
        let want: String = (1..=10).map(|i| format!("tick {i} \n")).collect();
        assert_eq!(out.as_str().unwrap(), want, "every line once, in order");
        no_console_errors(&c, &[]).await;
        c.close().await.unwrap();
    });
}

/// Whatever a sandbox sends — output, warnings, errors, a data frame's names and cells, file names — the page
/// shows as text: markup in it never becomes elements and never runs.
#[test]
fn sandbox_output_is_shown_as_text_never_as_markup() {
    let Some(driver) = Driver::start("console::hostile_output") else {
        return;
    };
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let c = driver.browser().await;
        one_click_sign_in(&c, &format!("http://{}/", h.addr), "#sign-in-user", None).await;
        until(
            &c,
            "document.querySelector('.cm-content')",
            "the playground",
        )
        .await;
        let payload = "<img src=x onerror=window.pwned=1><script>window.pwned=2</script>";
        let code = format!(
            "p <- \"{payload}\"; cat(p); message(p); warning(p); \
             d <- data.frame(x = p); names(d) <- p; print(d); \
             writeLines(p, \"/work/out/page.html\"); \
             svg(\"/work/out/drawing.svg\"); plot(1); dev.off(); stop(p)"
        );
        run_code(&c, &code).await;
        until(
            &c,
            "document.getElementById('run-state').textContent === 'failed' && \
             document.querySelectorAll('.artifact').length === 2",
            "the failed run with its two artifacts",
        )
        .await;
        let report = js(
            &c,
            "({ pwned: window.pwned === undefined ? null : window.pwned, \
                elements: document.querySelectorAll('#output *:not(span), #result img, #result script, #artifacts script, #artifacts iframe, #artifacts object, #artifacts embed').length, \
                images: document.querySelectorAll('#artifacts img').length, \
                output: document.getElementById('output').textContent, \
                result: document.getElementById('result').textContent })",
        )
        .await;
        assert_eq!(report["pwned"], Value::Null, "{report}");
        assert_eq!(report["elements"], 0, "{report}");
        // SVG and HTML files are offered as downloads, never drawn in the page.
        assert_eq!(report["images"], 0, "{report}");
        let output = report["output"].as_str().unwrap();
        assert!(output.starts_with(payload), "{report}");
        let result = report["result"].as_str().unwrap();
        assert!(result.contains(&format!("Error: {payload}")), "{report}");
        assert!(result.contains(&format!("Warning: {payload}")), "{report}");

        // A data frame whose column name and cell are markup, as the value's table.
        run_code(
            &c,
            &format!("d <- data.frame(x = \"{payload}\"); names(d) <- \"{payload}\"; d"),
        )
        .await;
        let cells = until(
            &c,
            "document.getElementById('run-state').textContent === 'succeeded' && \
             Array.from(document.querySelectorAll('#result-value table th, #result-value table td')).map(e => e.textContent)",
            "the value's table",
        )
        .await;
        assert_eq!(cells, json!([payload, payload]));
        let pwned = js(&c, "window.pwned === undefined && document.querySelectorAll('#result img, #result script').length === 0").await;
        assert_eq!(pwned, true);
        no_console_errors(&c, &[]).await;
        c.close().await.unwrap();
    });
}
