"""The `snakemake --report` HTML as a reader sees it: built for a small run of the real rule
report (workflow/rules/report.smk, its script and captions) on synthetic stored fine-tuning
outputs, opened in headless Chromium, screenshotted; any console error or uncaught exception
fails the test. Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), so no Python
browser package is needed. Chromium comes from Debian (`make setup-chromium` installs it as
root); elsewhere the test skips and says so."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MAX_REPORT_BYTES = 5 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed: `make setup-chromium` as root (Debian package chromium)",
)


class Chromium:
    """Minimal DevTools-protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str, profile: Path):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # keep our ends away from 3 and 4, which the child's ends are moved onto
        self._w = fcntl.fcntl(to_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        self._r = fcntl.fcntl(from_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_chrome_r, to_chrome_w, from_chrome_r, from_chrome_w):
            os.close(fd)

        def child_fds():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(child_r)
        os.close(child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, timeout: float) -> dict:
        import select

        end = time.time() + timeout
        while b"\0" not in self._buf:
            left = end - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        end = time.time() + timeout
        while time.time() < end:
            e = self._read_message(end - time.time())
            self.events.append(e)
            if e.get("method") == method:
                return e
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            try:
                self.events.append(self._read_message(end - time.time()))
            except TimeoutError:
                return

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # already gone
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def view_in_chromium(html: Path, screenshot: Path, profile: Path, settle_s: float = 3.0) -> tuple[list[str], str]:
    """Open ``html``, let it render, write a full-window PNG screenshot; return (console errors and
    uncaught exceptions, the page's visible text)."""
    import base64

    browser = Chromium(CHROMIUM, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1000, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired", timeout=120)
        browser.drain(settle_s)  # the report renders with JavaScript after the load event
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        text = browser.send("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                            session=session)["result"].get("value", "")
        browser.drain(0.5)
    finally:
        browser.close()
    errors = []
    for e in browser.events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            errors.append(f"console.{p['type']}: {args}")
        elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
    return errors, text


def test_the_devtools_client_reports_console_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>console.error('boom'); missingFunction();</script></body></html>")
    errors, text = view_in_chromium(page, tmp_path / "bad.png", tmp_path / "profile", settle_s=0.5)
    assert any("boom" in e for e in errors) and any("missingFunction" in e for e in errors)
    assert text.strip() == "x"


SNAKEFILE = """
import json
import sys

sys.path.insert(0, {tests!r})  # slide_doubles.FakeSlide for the registration overlay


configfile: "config.yaml"


report: {workflow_rst!r}


RUN = json.load(open("run.json"))


def report_inputs(wildcards):
    return RUN["inputs"]


def report_experiments():
    return RUN["experiments"]


def report_config_hash():
    return "test-config"


def probe_files():
    return RUN.get("probes", [])


include: {report_smk!r}


rule all:
    input:
        "results/report/summary.json",
        "results/registration/sec01_20x.png",


rule overlay:
    output:
        report("results/registration/sec01_20x.png", caption={registration_rst!r}, category="Registration"),
    run:
        import numpy as np
        from slide_doubles import FakeSlide
        from cellstage.register.homography import RegistrationResult
        from cellstage.register.qc import overlay_png

        img = (np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)
        res = RegistrationResult(H=np.eye(3), n_matches=10, n_inliers=9, rmse_px=0.5, scale=1.0,
                                 rotation_deg=0.0, ok=True)
        overlay_png(FakeSlide(img, 0.17), FakeSlide(img, 0.17), res, output[0], max_side=1600)
"""


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "1", *args], cwd=work, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_html_report_of_a_small_run_renders_without_console_errors(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_report_tables import CLASSES, _report_run

    work = tmp_path / "run"
    work.mkdir()
    experiments, inputs, _ = _report_run(tmp_path / "stored")
    (work / "run.json").write_text(json.dumps({"experiments": experiments, "inputs": inputs}))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["classes"], config["static_classes"] = CLASSES, CLASSES[:2]
    config["segmentation"].setdefault("min_points_on_nuclei", 0.5)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    (work / "Snakefile").write_text(SNAKEFILE.format(
        tests=str(REPO / "tests"), workflow_rst=str(REPO / "workflow/report/workflow.rst"),
        report_smk=str(REPO / "workflow/rules/report.smk"),
        registration_rst=str(REPO / "workflow/report/registration.rst")))
    _snakemake(work)
    _snakemake(work, "--report", "report.html")
    html = work / "report.html"
    assert 0 < html.stat().st_size <= MAX_REPORT_BYTES

    shot = tmp_path / "report.png"
    errors, text = view_in_chromium(html, shot, tmp_path / "profile")
    print(f"report {html.stat().st_size / 1e6:.2f} MB, screenshot {shot}")
    assert not errors, "\n".join(errors)
    assert "cellstage" in text  # workflow.rst rendered into the page
    assert all(category in text for category in ("Tables", "Figures", "Registration", "Pipeline"))
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something is drawn, not a blank page


@pytest.mark.skipif(not os.environ.get("CELLSTAGE_REPORT_RUN"),
                    reason="set CELLSTAGE_REPORT_RUN to a finished run's directory (e.g. after `make demo`)")
def test_html_report_of_a_finished_run_is_small_and_renders_without_console_errors(tmp_path):
    """The report of a real run (``CELLSTAGE_REPORT_RUN``: its working directory, with results/ and
    config/; snakemake records its own log under that directory's .snakemake/)."""
    work = Path(os.environ["CELLSTAGE_REPORT_RUN"]).resolve()
    html = tmp_path / "report.html"
    _snakemake(work, "-s", str(REPO / "Snakefile"), "--report", str(html))
    size = html.stat().st_size
    print(f"report of {work}: {size / 1e6:.2f} MB")
    assert size <= MAX_REPORT_BYTES, f"{html}: {size / 1e6:.1f} MB > 5 MB: which report() outputs are large?"
    errors, text = view_in_chromium(html, tmp_path / "report.png", tmp_path / "profile")
    assert not errors, "\n".join(errors)
    assert "cellstage" in text
