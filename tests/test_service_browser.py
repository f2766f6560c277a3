"""The service's web UI in a real browser (Debian's Chromium driven by Selenium) against the real
`slime-rl service` process: the token box, then the seven steps of a job on the tiny model — model, algorithm
and task, data (a bad file's `file:line` error first), hyperparameters, review and submit (a server-side 400
sends the user back to the field it names), monitor (live curves drawn in the page), deploy and chat — then
the job list and the compare page.

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`; `make install` does it
where it runs as root); without them the test skips. The driver is given by path, so Selenium Manager never
reaches for the network.

SLIME_RL_SCREENSHOTS=1 saves a screenshot of each step under docs/service/ (the committed ones come from such
a run); otherwise the test writes nothing into the tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.server_procs import http

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "service"
# A job that ends in seconds: no warm-up, 2 RL steps of 4 prompts x 2 samples, validation only at the ends.
QUICK = {"batch_size": "4", "samples_per_prompt": "2", "max_steps": "2", "eval_every": "0", "max_new_tokens": "8"}
UI_WAIT_S = 15  # a page reacting to a click
JOB_WAIT_S = 180  # the job running to its end; the deployment coming up

pytestmark = pytest.mark.skipif(not (CHROMEDRIVER.exists() and CHROMIUM.exists()),
                                reason="needs Chromium and chromedriver: apt-get install chromium chromium-driver")


def _rows(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"{i % 10}+{i % 7}=", "label": str(i % 10 + i % 7)}) + "\n"
                   for i in range(start, start + n))


def _submit_through_the_api(url: str, name: str, algorithm: str) -> str:
    """A second quick job (on the task's generated data) for the list and the compare page."""
    hyper = {k: int(v) for k, v in QUICK.items()} | {"sft_warmup": "off", "backend": "hf"}
    body = {"name": name, "model": {"id": "tiny"}, "algorithm": algorithm, "task": {"id": "arithmetic"},
            "hyperparameters": hyper}
    status, job = http("POST", f"{url}/api/jobs", body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 201, job
    return job["id"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A `slime-rl service` on a free port; at the end nothing it started is left running."""
    root = tmp_path_factory.mktemp("svc_browser") / "root"
    log = open(root.parent / "service.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "slime_rl", "service", "--port", "0", "--root", str(root),
                             "--token", TOKEN], stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    line = proc.stdout.readline().decode()
    m = re.search(r"listening on (http://[\d.]+:\d+)", line)
    assert m, f"service did not start: {line!r}; see {log.name}"
    url = m.group(1)
    yield url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for dep in http("GET", f"{url}/api/deployments", headers=auth)[1]["deployments"]:
        if dep["status"] in ("starting", "ready"):
            http("DELETE", f"{url}/api/deployments/{dep['id']}", headers=auth)
    for job in http("GET", f"{url}/api/jobs", headers=auth)[1]["jobs"]:
        if job["status"] in ("queued", "running"):
            http("POST", f"{url}/api/jobs/{job['id']}/cancel", headers=auth)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(executable_path=str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


class Page:
    """The browser on the service's UI: find by id, wait for conditions, save a step's screenshot."""

    def __init__(self, driver):
        self.d = driver
        self.screenshots = os.environ.get("SLIME_RL_SCREENSHOTS") == "1"

    def by_id(self, element_id: str):
        return self.d.find_element(By.ID, element_id)

    def wait(self, condition, timeout: float = UI_WAIT_S, what: str = ""):
        """Until `condition(driver)` is truthy; an element replaced by a refresh meanwhile is looked up again."""
        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(self.d, timeout, ignored_exceptions=ignored).until(condition, what)

    def visible(self, element_id: str, timeout: float = UI_WAIT_S):
        return self.wait(EC.visibility_of_element_located((By.ID, element_id)), timeout, f"#{element_id} visible")

    def text_in(self, element_id: str, text: str, timeout: float = UI_WAIT_S):
        self.wait(EC.text_to_be_present_in_element((By.ID, element_id), text), timeout,
                  f"{text!r} in #{element_id}")

    def click(self, element_id: str):
        """Click once it is shown and enabled; found again if a refresh replaced it meanwhile."""
        def attempt(d):
            element = d.find_element(By.ID, element_id)
            if not (element.is_displayed() and element.is_enabled()):
                return False
            element.click()
            return True
        self.wait(attempt, what=f"#{element_id} clickable")

    def type(self, element_id: str, text: str):
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)

    def shot(self, name: str, scroll_to: str | None = None):
        if not self.screenshots:
            return
        if scroll_to:
            self.d.execute_script("arguments[0].scrollIntoView({block: 'start'})", self.by_id(scroll_to))
        else:
            self.d.execute_script("window.scrollTo(0, 0)")
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(SHOTS / f"{name}.png"))


@pytest.mark.slow
def test_the_seven_steps_in_a_browser(service, browser, tmp_path):
    page = Page(browser)
    bad = tmp_path / "bad_train.jsonl"
    bad.write_text(_rows(2) + '{"prompt": "1+1=", "label": \n')
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(_rows(16))
    val.write_text(_rows(4, 100))
    start = time.monotonic()

    # Without the token the page asks for it, and asks again when the one given is refused. A #token= link
    # (what `slime-rl service` prints) sets it; the page keeps it and drops it from the address bar.
    browser.get(f"{service}/#/jobs")
    page.visible("token-input").send_keys("not-the-token")
    page.click("token-save")
    page.wait(lambda d: "did not accept" in page.by_id("auth").text and page.by_id("token-input").is_displayed(),
              what="the token box again")
    browser.get(f"{service}/#token={TOKEN}")
    page.visible("step-1")
    assert "token" not in browser.current_url
    assert page.by_id("model-tiny").is_selected()
    page.shot("step1_model")

    # Step 1 with a checkpoint directory the server will refuse (only it can tell: it looks on its disk).
    page.click("model-path")
    page.visible("model-path-input").send_keys("/nonexistent/checkpoint")
    page.click("next-1")

    # Step 2: the defaults (GRPO on the generated arithmetic task).
    page.visible("step-2")
    assert Select(page.by_id("algorithm")).first_selected_option.get_attribute("value") == "GRPO"
    assert Select(page.by_id("task")).first_selected_option.get_attribute("value") == "arithmetic"
    page.shot("step2_algorithm_task")
    page.click("next-2")

    # Step 3: a file is checked as soon as it is chosen: rows counted, or the first bad line named.
    page.visible("step-3")
    page.by_id("upload-val").send_keys(str(val))
    page.text_in("upload-val-status", "4 rows")
    page.by_id("upload-train").send_keys(str(bad))
    page.text_in("upload-train-status", "bad_train.jsonl:3")
    assert "upload-status bad" in page.by_id("upload-train-status").get_attribute("class")
    page.shot("step3_data")
    page.by_id("upload-train").send_keys(str(train))
    page.text_in("upload-train-status", "16 rows")
    page.click("next-3")

    # Step 4: the form comes from the options, with their defaults and ranges; the client checks ranges.
    page.visible("step-4")
    lr = page.by_id("hp-lr_multiplier")
    assert float(lr.get_attribute("value")) == 1.0 and lr.get_attribute("max") is not None
    page.type("hp-lr_multiplier", "1000")
    page.click("next-4")
    page.text_in("hp-lr_multiplier-error", "must be in")
    assert page.by_id("step-4").is_displayed()
    page.type("hp-lr_multiplier", "1")
    for name, value in QUICK.items():
        page.type(f"hp-{name}", value)
    Select(page.by_id("hp-sft_warmup")).select_by_value("off")
    Select(page.by_id("hp-backend")).select_by_value("hf")
    page.shot("step4_hyperparameters")
    page.click("next-4")

    # Step 5: submitting the refused checkpoint directory brings step 1 back with the server's message.
    page.visible("step-5")
    page.type("job-name", "browser tiny GRPO")
    page.click("submit")
    page.visible("step-1")
    page.text_in("model-path-input-error", "model.path")
    assert "invalid" in page.by_id("model-path-input").get_attribute("class")
    page.click("model-tiny")
    for step in (1, 2, 3, 4):  # every other choice was kept
        page.click(f"next-{step}")
    page.visible("step-5")
    assert "16 rows" in page.by_id("review").text and "max_steps" in page.by_id("review").text
    page.shot("step5_review")
    page.click("submit")

    # Step 6: the job page follows the run; the curves are drawn from its metrics.
    page.visible("step-6")
    assert re.search(r"#/jobs/j_[0-9a-f]+$", browser.current_url)
    job_id = browser.current_url.rsplit("/", 1)[1]
    other_id = _submit_through_the_api(service, "api tiny DR_GRPO", "DR_GRPO")  # queued behind ours, to compare
    page.wait(lambda d: page.by_id("job-status").text in ("succeeded", "failed", "cancelled"), JOB_WAIT_S,
              "the job to end")
    assert page.by_id("job-status").text == "succeeded", page.by_id("log-tail").text[-2000:]
    page.wait(lambda d: int(page.by_id("chart-rollout-reward_mean").get_attribute("data-points")) > 0,
              what="reward points")
    assert int(page.by_id("chart-rollout-reward_mean").get_attribute("data-points")) == 2
    assert page.by_id("job-progress").text.strip() == "2 / 2"
    assert "rollout" in page.by_id("time-table").text
    page.shot("step6_monitor")

    # Step 7: deploy, chat, stop.
    page.click("deploy")
    page.visible("chat-input", JOB_WAIT_S)
    assert page.by_id("deploy-url").text.endswith("/v1")
    page.by_id("chat-input").send_keys("3+4=")
    page.click("chat-send")
    reply = page.wait(EC.presence_of_element_located((By.CSS_SELECTOR, "#chat-log .msg-assistant")),
                      JOB_WAIT_S, "a reply")
    # Two RL steps from random weights: the reply's characters are noise (often spaces), but there are some.
    assert int(reply.get_attribute("data-length")) > 0 and reply.find_element(By.CLASS_NAME, "msg-text").text
    assert not page.d.find_elements(By.CSS_SELECTOR, "#chat-log .msg-error")
    page.shot("step7_deploy", scroll_to="step-7")
    page.click("deploy-stop")
    page.text_in("deploy-status", "stopped")

    # The job list (its filters are the server's) and the compare page, with the API's job beside ours.
    browser.get(f"{service}/#/jobs")
    for job in (job_id, other_id):
        page.wait(EC.presence_of_element_located((By.ID, f"pick-{job}")), what=f"{job} in the list")
    Select(page.by_id("filter-algorithm")).select_by_value("DR_GRPO")
    page.wait(lambda d: not d.find_elements(By.ID, f"pick-{job_id}"), what="the filter to hide the GRPO job")
    Select(page.by_id("filter-algorithm")).select_by_value("")
    page.click(f"pick-{job_id}")
    page.click(f"pick-{other_id}")
    page.shot("jobs")
    page.click("compare")
    page.wait(lambda d: int(page.by_id("chart-rollout-reward_mean").get_attribute("data-points")) == 4,
              JOB_WAIT_S, "both jobs' curves")
    assert "browser tiny GRPO" in page.by_id("compare-jobs").text and "api" in page.by_id("compare-jobs").text
    page.shot("compare")
    print(f"browser walk: {time.monotonic() - start:.1f} s")
