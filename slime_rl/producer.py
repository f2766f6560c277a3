"""The generation side of the loop: scored groups for the trainer, synchronously or ahead of it.

`RolloutWorker` owns one asyncio event loop in a daemon thread; every request to
the engines (in-process or HTTP clients) goes out from it. A group is the `n`
samples of one prompt; it is generated until none of its samples is aborted,
then scored. A group whose generation fails (an engine died mid-request, a
connection broke after the client's own retries) is re-queued: it keeps its
identity and its seeds and goes out again, so it is trained on once, never
lost and never twice. `worker.stats.requeued` counts those.

Groups are numbered in the order their prompts are drawn: group g belongs to
wave g // B (B = prompts per step) and has id g % B in it, and its request seeds
come from (seed, wave, id, sample index). So sync and async runs of one seed
draw the same prompts with the same seeds.

- `SyncRollout`: step s generates wave s with the weights of step s, all at once.
- `AsyncRollout`: a producer keeps up to B groups in flight (`max_inflight`:
  more, so that rollouts which wait on a slow reward or tool overlap each
  other) and puts scored groups into a `RolloutBuffer`; wave w may start once the trainer has finished
  w - max_staleness steps, so no group is older than max_staleness versions
  when trained (the buffer checks it too, and groups that are older anyway are
  generated again). Weight pushes are either waited for (one-step-off: the
  push holds new starts and waits for in-flight groups) or interrupt
  generation (fully async: engines abort in-flight requests at the commit;
  the samples keep their tokens, each with its version, and resume under the
  new weights; with `partial_rollout` off they restart from the prompt).
- `ReplayRollout`: the groups a run saved with `debug.save_rollouts`, step by step.
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rollout.episodes import Episode, SingleTurn
from rollout.groups import merge_output, new_group
from rollout.strategies import GroupRunner, agenerate_keyed
from slime_rl.buffer import BufferClosed, RolloutBuffer, group_version
from slime_rl.timing import PhaseTimer
from slime_rl.types import Sample, SampleStatus, SamplingParams

Group = list[Sample]
_MAX_ATTEMPTS = 20  # generation attempts per group before the run gives up on the engines


@dataclass
class RolloutStats:
    requeued: int = 0  # group generations that failed and went out again
    resumed: int = 0  # sample continuations after an interruption (partial rollouts)
    regenerated: int = 0  # groups too stale to train, generated again from their prompts

    def metrics(self) -> dict[str, float]:
        return {"rollout/requeued_groups": float(self.requeued), "rollout/resumed_samples": float(self.resumed),
                "rollout/regenerated_groups": float(self.regenerated)}


def generated_tokens(s: Sample) -> int:
    """Tokens the engine generated for `s` (not a multi-turn episode's observation tokens, loss mask 0)."""
    return sum(s.loss_mask) if len(s.loss_mask) == len(s.response_ids) else len(s.response_ids)


def _unfinished(group: Group) -> list[Sample]:
    return [s for s in group if s.status == SampleStatus.ABORTED]


def _restart(group: Group) -> None:
    """Drop every generated token: the group goes out again from its prompt."""
    for s in group:
        s.response_ids, s.rollout_logprobs, s.loss_mask, s.weight_versions = [], [], [], []
        s.response_text, s.reward, s.status = "", None, SampleStatus.ABORTED


def group_uid(group: Group) -> str:
    return group[0].metadata["uid"]


class RolloutWorker:
    """Generates and scores groups on an event loop of its own (see the module docstring)."""

    def __init__(self, engine, sampling: SamplingParams, seed: int, decode: Callable | None,
                 score: Callable[[list[Sample]], Any], log=print, episode: Episode | None = None,
                 score_threads: int = 32, timer: PhaseTimer | None = None):
        self.engine, self.sampling, self.seed, self.decode, self.score, self.log = \
            engine, sampling, seed, decode, score, log
        self.timer = timer or PhaseTimer()  # busy time of generation and reward, generated tokens
        self.episode = episode or SingleTurn()
        self.stats = RolloutStats()
        self.partial = True  # resume interrupted samples from their tokens (False: restart them)
        # groups are scored on threads of their own: a reward that waits (HTTP, sandbox) must not queue behind
        # the event loop's default executor (min(32, cpus + 4) threads), nor hold it
        self._scoring = ThreadPoolExecutor(score_threads, thread_name_prefix="score")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rollout", daemon=True)
        self._thread.start()

    def submit(self, coro) -> "asyncio.Future":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def generate(self, group: Group, wave: int) -> Group:
        """Generate `group` until no sample is aborted; re-queue it on failure; then score it."""
        runner = GroupRunner(self.engine, self.sampling, base_seed=self.seed, step=wave, decode=self.decode)
        failures = 0
        while todo := _unfinished(group):
            if any(s.response_ids for s in todo):
                if self.partial:
                    self.stats.resumed += sum(1 for s in todo if s.response_ids)
                else:
                    _restart(group)
            try:
                with self.timer.busy("generation"):
                    await self.episode.run(runner, group)
            except Exception as exc:  # noqa: BLE001 - any engine failure: the group goes out again
                failures += 1
                self.stats.requeued += 1
                if failures >= _MAX_ATTEMPTS:
                    raise RuntimeError(f"group {group_uid(group)} failed {failures} times; last error: {exc}") from exc
                self.log(f"[rollout] group {group_uid(group)} failed ({type(exc).__name__}: {exc}); re-queued "
                         f"(attempt {failures + 1})")
                await asyncio.sleep(min(0.25 * 2 ** failures, 5.0))
        self.timer.count("generated_tokens", sum(generated_tokens(s) for s in group))
        await asyncio.get_running_loop().run_in_executor(self._scoring, self._score, group)
        return group

    def _score(self, group: Group) -> None:
        with self.timer.busy("reward"):
            self.score(group)

    async def generate_wave(self, items: list[tuple[int, Group]]) -> list[Group]:
        """Every group at once, in one engine call (so the engine sees the same batch every time: a
        reproducible step), then `generate` for what that left unfinished or could not do. Multi-turn
        episodes go out group by group."""
        owners, reqs, keys = [], [], []
        for wave, group in items if self.episode.one_call else ():
            runner = GroupRunner(self.engine, self.sampling, base_seed=self.seed, step=wave, decode=self.decode)
            todo, group_reqs, key = runner.requests(group)
            owners += todo
            reqs += group_reqs
            keys += [key] * len(group_reqs)
        try:
            with self.timer.busy("generation"):
                outs = await agenerate_keyed(self.engine, reqs, keys) if reqs else ()
            for s, out in zip(owners, outs):
                merge_output(s, out, self.decode)
        except Exception as exc:  # noqa: BLE001 - each group goes out again on its own below
            self.stats.requeued += len(items)
            self.log(f"[rollout] a batch of {len(items)} groups failed ({type(exc).__name__}: {exc}); re-queued")
        return list(await asyncio.gather(*(self.generate(group, wave) for wave, group in items)))

    def close(self) -> None:
        if self.loop.is_running():
            if hasattr(self.engine, "aclose"):  # an HTTP client: close its session on this loop
                try:
                    self.submit(self.engine.aclose()).result(timeout=10)
                except Exception as exc:  # noqa: BLE001 - closing is best effort
                    self.log(f"[rollout] closing the engine client's session: {exc}")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self._scoring.shutdown(wait=False, cancel_futures=True)


class PromptStream:
    """Prompts in epoch-shuffled order, deterministic from the seed, numbered as groups (see module docstring)."""

    def __init__(self, records: list, seed: int, per_step: int, n_samples: int):
        import random

        self.records, self.per_step, self.n = records, per_step, n_samples
        self.rng, self.order, self.drawn = random.Random(seed), [], 0

    def next_group(self) -> tuple[int, Group]:
        """(wave, a fresh group) for the next prompt."""
        if not self.records:
            raise ValueError("no training prompts")
        if not self.order:
            self.order = list(range(len(self.records)))
            self.rng.shuffle(self.order)
        g, self.drawn = self.drawn, self.drawn + 1
        wave, gid = divmod(g, self.per_step)
        group = new_group(self.records[self.order.pop()], gid, self.n)
        for s in group:
            s.metadata["uid"] = f"{wave}:{gid}"
        return wave, group

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.drawn = list(state["order"]), state["drawn"]


class SyncRollout:
    """Step s: wave s, generated now with the current weights (staleness 0)."""

    overlaps_training = False  # the loop waits for generation and scoring (slime_rl.timing)

    def __init__(self, worker: RolloutWorker, prompts: PromptStream):
        self.worker, self.prompts = worker, prompts

    def get(self, step: int, trainer_version: int, n: int | None = None) -> list[Group]:
        """The next `n` groups (default: a step's worth), generated together now."""
        items = [self.prompts.next_group() for _ in range(n or self.prompts.per_step)]
        return self.worker.submit(self.worker.generate_wave(items)).result()

    def start(self) -> None:
        """Nothing runs ahead of the trainer."""

    def push(self, push_fn: Callable[[], dict]) -> dict:
        return push_fn()

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])

    def metrics(self) -> dict[str, float]:
        return self.worker.stats.metrics()

    def close(self) -> None:
        self.worker.close()


