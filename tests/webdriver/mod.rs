//! Just enough W3C WebDriver to drive headless Chromium through chromedriver, over the
//! reqwest client the tests already have. (A WebDriver crate such as fantoccini pulls in ICU
//! and changes features of crates candle shares, which rebuilds candle for every test build.)
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The key W3C WebDriver uses to mark an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The Enter key, for `type_into`.
pub const ENTER: &str = "\u{E007}";

/// The first of `names` found on `PATH`, as a full path.
pub fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver on an ephemeral loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// Starts chromedriver with `--port=0`, reads the port it chose from its output, and waits
    /// (bounded) until `/status` says it is ready.
    async fn start(http: &reqwest::Client) -> Driver {
        let exe = on_path(&["chromedriver"]).expect(
            "no chromedriver: install it with `apt-get install chromium-driver` \
             (./scripts/test.sh does)",
        );
        let mut child = Command::new(exe)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut driver = Driver { child, url: String::new() };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading after the receiver is gone: chromedriver must never block on a
            // full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let port = tokio::task::spawn_blocking(move || loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("chromedriver did not say which port it listens on");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().parse::<u16>().expect("a port number");
            }
        })
        .await
        .expect("reading chromedriver's output");
        driver.url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await {
                let body: Value = r.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An element reference.
#[derive(Clone, Debug)]
pub struct Element(String);

/// One headless Chromium session with its own profile directory.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (`--no-sandbox`: CI runs as root) with a
    /// window of `width` × `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let binary = on_path(&["chromium", "chromium-browser", "google-chrome"]).expect(
            "no Chromium: install it with `apt-get install chromium` (./scripts/test.sh does)",
        );
        let http = reqwest::Client::builder().no_proxy().build().expect("a client");
        let driver = Driver::start(&http).await;
        let profile = tempfile::tempdir().expect("a temp dir");
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "timeouts": {"script": 120_000, "pageLoad": 30_000},
            "goog:chromeOptions": {"binary": binary, "args": args},
        }}});
        let url = format!("{}/session", driver.url);
        let value = answer(http.post(url).json(&caps).send().await).await;
        let session = value["sessionId"].as_str().expect("a session id").to_string();
        Browser { http, session, driver, _profile: profile }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver.url, self.session);
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request.send().await).await
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Navigates and waits for the page's load event.
    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Reloads and waits for the page's load event.
    pub async fn refresh(&self) {
        self.post("/refresh", json!({})).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args })).await
    }

    /// The first element matching `css`, once there is one: a MutationObserver in the page
    /// answers as soon as the DOM has it, or `None` after `within`.
    pub async fn wait_for(&self, css: &str, within: Duration) -> Option<Element> {
        let script = "const [css, ms, done] = arguments;
            const found = () => document.querySelector(css);
            if (found()) return done(found());
            const observer = new MutationObserver(() => {
                if (found()) { observer.disconnect(); clearTimeout(timer); done(found()); }
            });
            observer.observe(document.documentElement,
                {subtree: true, childList: true, attributes: true, characterData: true});
            const timer = setTimeout(() => { observer.disconnect(); done(null); }, ms);";
        let args = json!([css, within.as_millis() as u64]);
        let value = self.post("/execute/async", json!({ "script": script, "args": args })).await;
        value[ELEMENT].as_str().map(|id| Element(id.to_string()))
    }

    /// Like `wait_for`, but a timeout fails the test with the page's text.
    pub async fn expect(&self, css: &str, within: Duration) -> Element {
        match self.wait_for(css, within).await {
            Some(e) => e,
            None => {
                let page = self.execute("return document.body.innerText", vec![]).await;
                panic!(
                    "waited {within:?} for {css}; the page says:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
        }
    }

    /// The first element matching `css` now.
    pub async fn find(&self, css: &str) -> Element {
        let value = self.post("/element", json!({"using": "css selector", "value": css})).await;
        Element(value[ELEMENT].as_str().expect("an element reference").to_string())
    }

    /// Clicks the first match of `css` as a user would (scrolled into view, not covered).
    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.click_on(&e).await;
    }

    /// Clicks `e` as a user would.
    pub async fn click_on(&self, e: &Element) {
        self.post(&format!("/element/{}/click", e.0), json!({})).await;
    }

    /// Clears the field and types `text` into it as keystrokes (`ENTER` presses Enter).
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.post(&format!("/element/{}/clear", e.0), json!({})).await;
        self.post(&format!("/element/{}/value", e.0), json!({ "text": text })).await;
    }

    /// The markup's attribute (`data-*` state the page sets), `None` when absent.
    pub async fn attr(&self, e: &Element, name: &str) -> Option<String> {
        self.get(&format!("/element/{}/attribute/{name}", e.0)).await.as_str().map(str::to_string)
    }

    /// The live DOM property (an input's current `value`, unlike its attribute).
    pub async fn property(&self, e: &Element, name: &str) -> Value {
        self.get(&format!("/element/{}/property/{name}", e.0)).await
    }

    /// The rendered text of the first match of `css`.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        let value = self.get(&format!("/element/{}/text", e.0)).await;
        value.as_str().unwrap_or_default().to_string()
    }

    /// `textContent` of every match of `css`, rendered or not.
    pub async fn contents(&self, css: &str) -> Vec<String> {
        let script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)";
        let value = self.execute(script, vec![json!(css)]).await;
        serde_json::from_value(value).expect("a list of strings")
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let value = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 PNG"))
            .expect("valid base64");
        std::fs::write(path, png).expect("screenshot written");
    }

    /// Ends the session, which closes Chromium; chromedriver stops when `self` drops.
    pub async fn close(self) {
        let url = format!("{}/session/{}", self.driver.url, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

/// A WebDriver answer's `value`; a WebDriver error fails the test with its message.
async fn answer(sent: reqwest::Result<reqwest::Response>) -> Value {
    let r = sent.expect("chromedriver answers");
    let status = r.status();
    let body: Value = r.json().await.expect("chromedriver answers JSON");
    let value = body["value"].clone();
    if !status.is_success() {
        panic!("WebDriver error {status}: {} — {}", value["error"], value["message"]);
    }
    value
}
