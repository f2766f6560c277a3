"""Prompts reach the engine tokenised as the checkpoint expects: `tokenizer(prompt).input_ids` for a plain string
(its BOS included), exactly the template's tokens for a chat prompt, and a warning when the two disagree.

Encoding plain prompts with `add_special_tokens=False` dropped the BOS of every prompt for tokenizers that add
one (Llama's, and a character-level Qwen2 tokenizer with a BOS post-processor): a model trained on BOS-led text
started RL at 6% validation accuracy instead of 33%, silently."""

from __future__ import annotations

import logging

import pytest

from rollout.groups import generate_groups
from slime_rl import data
from slime_rl.data import load_prompts, write_jsonl
from slime_rl.tokenizer import CharTokenizer, load_tokenizer
from slime_rl.types import GenerateOutput, SampleStatus, SamplingParams

PROMPTS = ["12 + 30 =", "what is two plus three", "hello world"]
TEMPLATE_NO_BOS = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE_BOS = "{{ bos_token }}" + TEMPLATE_NO_BOS


def _hf_tokenizer(directory, template: str, bos_post_processor: bool):
    """A tiny BPE tokenizer like Llama's: `<s>` put before plain text by its post-processor (or not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    raw.train_from_iterator(PROMPTS * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_post_processor:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = template
    tok.save_pretrained(str(directory))
    return load_tokenizer(str(directory))


class _RecordingEngine:
    def __init__(self):
        self.seen = []

    def generate(self, requests):
        self.seen += [list(r.input_ids) for r in requests]
        return [GenerateOutput(r.rid, output_ids=[2], output_logprobs=[-0.1], finish_reason=SampleStatus.COMPLETED,
                               weight_version=0) for r in requests]


@pytest.mark.parametrize("bos_post_processor", [True, False], ids=["adds-bos", "no-bos"])
def test_the_engine_sees_exactly_what_the_tokenizer_makes_of_a_plain_prompt(tmp_path, bos_post_processor):
    tok = _hf_tokenizer(tmp_path / "tok", TEMPLATE_NO_BOS, bos_post_processor)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "label": "1"} for p in PROMPTS])
    records, _ = load_prompts(path, tok)
    engine = _RecordingEngine()
    generate_groups(engine, records, n=2, sampling=SamplingParams(max_new_tokens=4))
    expected = [tok.hf(p).input_ids for p in PROMPTS]
    assert engine.seen == [ids for ids in expected for _ in range(2)]
    assert all((ids[0] == tok.bos_token_id) == bos_post_processor for ids in expected)


def test_a_chat_prompt_gets_the_templates_tokens_and_one_bos(tmp_path):
    tok = _hf_tokenizer(tmp_path / "tok", TEMPLATE_BOS, bos_post_processor=True)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": [{"role": "user", "content": p}], "label": "1"}
                                                   for p in PROMPTS])
    records, _ = load_prompts(path, tok)
    for record, prompt in zip(records, PROMPTS):
        out = tok.hf.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True)
        assert record.prompt_ids == list(out["input_ids"] if hasattr(out, "keys") else out)
        assert record.prompt_ids[:2].count(tok.bos_token_id) == 1


@pytest.mark.parametrize("template,bos_post_processor,warns", [
    (TEMPLATE_NO_BOS, True, "does not write it"), (TEMPLATE_BOS, False, "does not add it"),
    (TEMPLATE_BOS, True, None), (TEMPLATE_NO_BOS, False, None)])
def test_a_tokenizer_and_template_that_disagree_about_bos_warn_once(tmp_path, caplog, template, bos_post_processor,
                                                                    warns):
    tok = _hf_tokenizer(tmp_path / "tok", template, bos_post_processor)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "label": "1"} for p in PROMPTS])
    with caplog.at_level(logging.WARNING, logger="slime_rl.data"):
        load_prompts(path, tok, apply_chat_template=True)
        load_prompts(path, tok, apply_chat_template=True)
    found = [r.getMessage() for r in caplog.records if r.getMessage().startswith("BOS:")]
    if warns is None:
        assert found == [] and data.bos_disagreement(tok) is None
    else:
        assert len(found) == 1 and warns in found[0] and "<s>" in found[0]


def test_the_character_tokenizer_like_qwen2s_puts_nothing_before_plain_prompts(tmp_path):
    tok = CharTokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "12+30=", "label": "42"}])
    (record,), _ = load_prompts(path, tok)
    assert record.prompt_ids == tok.encode("12+30=", add_special_tokens=True) == tok.encode("12+30=")
    assert data.bos_disagreement(tok) is None  # its built-in template is a stand-in: never warned about
