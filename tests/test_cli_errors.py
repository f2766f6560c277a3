"""Expected CLI errors are one line on stderr with exit code 2 (`--debug` prints the traceback instead);
`slime-rl serve` checks every flag before it loads anything and leaves promptly on SIGTERM.

Everything runs `slime_rl.cli.main` in-process except the SIGTERM test, which needs a real process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rollout.limits import ServerLimits
from rollout.serve import ServeConfig, ServeConfigError
from server_procs import post
from slime_rl.cli import build_parser, main, serve_config_from_args
from slime_rl.data import load_prompts
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr and no traceback. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv("SLIME_RL_API_KEY", raising=False)
    monkeypatch.delenv("SLIME_RL_ADMIN_API_KEY", raising=False)


# ---- data and config files ------------------------------------------------------------------


BAD_SECOND_LINES = {
    "missing_key": (b'{"label": "3"}', "missing key 'prompt'"),
    "not_utf8": (b'{"prompt": "1+2=\xff", "label": "3"}', "not UTF-8"),
    "deeply_nested": (b"[" * 100_000, "invalid JSON: nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECOND_LINES))
def test_data_error_is_one_line_naming_file_and_line(capsys, tmp_path, case):
    line, problem = BAD_SECOND_LINES[case]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "label": "2"}\n' + line + b"\n")
    err = one_line_error(capsys, ["train", "--data.train_path", str(path), "--log.output_dir", str(tmp_path / "out")])
    assert f"broken.jsonl:2: {problem}" in err and err.startswith("slime-rl train: data error:")


def test_undecodable_and_deep_lines_are_skippable(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "label": "2"}\n' + b"\n".join(line for line, _ in BAD_SECOND_LINES.values()))
    records, stats = load_prompts(path, TOK, skip_bad_lines=True)
    assert len(records) == 1
    assert stats.skipped_by_reason == {"missing_key": 1, "not_utf8": 1, "invalid_json": 1}


BAD_CONFIGS = {
    "malformed.json": (b'{"train": {"lr": 1e-4,}}', "malformed.json:1: invalid JSON"),
    "deep.json": (b"[" * 100_000, "deep.json: nested too deeply"),
    "latin1.yaml": (b"train:\n  lr: 1.0e-4  # caf\xe9\n", "latin1.yaml:2: not UTF-8 text"),
    "syntax.yaml": (b"train: {lr: 1\nrollout: 2\n", "syntax.yaml:2: invalid YAML"),
    "list.yaml": (b"- train\n- rollout\n", "list.yaml: expected a mapping of config sections"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_config_file_error_is_one_line_naming_the_file(capsys, tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    (tmp_path / name).write_bytes(text)
    err = one_line_error(capsys, ["train", "-c", str(tmp_path / name)])
    assert expected in err and err.startswith("slime-rl train: config error:")


def test_debug_prints_the_traceback_before_or_after_the_command(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{")
    for argv in (["--debug", "train", "-c", str(tmp_path / "bad.json")], ["train", "-c", str(tmp_path / "bad.json"),
                                                                           "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "ConfigError: " in err and "bad.json:1: invalid JSON" in err
    # the --debug.* config flags still work next to it
    args = build_parser().parse_args(["train", "--debug.rollout_only", "true"])
    assert not args.traceback and getattr(args, "debug.rollout_only") == "true"


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "m", "--port", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--port: invalid int value: 'x'" in err


# ---- serve: flags --------------------------------------------------------------------------


@pytest.fixture
def junk_model(tmp_path) -> Path:
    """The shape of a checkpoint (what validation looks at), none of the content."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    return tmp_path


