"""Config and CLI: defaults, files, flags, and errors that name the field."""

import json

import pytest

from slime_rl.cli import build_parser, config_from_args, main
from slime_rl.config import ConfigError, JobConfig, from_dict, set_field


def parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_defaults_validate():
    cfg = parse(["train"])
    assert cfg == JobConfig()


def test_flags_override_and_coerce():
    cfg = parse(["train", "--rollout.temperature", "0.7", "--sft.enabled", "false", "--data.metadata_keys", "a,b"])
    assert cfg.rollout.temperature == 0.7
    assert cfg.sft.enabled is False
    assert cfg.data.metadata_keys == ["a", "b"]


def test_short_topology_flags():
    cfg = parse(["train", "-t", "4", "-i", "3", "-b", "megatron", "--tp", "2", "--algo", "DAPO"])
    assert (cfg.train.num_trainers, cfg.rollout.num_inferencers, cfg.train.tp) == (4, 3, 2)
    assert cfg.train.backend == "megatron" and cfg.algorithm.name == "DAPO"
    assert parse(["train", "--tp", "2", "--pp", "2"]).trainer_ranks == 4  # num_trainers None = tp x pp


@pytest.mark.parametrize("flags, field", [
    (["-t", "3", "--tp", "2"], "train.num_trainers"),  # not a multiple of tp x pp
    (["-b", "hf", "--tp", "2"], "train.backend"),  # the reference backend is one process
    (["--tp", "0"], "train.tp"),
])
def test_bad_layouts_name_the_field(flags, field):
    with pytest.raises(ConfigError, match=field):
        parse(["train", *flags])


def test_yaml_file_then_flags(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("rollout:\n  n_samples_per_prompt: 4\ntrain:\n  lr: 0.001\n")
    cfg = parse(["train", "-c", str(f), "--train.lr", "0.01"])
    assert cfg.rollout.n_samples_per_prompt == 4
    assert cfg.train.lr == 0.01


def test_json_file(tmp_path):
    f = tmp_path / "job.json"
    f.write_text(json.dumps({"algorithm": {"kl_coef": 0.1}}))
    assert parse(["train", "-c", str(f)]).algorithm.kl_coef == 0.1


def test_unknown_key_in_file_names_it(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"rollout\.temprature"):
        parse(["train", "-c", str(f)])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"algorithm\.name.*allowed values: GRPO, DR_GRPO, DAPO, RLOO, REINFORCE_PP, REINFORCE_PPB, PPO, GSPO, CISPO"):
        from_dict(JobConfig, {"algorithm": {"name": "SAC"}})


def test_bad_type_names_field():
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        from_dict(JobConfig, {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens: expected an integer"):
        from_dict(JobConfig, {"rollout": {"max_new_tokens": 1.5}})
    with pytest.raises(ConfigError, match=r"sft\.enabled: expected a boolean"):
        set_field(JobConfig(), "sft.enabled", "maybe")


def test_range_checks_name_field():
    with pytest.raises(ConfigError, match=r"rollout\.top_p must be in \(0, 1\]"):
        parse(["train", "--rollout.top_p", "1.5"])


def test_cli_reports_config_error(capsys):
    assert main(["train", "--algorithm.loss_agg", "median"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.loss_agg" in err and "token, sequence" in err


def test_cli_unknown_algorithm_names_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--algo", "SAC", "--log.output_dir", "/nonexistent-never-created"])
    assert exc.value.code == 2
    assert "invalid choice: 'SAC'" in capsys.readouterr().err


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in ["--rollout.temperature", "-t N, --num-trainers N", "--algo", "{GRPO,DR_GRPO,DAPO,RLOO,REINFORCE_PP,REINFORCE_PPB,PPO,GSPO,CISPO,RAFT}",
                   "rollout:", "Generation side"]:
        assert needle in out, needle


def test_adam_eps_reaches_the_policy_and_critic_optimizers():
    from slime_rl.config import build_config
    from slime_rl.hf_io import init_tiny_model, tiny_hf_config
    from slime_rl.job import _critic_opt, _rl_opt
    from training.hf import HFTrainer

    cfg = build_config(overrides=[("train.adam_eps", 1e-2)])
    assert _rl_opt(cfg).eps == _critic_opt(cfg).eps == 1e-2
    assert _rl_opt(build_config()).eps == 1e-8  # torch's and Megatron's default
    hf = tiny_hf_config(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    trainer = HFTrainer(hf, init_tiny_model(hf, seed=0), _rl_opt(cfg))
    assert {g["eps"] for g in trainer.optimizer.param_groups} == {1e-2}
    with pytest.raises(ConfigError, match="train.adam_eps must be > 0"):
        build_config(overrides=[("train.adam_eps", 0.0)])
