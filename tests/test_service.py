"""The job service's API against the real `slime-rl service` process: job lifecycle on the tiny model (submit,
run, succeed, metrics, deploy, chat), a failing job's file:line reason, cancel, the concurrent-job limit, a
service restart with a job running (reattached), resume, auth, and every malformed request a 4xx naming the
field."""

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

from tests.server_procs import http

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A tiny job that ends in seconds: no warm-up, 2 steps of 4 x 2, validation only at the ends.
QUICK = {"batch_size": 4, "samples_per_prompt": 2, "max_steps": 2, "eval_every": 0, "sft_warmup": "off",
         "backend": "hf", "max_new_tokens": 8}
LONG = {**QUICK, "max_steps": 100000, "save_every": 1}


class ServiceProc:
    def __init__(self, root: Path):
        self.root = root
        self.log = open(root.parent / f"{root.name}_service.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slime_rl", "service", "--port", "0", "--root", str(root), "--token", TOKEN],
            stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"listening on (http://[\d.]+:\d+)", line)
        assert m, f"service did not start: {line!r}"
        self.url = m.group(1)

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, auth: bool = True):
        return http(method, self.url + path, body, headers=AUTH if auth else None, raw=raw)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    s = ServiceProc(tmp_path_factory.mktemp("svc") / "root")
    yield s
    for job in s.call("GET", "/api/jobs")[1]["jobs"]:  # nothing left running behind the tests
        if job["status"] in ("queued", "running"):
            s.call("POST", f"/api/jobs/{job['id']}/cancel")
    s.stop()