class AsyncRollout:
    """A producer ahead of the trainer by at most `staleness` steps (see the module docstring)."""

    overlaps_training = True  # generation and scoring run while the trainer trains (slime_rl.timing)

    def __init__(self, worker: RolloutWorker, prompts: PromptStream, staleness: int, interruptible: bool,
                 capacity: int | None = None, start_step: int = 0, max_inflight: int | None = None):
        self.worker, self.prompts = worker, prompts
        self.staleness, self.interruptible = staleness, interruptible
        self.per_step = prompts.per_step
        self.max_inflight = max_inflight or self.per_step
        self.buffer = RolloutBuffer(capacity or self.per_step * (staleness + 1), max_staleness=staleness)
        self.trained_steps = start_step  # steps whose weights were pushed; wave w may start at w <= this + staleness
        self.requeue: deque[tuple[int, Group]] = deque()  # (wave, group) to generate before drawing new prompts
        self.inflight: dict[str, tuple[int, Group]] = {}  # being generated
        self._unbuffered = 0  # generated and scored, not yet in the buffer
        self._holding = False
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.worker.submit(self._produce())

    # ---- the producer (on the worker's loop) --------------------------------
    def _admissible(self) -> tuple[int, Group] | None:
        if self._holding or len(self.inflight) >= self.max_inflight:
            return None
        for group in self.buffer.take_stale():  # too old to train: generate again from the prompt
            _restart(group)
            self.worker.stats.regenerated += 1
            self.requeue.append((self.trained_steps, group))
        if self.requeue:
            return self.requeue.popleft()
        if self.prompts.drawn // self.per_step > self.trained_steps + self.staleness:
            return None
        return self.prompts.next_group()

    async def _produce(self) -> None:
        self._kick = asyncio.Event()
        self._task = asyncio.current_task()
        tasks: set[asyncio.Task] = set()
        waiter = None
        try:
            while True:
                with self._cv:
                    while (item := self._admissible()) is not None:
                        wave, group = item
                        self.inflight[group_uid(group)] = item
                        tasks.add(asyncio.ensure_future(self._one(wave, group)))
                self._kick.clear()
                waiter = asyncio.ensure_future(self._kick.wait())
                done, _ = await asyncio.wait(tasks | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                for task in done - {waiter}:
                    tasks.discard(task)
                    task.result()
        except asyncio.CancelledError:
            for task in [*tasks, waiter]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BaseException as exc:
            with self._cv:
                self._error = exc
                self._cv.notify_all()
            self.buffer.close()
            raise

    async def _one(self, wave: int, group: Group) -> None:
        await self.worker.generate(group, wave)
        with self._cv:
            self.inflight.pop(group_uid(group))
            self._unbuffered += 1
            self._cv.notify_all()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.buffer.put, group)
        finally:
            with self._cv:
                self._unbuffered -= 1
                self._cv.notify_all()

    def _wake(self) -> None:
        if self._kick is not None:
            self.worker.loop.call_soon_threadsafe(self._kick.set)

    # ---- the trainer's side ---------------------------------------------------
    def get(self, step: int, trainer_version: int) -> list[Group]:
        """The next batch: B groups at most `staleness` versions older than `trainer_version`."""
        while True:
            try:
                groups = self.buffer.get(self.per_step, trainer_version, timeout=1.0)
                break
            except BufferClosed as exc:
                raise RuntimeError(f"rollout producer failed: {self._error}") from (self._error or exc)
            except TimeoutError:
                self._wake()  # stale groups may have been set aside: let the producer regenerate them
                if self._error is not None:
                    raise RuntimeError(f"rollout producer failed: {self._error}") from self._error
        self._wake()
        return groups

    def push(self, push_fn: Callable[[], dict]) -> dict:
        """Push new weights: one-step-off waits for in-flight groups first; fully async interrupts them."""
        self._hold()
        try:
            return push_fn()
        finally:
            self.trained_steps += 1
            self._release()

    def _hold(self) -> None:
        with self._cv:
            self._holding = True
            if not self.interruptible:
                while self.inflight and self._error is None:
                    self._cv.wait(0.5)

    def _release(self) -> None:
        with self._cv:
            self._holding = False
        self._wake()

    def state_dict(self) -> dict:
        """Prompt position, buffered groups and the groups in flight (waited for first)."""
        with self._cv:
            self._holding = True
            while self.inflight and self._error is None:
                self._cv.wait(0.5)
            while self._unbuffered and self._error is None:  # finished, on their way into the buffer
                self._cv.wait(0.5)
        try:
            return {"prompts": self.prompts.state_dict(), "buffer": copy.deepcopy(self.buffer.state_dict()),
                    "requeue": copy.deepcopy(list(self.requeue)), "stats": vars(self.worker.stats).copy()}
        finally:
            self._release()

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.buffer.load_state_dict(state["buffer"])
        self.requeue = deque(state["requeue"])
        self.worker.stats = RolloutStats(**state["stats"])

    def metrics(self) -> dict[str, float]:
        return {**self.worker.stats.metrics(), **self.buffer.metrics()}

    def close(self) -> None:
        self.buffer.close()
        if self._task is not None:
            async def stop() -> None:  # cancels the groups and their requests, and waits until they are gone
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

            self.worker.submit(stop()).result(timeout=30)
        self.worker.close()


