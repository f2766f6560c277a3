"""EmbeddedEngine: the in-process `RolloutEngine` (token ids in, ids + logprobs out).

Generation is static batching per call: requests are sorted by prompt length,
cut into chunks of at most `max_batch_size`, and each chunk runs prefill +
decode with a KV cache preallocated for the chunk. Prompts are left-padded to
a common length P; each row's position ids start at 0 at its first real token
and a per-row key mask hides the padding, so all rows share one cache slot per
decode step. Rows that finish stop being recorded at once and leave the batch
(their KV rows are dropped) once a quarter of the batch has finished.

Concurrency: `generate` is synchronous but may run on a worker thread while
another thread calls `abort`, `pause_generation`, `continue_generation` or a
weight update. Abort / pause are checked before every forward step; weight
updates take the same lock as a forward step, so a step never sees a
half-updated model. A weight update during an in-place pause makes later
tokens come from the new weights; each output is stamped with the weight
version current when that row finished.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from glob import glob
from typing import Iterable

import torch
from safetensors.torch import load_file

from rollout.model import DecoderLM, KVCache, ModelConfig
from rollout.sampling import SamplingTensors, row_uniforms, sample
from slime_rl.types import GenerateOutput, GenerateRequest, SampleStatus

_RUNNING, _COMPLETED, _TRUNCATED, _ABORTED = 0, 1, 2, 3
_STATUS = {_COMPLETED: SampleStatus.COMPLETED, _TRUNCATED: SampleStatus.TRUNCATED, _ABORTED: SampleStatus.ABORTED}
PAUSE_MODES = ("abort", "in_place")


def load_safetensors_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
    else:
        files = sorted(glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(path, device="cpu"))
    # Old checkpoints carry RoPE buffers; the engine computes its own.
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


class _Control:
    """Abort / pause state shared between `generate` and other threads."""

    def __init__(self):
        self.cond = threading.Condition()
        self.paused = False
        self.abort_epoch = 0  # bumped by abort-all; a generate call snapshots it
        self.inflight: dict[str, int] = {}
        self.aborted_rids: set[str] = set()

    def begin(self, rids: list[str]) -> int:
        with self.cond:
            for rid in rids:
                self.inflight[rid] = self.inflight.get(rid, 0) + 1
            return self.abort_epoch

    def end(self, rids: list[str]) -> None:
        with self.cond:
            for rid in rids:
                self.inflight[rid] -= 1
                if self.inflight[rid] == 0:
                    del self.inflight[rid]
                    self.aborted_rids.discard(rid)

    def abort(self, rid: str | None) -> None:
        with self.cond:
            if rid is None:
                self.abort_epoch += 1
            elif rid in self.inflight:
                self.aborted_rids.add(rid)
            self.cond.notify_all()

    def row_aborts(self, epoch: int, rids: list[str | None]) -> list[bool] | None:
        """Per-row abort flags, or None when nothing is aborted (the fast path)."""
        if self.abort_epoch == epoch and not self.aborted_rids:
            return None
        with self.cond:
            if self.abort_epoch != epoch:
                return [True] * len(rids)
            return [rid in self.aborted_rids for rid in rids]

    def wait_while_paused(self, epoch: int, rids: list[str | None]) -> None:
        """Block while paused, unless one of these rows gets aborted meanwhile."""
        if not self.paused:
            return
        with self.cond:
            while self.paused and self.row_aborts(epoch, rids) is None:
                self.cond.wait()

    def set_paused(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            self.cond.notify_all()


@dataclass
class _Batch:
    """Per-row state of the rows still in the decode batch (compacted together)."""

    rows_B: torch.Tensor  # index into the chunk's result tensors
    rids: list[str | None]
    st: SamplingTensors
    u_BT: torch.Tensor  # per-row uniforms, one per step
    stop_BK: torch.Tensor  # stop token ids, padded with -1
    max_new_B: torch.Tensor
    lens_B: torch.Tensor  # prompt lengths
    key_valid_BS: torch.Tensor  # False on left padding
    cache: KVCache

    def keep(self, idx_B: torch.Tensor) -> None:
        for name in ("rows_B", "u_BT", "stop_BK", "max_new_B", "lens_B", "key_valid_BS"):
            setattr(self, name, getattr(self, name)[idx_B])
        self.rids = [self.rids[i] for i in idx_B.tolist()]
        self.st = self.st.select(idx_B)
        self.cache.keep_rows(idx_B)


class EmbeddedEngine:
    """In-process rollout engine over a `DecoderLM` (see module docstring)."""

    def __init__(
        self,
        hf_config: dict,
        state_dict: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 64,
        seed: int = 0,
    ):
        """`state_dict` in HF naming (all tensors required); None = random init from `seed`."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.config = ModelConfig.from_hf(hf_config)
        self.hf_config = dict(hf_config)
        self.device, self.dtype, self.max_batch_size = torch.device(device), dtype, max_batch_size
        self.model = DecoderLM(self.config, self.device, dtype).eval()
        self._params = dict(self.model.named_parameters())
        self._gen = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()  # one forward step or one weight update at a time
        self._ctl = _Control()
        self._version = 0
        if state_dict is None:
            self.model.init_random(seed)
        else:
            self._apply(self._check_tensors(state_dict.items(), full=True))

    @classmethod
    def from_pretrained(cls, model_dir: str, device="cpu", dtype=torch.float32, max_batch_size=64, seed=0):
        """Load `config.json` + `*.safetensors` (possibly sharded) from an HF directory."""
        with open(os.path.join(model_dir, "config.json")) as f:
            hf_config = json.load(f)
        return cls(hf_config, load_safetensors_dir(model_dir), device, dtype, max_batch_size, seed)

    # ---- generation -------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for all requests; outputs in request order."""
        self._check_requests(requests)
        seeds = [self._request_seed(r) for r in requests]
        rids = [r.rid for r in requests if r.rid is not None]
        epoch = self._ctl.begin(rids)
        outputs: list[GenerateOutput | None] = [None] * len(requests)
        try:
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
            for c in range(0, len(order), self.max_batch_size):
                chunk = order[c : c + self.max_batch_size]
                outs = self._generate_chunk([requests[i] for i in chunk], [seeds[i] for i in chunk], epoch)
                for i, out in zip(chunk, outs):
                    outputs[i] = out
        finally:
            self._ctl.end(rids)
        return outputs  # type: ignore[return-value]

    def _request_seed(self, req: GenerateRequest) -> int:
        if req.sampling.seed is not None:
            return int(req.sampling.seed)
        return int(torch.randint(0, 2**62, (1,), generator=self._gen))

    def _check_requests(self, requests: list[GenerateRequest]) -> None:
        limit, vocab = self.config.max_position_embeddings, self.config.vocab_size
        for i, r in enumerate(requests):
            where = f"request {i} (rid={r.rid!r})"
            try:
                r.sampling.validate()
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            n, m = len(r.input_ids), r.sampling.max_new_tokens
            if n == 0:
                raise ValueError(f"{where}: input_ids is empty")
            if n + m > limit:
                raise ValueError(
                    f"{where}: prompt of {n} tokens + max_new_tokens {m} = {n + m} exceeds "
                    f"max_position_embeddings {limit}"
                )
            if min(r.input_ids) < 0 or max(r.input_ids) >= vocab:
                raise ValueError(f"{where}: token ids must be in [0, {vocab}), got range "
                                 f"[{min(r.input_ids)}, {max(r.input_ids)}]")

    def _new_batch(self, reqs: list[GenerateRequest], seeds: list[int]) -> tuple[_Batch, torch.Tensor]:
        """Left-padded prompt ids [B, P] and the per-row decode state."""
        dev, B = self.device, len(reqs)
        lens = [len(r.input_ids) for r in reqs]
        P, T = max(lens), max(r.sampling.max_new_tokens for r in reqs)
        ids_BP = torch.zeros(B, P, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids_BP[b, P - lens[b] :] = torch.tensor(r.input_ids, dtype=torch.long)
        K = max(1, max(len(r.sampling.stop_token_ids) for r in reqs))
        stop_BK = torch.full((B, K), -1, dtype=torch.long)
        for b, r in enumerate(reqs):
            stop_BK[b, : len(r.sampling.stop_token_ids)] = torch.tensor(r.sampling.stop_token_ids, dtype=torch.long)
        lens_B = torch.tensor(lens, device=dev)
        batch = _Batch(
            rows_B=torch.arange(B, device=dev),
            rids=[r.rid for r in reqs],
            st=SamplingTensors.from_params([r.sampling for r in reqs], self.config.vocab_size, dev),
            u_BT=row_uniforms(seeds, T).to(dev),
            stop_BK=stop_BK.to(dev),
            max_new_B=torch.tensor([r.sampling.max_new_tokens for r in reqs], device=dev),
            lens_B=lens_B,
            key_valid_BS=torch.arange(P + T, device=dev).unsqueeze(0) >= (P - lens_B).unsqueeze(1),
            cache=KVCache(self.config, B, P + T, dev, self.dtype),
        )
        return batch, ids_BP.to(dev)

    def _prefill(self, batch: _Batch, ids_BP: torch.Tensor) -> torch.Tensor:
        """Run the prompts into the cache; logits [B, V] at each row's last token."""
        B, P = ids_BP.shape
        pos_BP = (torch.arange(P, device=self.device).unsqueeze(0) - (P - batch.lens_B).unsqueeze(1)).clamp(min=0)
        causal_PP = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        # Pad queries also see themselves: a fully masked row would make NaNs
        # that reach real rows through 0 * NaN in the attention product.
        eye_PP = torch.eye(P, dtype=torch.bool, device=self.device)
        mask_B1PP = ((causal_PP & batch.key_valid_BS[:, None, :P]) | eye_PP).unsqueeze(1)
        with self._lock:
            return self.model(ids_BP, pos_BP, batch.cache, 0, mask_B1PP, last_only=True)[:, -1]

    def _decode_step(self, batch: _Batch, tok_B: torch.Tensor, step: int, P: int) -> torch.Tensor:
        """Feed each row's token `step - 1` (cache slot P + step - 1); logits [B, V]."""
        slot = P + step - 1
        pos_B1 = (batch.lens_B + (step - 1)).unsqueeze(1)
        mask_B11S = batch.key_valid_BS[:, None, None, : slot + 1]
        with self._lock:
            return self.model(tok_B.unsqueeze(1), pos_B1, batch.cache, slot, mask_B11S)[:, -1]

    def _generate_chunk(self, reqs: list[GenerateRequest], seeds: list[int], epoch: int) -> list[GenerateOutput]:
        batch, ids_BP = self._new_batch(reqs, seeds)
        N, P, T = len(reqs), ids_BP.shape[1], batch.u_BT.shape[1]
        tokens_NT = torch.zeros(N, T, dtype=torch.long, device=self.device)
        logps_NT = torch.zeros(N, T, dtype=torch.float32, device=self.device)
        n_gen_N = torch.zeros(N, dtype=torch.long, device=self.device)
        status_N = torch.zeros(N, dtype=torch.long, device=self.device)
        versions = [self._version] * N
        alive_B = torch.ones(N, dtype=torch.bool, device=self.device)
        tok_B = torch.zeros(N, dtype=torch.long, device=self.device)
        for t in range(T):
            self._ctl.wait_while_paused(epoch, batch.rids)
            aborted = self._ctl.row_aborts(epoch, batch.rids)
            if aborted is not None:
                hit_B = alive_B & torch.tensor(aborted, device=self.device)
                self._finish(hit_B, _ABORTED, batch, status_N, versions)
                alive_B &= ~hit_B
            if not bool(alive_B.any()):
                break
            dead = int((~alive_B).sum())
            if dead and dead * 4 >= alive_B.numel():
                keep_B = alive_B.nonzero().squeeze(1)
                batch.keep(keep_B)
                alive_B, tok_B, ids_BP = alive_B[keep_B], tok_B[keep_B], ids_BP[keep_B]
            logits_BV = self._prefill(batch, ids_BP) if t == 0 else self._decode_step(batch, tok_B, t, P)
            tok_B, lp_B = sample(logits_BV, batch.st, batch.u_BT[:, t])
            rows = batch.rows_B[alive_B]
            tokens_NT[rows, t], logps_NT[rows, t] = tok_B[alive_B], lp_B[alive_B]
            n_gen_N[rows] += 1
            stop_B = alive_B & (tok_B.unsqueeze(1) == batch.stop_BK).any(1)
            full_B = alive_B & ~stop_B & (batch.max_new_B <= t + 1)
            self._finish(stop_B, _COMPLETED, batch, status_N, versions)
            self._finish(full_B, _TRUNCATED, batch, status_N, versions)
            alive_B &= ~(stop_B | full_B)
        return self._outputs(reqs, tokens_NT, logps_NT, n_gen_N, status_N, versions)

    def _finish(self, hit_B, code: int, batch: _Batch, status_N, versions: list[int]) -> None:
        if bool(hit_B.any()):
            rows = batch.rows_B[hit_B]
            status_N[rows] = code
            for r in rows.tolist():
                versions[r] = self._version

    @staticmethod
    def _outputs(reqs, tokens_NT, logps_NT, n_gen_N, status_N, versions) -> list[GenerateOutput]:
        tokens, logps = tokens_NT.tolist(), logps_NT.tolist()
        n_gen, status = n_gen_N.tolist(), status_N.tolist()
        return [
            GenerateOutput(
                rid=r.rid,
                output_ids=tokens[i][: n_gen[i]],
                output_logprobs=logps[i][: n_gen[i]],
                finish_reason=_STATUS[status[i]],
                weight_version=versions[i],
                prompt_tokens=len(r.input_ids),
            )
            for i, r in enumerate(reqs)
        ]

    # ---- scoring ----------------------------------------------------------

    @torch.inference_mode()
    def compute_logprobs(
        self, sequences: list[list[int]], temperature: float = 1.0, start_positions: list[int] | None = None
    ) -> list[torch.Tensor]:
        """No-cache forward. For sequence i returns float32 CPU [len_i - start_i]:
        log_softmax(logits / temperature) of token t given tokens < t, for t in
        [start_i, len_i); start defaults to 1. Matches generation's logprobs."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for logprobs, got {temperature}")
        starts = [1] * len(sequences) if start_positions is None else list(start_positions)
        if len(starts) != len(sequences):
            raise ValueError(f"got {len(starts)} start positions for {len(sequences)} sequences")
        for i, (s, start) in enumerate(zip(sequences, starts)):
            if not 1 <= start <= len(s):
                raise ValueError(f"sequence {i}: start position {start} not in [1, {len(s)}]")
        out: list[torch.Tensor] = []
        for c in range(0, len(sequences), self.max_batch_size):
            seqs = sequences[c : c + self.max_batch_size]
            T = max(len(s) for s in seqs)
            ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids_BT[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            ids_BT = ids_BT.to(self.device)
            with self._lock:  # right padding: causal attention never sees it
                logits_BTV = self.model(ids_BT).float()
            lp_BT = torch.log_softmax(logits_BTV[:, :-1] / temperature, -1).gather(2, ids_BT[:, 1:, None])[..., 0]
            for b, s in enumerate(seqs):
                out.append(lp_BT[b, starts[c + b] - 1 : len(s) - 1].cpu())
        return out

    # ---- control ----------------------------------------------------------

    def abort(self, rid: str | None = None) -> None:
        """Abort one in-flight request by rid (unknown rids are ignored) or all (None)."""
        self._ctl.abort(rid)

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop decoding until `continue_generation`: "abort" also aborts in-flight
        rows (they return what they have); "in_place" keeps them waiting. A
        `generate` started while paused waits before its prefill."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._ctl.set_paused(True)
        if mode == "abort":
            self._ctl.abort(None)

    def continue_generation(self) -> None:
        self._ctl.set_paused(False)

    # ---- weights ----------------------------------------------------------

    def _check_tensors(
        self, named: Iterable[tuple[str, torch.Tensor]], full: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Validate names and shapes of every tensor; (destination, source) pairs."""
        pairs, seen = [], set()
        for name, src in named:
            key = name
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                key = "model.embed_tokens.weight"  # tied: the same tensor
            if key not in self._params:
                raise ValueError(f"weight update: unknown tensor {name!r} for {self.config.model_type} model")
            dst = self._params[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"weight update: tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            if not src.is_floating_point():
                raise ValueError(f"weight update: tensor {name!r} has non-float dtype {src.dtype}")
            pairs.append((dst, src))
            seen.add(key)
        missing = sorted(self._params.keys() - seen)
        if full and missing:
            raise ValueError(f"weight update: missing {len(missing)} tensors, e.g. {missing[:5]}")
        return pairs

    def _apply(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._lock, torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int
    ) -> None:
        """Partial or full update in HF naming; validated first, then applied whole."""
        pairs = self._check_tensors(list(named_tensors), full=False)
        with self._lock:
            self._apply(pairs)
            self._version = int(weight_version)

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Full update from an HF safetensors directory."""
        pairs = self._check_tensors(load_safetensors_dir(model_path).items(), full=True)
        with self._lock:
            self._apply(pairs)
            self._version = int(weight_version)

    def flush_cache(self) -> None:
        """No cross-call KV / prefix cache is kept, so there is nothing to drop."""

    def health(self) -> bool:
        return True

    def get_weight_version(self) -> int:
        return self._version