BAD_SERVE_FLAGS = [
    (["--port", "99999"], "--port must be in 0..65535"),
    (["--port", "-1"], "--port must be in 0..65535"),
    (["--api-key", ""], "--api-key must be a non-blank key"),
    (["--api-key", "  "], "--api-key must be a non-blank key"),
    (["--admin-api-key", ""], "--admin-api-key must be a non-blank key"),
    (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
    (["--page-size", "0"], "--page-size must be >= 1"),
    (["--max-total-tokens", "0"], "--max-total-tokens must be >= 2"),
    (["--max-total-tokens", "8", "--page-size", "16"], "--max-total-tokens must be >= 16"),
    (["--device", "cuda"], "--device 'cuda': CUDA is not available"),
    (["--device", "cuda:1"], "--device 'cuda:1': CUDA is not available"),
    (["--device", "toaster"], "--device 'toaster': not a device torch knows"),
    (["--device", "meta"], "--device 'meta': the embedded engine runs on cpu, cuda or cuda:N"),
    (["--host", "0.0.0.0"], "--allow-unauthenticated"),
    (["--host", "example.org", "--admin-api-key", "k"], "--allow-unauthenticated"),
    (["--max-n", "0"], "--max-n must be > 0"),
    (["--header-timeout-s", "0"], "--header-timeout-s must be > 0"),
    (["--max-queued-requests", "-3"], "--max-queued-requests must be > 0"),
]


@pytest.mark.parametrize("flags,expected", BAD_SERVE_FLAGS, ids=[" ".join(f) for f, _ in BAD_SERVE_FLAGS])
def test_serve_refuses_a_bad_flag_before_loading(capsys, monkeypatch, junk_model, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error(capsys, ["serve", "--model", str(junk_model), *flags])
    assert err.startswith("slime-rl serve: ") and expected in err, err


def test_serve_config_validate_without_a_server(junk_model):
    ServeConfig(model=str(junk_model)).validate()
    ServeConfig(model=str(junk_model), host="::1").validate()
    ServeConfig(model=str(junk_model), host="10.0.0.5", api_key="k").validate()
    ServeConfig(model=str(junk_model), host="0.0.0.0", allow_unauthenticated=True).validate()
    with pytest.raises(ServeConfigError, match="--dtype must be one of float32, bfloat16, float16"):
        ServeConfig(model=str(junk_model), dtype="float64").validate()
    with pytest.raises(ServeConfigError, match="--max-body-mb must be > 0"):
        ServeConfig(model=str(junk_model), limits=ServerLimits(max_body_mb=0)).validate()
    with pytest.raises(ServeConfigError, match="--model .*: not a directory"):
        ServeConfig(model=str(junk_model / "nope")).validate()


def test_serve_has_a_flag_per_config_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one flag a line in the help
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    usage, options = capsys.readouterr().out.split("options:")
    flags = ["--" + f.name.replace("_", "-") for cls in (ServeConfig, ServerLimits) for f in dataclasses.fields(cls)]
    assert [flag for flag in flags if flag != "--limits" and not re.search(f"  {flag}[ \n]", options)] == []
    assert "limits:" in options and "--max-queued-requests INT" in options and "(default: $SLIME_RL_API_KEY)" in options
    monkeypatch.setenv("SLIME_RL_ADMIN_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--model", "m", "--max-n", "3", "--body-timeout-s", "2.5", "--port", "0",
                              "--allow-unauthenticated", "--dtype", "bfloat16"])
    cfg = serve_config_from_args(args)
    assert cfg == ServeConfig(model="m", port=0, allow_unauthenticated=True, dtype="bfloat16",
                              admin_api_key="from-env", limits=ServerLimits(max_n=3, body_timeout_s=2.5))


# ---- serve: a model directory that does not load ---------------------------------------------


def _tiny_config() -> dict:
    return tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=2, num_kv_heads=1, max_position_embeddings=64, eos_token_id=TOK.eos_token_id)


JUNK_MODELS = {
    "config.json not JSON": ("{model_type: llama", True, "JSONDecodeError"),
    "config.json not UTF-8": (b"\xff\xfe{}", True, "UnicodeDecodeError"),
    "config.json a list": ("[1, 2]", True, "AttributeError"),
    "config.json missing keys": ('{"model_type": "llama"}', True, "KeyError: 'num_attention_heads'"),
    "safetensors junk": (None, False, "safetensor"),  # SafetensorError, or a ValueError naming the file
}


