"""Tokens with loss_mask 0 get exactly zero gradient, under every algorithm and on both trainer backends.

Multi-turn episodes (rollout/episodes.py) put the environment's / tools' tokens into `Sample.response_ids`
with `loss_mask` 0 and rollout logprob 0; the prompt and the right padding are off the mask too. Whatever
per-token data sits at those positions must not reach the update:

- loss level, every registered algorithm with its preset, bare and with a KL term, an entropy bonus,
  dual-clip and truncated IS weights: the policy loss's gradient with respect to the logprobs and the
  entropy is exactly 0.0 at every masked position (and nonzero on the model's tokens, so the check can
  fail), once with the values the models give at the masked positions and once with wild values there
  (logprobs, entropy, old / reference / rollout logprobs, critic values, advantages, IS weights). Both
  are needed: a wild logprob saturates the log-ratio clamp, whose gradient is 0, and would hide a term
  that leaks onto masked tokens;
- backend level: one `train_step` from the same weights gives bit-identical parameters when only the
  masked positions' per-token data (rollout / old / reference logprobs, values, then advantages, returns
  and IS weights) is changed, on `training.hf.HFTrainer` for every algorithm (fused and plain logits
  paths) and on `training.megatron.MegatronBackend` (TP1, CPU over gloo) for GRPO and CISPO; changing one
  loss token's advantage changes them (the control). On HF, hooks also check that the gradient reaching
  the backend's own logprobs and entropy is 0.0 off the mask (a leak that does not depend on the data,
  such as an entropy bonus over every token, leaves the two steps equal).

Wild values are large but finite: the loss masks by multiplying with the loss weights, so a NaN or inf at
a masked position (advantage, IS weight, old logprob under GSPO / CISPO) would turn 0 * x into NaN; every
producer writes finite values there (0, or the trainer's own logprobs).
The per-token data is scored as `slime_rl.loop.score_batch` scores it (old and reference logprobs,
critic values, the algorithm's own advantages, the off-policy weights), except that the reference
logprobs come from a second model with other weights, so the KL term has a gradient at step 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slime_rl import algorithms
from slime_rl.algorithms import off_policy
from slime_rl.config import build_config
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.types import Sample, SampleStatus, TrainBatch
from training.hf import HFTrainer, OptimSettings

VOCAB, PAD = 61, 0
HF_CONFIG = tiny_hf_config("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, tie_word_embeddings=False)
OPT = OptimSettings(lr=1e-3, micro_batch_size=2, grad_clip=1.0, warmup_steps=0)  # 2 micro-batches of 2 rows
# per-token fields -> the value each gets at the positions being perturbed (finite: see the docstring)
WILD_INPUTS = {"rollout_logprobs_BT": -1e3, "old_logprobs_BT": 30.0, "ref_logprobs_BT": 50.0, "values_BT": 1e4}
WILD_OUTPUTS = {"advantages_BT": 1e4, "returns_BT": -1e4, "is_weights_BT": 1e3}
MEGATRON_ALGOS = ("GRPO", "CISPO")


def turns(g: torch.Generator, lengths: list[int]) -> tuple[list[int], list[float], list[int]]:
    """Response ids, rollout logprobs and loss mask of alternating model turns (even entries of `lengths`,
    loss_mask 1) and environment replies (odd entries: loss_mask 0, logprob 0), as MultiTurn builds them."""
    ids, logprobs, mask = [], [], []
    for k, n in enumerate(lengths):
        model = k % 2 == 0
        ids += torch.randint(1, VOCAB, (n,), generator=g).tolist()
        logprobs += (-0.1 - 3 * torch.rand(n, generator=g)).tolist() if model else [0.0] * n
        mask += [int(model)] * n
    return ids, logprobs, mask


def episode_samples() -> list[Sample]:
    """Two groups of two ragged multi-turn samples: one ends on an environment reply, one alternates single
    tokens; rewards differ inside each group, so every algorithm's advantages are nonzero."""
    g = torch.Generator().manual_seed(0)
    spec = [(4, [3, 2, 2], 1.0), (3, [2, 3, 3, 2], 0.0), (5, [1, 1, 1, 1, 1], 0.2), (2, [2, 4, 1, 1, 2], 0.9)]
    samples = []
    for i, (prompt_len, lengths, reward) in enumerate(spec):
        ids, logprobs, mask = turns(g, lengths)
        samples.append(Sample(prompt_ids=torch.randint(1, VOCAB, (prompt_len,), generator=g).tolist(),
                              response_ids=ids, rollout_logprobs=logprobs, loss_mask=mask, reward=reward,
                              status=SampleStatus.COMPLETED, group_id=i // 2, index=i % 2))
    return samples


def job_config(name: str, extras: bool):
    """The algorithm's preset; `extras` adds a KL term in the loss (unless the preset puts the KL in the reward),
    an entropy bonus, dual-clip and truncated importance sampling."""
    overrides = [("algorithm.name", name)]
    if extras:
        overrides += [("algorithm.entropy_coef", 0.01), ("algorithm.dual_clip_c", 3.0),
                      ("algorithm.off_policy", "tis")]
        if not build_config(overrides=overrides).algorithm.kl_in_reward:
            overrides.append(("algorithm.kl_coef", 0.05))
    return build_config(overrides=overrides)


def prepare(cfg) -> TrainBatch:
    """`slime_rl.loop.prepare` for the episode samples: shaped rewards, groups, loss weights."""
    a = cfg.algorithm
    samples = episode_samples()
    budget = cfg.rollout.max_new_tokens
    rewards = [s.scalar_reward + algorithms.overlong_penalty(len(s.response_ids), budget, a.overlong_buffer_len,
                                                             a.overlong_penalty) for s in samples]
    return algorithms.build_train_batch(samples, None, PAD, loss_agg=a.loss_agg, temperature=0.9,
                                        constant_len=a.loss_agg_len or budget, rewards=rewards,
                                        mask_truncated=a.mask_truncated)


def wild(x_BT: torch.Tensor | None, where_BT: torch.Tensor, value: float) -> torch.Tensor | None:
    return None if x_BT is None else torch.where(where_BT, torch.full_like(x_BT, value), x_BT)


def score(cfg, batch: TrainBatch, old_BT: torch.Tensor, ref_BT: torch.Tensor, values_BT: torch.Tensor,
          where_BT: torch.Tensor | None = None, wild_outputs: bool = True) -> TrainBatch:
    """`slime_rl.loop.score_batch` on a copy of `batch` from given old / reference logprobs and critic values.
    At `where_BT` the inputs are set to wild values before the algorithm and the IS weights see them, and (with
    `wild_outputs`) the advantages, returns and IS weights after."""
    a = cfg.algorithm
    algorithm = algorithms.get(a.name)
    needs = algorithm.needs(a)
    mask_BT = batch.response_mask_BT
    where_BT = torch.zeros_like(mask_BT, dtype=torch.bool) if where_BT is None else where_BT
    b = dataclasses.replace(batch, old_logprobs_BT=old_BT, ref_logprobs_BT=ref_BT if needs.reference else None,
                            values_BT=values_BT * mask_BT if needs.critic else None)
    for name, value in WILD_INPUTS.items():
        setattr(b, name, wild(getattr(b, name), where_BT, value))
    b.advantages_BT, b.returns_BT = algorithm.advantages(b, a)
    method = off_policy.resolve(a.off_policy, cfg.async_rl.mode)
    b.is_weights_BT, _ = off_policy.importance_weights(b.old_logprobs_BT, b.rollout_logprobs_BT, mask_BT, method,
                                                       a.is_cap)
    for name, value in WILD_OUTPUTS.items() if wild_outputs else ():
        setattr(b, name, wild(getattr(b, name), where_BT, value))
    return b


@pytest.fixture(scope="module")
def weights():
    return init_tiny_model(HF_CONFIG, seed=4)


@pytest.fixture(scope="module")
def scored_inputs(weights):
    """Old logprobs from the policy, reference logprobs from a second model, critic values: [B, T] each."""
    batch = prepare(job_config("GRPO", extras=False))  # the token layout is the same under every config
    old_BT = HFTrainer(HF_CONFIG, weights, OPT).logprobs(batch)
    ref_BT = HFTrainer(HF_CONFIG, init_tiny_model(HF_CONFIG, seed=5), OPT).logprobs(batch)
    values_BT = torch.randn(batch.input_ids_BT.shape, generator=torch.Generator().manual_seed(1))
    return old_BT, ref_BT, values_BT


def off_mask(batch: TrainBatch) -> torch.Tensor:
    """[B, T] bool: environment tokens, prompt and padding."""
    return batch.response_mask_BT == 0


def test_episode_batch_has_environment_tokens_inside_responses():
    batch = prepare(job_config("GRPO", extras=False))
    mask_BT, attn_BT = batch.response_mask_BT, batch.attention_mask_BT
    first_B = mask_BT.argmax(dim=1)
    last_B = mask_BT.shape[1] - 1 - mask_BT.flip(1).argmax(dim=1)
    pos_BT = torch.arange(mask_BT.shape[1]).expand_as(mask_BT)
    inside_BT = (pos_BT > first_B[:, None]) & (pos_BT < last_B[:, None]) & (mask_BT == 0)
    assert bool(inside_BT.any(dim=1).all())  # every row has environment tokens between two model turns
    assert bool((attn_BT == 0).any()) and bool(((attn_BT == 1) & (mask_BT == 0) & (pos_BT > last_B[:, None])).any())
    assert torch.equal(batch.rollout_logprobs_BT[mask_BT == 0], torch.zeros(int((mask_BT == 0).sum())))


# ---------------------------------------------------------------------------------------------- loss level
def assert_zero_off_mask(grads: dict[str, torch.Tensor | None], off_BT: torch.Tensor, entropy_coef: float) -> None:
    for what, grad_BT in grads.items():
        if grad_BT is None:  # no entropy bonus: the entropy is not in the loss at all
            assert what == "entropy" and not entropy_coef
            continue
        assert bool((grad_BT[off_BT] == 0).all()), (what, grad_BT[off_BT & (grad_BT != 0)])


@pytest.mark.parametrize("data", ["scored", "wild"])
@pytest.mark.parametrize("extras", [False, True], ids=["preset", "kl-entropy-dualclip-tis"])
@pytest.mark.parametrize("name", algorithms.implemented())
def test_masked_tokens_get_exactly_zero_loss_gradient(name, extras, data, scored_inputs):
    """`scored`: the masked positions hold what the models gave there (a leak is not hidden by a clamp);
    `wild`: every per-token input and output there is wild, and so are the logprobs and entropy."""
    cfg = job_config(name, extras)
    batch = prepare(cfg)
    off_BT = off_mask(batch)
    where_BT = off_BT if data == "wild" else None
    b = score(cfg, batch, *scored_inputs, where_BT=where_BT, wild_outputs=False)
    assert bool((b.advantages_BT[off_BT] == 0).all())  # 0 off the mask, as TrainBatch documents
    b = score(cfg, batch, *scored_inputs, where_BT=where_BT)
    old_BT = scored_inputs[0]
    noise_BT = 1e-4 * torch.randn(old_BT.shape, generator=torch.Generator().manual_seed(2))  # ratio ~1: GSPO's
    logprobs_BT = old_BT + noise_BT  # eps (3e-4) clips few sequences
    entropy_BT = torch.rand(old_BT.shape, generator=torch.Generator().manual_seed(3))
    if data == "wild":
        logprobs_BT, entropy_BT = wild(logprobs_BT, off_BT, -25.0), wild(entropy_BT, off_BT, 40.0)
    logprobs_BT.requires_grad_()
    entropy_BT.requires_grad_()
    loss, _ = algorithms.get(name).loss(cfg.algorithm)(logprobs_BT, entropy_BT, b)
    loss.backward()
    assert torch.isfinite(loss)
    assert_zero_off_mask({"logprobs": logprobs_BT.grad, "entropy": entropy_BT.grad}, off_BT,
                         cfg.algorithm.entropy_coef)
    on_BT = ~off_BT
    assert bool((logprobs_BT.grad[on_BT] != 0).any())  # the check can fail: the model's tokens do get gradient
    if extras:  # the KL and entropy terms reach every loss token
        assert bool((logprobs_BT.grad[on_BT] != 0).all()) and bool((entropy_BT.grad[on_BT] != 0).all())


# ------------------------------------------------------------------------------------------- backend level
class GradProbe:
    """A LossFn wrapper that records, per micro-batch, the gradient reaching the backend's own logprobs and
    entropy (hooks: the HF backend runs it in this process) with the micro-batch's response mask."""

    def __init__(self, loss_fn):
        self.loss_fn, self.seen = loss_fn, []

    def __call__(self, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, batch: TrainBatch):
        record = {"mask": batch.response_mask_BT, "logprobs": None, "entropy": None}
        self.seen.append(record)
        for what, x_BT in (("logprobs", logprobs_BT), ("entropy", entropy_BT)):
            if x_BT.requires_grad:
                x_BT.register_hook(lambda g, what=what: record.__setitem__(what, g.detach().clone()))
        return self.loss_fn(logprobs_BT, entropy_BT, batch)


def hf_step(weights, batch: TrainBatch, loss_fn) -> dict[str, torch.Tensor]:
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    trainer.train_step(batch, loss_fn)
    return {k: v.clone() for k, v in trainer.hf_state_dict().items()}


def with_one_advantage_changed(batch: TrainBatch) -> TrainBatch:
    """The control: one loss token's advantage moved by 0.5."""
    adv_BT = batch.advantages_BT.clone()
    b, t = (batch.response_mask_BT > 0).nonzero()[3].tolist()
    adv_BT[b, t] += 0.5
    return dataclasses.replace(batch, advantages_BT=adv_BT)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def three_batches(cfg, inputs) -> tuple[TrainBatch, TrainBatch, TrainBatch]:
    """(scored batch, the same with wild data at every masked position, the control)."""
    batch = prepare(cfg)
    base = score(cfg, batch, *inputs)
    return base, score(cfg, batch, *inputs, where_BT=off_mask(batch)), with_one_advantage_changed(base)


@pytest.mark.parametrize("name", algorithms.implemented())
def test_hf_step_ignores_masked_positions_bit_exactly(name, weights, scored_inputs):
    cfg = job_config(name, extras=True)
    loss_fn = algorithms.get(name).loss(cfg.algorithm)
    base, masked_changed, control = three_batches(cfg, scored_inputs)
    probe = GradProbe(loss_fn)
    after = hf_step(weights, base, probe)
    assert len(probe.seen) == 2  # two micro-batches, each trimmed to its own length
    for record in probe.seen:  # the model's logprobs and entropy, as the backend computed them
        grads = {what: record[what] for what in ("logprobs", "entropy")}
        assert_zero_off_mask(grads, record["mask"] == 0, cfg.algorithm.entropy_coef)
        assert bool((record["logprobs"][record["mask"] > 0] != 0).all())
    assert not same(after, weights)
    assert same(hf_step(weights, masked_changed, loss_fn), after)
    assert not same(hf_step(weights, control, loss_fn), after)


def test_hf_unfused_logprobs_ignore_masked_positions_bit_exactly(weights, scored_inputs):
    """The same on the plain logits path (fused_logprob=False)."""
    cfg = job_config("GRPO", extras=True)
    loss_fn = algorithms.get("GRPO").loss(cfg.algorithm)
    results = []
    for batch in three_batches(cfg, scored_inputs):
        trainer = HFTrainer(HF_CONFIG, weights, OPT, fused_logprob=False)
        trainer.train_step(batch, loss_fn)
        results.append({k: v.clone() for k, v in trainer.hf_state_dict().items()})
    assert same(results[0], results[1]) and not same(results[0], results[2])


def test_megatron_step_ignores_masked_positions_bit_exactly(weights, scored_inputs, tmp_path_factory):
    """TP1 on one gloo rank; every case restarts from the same weights with a fresh optimizer."""
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    path = tmp_path_factory.mktemp("weights")
    save_hf_checkpoint(path, HF_CONFIG, weights)
    settings = MegatronSettings(model=ModelSettings(tp=1, pp=1))
    with MegatronBackend(HF_CONFIG, weights, OPT, settings, num_ranks=1) as backend:
        for name in MEGATRON_ALGOS:
            cfg = job_config(name, extras=True)
            loss_fn = algorithms.get(name).loss(cfg.algorithm)
            old_BT = backend.logprobs(prepare(cfg))  # the loop scores with the training backend's own logprobs
            results = []
            for batch in three_batches(cfg, (old_BT, *scored_inputs[1:])):
                backend.load(str(path))
                backend.reset_optimizer(OPT)
                backend.train_step(batch, loss_fn)
                results.append(backend.hf_state_dict())
            assert not same(results[0], weights), name
            assert same(results[0], results[1]), name
            assert not same(results[0], results[2]), name
