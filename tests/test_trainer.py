"""Reference trainer: micro-batch invariance, LR schedule, checkpoint round trip."""

import math

import pytest
import torch

from slime_rl.algorithms import build_train_batch, make_policy_loss
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import Sample
from training.hf import HFTrainer, OptimSettings
from training.hf.backend import causal_mask_arg, lr_lambda, micro_batch_rows


def tiny(arch="llama"):
    cfg = tiny_hf_config(arch, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return cfg, init_tiny_model(cfg, seed=0)


def make_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        P, R = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(3, 40, (P + R,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:P], response_ids=ids[P:], rollout_logprobs=[0.0] * R))
    adv = torch.randn(n, generator=g).tolist()
    return build_train_batch(samples, adv, pad_id=0, loss_agg="token")


def step_with(micro_batch_size, arch="llama"):
    cfg, sd = tiny(arch)
    trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-2, micro_batch_size=micro_batch_size))
    batch = make_batch()
    batch.old_logprobs_BT = trainer.logprobs(batch)
    stats = trainer.train_step(batch, make_policy_loss(0.2, 0.2))
    return trainer, stats


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_micro_batch_size_does_not_change_the_step(arch):
    t_full, s_full = step_with(8, arch)
    t_micro, s_micro = step_with(3, arch)
    assert math.isclose(s_full["loss"], s_micro["loss"], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(s_full["grad_norm"], s_micro["grad_norm"], rel_tol=1e-5)
    # Compare the accumulated gradients (left in .grad after the step): the weights
    # after Adam's first step are lr * sign(g) wherever |g| ~ eps, so they would
    # amplify last-bit differences into lr-sized ones.
    for (n, a), (_, b) in zip(t_full.model.named_parameters(), t_micro.model.named_parameters()):
        scale = a.grad.abs().max().clamp(min=1e-12)
        assert torch.allclose(a.grad, b.grad, atol=1e-5 * float(scale), rtol=0), n


def test_micro_batches_group_similar_lengths_within_both_budgets():
    lengths = [5, 9, 2, 9, 7, 3, 8]
    rows = [r.tolist() for r in micro_batch_rows(lengths, max_rows=3, max_tokens=20)]
    # longest first (ties by index); a micro-batch is cut at 3 rows or when rows x its longest would pass 20
    assert rows == [[1, 3], [6, 4], [0, 5, 2]]
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert [r.tolist() for r in micro_batch_rows([50, 4], max_rows=8, max_tokens=10)] == [[0], [1]]  # a long row alone


def test_right_padded_rows_need_no_attention_mask_and_give_the_same_logprobs():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert causal_mask_arg(right) is None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert causal_mask_arg(left) is left
    cfg, sd = tiny()
    trainer = HFTrainer(cfg, sd, OptimSettings())
    trainer.response_tokens_only = False
    batch = make_batch(seed=5)
    assert causal_mask_arg(batch.attention_mask_BT) is None  # build_train_batch pads on the right
    with torch.no_grad():
        masked = trainer.model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    lp_BT = trainer.logprobs(batch)
    want_BT = torch.log_softmax(masked[:, :-1], -1).gather(-1, batch.input_ids_BT[:, 1:, None])[..., 0]
    real = batch.attention_mask_BT[:, 1:].bool()
    assert (lp_BT[:, 1:] - want_BT)[real].abs().max() < 1e-5


def grads_after_step(trainer, batch):
    stats = trainer.train_step(batch, make_policy_loss(0.2, 0.2))
    return stats, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("max_tokens", [4096, 12])
def test_the_output_layer_on_response_tokens_only_gives_the_same_loss_and_gradient(max_tokens):
    """The loss reads logprobs and entropy on response tokens only, so computing them nowhere else changes
    nothing: same loss, statistics and gradient as every position (also across several micro-batches)."""
    cfg, sd = tiny()
    batch = make_batch(seed=3)
    batch.response_mask_BT[2] = 0  # a row without loss (e.g. a truncated sample) sits among the others
    batch.loss_weights_BT = batch.loss_weights_BT * batch.response_mask_BT
    results = []
    for only in (False, True):
        trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-2, max_tokens_per_micro_batch=max_tokens))
        trainer.response_tokens_only = only
        batch.old_logprobs_BT = trainer.logprobs(batch)
        results.append(grads_after_step(trainer, batch))
    (full, full_grads), (only, only_grads) = results
    assert full.keys() == only.keys()
    for key in full:
        assert math.isclose(full[key], only[key], rel_tol=1e-6, abs_tol=1e-7), key
    for name, grad in full_grads.items():
        assert torch.allclose(grad, only_grads[name], atol=1e-6 * float(grad.abs().max()), rtol=0), name


