"""The sandbox (`slime_rl.sandbox`) and the `code` reward: hostile programs are contained and scored as failures
while the samples around them are still scored; hand-written solutions get the right rewards.

Every attack's test case expects the output the program prints only when the attack works ("escaped", or the
secret), so an escape would score 1 and fail the test; the host-side checks (the file is untouched, the
listener got no connection, no sandbox process is left) are made after the run. Short limits keep it quick.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from slime_rl.rewards import score_samples
from slime_rl.rewards.code import CodeReward, extract_program, parse_cases
from slime_rl.rewards.config import CodeRewardConfig, SandboxConfig
from slime_rl.sandbox import RunStatus, SandboxPool, SandboxUnavailable, isolation
from slime_rl.types import Sample

LIMITS = SandboxConfig(cpu_s=1, wall_s=3.0, memory_mb=256, max_procs=8, max_file_mb=4, max_output_kb=64,
                       max_parallel=2)
ESCAPED = {"tests": [{"input": "", "output": "escaped\n"}]}
needs_bwrap = pytest.mark.skipif(isolation.find_bwrap() is None, reason="bubblewrap (bwrap) is not installed")


def _sample(index: int, program: str, label) -> Sample:
    return Sample(prompt_ids=[], response_text=program, label=label, group_id=0, index=index)


@pytest.fixture(scope="module")
def reward():
    if isolation.find_bwrap() is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    r = CodeReward(CodeRewardConfig(sandbox=LIMITS))
    yield r
    r.close()


def _sandbox_processes(marker: str) -> list[str]:
    """Host processes that belong to this process's sandboxes: a leased uid, or `marker` on the command line."""
    leases = isolation.uid_leases()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            uid = int((proc / "status").read_text().split("\nUid:")[1].split()[0])
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue  # exited meanwhile
        if marker in cmdline or (os.geteuid() == 0 and leases.base <= uid < leases.base + leases.count):
            found.append(f"{proc.name} uid={uid} {cmdline!r}")
    return found


SOLUTION = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_TESTS = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0\n"},
                       {"input": "10 -3\n", "output": "7"}]}


