//! The operations page (`/ui`) in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`), against the real server and the emulator.
//! Without them the browser tests say so and skip, or fail when `CI` is set. Screenshots go
//! to `$CARGO_TARGET_TMPDIR/ui/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use callops::emulator::graph::GraphScript;

use crate::support::{TestApp, remove_event, silent};

const GRAPH_CALL: &str = "57dab8b1-894c-409a-b240-bd8beae78896";
const MARKUP_CONTEXT: &str = "<img src=x onerror=\"window.__injected=1\">";
const KEY: &str = "ui-browser-key-0123456789abcdef";
const CHROMEDRIVER: &str = "chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Generous: a cold Chromium on a busy two-core machine takes seconds to start.
const BROWSER_SOON: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_front_door_links_the_page_and_the_page_is_locked_down() {
    let app = TestApp::spawn_with(|config| config.http.api_keys = KEY.to_owned().into()).await;
    let json: Value = app.get("/").await.json().await.unwrap();
    assert_eq!(json["links"]["ui"], "/ui", "{json}");
    let html = app
        .http
        .get(app.url("/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert!(html.text().await.unwrap().contains("href=\"/ui\""));

    // The page needs no key (it asks for one); only the data behind it does.
    let page = app.get("/ui").await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let body = page.text().await.unwrap();
    // No third party: everything the page loads comes from this origin.
    assert!(!body.contains("http://") && !body.contains("https://"));
    for (path, kind) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], kind, "{path}");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("https://") && !text.contains("http://"),
            "{path}"
        );
    }
    let missing = app.get("/ui/other.js").await;
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "NotFound");
    // The data still needs the key.
    assert_eq!(app.get("/v1/operations").await.status(), 401);
}