class ReplayRollout:
    """The groups of a run recorded with `debug.save_rollouts`, step by step (no engines)."""

    overlaps_training = False

    def __init__(self, directory: str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"debug.load_rollouts: {directory} is not a directory")

    def start(self) -> None:
        """Nothing runs ahead of the trainer."""

    def get(self, step: int, trainer_version: int) -> list[Group]:
        path = self.directory / f"step_{step:06d}.pt"
        if not path.exists():
            raise FileNotFoundError(f"debug.load_rollouts: no rollouts recorded for step {step + 1} ({path})")
        return load_groups(path)

    def push(self, push_fn: Callable[[], dict]) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def has_signal(group: Group) -> bool:
    """DAPO's dynamic-sampling filter: a group whose rewards all agree gives every sample advantage 0."""
    rewards = [s.scalar_reward for s in group]
    return max(rewards) > min(rewards)


class DynamicSampling:
    """DAPO's dynamic sampling over any rollout: groups whose rewards all agree are dropped, and while the
    batch is short more groups are generated (`rounds` extra rounds at most, each sized by the keep rate so
    far); kept groups past the batch size are dropped too. Only a rollout that generates on demand (sync:
    `get(..., n=)`) is refilled; in the asynchronous modes and on replay the filter only drops, and the step
    trains on a smaller batch."""

    def __init__(self, inner, target: int, rounds: int):
        self.inner, self.target, self.rounds = inner, target, rounds
        self.refill = isinstance(inner, SyncRollout)
        self.last: dict[str, float] = {}

    def get(self, step: int, trainer_version: int) -> list[Group]:
        groups = self.inner.get(step, trainer_version)
        kept, generated, rounds = [], 0, 0
        while True:
            generated += len(groups)
            kept += [g for g in groups if has_signal(g)]
            if len(kept) >= self.target or not self.refill or rounds >= self.rounds:
                break
            rounds += 1
            rate = max(len(kept) / generated, 0.1)
            missing = self.target - len(kept)
            groups = self.inner.get(step, trainer_version, n=min(4 * self.target, math.ceil(missing / rate)))
        batch = kept[: self.target] or groups  # nothing kept: the last groups, which carry no advantage
        n = len(batch[0]) if batch else 0
        self.last = {"rollout/filtered_groups_frac": (generated - len(kept)) / max(1, generated),
                     "rollout/extra_samples": float((generated - len(batch)) * n),
                     "rollout/sampling_rounds": float(rounds + 1), "rollout/kept_groups": float(len(kept))}
        return batch

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), **self.last}

    def __getattr__(self, name: str):  # start, push, state_dict, load_state_dict, close: the inner rollout's
        return getattr(self.inner, name)


def save_groups(path: Path, groups: list[Group]) -> None:
    """Scored groups as plain data (no pickled classes), for replay."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[{**vars(s), "status": s.status.value} for s in g] for g in groups]
    torch.save(rows, path)


def load_groups(path: Path) -> list[Group]:
    rows = torch.load(path, weights_only=True)
    return [[Sample(**{**row, "status": SampleStatus(row["status"])}) for row in g] for g in rows]


def staleness_of(groups: list[Group], trainer_version: int) -> int:
    """The largest trainer_version - token version over the groups' tokens (0 without tokens)."""
    return max((trainer_version - group_version(g, trainer_version) for g in groups), default=0)