@pytest.mark.parametrize("case", list(JUNK_MODELS))
def test_serve_with_a_junk_model_dir_is_one_line(capsys, tmp_path, case):
    config, good_weights, expected = JUNK_MODELS[case]
    config = json.dumps(_tiny_config()) if config is None else config
    (tmp_path / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    if good_weights:
        save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    else:
        (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    err = one_line_error(capsys, ["serve", "--model", str(tmp_path), "--port", "0"])
    assert err.startswith(f"slime-rl serve: --model {tmp_path}: cannot load: ") and expected.lower() in err.lower(), err


def test_serve_flags_reach_the_engine(capsys, monkeypatch, junk_model):
    from rollout.engine import EmbeddedEngine

    seen: list[dict] = []

    def from_pretrained(model_dir, **kwargs):
        seen.append(kwargs)
        raise ValueError("stop before serving")

    monkeypatch.setattr(EmbeddedEngine, "from_pretrained", staticmethod(from_pretrained))
    one_line_error(capsys, ["serve", "--model", str(junk_model), "--tokenizer", "char"])
    one_line_error(capsys, ["serve", "--model", str(junk_model), "--tokenizer", "char", "--allow-nonfinite-weights",
                            "--max-total-tokens", "64", "--page-size", "4", "--disable-radix-cache"])
    assert seen[0]["reject_nonfinite_weights"] and seen[0]["enable_prefix_cache"]
    assert not seen[1]["reject_nonfinite_weights"] and not seen[1]["enable_prefix_cache"]
    assert (seen[1]["max_total_tokens"], seen[1]["page_size"]) == (64, 4)


def test_unauthenticated_non_loopback_host_warns(capsys, junk_model):
    assert main(["serve", "--model", str(junk_model), "--host", "0.0.0.0", "--allow-unauthenticated"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()  # the junk model stops it after the warning
    assert "WARNING" in warning and "reachable without authentication" in warning and "0.0.0.0" in warning
    assert "cannot load" in error


# ---- serve: SIGTERM with a request thread stuck in a blocking call ---------------------------


def test_sigterm_stops_serve_with_a_stuck_request_thread(tmp_path):
    """A weight-group rendezvous whose master accepts but never answers holds a request thread in
    TCPStore; SIGTERM must still end the process within seconds (the thread is named and left behind)."""
    cfg = _tiny_config()
    model_dir = save_hf_checkpoint(tmp_path / "model", cfg, init_tiny_model(cfg, seed=0), TOK)
    cmd = [sys.executable, "-m", "slime_rl", "serve", "--model", str(model_dir), "--port", "0", "--max-n", "1",
           "--admin-api-key", "adm", "--group-init-timeout-s", "600", "--max-total-tokens", "256"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    dead_peer = socket.create_server(("127.0.0.1", 0))
    dead_peer.settimeout(60)
    seen: list[str] = []
    try:
        while "listening on http://" not in (seen[-1] if seen else ""):
            seen.append(lines.get(timeout=60))
        url = seen[-1].split("listening on ", 1)[1].split()[0]
        status, res = post(url + "/generate", {"text": "1+1=", "sampling_params": {"n": 2, "max_new_tokens": 1}})
        assert status == 400 and "--max-n" in json.dumps(res)  # the limits reached the app
        body = {"master_address": "127.0.0.1", "master_port": dead_peer.getsockname()[1], "rank_offset": 1,
                "world_size": 2, "group_name": "g", "backend": "gloo"}
        assert post(url + "/init_weights_update_group", body)[0] == 401  # so did the admin key
        auth = {"Authorization": "Bearer adm"}
        threading.Thread(target=_post_ignoring_errors, args=(url + "/init_weights_update_group", body, auth),
                         daemon=True).start()
        conn, _ = dead_peer.accept()  # the server's request thread is now inside the rendezvous
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        conn.close()
    finally:
        dead_peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = "".join(seen) + "".join(lines.queue)
    assert code == 0 and elapsed < 10, (code, elapsed, out[-2000:])  # ~5 s here; the rendezvous would take 600


def test_shutdown_leaves_without_joining_a_stuck_thread(monkeypatch, caplog):
    """What makes the exit above prompt whichever thread is stuck: serve's threads still alive after
    the engine closed are named, and the process leaves with os._exit instead of joining them."""
    from rollout import serve

    exits: list[int] = []
    monkeypatch.setattr(serve.os, "_exit", exits.append)
    monkeypatch.setattr(serve, "THREAD_JOIN_GRACE_S", 0.01)
    before = set(threading.enumerate())
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="slime-rl-server_0")  # not a daemon, as pool threads
    stuck.start()
    try:
        serve._exit_now_if_stuck(before, 3, closed=True)
    finally:
        release.set()
        stuck.join()
    assert exits == [3] and "still running after shutdown: slime-rl-server_0" in caplog.text
    serve._exit_now_if_stuck(before, 0, closed=True)  # the thread has ended: a normal return
    serve._exit_now_if_stuck(before, 0, closed=False)  # engine.close() never returned
    assert exits == [3, 0] and "engine.close()" in caplog.text


def _post_ignoring_errors(url: str, body: dict, headers: dict) -> None:
    try:
        post(url, body, headers=headers)
    except OSError:
        pass  # the server is gone: that is the point