def _attacks(tmp_path: Path, port: int, host_pid: int, marker: str, env_name: str, token: str) -> dict[str, tuple]:
    """name -> (program, label, what the reward dict must show)."""
    secret_file, existing, target = tmp_path / "secret.txt", tmp_path / "existing.txt", tmp_path / "written.txt"
    return {
        "network": (f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
s.sendall(b"escaped")
print("escaped")
""", ESCAPED, {"crashes": 1.0}),
        "env_secret": (f"""
import os
print(os.environ.get({env_name!r}, ""))
for pid in os.listdir("/proc"):
    try:
        env = open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace").split("\\0")
    except OSError:
        continue
    print(*[v.split("=", 1)[1] for v in env if v.startswith({env_name!r} + "=")])
""", {"tests": [{"input": "", "output": token}]}, {}),
        "file_secret": (f"""
for path in ({str(secret_file)!r}, "/proc/1/root" + {str(secret_file)!r}, "/proc/self/root" + {str(secret_file)!r}):
    try:
        print(open(path).read())
    except OSError:
        pass
""", {"tests": [{"input": "", "output": token}]}, {}),
        "write_outside": (f"""
wrote = []
for path in ({str(target)!r}, {str(existing)!r}, "/proc/1/root" + {str(existing)!r}, "/box/solution.py",
             "/usr/escaped", "/escaped", "/dev/shm/escaped", "/dev/escaped"):
    try:
        with open(path, "w") as f:
            f.write("escaped")
        wrote.append(path)
    except OSError:
        pass
print("escaped" if wrote else "contained")
""", ESCAPED, {}),
        "nested_user_namespace": ("""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000  # root in a namespace of its own: mounts, more kernel
print("escaped" if any(libc.unshare(flags) == 0 for flags in (CLONE_NEWUSER, CLONE_NEWUSER | CLONE_NEWNS))
      else "contained")
""", ESCAPED, {}),
        "fork_bomb": ("""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", ESCAPED, {"timeouts": 1.0}),
        "memory_bomb": ("""
chunks = [bytearray(100 << 20) for _ in range(100)]  # 10 GB
print("escaped")
""", ESCAPED, {"crashes": 1.0}),
        "cpu_loop": ("while True:\n    pass\n", ESCAPED, {"timeouts": 1.0}),
        "sleep_loop": ("import time\nwhile True:\n    time.sleep(0.5)\n", ESCAPED, {"timeouts": 1.0}),
        "gigabyte_output": ("""
import sys
chunk = "x" * (1 << 20)
for _ in range(1024):
    sys.stdout.write(chunk)
print("escaped")
""", ESCAPED, {"crashes": 1.0}),
        "kill_parent": (f"""
import os
for kill in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({host_pid}, 9), lambda: os.kill(1, 9),
             lambda: os.killpg(os.getpgid(os.getppid()), 9), lambda: os.kill(-1, 9)):
    try:
        kill()
    except OSError:
        pass
print("done")  # kill(-1) spares the caller; whether the host survived is checked on the host
""", ESCAPED, {}),
        "background_process": (f"""
import os, sys
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"up")
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", {marker!r}])
    os._exit(0)
os.close(w)
os.read(r, 2)
print("daemon started")
""", ESCAPED, {}),
    }


def test_attacks_are_contained_scored_as_failures_and_the_run_goes_on(reward, tmp_path, monkeypatch):
    token, marker = secrets.token_hex(16), f"slime-sandbox-marker-{secrets.token_hex(8)}"
    env_name = "SLIME_TEST_PLANTED_SECRET"
    monkeypatch.setenv(env_name, token)
    (tmp_path / "secret.txt").write_text(token)
    (tmp_path / "existing.txt").write_text("original")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)):  # the listener works from the host
        listener.accept()[0].close()
    sentinel = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)

    attacks = _attacks(tmp_path, port, os.getpid(), marker, env_name, token)
    samples, expected = [_sample(0, SOLUTION, SUM_TESTS)], {}
    for name, (program, label, shows) in attacks.items():
        expected[len(samples)] = (name, shows)
        samples.append(_sample(len(samples), program, label))
        if len(samples) % 4 == 0:
            samples.append(_sample(len(samples), SOLUTION, SUM_TESTS))
    samples.append(_sample(len(samples), SOLUTION, SUM_TESTS))

    stats = score_samples(samples, reward, timeout_s=60, max_workers=4)

    assert stats.errors == 0 and stats.timeouts == 0, stats.failed_ids
    for i, sample in enumerate(samples):
        if i not in expected:
            assert sample.reward["reward"] == 1.0, (i, sample.reward)  # the samples around the attacks
            continue
        name, shows = expected[i]
        assert sample.reward["reward"] == 0.0 and sample.reward["passed"] == 0.0, (name, sample.reward)
        assert sample.reward["compile_error"] == 0.0, (name, sample.reward)
        for key, value in shows.items():
            assert sample.reward[key] == value, (name, key, sample.reward)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection from the sandbox arrived
    listener.close()
    assert not (tmp_path / "written.txt").exists()
    assert (tmp_path / "existing.txt").read_text() == "original"
    assert sentinel.poll() is None  # a host process of the same user survived the kill attempts
    sentinel.kill()
    sentinel.wait()
    assert _sandbox_processes(marker) == []  # nothing survives a sample: not the daemon, not the fork bomb


@pytest.fixture(scope="module")
def pool(reward):
    return reward.pool


@needs_bwrap
def test_a_fork_bomb_gets_at_most_max_procs_processes(pool):
    program = """
import os
r, w = os.pipe()
n = 0
try:
    while True:
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # wait until the parent is done counting
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
"""
    result = pool.run(program)
    assert result.status is RunStatus.OK, result
    assert 1 <= int(result.stdout) <= LIMITS.max_procs - 1  # the program itself is one of max_procs


@needs_bwrap
def test_the_seccomp_filter_holds_and_leaves_threads_and_subprocesses_working(pool):
    if pool.spec.seccomp is None:
        pytest.skip("no seccomp filter for this machine")
    result = pool.run("""
import subprocess, threading
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("Seccomp:")][0])
t = threading.Thread(target=print, args=("thread",))
t.start()
t.join()
print(subprocess.run(["echo", "subprocess"], capture_output=True, text=True).stdout.strip())
""")
    assert result.status is RunStatus.OK and result.stdout.split() == ["2", "thread", "subprocess"], result


@needs_bwrap
def test_a_gigabyte_of_output_is_cut_at_the_cap_without_host_memory(pool):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = pool.run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n")
    assert result.status is RunStatus.OUTPUT_LIMIT, result.status
    assert len(result.stdout) + len(result.stderr) <= LIMITS.max_output_kb << 10
    assert result.elapsed_s < LIMITS.wall_s  # cut by the cap, not the clock
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: < 100 MiB more


