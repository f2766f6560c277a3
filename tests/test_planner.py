"""`slime-rl plan`: placement, layout, weight-sync plan, memory estimate and refusal; the GPU recipes load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slime_rl.cli import main
from slime_rl.config import ConfigError, build_config, load_config_file
from slime_rl.planner import KNOWN_MODELS, build_plan, resolve_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
RECIPE_7B = str(ROOT / "examples" / "qwen2.5_7b_grpo_disagg.yaml")
GPU_RECIPES = ["qwen2.5_0.5b_grpo_colocated.yaml", "qwen2.5_1.5b_grpo_torchrun.yaml", "qwen2.5_7b_grpo_disagg.yaml",
               "llama3_8b_grpo_torchrun.yaml", "qwen3_4b_dapo_torchrun.yaml"]


def plan_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_7b_recipe_prints_placement_layout_sync_and_memory(capsys):
    rc, out, err = plan_cli(capsys, RECIPE_7B)
    assert rc == 0, err
    assert "placement: disaggregated, 8 GPU(s)" in out
    assert "node 0 gpu 0: trainer rank 0 (tp 0, pp 0, dp 0)" in out
    assert "node 0 gpu 3: trainer rank 3 (tp 1, pp 0, dp 1)" in out
    assert "node 0 gpu 4: engine 0" in out and "node 0 gpu 7: engine 3" in out
    assert "TP 2 x PP 1 x DP 2 = 4 rank(s), layers per stage [28]" in out
    assert "weight sync: shm to 4 engine(s)" in out
    assert "node 0 gpu 0: total" in out and "optimizer" in out and "activations" in out and "kv cache" in out
    assert "REFUSED" not in out and err == ""


def test_impossible_plan_is_refused_with_the_setting_to_change(capsys):
    """A 7B full fine-tune on one 24 GB GPU: exit code 2, one line naming train.tp."""
    rc, out, err = plan_cli(capsys, RECIPE_7B, "--tp", "1", "-t", "1", "--gpu-memory-gb", "24")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slime-rl plan: does not fit: node 0 gpu 0")
    assert "train.tp" in lines[0] and "Traceback" not in err
    assert "DOES NOT FIT" in out  # the plan itself is still printed


def test_sglang_servers_that_cannot_hold_the_weights_are_refused(capsys):
    recipe = str(ROOT / "examples" / "llama3_8b_grpo_torchrun.yaml")
    rc, _, err = plan_cli(capsys, recipe, "--rollout.sglang_args", '{"tp-size": 1, "mem-fraction-static": 0.15}')
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "each external engine GPU" in err and "of 12.00 GiB" in err and "rollout.sglang_args" in err


def test_every_example_loads_through_the_config_loader():
    assert len(EXAMPLES) >= 5
    for path in EXAMPLES:
        build_config(load_config_file(path))  # unknown keys and bad values raise ConfigError


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_every_gpu_recipe_fits_80gb_gpus(name):
    plan = build_plan(build_config(load_config_file(ROOT / "examples" / name)))
    assert "refused" not in plan, plan["refused"]
    assert plan["model"]["source"].startswith("published config.json values")  # the placeholder path's basename


def test_the_loader_rejects_an_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples" / "qwen2.5_0.5b_grpo_colocated.yaml").read_text()
                   + "train:\n  tensor_parallel: 2\n")
    with pytest.raises(ConfigError, match="tensor_parallel"):
        build_config(load_config_file(bad))


def test_json_output_parses(capsys):
    rc, out, _ = plan_cli(capsys, str(ROOT / "examples" / "qwen2.5_0.5b_grpo_colocated.yaml"), "--json")
    assert rc == 0
    plan = json.loads(out)
    assert plan["placement"]["mode"] == "colocated"
    slot = plan["placement"]["slots"][0]
    assert slot["trainer_ranks"][0]["rank"] == 0 and slot["engines"] == [0]
    assert plan["layout"]["dp"] == 4 and plan["weight_sync"]["buckets"] >= 1
    assert set(plan["memory"][0]["parts"]) >= {"weights", "gradients", "optimizer", "activations", "kv_cache"}


def test_overrides_change_the_plan(capsys):
    rc, out, _ = plan_cli(capsys, RECIPE_7B, "--train.pp", "2", "--json")
    assert rc == 0
    layout = json.loads(out)["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["layers_per_stage"]) == (2, 2, 1, [14, 14])


def test_published_sizes_give_the_published_parameter_counts():
    counts = {"Qwen2.5-0.5B": 0.494e9, "Qwen2.5-7B": 7.62e9, "Llama-3.1-8B": 8.03e9, "Qwen3-8B": 8.19e9,
              "Llama-3.2-1B": 1.24e9, "SmolLM2-135M": 0.1345e9}
    for name, expected in counts.items():
        cfg = build_config(overrides=[("model.path", f"/nowhere/{name}-Instruct")])
        assert resolve_model(cfg).params() == pytest.approx(expected, rel=0.01), name
    assert set(counts) <= set(KNOWN_MODELS)


def test_weight_sync_bytes_are_the_engine_dtype_times_the_params():
    cfg = build_config(load_config_file(RECIPE_7B))
    plan = build_plan(cfg)
    assert plan["weight_sync"]["bytes_per_sync"] == plan["model"]["params"] * 4  # fp32 embedded engines, untied


def test_config_json_wins_over_the_table(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**KNOWN_MODELS["SmolLM2-135M"], "num_hidden_layers": 2}))
    cfg = build_config(overrides=[("model.path", str(model_dir))])
    facts = resolve_model(cfg)
    assert facts.layers == 2 and facts.source.endswith("config.json")


@pytest.mark.parametrize("argv, message", [
    (["/no/such/job.yaml"], "config error: config file not found: /no/such/job.yaml"),
    (["--model.path", "/no/such/FancyModel-3B"], "FancyModel-3B' is not a known model"),
    (["--tp", "3", "--model-name", "Qwen2.5-7B"], "train.tp=3 must divide the model's num_attention_heads (28)"),
    (["-i", "2"], "rollout.num_inferencers is 2, but the local launcher runs one embedded engine"),  # as train
    ([RECIPE_7B, "--gpus-per-node", "0"], "--gpus-per-node (0) >= 1"),
])
def test_bad_inputs_give_one_line_and_exit_code_2(capsys, argv, message):
    rc, _, err = plan_cli(capsys, *argv)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_the_command_line_entry_point_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "slime_rl.cli", "plan", "--model.path", "/no/such/Unknown-1B"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "is not a known model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tiny_estimate_is_within_25_percent_of_the_measured_cpu_peak():
    """One reference-backend step of the default tiny model at the planner's micro-batch (fp32, CPU):
    torch's memory profiler's peak of live tensor bytes against the estimate."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_plan_memory import measure

    r = measure("tiny", rss=False)
    assert 0.75 <= r["estimate_over_allocator_peak"] <= 1.25, r