def wait_for(predicate, timeout: float = 240, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def job_status(s: ServiceProc, job_id: str, *statuses: str):
    def check():
        job = s.call("GET", f"/api/jobs/{job_id}")[1]
        return job if job["status"] in statuses else None
    return check


def rows(n: int, start: int = 0) -> bytes:
    return "".join(json.dumps({"prompt": f"{i % 10}+{i % 7}=", "label": str(i % 10 + i % 7)}) + "\n"
                   for i in range(start, start + n)).encode()


def upload(s: ServiceProc, body: bytes, kind: str = "train", name: str = "train.jsonl", task: str = "arithmetic"):
    return s.call("POST", f"/api/uploads?kind={kind}&task={task}&filename={name}", raw=body)


def submit(s: ServiceProc, hyper: dict, **fields):
    body = {"name": fields.pop("name", "t"), "model": {"id": "tiny"}, "algorithm": "GRPO",
            "task": {"id": "arithmetic"}, "hyperparameters": hyper, **fields}
    status, job = s.call("POST", "/api/jobs", body)
    assert status == 201, job
    return job


def test_a_job_runs_to_succeeded_and_its_model_is_deployed_and_answers(service):
    s = service
    status, train = upload(s, rows(16))
    assert status == 201 and train["rows"] == 16
    status, val = upload(s, rows(4, 100), kind="val", name="val.jsonl")
    assert status == 201
    job = submit(s, QUICK, name="lifecycle", train_upload=train["id"], val_upload=val["id"])
    assert job["status"] in ("queued", "running") and job["progress"]["total_steps"] == 2
    done = wait_for(job_status(s, job["id"], "succeeded", "failed"), what="the job to end")
    assert done["status"] == "succeeded", (done["error"], s.call("GET", f"/api/jobs/{job['id']}/log")[1])
    assert done["progress"] == {"step": 2, "total_steps": 2} and done["checkpoint"]
    assert {r["phase"] for r in done["time_table"]["phases"]} >= {"rollout", "train"}
    assert done["config"]["data"]["train_path"].endswith("train.jsonl")
    metrics = s.call("GET", f"/api/jobs/{job['id']}/metrics")[1]["rows"]
    assert [r["step"] for r in metrics if "rollout/reward_mean" in r] == [1, 2]
    assert any("val/accuracy" in r for r in metrics)
    assert len(s.call("GET", f"/api/jobs/{job['id']}/log?tail=5")[1]["lines"]) == 5
    for bad in ("-1", "x", "10001"):
        status, answer = s.call("GET", f"/api/jobs/{job['id']}/log?tail={bad}")
        assert (status, answer["field"]) == (400, "tail")
    listed = s.call("GET", "/api/jobs?status=succeeded&algorithm=grpo&task=arithmetic&q=LIFE")[1]["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert s.call("GET", "/api/jobs?status=failed&q=lifecycle")[1]["jobs"] == []

    status, dep = s.call("POST", f"/api/jobs/{job['id']}/deploy")
    assert status == 201
    dep = wait_for(lambda: (d := s.call("GET", f"/api/deployments/{dep['id']}")[1])["status"] != "starting" and d,
                   timeout=120, what="the deployment")
    assert dep["status"] == "ready" and dep["url"].startswith("http://127.0.0.1:") and dep["url"].endswith("/v1")
    assert s.call("GET", f"/api/jobs/{job['id']}")[1]["deployment"]["id"] == dep["id"]
    status, models = http("GET", dep["url"] + "/models", headers={"Authorization": f"Bearer {dep['api_key']}"})
    assert status == 200 and models["data"][0]["id"] == "lifecycle"  # the URL and key work from outside
    status, answer = s.call("POST", f"/api/deployments/{dep['id']}/chat",
                            {"messages": [{"role": "user", "content": "3+4="}], "max_tokens": 8})
    assert status == 200 and isinstance(answer["reply"], str) and answer["usage"]["completion_tokens"] >= 1
    status, bad = s.call("POST", f"/api/deployments/{dep['id']}/chat", {"messages": [{"role": "robot"}]})
    assert (status, bad["field"]) == (400, "messages[0].role")
    status, dep = s.call("DELETE", f"/api/deployments/{dep['id']}")
    assert status == 200 and dep["status"] == "stopped"


def test_a_job_on_bad_data_fails_with_the_file_and_line(service):
    s = service
    long_prompt = json.dumps({"prompt": "1+" * 100 + "1=", "label": "101"})  # past max_prompt_tokens (64)
    status, train = upload(s, rows(3) + long_prompt.encode() + b"\n")
    assert status == 201  # well-formed: only the model's tokenizer can tell
    job = submit(s, QUICK, name="bad-data", train_upload=train["id"])
    done = wait_for(job_status(s, job["id"], "succeeded", "failed"), what="the job to end")
    assert done["status"] == "failed"
    assert re.search(r"train\.jsonl:4: prompt is \d+ tokens", done["error"]), done["error"]
    status, answer = s.call("POST", f"/api/jobs/{job['id']}/deploy")
    assert (status, answer["field"]) == (409, "status")


def test_cancel_and_the_concurrent_job_limit(service):
    s = service  # the service runs one job at a time
    first = submit(s, LONG, name="first")
    second = submit(s, LONG, name="second")
    first = wait_for(job_status(s, first["id"], "running"), what="the first job to start")
    assert s.call("GET", f"/api/jobs/{second['id']}")[1]["status"] == "queued"
    status, cancelled = s.call("POST", f"/api/jobs/{first['id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    wait_for(lambda: not _alive(first["id"], s), timeout=30, what="the cancelled job's processes to go")
    wait_for(job_status(s, second["id"], "running"), what="the queued job to start")
    status, again = s.call("POST", f"/api/jobs/{first['id']}/cancel")
    assert (status, again["field"]) == (409, "status")
    s.call("POST", f"/api/jobs/{second['id']}/cancel")
    wait_for(lambda: not _alive(second["id"], s), timeout=30, what="the second job's processes to go")


def _alive(job_id: str, s: ServiceProc) -> bool:
    """Whether any process of the job (its shell or the train command under it) is still there."""
    out = subprocess.run(["pgrep", "-f", f"jobs/{job_id}/config.json"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_a_running_job_survives_a_service_restart_and_a_killed_one_resumes(tmp_path):
    s = ServiceProc(tmp_path / "root")
    try:
        job = submit(s, LONG, name="survivor")
        wait_for(lambda: s.call("GET", f"/api/jobs/{job['id']}")[1]["progress"]["step"] >= 1,
                 what="a first step")
        s.stop()
        assert _alive(job["id"], s)  # the job outlives the service
        s = ServiceProc(tmp_path / "root")
        assert s.call("GET", f"/api/jobs/{job['id']}")[1]["status"] == "running"  # reattached
        step = s.call("GET", f"/api/jobs/{job['id']}")[1]["progress"]["step"]
        wait_for(lambda: s.call("GET", f"/api/jobs/{job['id']}")[1]["progress"]["step"] > step, what="progress")

        # The job's processes die while the service is down: failed with the reason, then resumed.
        s.stop()
        subprocess.run(["pkill", "-KILL", "-f", f"jobs/{job['id']}/config.json"])
        wait_for(lambda: not _alive(job["id"], s), timeout=30, what="the job to die")
        s = ServiceProc(tmp_path / "root")
        failed = s.call("GET", f"/api/jobs/{job['id']}")[1]
        assert failed["status"] == "failed" and "resume" in failed["error"]
        status, resumed = s.call("POST", f"/api/jobs/{job['id']}/resume")
        assert status == 200 and resumed["status"] in ("queued", "running")
        assert resumed["config"]["ckpt"]["resume"] == "auto"
        wait_for(lambda: any("resum" in line.lower() for line in
                             s.call("GET", f"/api/jobs/{job['id']}/log?tail=400")[1]["lines"][-200:]),
                 what="the resumed run to say so")
        assert s.call("GET", f"/api/jobs/{job['id']}")[1]["attempts"] == 2
    finally:
        for j in s.call("GET", "/api/jobs")[1]["jobs"]:
            if j["status"] in ("queued", "running"):
                s.call("POST", f"/api/jobs/{j['id']}/cancel")
        wait_for(lambda: not any(_alive(j["id"], s) for j in s.call("GET", "/api/jobs")[1]["jobs"]), timeout=30)
        s.stop()


def test_every_route_but_health_needs_the_token(service):
    s = service
    assert s.call("GET", "/api/health", auth=False) == (200, {"status": "ok"})
    status, answer = s.call("GET", "/api/jobs", auth=False)
    assert (status, answer["field"]) == (401, "Authorization") and "missing" in answer["error"]
    status, answer = http("GET", s.url + "/api/options", headers={"Authorization": "Bearer wrong-token"})
    assert status == 401 and "wrong" in answer["error"]
    status, page = http("GET", s.url + "/")
    assert status == 200 and "<html" in page.lower()  # the UI's files are public; they ask for the token


TINY = {"model": {"id": "tiny"}, "task": {"id": "arithmetic"}}


@pytest.mark.parametrize("body,field", [
    (None, "body"),
    ([], "body"),
    ({"model": {"id": "gpt-9"}, "task": {"id": "arithmetic"}}, "model.id"),
    ({"model": 3, "task": {"id": "arithmetic"}}, "model"),
    ({"model": {"id": "path"}, "task": {"id": "arithmetic"}}, "model.path"),
    ({"model": {"id": "path", "path": "/nonexistent/ckpt"}, "task": {"id": "arithmetic"}}, "model.path"),
    ({**TINY, "task": {"id": "nope"}}, "task.id"),
    ({**TINY, "task": {"id": "custom", "path": "os.system"}}, "task.path"),
    ({**TINY, "task": {"id": "math"}}, "train_upload"),
    ({**TINY, "algorithm": "FOO"}, "algorithm"),
    ({**TINY, "name": "x" * 500}, "name"),
    ({**TINY, "surprise": 1}, "surprise"),
    ({**TINY, "train_upload": "u_000000000000"}, "train_upload"),
    ({**TINY, "train_upload": "../../etc/passwd"}, "train_upload"),
    ({**TINY, "hyperparameters": []}, "hyperparameters"),
    ({**TINY, "hyperparameters": {"epochs": -1}}, "hyperparameters.epochs"),
    ({**TINY, "hyperparameters": {"batch_size": 1.5}}, "hyperparameters.batch_size"),
    ({**TINY, "hyperparameters": {"batch_size": "8"}}, "hyperparameters.batch_size"),
    ({**TINY, "hyperparameters": {"lr_multiplier": float("inf")}}, "hyperparameters.lr_multiplier"),
    ({**TINY, "hyperparameters": {"sft_warmup": True}}, "hyperparameters.sft_warmup"),
    ({**TINY, "hyperparameters": {"backend": "tpu"}}, "hyperparameters.backend"),
    ({**TINY, "hyperparameters": {"bogus": 1}}, "hyperparameters.bogus"),
])
def test_a_malformed_job_is_a_400_naming_the_field(service, body, field):
    raw = b"{not json" if body is None else json.dumps(body).encode()
    status, answer = service.call("POST", "/api/jobs", raw=raw)
    assert (status, answer["field"]) == (400, field), answer
    assert field.split(".")[-1] in answer["error"] or field == "body"


@pytest.mark.parametrize("query,body,field,line", [
    ("kind=test&task=arithmetic", b'{"prompt": "1+1=", "label": "2"}\n', "kind", None),
    ("kind=train&task=nope", b'{"prompt": "1+1=", "label": "2"}\n', "task", None),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'{"prompt": "1+1=", "label": "2"}\n{oops\n', "file", 2),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'{"prompt": "1+1="}\n', "file", 1),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'\n\n{"prompt": "", "label": "1"}\n', "file", 3),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'[1, 2]\n', "file", 1),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'{"prompt": "\xff", "label": "1"}\n', "file", 1),
    ("kind=train&task=arithmetic&filename=bad.jsonl", b'', "file", None),
])
def test_a_bad_upload_names_the_file_and_line_and_stores_nothing(service, query, body, field, line):
    before = sorted((service.root / "uploads").glob("*")) if (service.root / "uploads").exists() else []
    status, answer = service.call("POST", f"/api/uploads?{query}", raw=body)
    assert (status, answer["field"]) == (400, field), answer
    if line is not None:
        assert answer["line"] == line and answer["error"].startswith(f"bad.jsonl:{line}: ")
    after = sorted((service.root / "uploads").glob("*")) if (service.root / "uploads").exists() else []
    assert after == before