@needs_bwrap
def test_scratch_is_private_bounded_and_removed(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write = pool.run("import os\nopen('note', 'w').write('x')\nprint(os.getcwd(), os.listdir('.'))")
    assert write.status is RunStatus.OK and write.stdout.split()[0] == "/tmp", write
    assert pool.run("import os\nprint(os.listdir('.'))").stdout.strip() == "[]"  # the next run starts empty
    big = pool.run(f"open('big', 'wb').write(b'x' * ({LIMITS.max_file_mb} << 21))")
    assert big.status is RunStatus.RUNTIME_ERROR, big  # RLIMIT_FSIZE / the tmpfs size
    assert list(tmp_path.iterdir()) == []  # every host directory removed


@needs_bwrap
@pytest.mark.parametrize("program, mode, status", [
    ("print('hi')", "run", RunStatus.OK),
    ("raise SystemExit(3)", "run", RunStatus.RUNTIME_ERROR),
    ("import os\nos.kill(os.getpid(), 9)", "run", RunStatus.KILLED),
    ("x = ' ' * (1 << 30)", "run", RunStatus.MEMORY),
    ("def f(:\n    pass", "check", RunStatus.COMPILE_ERROR),
    ("def f():\n    return 1", "check", RunStatus.OK),
])
def test_run_statuses(pool, program, mode, status):
    result = pool.run(program, mode=mode)
    assert result.status is status, result


@needs_bwrap
def test_runs_from_many_threads_share_the_pool_bound(pool, monkeypatch):
    """Two callers' run_many calls hold at most max_parallel runs at once (fake runs parked on a gate)."""
    gate, cond, active, seen = threading.Event(), threading.Condition(), [0], [0]

    def fake_run(*args, **kwargs):
        with cond:
            active[0] += 1
            seen[0] = max(seen[0], active[0])
            cond.notify_all()
        gate.wait()
        with cond:
            active[0] -= 1
        return "done"

    monkeypatch.setattr("slime_rl.sandbox.pool.run_program", fake_run)
    results = []
    callers = [threading.Thread(target=lambda: results.append(pool.run_many([("p", "")] * 3))) for _ in range(2)]
    for t in callers:
        t.start()
    with cond:
        assert cond.wait_for(lambda: active[0] == pool.max_parallel, timeout=10)
    assert not pool._slots.acquire(blocking=False)  # every slot held: a third run would wait
    gate.set()
    for t in callers:
        t.join()
    assert seen[0] == pool.max_parallel == 2 and results == [["done"] * 3] * 2


def _two_scorings(reward, all_reward, samples, skip_in_all: set[int]):
    """Rewards under `fraction`, then under `all` (None for `skip_in_all`: slow samples scored once)."""
    score_samples(samples, reward, timeout_s=60, max_workers=4)
    fractions = [s.reward for s in samples]
    again = [s for i, s in enumerate(samples) if i not in skip_in_all]
    for s in again:
        s.reward = None
    score_samples(again, all_reward, timeout_s=60, max_workers=4)
    return fractions, [None if i in skip_in_all else s.reward for i, s in enumerate(samples)]


def test_hand_written_solutions_score_right_in_both_modes(reward):
    all_reward = CodeReward(CodeRewardConfig(scoring="all", sandbox=LIMITS))
    asserts = {"asserts": ["assert f(2) == 7", "assert f(0) == 1", "assert f(-1) == -2"]}
    cases = {  # name -> (response, label, fraction-mode dict subset, all-mode reward)
        "right": (SOLUTION, SUM_TESTS, {"reward": 1.0, "passed": 3.0, "answer_correct": 1.0}, 1.0),
        "right_fenced": ("Read both and add:\n```python\n" + SOLUTION + "```\nDone.", SUM_TESTS,
                         {"reward": 1.0}, 1.0),
        "trailing_space": ("a, b = map(int, input().split())\nprint(a + b, end='  \\n\\n')", SUM_TESTS,
                           {"reward": 1.0}, 1.0),
        "wrong": ("a, b = map(int, input().split())\nprint(a - b)", SUM_TESTS,
                  {"reward": 0.0, "passed": 0.0, "crashes": 0.0, "timeouts": 0.0}, 0.0),
        "partly": ("a, b = map(int, input().split())\nprint(abs(a) + b)", SUM_TESTS,
                   {"reward": 2 / 3, "passed": 2.0, "total": 3.0, "answer_correct": 0.0}, 0.0),
        "slow": ("import time\ntime.sleep(30)\n" + SOLUTION, SUM_TESTS, {"reward": 0.0, "timeouts": 3.0}, None),
        "crashing": ("a, b = input().split()\nprint(a + b + 1)", SUM_TESTS, {"reward": 0.0, "crashes": 3.0}, 0.0),
        "syntax_error": ("a, b = map(int input().split())\nprint(a + b)", SUM_TESTS,
                         {"reward": 0.0, "compile_error": 1.0, "passed": 0.0, "total": 3.0, "timeouts": 0.0}, 0.0),
        "asserts_right": ("```py\ndef f(x):\n    return 3 * x + 1\n```", asserts, {"reward": 1.0, "total": 3.0}, 1.0),
        "asserts_wrong": ("def f(x):\n    return 3 * x + 2", asserts, {"reward": 0.0, "crashes": 3.0}, 0.0),
        "both_styles": ("import sys\ndef f(x):\n    return 3 * x + 1\n"
                        "for n in sys.stdin.read().split():\n    print(f(int(n)))",
                        {"tests": [{"input": "4\n", "output": "13\n"}], "asserts": ["assert f(1) == 4"]},
                        {"reward": 1.0, "total": 2.0}, 1.0),
        "json_label": (SOLUTION, '{"tests": [{"input": "2 2", "output": "4"}]}', {"reward": 1.0}, 1.0),
    }
    samples = [_sample(i, response, label) for i, (response, label, _, _) in enumerate(cases.values())]
    try:
        fractions, alls = _two_scorings(reward, all_reward, samples, {list(cases).index("slow")})
    finally:
        all_reward.close()
    for name, got, got_all, (_, _, want, want_all) in zip(cases, fractions, alls, cases.values()):
        assert {k: got[k] for k in want} == pytest.approx(want), (name, got)
        assert got_all is None or got_all["reward"] == want_all, (name, got_all)


def test_a_malformed_label_is_that_samples_failure_only(reward):
    labels = [{"asserts": "assert True"}, {"tests": [{"input": "1"}]}, "not json", {"expected": "3"}, {"tests": []},
              SUM_TESTS]
    samples = [_sample(i, SOLUTION, label) for i, label in enumerate(labels)]
    stats = score_samples(samples, reward, timeout_s=60)
    assert stats.errors == len(labels) - 1
    assert [s.reward.get("reward_error", 0.0) for s in samples] == [1.0] * (len(labels) - 1) + [0.0]
    assert samples[-1].reward["reward"] == 1.0


@pytest.mark.parametrize("label, message", [
    ({"asserts": "assert True"}, "'asserts' must be a list"),
    ({"tests": [{"input": "1"}]}, "tests[0] must be"),
    ("{bad json", "not JSON"),
    (["assert True"], "must be a dict"),
    ({"tests": [], "extra": 1}, "nothing else"),
    ({"tests": []}, "no test case"),
    ({"asserts": ["  "]}, "asserts[0] must be a non-empty string"),
])
def test_parse_cases_names_what_is_wrong(label, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_cases(label, "pass")


def test_extract_program_prefers_the_last_python_block():
    assert extract_program("no fences") == "no fences"
    assert extract_program("```python\na = 1\n```\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_program("```python\na = 1\n```\n```text\nnot code\n```") == "a = 1\n"
    assert extract_program("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_program("Here:\n```python\ncut = 1\noff") == "cut = 1\noff"  # truncated generation


def test_without_bubblewrap_the_reward_refuses_to_run(monkeypatch):
    monkeypatch.setattr(isolation, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match=r"reward\.code\.sandbox\.allow_unsandboxed"):
        CodeReward(CodeRewardConfig(sandbox=LIMITS))
    with pytest.raises(SandboxUnavailable, match=r"reward\.code\.sandbox\.allow_unsandboxed"):
        SandboxPool(SandboxConfig(isolation="rlimits"))


@needs_bwrap
def test_limits_too_tight_for_the_interpreter_fail_at_set_up_naming_the_fields():
    with pytest.raises(SandboxUnavailable, match="raise memory_mb, cpu_s or wall_s"):
        SandboxPool(SandboxConfig(memory_mb=4))


def test_rlimits_only_runs_behind_the_flag_with_one_loud_warning(monkeypatch, caplog):
    monkeypatch.setattr(isolation, "find_bwrap", lambda: None)
    monkeypatch.setattr(isolation, "_warned", threading.Event())
    cfg = CodeRewardConfig(sandbox=SandboxConfig(allow_unsandboxed=True, cpu_s=1, wall_s=5, max_parallel=2))
    with caplog.at_level(logging.WARNING, logger="slime_rl.sandbox.isolation"):
        reward = CodeReward(cfg)
        second = SandboxPool(cfg.sandbox)
    second.close()
    warnings = [r for r in caplog.records if "UNSANDBOXED" in r.getMessage()]
    assert len(warnings) == 1 and "allow_unsandboxed" in warnings[0].getMessage()
    assert reward.pool.spec.kind == "rlimits"
    try:
        right = reward(_sample(0, SOLUTION, SUM_TESTS))
        crash = reward(_sample(1, "raise ValueError", SUM_TESTS))
        env = reward.pool.run("import os\nprint(sorted(os.environ))")
    finally:
        reward.close()
    assert right["reward"] == 1.0 and crash["crashes"] == 3.0
    assert env.status is RunStatus.OK and env.stdout.strip() in ("['PATH']", "['LC_CTYPE', 'PATH']")
