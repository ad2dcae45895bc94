//! A headless Chromium driven over the DevTools protocol, for tests of pages whose own
//! scripts must run (`chromium --dump-dom` loads a page once and prints it; a page that
//! refreshes itself needs a browser that stays open while the test acts).
//!
//! The transport is `--remote-debugging-pipe`: CDP messages (JSON, each ended by a NUL byte)
//! on the browser's fd 3 (to it) and fd 4 (from it), so no port is opened. Chromium runs in
//! its own process group with a fresh profile directory, and the whole group is killed when
//! the [`Browser`] is dropped, whether the test passed or not.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use command_fds::{CommandFdExt, FdMapping};
use serde_json::{Value, json};

/// Where Chromium is: `$CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// A running headless Chromium with (after [`Browser::open`]) one page attached.
pub struct Browser {
    child: Child,
    to_browser: std::io::PipeWriter,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless, with nothing that reaches beyond loopback on its own
    /// (no background networking, component updates, sync or QUIC).
    pub fn launch() -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir()?;
        // fd 3: the browser reads our messages; fd 4: it writes its own.
        let (browser_reads, to_browser) = std::io::pipe()?;
        let (from_browser, browser_writes) = std::io::pipe()?;
        let mut cmd = Command::new(chromium_path());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .fd_mappings(vec![
            FdMapping {
                parent_fd: OwnedFd::from(browser_reads),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: OwnedFd::from(browser_writes),
                child_fd: 4,
            },
        ])?;
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} (install chromium)", chromium_path()))?;
        // The command holds our copies of the browser's ends: drop it, so its exit is seen.
        drop(cmd);
        Ok(Browser {
            child,
            to_browser,
            from_browser: spawn_reader(from_browser),
            next_id: 0,
            session: None,
            _profile: profile,
        })
    }

    /// Sends `method` (to the page once one is open) and waits up to `timeout` for its answer.
    pub fn call(&mut self, method: &str, params: Value, timeout: Duration) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to_browser.write_all(&bytes).context("chromium closed its pipe")?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = match self.from_browser.recv_timeout(left) {
                Ok(a) => a,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("no answer to {method} within {timeout:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("chromium exited during {method}"),
            };
            if answer["id"].as_u64() != Some(id) {
                continue; // an event, or the answer to an earlier call that timed out
            }
            if let Some(e) = answer.get("error") {
                bail!("{method} failed: {e}");
            }
            return Ok(answer["result"].clone());
        }
    }

    /// Opens `url` in a new page of `width` x `height` CSS pixels and attaches to it: later
    /// calls go to that page.
    pub fn open(&mut self, url: &str, width: u32, height: u32) -> anyhow::Result<()> {
        let t = Duration::from_secs(20);
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }), t)?;
        let target_id = target["targetId"].clone();
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            t,
        )?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session: {attached}"))?;
        self.session = Some(session.to_string());
        let metrics = json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false });
        self.call("Emulation.setDeviceMetricsOverride", metrics, t)?;
        self.call("Page.enable", json!({}), t)?;
        let nav = self.call("Page.navigate", json!({ "url": url }), t)?;
        if let Some(e) = nav.get("errorText").and_then(Value::as_str) {
            bail!("cannot load {url}: {e}");
        }
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let params = json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let r = self.call("Runtime.evaluate", params, Duration::from_secs(10))?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression} threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until its value is truthy (not null, false, 0 or
    /// ""), and returns it; fails after `timeout`, naming `what` and the last value.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration, what: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression)?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what} (last value: {v})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the whole page (beyond the viewport when it is taller).
    pub fn screenshot(&mut self) -> anyhow::Result<Vec<u8>> {
        let layout = self.call("Page.getLayoutMetrics", json!({}), Duration::from_secs(10))?;
        let size = &layout["cssContentSize"];
        let clip = json!({ "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1 });
        let params = json!({ "format": "png", "captureBeyondViewport": true, "clip": clip });
        let shot = self.call("Page.captureScreenshot", params, Duration::from_secs(20))?;
        let data = shot["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser and its renderer, GPU and utility processes: its process group.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads NUL-separated JSON messages from the browser on a thread of its own.
fn spawn_reader(pipe: std::io::PipeReader) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut msg = Vec::new();
        loop {
            msg.clear();
            match reader.read_until(0, &mut msg) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if msg.last() == Some(&0) {
                msg.pop();
            }
            if let Ok(v) = serde_json::from_slice(&msg)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The base64 SHA-256 of the public key in the PEM certificate at `cert`, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it (openssl computes it).
pub fn spki_hash(cert: &std::path::Path) -> anyhow::Result<String> {
    let script = format!(
        "openssl x509 -pubkey -noout -in '{}' | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().context("openssl")?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || hash.is_empty() {
        bail!(
            "no SPKI hash of {}: {}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(hash)
}

/// Loads `url` once in a headless Chromium (a fresh profile) whose proxy is `proxy` (an
/// `http://` or `https://` URL), trusting the certificate whose SPKI hash is `spki`, with
/// loopback destinations sent through the proxy too; returns the DOM it printed once its
/// virtual time budget (10 s) ran out, and its stderr.
pub fn dump_dom_through(proxy: &str, spki: &str, url: &str) -> anyhow::Result<(String, String)> {
    let profile = tempfile::tempdir()?;
    let out = Command::new(chromium_path())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--proxy-server={proxy}"),
            // Chromium sends loopback destinations past the proxy unless told not to.
            "--proxy-bypass-list=<-loopback>",
            &format!("--ignore-certificate-errors-spki-list={spki}"),
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ])
        .output()
        .context("chromium runs (.ci/run installs it)")?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((text(&out.stdout), text(&out.stderr)))
}