@pytest.mark.parametrize("method,path,status,field", [
    ("GET", "/api/jobs?status=bogus", 400, "status"),
    ("GET", "/api/jobs/j_nope", 404, "id"),
    ("GET", "/api/jobs/j_nope/metrics", 404, "id"),
    ("POST", "/api/jobs/j_nope/cancel", 404, "id"),
    ("POST", "/api/jobs/j_nope/resume", 404, "id"),
    ("POST", "/api/jobs/j_nope/deploy", 404, "id"),
    ("GET", "/api/deployments/d_nope", 404, "id"),
    ("DELETE", "/api/deployments/d_nope", 404, "id"),
    ("POST", "/api/deployments/d_nope/chat", 404, "id"),
    ("GET", "/api/nothing-here", 404, "path"),
    ("DELETE", "/api/jobs", 405, "path"),
])
def test_unknown_ids_and_routes_are_4xx_naming_what(service, method, path, status, field):
    got, answer = service.call(method, path, {} if method == "POST" else None)
    assert (got, answer["field"]) == (status, field), answer


def test_the_openapi_document_lists_every_route(service):
    doc = service.call("GET", "/api/openapi.json")[1]
    from slime_rl.service.app import ROUTES

    for method, path, _ in ROUTES:
        assert method.lower() in doc["paths"][path], (method, path)
    hp = doc["components"]["schemas"]["JobRequest"]["properties"]["hyperparameters"]["properties"]
    assert hp["batch_size"]["minimum"] == 1 and "sync" in hp["async_mode"]["enum"]


def test_options_offer_every_algorithm_and_task_the_project_ships(service):
    from slime_rl.algorithms.config import AlgorithmName
    from slime_rl.config import literal_choices
    from slime_rl.tasks import registered_tasks

    options = service.call("GET", "/api/options")[1]
    assert [a["id"] for a in options["algorithms"]] == list(literal_choices(AlgorithmName))
    assert set(registered_tasks()) <= {t["id"] for t in options["tasks"]}
    assert {m["id"] for m in options["models"]} == {"tiny", "smollm2", "path"}
    assert all(h["default"] is not None for h in options["hyperparameters"])


def test_a_service_beyond_loopback_needs_a_token():
    out = subprocess.run([sys.executable, "-m", "slime_rl", "service", "--host", "0.0.0.0", "--allow-unauthenticated"],
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 2 and "--allow-unauthenticated" in out.stderr
