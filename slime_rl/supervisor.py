"""Engine fault tolerance: health probes, removal from routing, restart and re-sync of dead engines.

    supervisor = EngineSupervisor(urls, sync_factory=http_sync_factory(trainer, cfg.sync), router=router,
                                  restart=launch.restart_engine, interval_s=1.0, timeout_s=5.0, max_restarts=3)
    metrics = supervisor.push(version)     # instead of WeightSync.push: survives an engine dying mid-push
    with supervisor.trainer_idle():        # the trainer holds the last pushed weights and is not in use:
        groups = rollout.get(...)          # a replacement engine may be re-synced from it meanwhile
    supervisor.close()

Each engine is a *slot* (its URL changes when it is restarted). A slot is `serving` (in the router and in
weight sync), `restarting` (the `restart` callback runs, then the new engine must answer /health),
`ready` (up, waiting for the current weights; not routed), or `down` (no restart callback, or
`max_restarts` spent: it stays out for the rest of the job).

Death. A background thread GETs /health of every serving and ready engine each `interval_s`; a probe
not answered 2xx within `timeout_s` fails, so a hung engine counts like a dead one. FAILURES_TO_DIE = 2
consecutive failures declare the death: one probe lost on a loaded machine is not worth a restart,
and a dead engine is still noticed within ~2 intervals (the built-in router stops sending it requests
on the first connection error already). A weight push that fails probes its engines once; an engine
that does not answer is dead at once (the failed push is the first strike).

On death the engine leaves the router at once, leaves weight sync (a `WeightSync` holds a fixed list of
endpoints: it is rebuilt over the remaining engines on its next use) and, if its slot has restarts left,
a thread of its own calls `restart(url) -> new_url` and waits until the new engine is healthy.

Re-sync. A replacement serves the checkpoint it was launched from. It enters the router only once it
serves the version last pushed, so no request ever sees stale weights: before the first push, at once
(every engine serves the checkpoint); else by a push of that version to it alone, from its restart
thread, while the caller holds `trainer_idle()` (the trainer holds exactly the last pushed weights and
nobody else calls it: a trainer is not safe to read while it trains, nor from two threads); else by the
next `push`, which includes every ready engine.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from rollout.client import EngineClient
from weight_sync.config import SyncConfig
from weight_sync import SyncError, WeightSync

FAILURES_TO_DIE = 2  # consecutive failed /health probes that declare an engine dead
SERVING, RESTARTING, READY, DOWN = "serving", "restarting", "ready", "down"
_JOIN_S = 10.0  # how long close() waits for each restart thread


def probe(url: str, timeout_s: float, api_key: str | None = None) -> str | None:
    """None when GET url/health answers 2xx within timeout_s; else why not, for the log."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=headers), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        return f"/health answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, TimeoutError):
            return f"/health not answered within {timeout_s} s"
        return f"/health failed: {reason}"
    except TimeoutError:
        return f"/health not answered within {timeout_s} s"
    except (OSError, http.client.HTTPException) as exc:  # e.g. the connection reset mid-answer
        return f"/health failed: {type(exc).__name__}: {exc}"


def http_sync_factory(trainer: Any, settings: SyncConfig, api_key: str | None = None,
                      log: Callable[[str], None] = print) -> Callable[[list[str]], WeightSync]:
    """`sync_factory` for SGLang-protocol engines: a `WeightSync` from `trainer` over one client per URL."""

    def build(urls: list[str]) -> WeightSync:
        clients = [EngineClient(u, api_key=api_key, max_retries=0) for u in urls]  # updates are never resent
        try:
            return WeightSync(trainer, clients, settings, log=log)
        except BaseException:
            for c in clients:
                c.close()
            raise

    return build


@dataclass
class _Slot:
    """One engine position; `epoch` grows at every death so stale probes and threads can tell."""

    index: int
    url: str
    state: str = SERVING
    failures: int = 0  # consecutive failed probes
    restarts: int = 0
    epoch: int = 0