#[tokio::test]
async fn the_page_shows_a_removal_live_filters_and_opens_its_events() {
    let Some(browser) = Browser::start("live").await else {
        return;
    };
    let app = TestApp::spawn().await;
    // Values from the API are text, never markup.
    let other = app
        .remove("call-ui-other", silent(), Some(MARKUP_CONTEXT))
        .await;
    browser.open_live(&app.url("/ui")).await;
    browser
        .until(
            "the existing operation is listed",
            &format!(
                "!!document.querySelector('tr[data-id=\"{}\"]')",
                other["id"].as_str().unwrap()
            ),
        )
        .await;
    let context = browser
        .eval(&format!(
            "const td = document.querySelector('tr[data-id=\"{}\"] td.context'); \
             return [td.textContent, td.children.length, window.__injected === undefined]",
            other["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(context, json!([MARKUP_CONTEXT, 0, true]));
    // Marks the document: a reload would lose it.
    browser
        .eval("window.__loadedOnce = true; return true")
        .await;

    let started = app.remove("call-ui-1", silent(), Some("ctx-ui")).await;
    let id = started["id"].as_str().unwrap().to_owned();
    let status_of = format!(
        "const row = document.querySelector('tr[data-id=\"{id}\"]'); return row ? row.querySelector('.status a').textContent : null"
    );
    let status = browser.until("the new removal is listed", &status_of).await;
    assert!(status == "NotStarted" || status == "Running", "{status}");
    // ACS accepted it (the emulator holds its callback back): the row follows.
    browser
        .until(
            "the removal shows Running",
            &format!("return (function() {{ {status_of} }})() === 'Running'"),
        )
        .await;

    app.callback(&remove_event("ev-ui-1", "call-ui-1", "ctx-ui", true))
        .await;
    browser
        .until(
            "the removal shows Succeeded",
            &format!("return (function() {{ {status_of} }})() === 'Succeeded'"),
        )
        .await;
    assert_eq!(
        browser.eval("return window.__loadedOnce === true").await,
        true,
        "the page was reloaded"
    );
    browser.screenshot("operations").await;

    // The filter narrows the list to one call.
    let input = browser
        .client
        .find(Locator::Css("#filters input[name=callConnectionId]"))
        .await
        .unwrap();
    input.send_keys("call-ui-1").await.unwrap();
    browser
        .client
        .find(Locator::Css("#filters button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let calls = browser
        .until(
            "only call-ui-1 is listed",
            "const calls = [...document.querySelectorAll('#operations tbody td.call')].map(td => td.textContent); \
             return calls.length > 0 && calls.every(call => call === 'call-ui-1') ? calls : null",
        )
        .await;
    assert_eq!(calls, json!(["call-ui-1"]));

    // The detail view shows the event that settled it, opened from the keyboard.
    let link = browser
        .client
        .find(Locator::Css(&format!("tr[data-id=\"{id}\"] .status a")))
        .await
        .unwrap();
    link.send_keys("\u{E007}").await.unwrap(); // Enter
    let timeline = browser
        .until(
            "the detail view lists the event",
            "const dialog = document.querySelector('#detail'); \
             const rows = [...document.querySelectorAll('#timeline tbody tr')]; \
             return dialog.open && rows.length ? rows.map(tr => [...tr.children].map(td => td.textContent)) : null",
        )
        .await;
    assert_eq!(
        timeline[0][1],
        "Microsoft.Communication.RemoveParticipantSucceeded"
    );
    assert_eq!(timeline[0][2], "ev-ui-1");
    assert_eq!(timeline[0][3], "applied");
    let raw = browser
        .eval("return document.querySelector('#detail-json').textContent")
        .await;
    let raw: Value = serde_json::from_str(raw.as_str().unwrap()).unwrap();
    assert_eq!(raw["id"], id.as_str());
    browser.screenshot("operation-detail").await;
    // Escape closes it and focus goes back to the page.
    browser
        .client
        .find(Locator::Css("#detail"))
        .await
        .unwrap()
        .send_keys("\u{E00C}")
        .await
        .unwrap();
    browser
        .until(
            "Escape closes the detail view",
            "return !document.querySelector('#detail').open",
        )
        .await;
    browser.quit().await;
}

#[tokio::test]
async fn a_graph_cancel_shows_the_media_operations_it_cancelled() {
    let Some(browser) = Browser::start("cancel").await else {
        return;
    };
    let app = TestApp::spawn().await;
    browser.open_live(&app.url("/ui")).await;
    app.queue_media(GRAPH_CALL, "playPrompt", "welcome").await;
    let cancel = app
        .cancel(GRAPH_CALL, GraphScript::default(), Some("stop-all"))
        .await;
    let id = cancel["id"].as_str().unwrap();
    let done = app
        .operation_until(id, |op| {
            op["cancelledOperations"]
                .as_array()
                .is_some_and(|list| !list.is_empty())
        })
        .await;
    let prompt_id = done["cancelledOperations"][0]["id"].clone();
    browser
        .until(
            "the cancel is listed as settled",
            &format!("return document.querySelector('tr[data-id=\"{id}\"] .status a')?.textContent === 'Succeeded'"),
        )
        .await;
    // A click anywhere on the row opens it.
    browser
        .client
        .find(Locator::Css(&format!("tr[data-id=\"{id}\"] td.call")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let cancelled = browser
        .until(
            "the detail view lists the cancelled prompt",
            "const rows = [...document.querySelectorAll('#cancelled tbody tr')]; \
             return document.querySelector('#detail').open && rows.length \
               ? rows.map(tr => [...tr.children].map(td => td.textContent)) : null",
        )
        .await;
    assert_eq!(cancelled[0][0], prompt_id, "{cancelled}");
    assert_eq!(cancelled[0][1], "playPrompt");
    assert_eq!(cancelled[0][2], "welcome");
    browser.screenshot("graph-cancel").await;
    browser.quit().await;
}

#[tokio::test]
async fn the_page_asks_for_the_api_key_and_says_when_it_is_wrong() {
    let Some(browser) = Browser::start("key").await else {
        return;
    };
    let app = TestApp::spawn_with(|config| config.http.api_keys = KEY.to_owned().into())
        .await
        .authenticated(KEY);
    let started = app.remove("call-ui-key", silent(), Some("ctx-key")).await;
    browser.goto(&app.url("/ui")).await;
    browser
        .until(
            "the key is asked for",
            "return !document.querySelector('#key-panel').hidden",
        )
        .await;

    let submit_key = |key: &'static str| {
        let client = browser.client.clone();
        async move {
            let input = client.find(Locator::Css("#api-key")).await.unwrap();
            input.send_keys(key).await.unwrap();
            client
                .find(Locator::Css("#key-form button[type=submit]"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        }
    };
    submit_key("not-the-key-0123456789").await;
    let error = browser
        .until(
            "a wrong key shows an error",
            "const box = document.querySelector('#error'); \
             return !box.hidden && box.textContent.includes('refused') ? box.textContent : null",
        )
        .await;
    assert!(error.as_str().unwrap().contains("Unauthorized"), "{error}");
    browser.screenshot("wrong-api-key").await;

    submit_key(KEY).await;
    browser
        .until(
            "with the right key the operations are listed",
            &format!(
                "return !!document.querySelector('tr[data-id=\"{}\"]')",
                started["id"].as_str().unwrap()
            ),
        )
        .await;
    // The key is kept for the tab only, and never put in the address.
    let url = browser.client.current_url().await.unwrap();
    assert!(!url.as_str().contains(KEY), "{url}");
    let kept = browser
        .eval("return sessionStorage.getItem('callops.apiKey')")
        .await;
    assert_eq!(kept, KEY);
    let local = browser.eval("return localStorage.length").await;
    assert_eq!(local, 0);
    browser.quit().await;
}

/// One browser at a time: Chromium is heavy on a two-core machine, and the other tests in
/// this binary run beside it.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Chromium under a chromedriver of its own, with a fresh profile.
struct Browser {
    client: Client,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
    name: &'static str,
}

impl Browser {
    /// `None` (after saying why) when Chromium or chromedriver is missing and `CI` is unset.
    async fn start(name: &'static str) -> Option<Self> {
        let present = std::path::Path::new(CHROMIUM).exists()
            && std::process::Command::new(CHROMEDRIVER)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
        if !present {
            assert!(
                std::env::var_os("CI").is_none(),
                "the browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
            );
            eprintln!(
                "skipping the browser test {name}: no {CHROMIUM} or {CHROMEDRIVER} (apt-get install chromium chromium-driver); set CI=1 to make this a failure"
            );
            return None;
        }
        let turn = ONE_BROWSER.lock().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--window-size=1366,860",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + BROWSER_SOON;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => break client,
                Err(error) if Instant::now() < deadline => {
                    // chromedriver is still starting: its port refuses until it listens.
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("no WebDriver session from chromedriver: {error}"),
            }
        };
        Some(Self {
            client,
            _turn: turn,
            _driver: driver,
            _profile: profile,
            name,
        })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Opens the page at `url` and waits until its change stream is live.
    async fn open_live(&self, url: &str) {
        self.goto(url).await;
        self.until(
            "the stream is live",
            "document.querySelector('#live').dataset.state === 'live'",
        )
        .await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, Vec::new()).await.unwrap()
    }

    /// Runs `script` until it returns something other than `null` or `false`, and returns
    /// that; a bare expression is returned as is. Fails with a screenshot past
    /// [`BROWSER_SOON`].
    async fn until(&self, what: &str, script: &str) -> Value {
        let body = if script.contains("return ") {
            script.to_owned()
        } else {
            format!("return ({script})")
        };
        let deadline = Instant::now() + BROWSER_SOON;
        loop {
            let value = self.eval(&body).await;
            if !(value.is_null() || value == Value::Bool(false)) {
                return value;
            }
            if Instant::now() > deadline {
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")))
                    .await;
                let text = self.eval("return document.body.innerText").await;
                panic!(
                    "{}: timed out waiting until {what}; the page shows:\n{text}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot as `$CARGO_TARGET_TMPDIR/ui/{name}.png` and returns its path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }

    async fn quit(self) {
        self.client.close().await.unwrap();
    }
}

#[tokio::test]
async fn older_operations_load_on_request() {
    let Some(browser) = Browser::start("older").await else {
        return;
    };
    let app = TestApp::spawn().await;
    // One more than the page reads at first (100).
    for n in 0..101 {
        app.remove(&format!("call-ui-page-{n}"), silent(), None)
            .await;
    }
    browser.goto(&app.url("/ui")).await;
    let shown = browser
        .until(
            "the first page is listed with a way to the rest",
            "const rows = document.querySelectorAll('#operations tbody tr').length; \
             return rows > 0 && !document.querySelector('#more').hidden ? rows : null",
        )
        .await;
    assert_eq!(shown, 100);
    browser
        .client
        .find(Locator::Css("#more"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "the oldest operation is listed too",
            "document.querySelectorAll('#operations tbody tr').length === 101 \
             && document.querySelector('#more').hidden",
        )
        .await;
    let oldest = browser
        .eval(
            "return document.querySelector('#operations tbody tr:last-child td.call').textContent",
        )
        .await;
    assert_eq!(oldest, "call-ui-page-0");
    browser.quit().await;
}
