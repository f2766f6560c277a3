"""Diagnostics for RL on the customer-support task: does the model copy the order id, and does an RL gradient
point toward copying it better?

    python benchmarks/probe_support_copy.py copy CKPT [CKPT ...]
    python benchmarks/probe_support_copy.py align CKPT ROLLOUT_DIR

`copy`: over held-out scenarios (seeds no training row uses), the prompt plus the oracle's first call up to the
order id's "A" is fed to the checkpoint (teacher forcing). Printed: the mean probability of the id's first and
second two-digit chunk (the task's word tokenizer), how often each is the most likely token, the probability of
both, and the entropy at the first chunk.

`align`: the GRPO gradient (group-normalised advantages, token mean) of the groups saved with
`--debug.save_rollouts ROLLOUT_DIR` by a run from CKPT, against the gradient of the held-out copy
log-probability. Printed: their cosine (a random direction's is about 1/sqrt(parameters)), the held-out copy
log-probability after plain steps along the GRPO gradient, and the cosine kept by Adam's first step
(entry / (|entry| + eps)) for several eps.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VAL_BASE = 10_000_000  # the task's held-out split for task_seed 0; any seeds outside the training rows do


def copy_cases(tok, n: int) -> list[tuple[list[int], list[int]]]:
    """(context ids up to the id's "A", the id's two chunk ids) for `n` held-out scenarios."""
    from slime_rl.tasks.customer_support.scenarios import make_scenario
    from slime_rl.tasks.customer_support.task import SYSTEM_PROMPT, oracle_dialogue, prompt_messages

    cases = []
    for seed in range(VAL_BASE, VAL_BASE + n):
        oid = make_scenario(seed).order.order_id
        first = oracle_dialogue(seed, 8)[0]["content"]
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *prompt_messages(seed)]
        context = tok.encode(tok.apply_chat_template(messages) + first[: first.index(oid) + 1])
        chunks = tok.encode(oid[1:3]) + tok.encode(oid[3:5])
        if len(chunks) != 2:
            raise SystemExit("the checkpoint's tokenizer is not the task's word tokenizer (two-digit chunks)")
        cases.append((context, chunks))
    return cases


def chunk_logprobs(model, cases) -> list[torch.Tensor]:
    """Log-softmax rows at the two chunk positions of each case."""
    out = []
    for context, chunks in cases:
        logits = model(torch.tensor([context + chunks[:1]])).logits[0, -2:]
        out.append(logits.float().log_softmax(-1))
    return out


def cmd_copy(args) -> None:
    from transformers import AutoModelForCausalLM

    from slime_rl.tokenizer import load_tokenizer

    for ckpt in args.checkpoints:
        tok, model = load_tokenizer(ckpt), AutoModelForCausalLM.from_pretrained(ckpt).eval()
        cases = copy_cases(tok, args.n)
        with torch.no_grad():
            rows = chunk_logprobs(model, cases)
        p1 = [lp[0, c[0]].exp().item() for lp, (_, c) in zip(rows, cases)]
        p2 = [lp[1, c[1]].exp().item() for lp, (_, c) in zip(rows, cases)]
        top1 = sum(lp[0].argmax().item() == c[0] for lp, (_, c) in zip(rows, cases)) / len(cases)
        top2 = sum(lp[1].argmax().item() == c[1] for lp, (_, c) in zip(rows, cases)) / len(cases)
        h1 = sum(-(lp[0].exp() * lp[0]).sum().item() for lp in rows) / len(rows)
        both = sum(a * b for a, b in zip(p1, p2)) / len(cases)
        print(f"{ckpt}: p(chunk 1) {sum(p1) / len(p1):.3f}  p(chunk 2 | 1) {sum(p2) / len(p2):.3f}  "
              f"argmax right {top1:.3f} / {top2:.3f}  p(both) {both:.3f}  entropy at chunk 1 {h1:.3f} nats "
              f"({len(cases)} held-out scenarios)")


def cmd_align(args) -> None:
    from transformers import AutoModelForCausalLM

    from slime_rl.ops import group_normalize
    from slime_rl.producer import load_groups
    from slime_rl.tokenizer import load_tokenizer

    tok, model = load_tokenizer(args.checkpoint), AutoModelForCausalLM.from_pretrained(args.checkpoint)
    params = list(model.parameters())
    cases = copy_cases(tok, args.n)
    files = sorted(glob.glob(str(Path(args.rollouts) / "step_*.pt")))
    if not files:
        raise SystemExit(f"no step_*.pt under {args.rollouts} (save them with --debug.save_rollouts)")
    groups = [g for f in files for g in load_groups(f)]

    def flat_grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in params])

    def copy_logprob() -> torch.Tensor:
        rows = chunk_logprobs(model, cases)
        return sum(lp[0, c[0]] + lp[1, c[1]] for lp, (_, c) in zip(rows, cases)) / len(cases)

    tokens = sum(sum(s.loss_mask) for g in groups for s in g)
    loss = torch.zeros(())
    for g in groups:
        r = torch.tensor([float(s.scalar_reward) for s in g])
        if len(g) < 2 or r.std() == 0:
            continue
        for s, a in zip(g, group_normalize(r[None])[0]):  # GRPO's advantages
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            lp = model(ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(s.loss_mask, dtype=torch.float32)
            loss = loss - a * (lp[len(s.prompt_ids) - 1:] * mask).sum() / tokens
    ascent = -flat_grad(loss)  # the direction a GRPO step moves the weights
    target = flat_grad(copy_logprob())  # the direction that raises the held-out copy log-probability
    cos = torch.nn.functional.cosine_similarity(ascent, target, dim=0).item()
    print(f"{len(groups)} groups, {tokens} trained tokens, {ascent.numel()} parameters")
    print(f"cosine(GRPO step, copy gradient) {cos:+.4f}   (a random direction: ~{ascent.numel() ** -0.5:.4f})")
    with torch.no_grad():
        base = copy_logprob().item()
        saved = [p.detach().clone() for p in params]
        unit = ascent / ascent.norm()
        for size in args.steps:
            offset = 0
            for p in params:
                p.add_(size * unit[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            print(f"plain step of norm {size:g}: held-out copy log-probability {base:.4f} -> {copy_logprob().item():.4f}")
            for p, s0 in zip(params, saved):
                p.copy_(s0)
    for eps in (1e-8, 1e-4, 1e-3, 1e-2):
        adam = ascent / (ascent.abs() + eps)
        kept = torch.nn.functional.cosine_similarity(adam, target, dim=0).item()
        print(f"Adam's first step, eps {eps:g}: cosine with the copy gradient {kept:+.4f}")
    if not math.isfinite(cos):
        raise SystemExit("the gradients are not finite")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="the order-id copy of checkpoints")
    c.add_argument("checkpoints", nargs="+")
    c.add_argument("--n", type=int, default=200, help="held-out scenarios")
    a = sub.add_parser("align", help="a GRPO gradient vs the copy gradient")
    a.add_argument("checkpoint")
    a.add_argument("rollouts", help="a --debug.save_rollouts directory of a run from the checkpoint")
    a.add_argument("--n", type=int, default=200, help="held-out scenarios")
    a.add_argument("--steps", type=float, nargs="+", default=[0.05, 0.2], help="plain step norms to try")
    args = p.parse_args()
    torch.manual_seed(0)
    {"copy": cmd_copy, "align": cmd_align}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