def test_a_micro_batch_without_response_tokens_still_steps():
    cfg, sd = tiny()
    batch = make_batch(seed=4, n=2)
    batch.response_mask_BT[:] = 0
    batch.loss_weights_BT = torch.zeros_like(batch.loss_weights_BT)
    trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-2))
    batch.old_logprobs_BT = trainer.logprobs(batch)
    stats = trainer.train_step(batch, make_policy_loss(0.2, 0.2))
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0


def test_ratio_is_exactly_one_before_the_update():
    _, stats = step_with(3)
    assert stats["ratio_max"] == 1.0 and stats["ratio_min"] == 1.0
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == 0.0


def test_a_sampled_pad_token_trains_its_embedding_like_any_other_token():
    """The engine may sample the pad id; as an input token its embedding row gets gradient, as in Megatron
    (transformers' padding_idx froze it, and the two backends' gradients parted)."""
    cfg, sd = tiny()
    cfg = {**cfg, "tie_word_embeddings": False, "pad_token_id": 0}
    sd = init_tiny_model(cfg, seed=0)
    trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-2, micro_batch_size=8))
    sample = Sample(prompt_ids=[5, 6, 7], response_ids=[9, 0, 11, 12], rollout_logprobs=[0.0] * 4)
    batch = build_train_batch([sample], [1.0], pad_id=0, loss_agg="token")
    batch.old_logprobs_BT = trainer.logprobs(batch)
    trainer.train_step(batch, make_policy_loss(0.2, 0.2))
    grad = trainer.model.get_input_embeddings().weight.grad
    assert float(grad[0].abs().sum()) > 0 and float(grad[1].abs().sum()) == 0  # id 1 never appears


def test_lr_schedules():
    opt = OptimSettings(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=2, total_steps=12)
    f = lr_lambda(opt)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert math.isclose(f(2), 1.0) and math.isclose(f(12), 0.1) and math.isclose(f(7), 0.55)
    lin = lr_lambda(OptimSettings(lr=1.0, schedule="linear", total_steps=10))
    assert math.isclose(lin(5), 0.5)
    assert lr_lambda(OptimSettings(schedule="constant"))(100) == 1.0


def test_checkpoint_round_trip_continues_identically(tmp_path):
    cfg, sd = tiny("qwen2")
    loss_fn = make_policy_loss(0.2, 0.2)
    a = HFTrainer(cfg, sd, OptimSettings(lr=1e-2, schedule="cosine", total_steps=5))
    for seed in range(2):
        b = make_batch(seed)
        b.old_logprobs_BT = a.logprobs(b)
        a.train_step(b, loss_fn)
    a.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "config.json").exists()
    cfg2, sd2 = tiny("qwen2")  # fresh weights, then load
    c = HFTrainer(cfg2, sd2, OptimSettings(lr=1e-2, schedule="cosine", total_steps=5))
    c.load(str(tmp_path / "ckpt"))
    assert c.step == 2
    for (n, x), (_, y) in zip(a.named_hf_weights(), c.named_hf_weights()):
        assert torch.equal(x, y), n
    nxt = make_batch(7)
    outs = []
    for t in (a, c):
        nxt.old_logprobs_BT = t.logprobs(nxt)
        outs.append(t.train_step(nxt, loss_fn))
    assert outs[0] == outs[1]
    for (n, x), (_, y) in zip(a.named_hf_weights(), c.named_hf_weights()):
        assert torch.equal(x, y), n


def test_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, sd = tiny("llama")
    t = HFTrainer(cfg, sd, OptimSettings())
    t.save(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, t.model(ids).logits, atol=1e-6)
