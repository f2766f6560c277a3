"""The SGLang launcher on CPU: command building, and process handling with a fake server script."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time

import pytest

from rollout.sglang import SGLangServer, build_sglang_command, launch_sglang_servers

FAKE_SERVER = textwrap.dedent("""
    # A stand-in for `python -m sglang.launch_server ... --port P`: /health is 503 for a moment, then 200.
    import json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    ready_after = float(os.environ.get("FAKE_READY_AFTER", "0.3"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like SGLang's workers
    with open(os.path.join(os.environ["FAKE_DIR"], f"argv_{port}.json"), "w") as f:
        json.dump({"argv": argv, "pid": os.getpid(), "child_pid": child.pid}, f)
    start = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ready = time.monotonic() - start >= ready_after
            self.send_response(200 if self.path == "/health" and ready else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    print("fake sglang starting on", port, flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


def fake_python(tmp_path) -> str:
    """An executable that takes the place of `python` in the SGLang command line."""
    path = tmp_path / "fake_python"
    path.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    path.chmod(0o755)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True for a running process (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- command building ----------------------------------------------------------------------


def test_command_flags_booleans_and_lists():
    cmd = build_sglang_command("/models/qwen", port=30001, python="py", sglang_args={
        "tp_size": 2, "mem-fraction-static": 0.8, "enable_metrics": True, "disable_radix_cache": False,
        "chunked_prefill_size": None, "cuda_graph_bs": [1, 2, 4], "api_key": "k",
    })
    assert cmd[:9] == ["py", "-m", "sglang.launch_server", "--model-path", "/models/qwen",
                       "--host", "127.0.0.1", "--port", "30001"]
    rest = cmd[9:]
    assert rest[rest.index("--tp-size") + 1] == "2"
    assert rest[rest.index("--mem-fraction-static") + 1] == "0.8"
    assert rest[rest.index("--cuda-graph-bs") + 1:rest.index("--cuda-graph-bs") + 4] == ["1", "2", "4"]
    assert rest[rest.index("--api-key") + 1] == "k"
    flag = rest.index("--enable-metrics")
    assert flag + 1 == len(rest) or rest[flag + 1].startswith("--")  # a bare flag
    assert "--disable-radix-cache" not in rest and "--chunked-prefill-size" not in rest
    assert "--skip-server-warmup" in rest  # our default


def test_defaults_can_be_overridden():
    assert "--skip-server-warmup" not in build_sglang_command("m", port=1, sglang_args={"skip_server_warmup": False})
    assert build_sglang_command("m", port=1, sglang_args={"skip-server-warmup": True}).count("--skip-server-warmup") == 1


@pytest.mark.parametrize("key", ["port", "host", "model_path", "model-path", "--port", "model"])
def test_reserved_keys_are_rejected(key):
    with pytest.raises(ValueError, match=repr(key)):
        build_sglang_command("m", port=1, sglang_args={key: "x"})


def test_same_flag_twice_and_dict_values_are_rejected():
    with pytest.raises(ValueError, match="both mean --tp-size"):
        build_sglang_command("m", port=1, sglang_args={"tp_size": 1, "tp-size": 2})
    with pytest.raises(ValueError, match="json_model_override_args"):
        build_sglang_command("m", port=1, sglang_args={"json_model_override_args": {"a": 1}})


def test_gpu_placement_given_twice_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        launch_sglang_servers("m", 2, 7000, {"base_gpu_id": 0}, gpus_per_server=1, log_dir=tmp_path)


# ---- process handling with a fake server -----------------------------------------------------


def fake_server(tmp_path, ready_after: float = 0.3) -> SGLangServer:
    env = {"FAKE_DIR": str(tmp_path), "FAKE_READY_AFTER": str(ready_after)}
    port = free_port()
    return SGLangServer("/models/tiny", port, {"tp_size": 1}, log_path=tmp_path / f"sglang_{port}.log", env=env,
                        python=fake_python(tmp_path))


def fake_info(tmp_path, port: int) -> dict:
    return json.loads((tmp_path / f"argv_{port}.json").read_text())


def test_start_waits_for_health_then_stop_kills_the_group(tmp_path):
    server = fake_server(tmp_path, ready_after=0.3)
    t0 = time.monotonic()
    with server.start(timeout_s=30):
        assert time.monotonic() - t0 >= 0.3  # /health answered 503 until then
        assert server._health_ok()
        info = fake_info(tmp_path, server.port)
        assert info["argv"][:4] == ["-m", "sglang.launch_server", "--model-path", "/models/tiny"]
        assert "--tp-size" in info["argv"]
        pid, child = info["pid"], info["child_pid"]
        assert os.getpgid(pid) == pid == os.getpgid(child)  # its own process group, with its children
        assert "fake sglang starting" in server.log_path.read_text()
    assert server.process is None and not pid_alive(pid)
    deadline = time.monotonic() + 10
    while pid_alive(child):  # the orphaned child got SIGTERM too; it dies asynchronously
        assert time.monotonic() < deadline, "the server's child survived stop()"
        time.sleep(0.02)


def test_stop_escalates_to_sigkill(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "print('ignoring SIGTERM', flush=True)\ntime.sleep(600)\n")
    server = SGLangServer("unused", free_port(), log_path=tmp_path / "s.log",
                          command=[sys.executable, str(script)]).start(wait=False)
    proc = server.process
    while "ignoring" not in (tmp_path / "s.log").read_text():  # wait until the handler is installed
        assert proc.poll() is None
        time.sleep(0.02)
    server.stop(timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL


def test_exiting_process_fails_fast_with_log_tail(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import sys\nfor i in range(60):\n    print('line', i, flush=True)\n"
                      "sys.exit('CUDA error: no GPU found')\n")
    server = SGLangServer("unused", free_port(), log_path=tmp_path / "crash.log",
                          command=[sys.executable, str(script)])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        server.start(timeout_s=60)
    msg = str(info.value)
    assert time.monotonic() - t0 < 30  # did not wait for the timeout
    assert "exited with code 1" in msg and server.url in msg and str(server.log_path) in msg
    assert "CUDA error: no GPU found" in msg and "line 21\n" in msg and "line 20\n" not in msg  # last 40 lines
    assert server.process is None


def test_timeout_reports_log_tail(tmp_path):
    server = fake_server(tmp_path, ready_after=1000)
    with pytest.raises(TimeoutError, match="fake sglang starting"):
        server.start(timeout_s=1)
    assert server.process is None


def test_launch_sglang_servers(tmp_path):
    base = next(p for p in (free_port() for _ in range(20)) if _port_free(p + 1))
    env = {"FAKE_DIR": str(tmp_path), "FAKE_READY_AFTER": "0.1"}
    servers = launch_sglang_servers("/models/tiny", 2, base, {"tp_size": 2}, log_dir=tmp_path, env=env,
                                    gpus_per_server=2, timeout_s=30, python=fake_python(tmp_path))
    try:
        assert [s.url for s in servers] == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        assert all(s._health_ok() for s in servers)
        argvs = [fake_info(tmp_path, s.port)["argv"] for s in servers]
        assert [a[a.index("--base-gpu-id") + 1] for a in argvs] == ["0", "2"]
    finally:
        for s in servers:
            s.stop()
    assert all(s.process is None for s in servers)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