class EngineSupervisor:
    """Keeps a set of engines healthy during a job: probes, routing, restarts, weight pushes.

    urls: the engines, all serving when the supervisor starts. sync_factory(urls): a WeightSync over those
    engines (e.g. `http_sync_factory`). router: has add_worker/remove_worker, or None (a router we do not
    own: only restarts and weight sync are managed). restart(url) -> new_url: replaces the engine at url
    (dead, or never healthy after a previous restart) and returns the new engine's URL; None for engines
    we do not own (a dead one is only dropped). interval_s: seconds between probes (0: no background
    probes; deaths are then noticed by `push` only). timeout_s: per probe. max_restarts: per slot, over
    the job (a restart that does not bring a healthy engine within restart_timeout_s counts too).
    on_change(urls): called with the serving URLs after each change (e.g. to update a client's
    control_urls).
    """

    def __init__(self, urls: list[str], *, sync_factory: Callable[[list[str]], WeightSync], router: Any = None,
                 restart: Callable[[str], str] | None = None, interval_s: float = 1.0, timeout_s: float = 5.0,
                 max_restarts: int = 3, restart_timeout_s: float = 300.0, api_key: str | None = None,
                 on_change: Callable[[list[str]], None] | None = None, log: Callable[[str], None] = print):
        if not urls:
            raise ValueError("EngineSupervisor needs at least one engine URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"engine URLs must be distinct, got {urls}")
        for name, value in (("interval_s", interval_s), ("max_restarts", max_restarts)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("timeout_s", timeout_s), ("restart_timeout_s", restart_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self._slots = [_Slot(i, u.rstrip("/")) for i, u in enumerate(urls)]
        self._sync_factory, self._router, self._restart = sync_factory, router, restart
        self.interval_s, self.timeout_s, self.max_restarts = interval_s, timeout_s, max_restarts
        self.restart_timeout_s, self.api_key = restart_timeout_s, api_key
        self._on_change, self.log = on_change, log
        self.events: list[tuple[float, str, str]] = []  # (time.time(), url, what)
        self._deaths = self._restarts = 0
        # Lock order: _sync before _state, never the other way. _state guards slots, counters and events
        # (short holds); _sync serializes everything that reads the trainer or writes engine weights.
        self._state = threading.Condition()
        self._sync = threading.Condition()
        self._weights: WeightSync | None = None
        self._weights_urls: list[str] = []
        self._last_version: int | None = None
        self._idle = 0  # open trainer_idle() windows
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._monitor: threading.Thread | None = None
        if interval_s > 0:
            self._monitor = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
            self._monitor.start()

    # ---- public API -------------------------------------------------------------------------

    def push(self, version: int) -> dict[str, float]:
        """WeightSync.push to every serving and ready engine; an engine found dead on failure is handled
        (out of routing, restarted) and the push retried on the others, at most once per dead engine.
        Any other failure raises. Returns the sync metrics plus `metrics()`."""
        with self._sync:
            failed: set[str] = set()
            while True:
                with self._state:
                    targets, described = self._urls(SERVING, READY), self._describe()
                if not targets:
                    raise SyncError(f"no engine left to push weight version {version} to: {described}",
                                    phase="supervisor")
                try:
                    metrics = self._sync_over(targets).push(version)
                    break
                except Exception as exc:  # noqa: BLE001 - re-raised unless an engine is found dead
                    dead = self._probe_all(targets)
                    fresh = {u: why for u, why in dead.items() if u not in failed}
                    if not fresh:
                        raise
                    failed |= fresh.keys()
                    cause = f"{type(exc).__name__}: {str(exc)[:200]}"
                    for url, why in fresh.items():
                        self._declare_dead(url, None, f"{why}; the push of version {version} failed: {cause}")
                    self.log(f"[engines] retrying the push of version {version} without {sorted(fresh)}")
            self._last_version = version
            for slot in self._slots_in(READY):
                if slot.url in targets:
                    self._admit(slot, slot.epoch, f"got version {version} with the others")
            self._sync.notify_all()
        return {**metrics, **self.metrics()}

    def check(self) -> dict[str, list[str]]:
        """WeightSync.check over the serving engines: {url: mismatching tensors}, empty when all agree.
        Reads the trainer: call it where `push` could be called."""
        with self._sync:
            return self._sync_over(self.serving()).check()

    @contextlib.contextmanager
    def trainer_idle(self) -> Iterator[None]:
        """A window in which a replacement engine may be re-synced from the trainer in the background. Open
        it only while the trainer holds the weights of the last push and this thread does not use it (e.g.
        around waiting for rollouts); leaving it waits for a re-sync in progress."""
        with self._sync:
            self._idle += 1
            self._sync.notify_all()
        try:
            yield
        finally:
            with self._sync:
                self._idle -= 1

    def wait_for_engines(self, timeout_s: float) -> list[str]:
        """Block until at least one engine serves; returns the serving URLs. TimeoutError after timeout_s,
        RuntimeError at once when every engine is down for good."""
        deadline = time.monotonic() + timeout_s
        with self._state:
            while not (serving := self._urls(SERVING)):
                if all(s.state == DOWN for s in self._slots):
                    raise RuntimeError(f"every engine is down for good: {self._describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no engine serving after {timeout_s} s: {self._describe()}")
                self._state.wait(left)
            return serving

    def serving(self) -> list[str]:
        """URLs of the engines in service (routed and synced), in slot order."""
        with self._state:
            return self._urls(SERVING)

    def states(self) -> dict[str, str]:
        """Each slot's current URL -> its state (serving / restarting / ready / down)."""
        with self._state:
            return {s.url: s.state for s in self._slots}

    def metrics(self) -> dict[str, float]:
        """Engines serving now, restarts started and deaths seen over the job."""
        with self._state:
            return {"engines/healthy": float(len(self._urls(SERVING))), "engines/restarts": float(self._restarts),
                    "engines/deaths": float(self._deaths)}

    def close(self) -> None:
        """Stop probing and restarting, close the current WeightSync (not the engines)."""
        self._stop.set()
        for cond in (self._state, self._sync):
            with cond:
                cond.notify_all()
        if self._monitor is not None:
            self._monitor.join()
        for thread in self._threads:
            thread.join(_JOIN_S)
            if thread.is_alive():
                self.log(f"[engines] {thread.name} still running at close (a restart callback blocks)")
        with self._sync:
            self._close_weights()

    def __enter__(self) -> "EngineSupervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- state helpers (callers hold _state or accept a snapshot) -------------------------------

    def _urls(self, *states: str) -> list[str]:
        return [s.url for s in self._slots if s.state in states]

    def _slots_in(self, state: str) -> list[_Slot]:
        with self._state:
            return [s for s in self._slots if s.state == state]

    def _describe(self) -> str:
        return ", ".join(f"{s.url} {s.state}" for s in self._slots)

    def _event(self, url: str, what: str) -> None:
        """Record (caller holds _state) and wake waiters."""
        self.events.append((time.time(), url, what))
        self._state.notify_all()

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.serving())
        except Exception as exc:  # noqa: BLE001 - the caller's hook must not stop the supervision
            self.log(f"[engines] on_change({self.serving()}) failed: {type(exc).__name__}: {exc}")

    # ---- weight sync ----------------------------------------------------------------------------

    def _sync_over(self, urls: list[str]) -> WeightSync:
        """The WeightSync over exactly `urls` (caller holds _sync), rebuilt when the set changed."""
        if self._weights is None or self._weights_urls != urls:
            self._close_weights()
            if not urls:
                with self._state:
                    raise SyncError(f"no engine serving: {self._describe()}", phase="supervisor")
            self._weights, self._weights_urls = self._sync_factory(urls), list(urls)
        return self._weights

    def _close_weights(self) -> None:
        weights, urls = self._weights, self._weights_urls
        self._weights, self._weights_urls = None, []
        if weights is not None:
            try:
                weights.close()
            except Exception as exc:  # noqa: BLE001 - a dead engine's endpoint may fail to close; go on
                self.log(f"[engines] closing the weight sync over {urls} failed: {exc}")

    # ---- health ---------------------------------------------------------------------------------

    def _probe_all(self, urls: list[str]) -> dict[str, str]:
        """{url: why} for the engines among `urls` that fail one probe (concurrently)."""
        with ThreadPoolExecutor(len(urls)) as pool:
            results = list(pool.map(lambda u: probe(u, self.timeout_s, self.api_key), urls))
        return {u: why for u, why in zip(urls, results) if why is not None}

    def _watch(self) -> None:
        """The probe loop: every interval_s, each serving or ready engine."""
        with ThreadPoolExecutor(len(self._slots), thread_name_prefix="engine-probe") as pool:
            while not self._stop.wait(self.interval_s):
                with self._state:
                    watched = [(s, s.url, s.epoch) for s in self._slots if s.state in (SERVING, READY)]
                results = list(pool.map(lambda w: probe(w[1], self.timeout_s, self.api_key), watched))
                for (slot, url, epoch), why in zip(watched, results):
                    with self._state:
                        if slot.epoch != epoch:
                            continue
                        slot.failures = 0 if why is None else slot.failures + 1
                        dead = slot.failures >= FAILURES_TO_DIE
                    if dead:
                        self._declare_dead(url, epoch, f"{why}, {FAILURES_TO_DIE} probes in a row")

    def _declare_dead(self, url: str, epoch: int | None, why: str) -> None:
        """Take the engine at `url` out of routing and weight sync, then restart its slot or give it up.
        A no-op when the slot has moved on (another death handled it; epoch None: any epoch)."""
        with self._state:
            slot = next((s for s in self._slots if s.url == url), None)
            if slot is None or slot.state not in (SERVING, READY) or epoch not in (None, slot.epoch):
                return
            routed = slot.state == SERVING
            slot.epoch += 1
            slot.failures = 0
            self._deaths += 1
            if self._restart is None:
                slot.state, then = DOWN, "removed from routing and weight sync (not ours to restart)"
            elif slot.restarts >= self.max_restarts:
                slot.state, then = DOWN, f"giving up: {self.max_restarts} restart(s) spent, it stays out"
            else:
                slot.state, slot.restarts = RESTARTING, slot.restarts + 1
                self._restarts += 1
                then = f"restarting ({slot.restarts}/{self.max_restarts})"
            self._event(url, "died")
            if slot.state == DOWN:
                self._event(url, "down")
            epoch = slot.epoch
        self.log(f"[engines] {url} died ({why}); {then}")
        if routed and self._router is not None:
            try:
                self._router.remove_worker(url)
            except ValueError:
                pass  # not registered (any more): nothing routes to it
            except Exception as exc:  # noqa: BLE001 - the router's own health checks will eject it
                self.log(f"[engines] could not remove {url} from the router: {exc}")
        self._changed()
        if slot.state == RESTARTING and not self._stop.is_set():
            thread = threading.Thread(target=self._revive, args=(slot, epoch), daemon=True,
                                      name=f"engine-restart-{slot.index}")
            self._threads.append(thread)
            thread.start()

    # ---- restart and re-sync ----------------------------------------------------------------------

    def _revive(self, slot: _Slot, epoch: int) -> None:
        """Restart thread: restart until a healthy engine comes up (or restarts run out), then re-sync it."""
        while not self._stop.is_set():
            old = slot.url
            try:
                new = self._restart(old).rstrip("/")
                with self._state:
                    slot.url = new  # a replacement that never gets healthy is what the next restart replaces
                self._wait_healthy(new)
            except Exception as exc:  # noqa: BLE001 - counted as a restart; the next one may succeed
                with self._state:
                    self._event(slot.url, "restart_failed")
                    if slot.restarts >= self.max_restarts:
                        slot.state = DOWN
                        self._event(slot.url, "down")
                        then = f"giving up: {self.max_restarts} restart(s) spent, it stays out"
                    else:
                        slot.restarts += 1
                        self._restarts += 1
                        then = f"restarting ({slot.restarts}/{self.max_restarts})"
                self.log(f"[engines] restarting {old} failed ({type(exc).__name__}: {exc}); {then}")
                if slot.state == DOWN:
                    return
                continue
            with self._state:
                if self._stop.is_set():
                    return
                slot.state, slot.failures = READY, 0
                self._event(new, "restarted")
            self.log(f"[engines] {new} (replacing {old}) is healthy; it serves once it has the current weights")
            self._resync(slot, epoch)
            return

    def _wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + self.restart_timeout_s
        while (why := probe(url, self.timeout_s, self.api_key)) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy {self.restart_timeout_s} s after its restart: {why}")
            if self._stop.wait(min(0.2, self.restart_timeout_s)):
                raise RuntimeError("the supervisor was closed")

    def _resync(self, slot: _Slot, epoch: int) -> None:
        """Bring a ready engine to the last pushed version and route it (see the module docstring for when)."""
        with self._sync:
            logged = False
            while self._last_version is not None and not self._idle:
                if self._stop.is_set() or slot.state != READY or slot.epoch != epoch:
                    return  # closed, or a push / another death took care of it
                if not logged:
                    self.log(f"[engines] {slot.url} waits for an idle trainer or the next weight push")
                    logged = True
                self._sync.wait()
            if self._stop.is_set() or slot.state != READY or slot.epoch != epoch:
                return
            version = self._last_version
            if version is None:
                self._admit(slot, epoch, "serves the checkpoint like the others (no weight push yet)")
                return
            try:
                weights = self._sync_factory([slot.url])
                try:
                    weights.push(version)
                finally:
                    weights.close()
            except Exception as exc:  # noqa: BLE001 - a dead engine restarts; a live one waits for the push
                why = probe(slot.url, self.timeout_s, self.api_key)
                if why is not None:
                    self._declare_dead(slot.url, epoch, f"{why}; re-sync of version {version} failed: {exc}")
                else:
                    self.log(f"[engines] re-sync of {slot.url} to version {version} failed ({exc}); "
                             f"it gets the next weight push")
                return
            self._admit(slot, epoch, f"re-synced to version {version}")

    def _admit(self, slot: _Slot, epoch: int, how: str) -> None:
        """A ready engine with the current weights joins the router and weight sync (caller holds _sync)."""
        url = slot.url
        try:
            if self._router is not None:
                self._router.add_worker(url, timeout_s=self.restart_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the router cannot reach it: treat as a death
            self._declare_dead(url, epoch, f"the router could not add it: {exc}")
            return
        with self._state:
            admitted = slot.epoch == epoch and slot.state == READY
            if admitted:
                slot.state = SERVING
                self._event(url, "serving")
        if not admitted:  # it died while being added: nothing may route to it
            if self._router is not None:
                with contextlib.suppress(Exception):
                    self._router.remove_worker(url)
            return
        self.log(f"[engines] {url} {how}; serving again")
        self._changed()
