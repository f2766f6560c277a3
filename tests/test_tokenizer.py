"""CharTokenizer and HFTokenizer share one API; load_tokenizer picks the right one."""

from __future__ import annotations

import json

import pytest

from slime_rl.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_char_round_trip_and_special_ids():
    tok = CharTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + 95 + 1  # specials + printable ASCII + "\n"
    text = "12+30=42\nHello, World! ~{}[]"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) >= 3
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == ids  # like Qwen2's: nothing before plain text


def test_char_special_token_strings():
    tok = CharTokenizer()
    ids = tok.encode("<bos>ab<eos><pad>")
    assert ids[0] == 1 and ids[-2:] == [2, 0] and len(ids) == 5
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>ab<eos><pad>"
    assert tok.encode(tok.decode(ids, skip_special_tokens=False)) == ids
    assert tok.encode("<eo") == [tok.encode(c)[0] for c in "<eo"]  # not a special token


def test_char_unknown_character_raises():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_char_chat_template():
    tok = CharTokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3=?"}]
    assert tok.apply_chat_template(msgs) == "system: Be brief.\nuser: 2+3=?\nassistant: "
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "system: Be brief.\nuser: 2+3=?\n"


def test_char_save_load(tmp_path):
    tok = CharTokenizer(alphabet="0123456789+=")
    path = tok.save(tmp_path)
    assert path.name == "char_tokenizer.json" and json.loads(path.read_text())["type"] == "char"
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.vocab_size == 15
    assert loaded.encode("12+3=15") == tok.encode("12+3=15")
    assert isinstance(load_tokenizer("char"), CharTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="expected 'char' or an existing directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither char_tokenizer.json nor HF tokenizer files"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BPE tokenizer trained offline, saved as an HF tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["what is two plus three", "the answer is five", "hello world", "12 + 30 = 42"] * 10
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(str(out))
    return out


def test_hf_round_trip(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_id == tok.hf.convert_tokens_to_ids("</s>")
    assert tok.bos_token_id == tok.hf.convert_tokens_to_ids("<s>")
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    assert tok.vocab_size == len(tok.hf)
    text = "hello world, the answer is 42!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    with_eos = ids + [tok.eos_token_id]
    assert tok.decode(with_eos) == text
    assert tok.decode(with_eos, skip_special_tokens=False) == text + "</s>"


def test_hf_chat_template_and_save(hf_dir, tmp_path):
    tok = load_tokenizer(str(hf_dir))
    msgs = [{"role": "user", "content": "what is two plus three"}]
    prompt = tok.apply_chat_template(msgs)
    assert prompt == "<|user|>what is two plus three<|end|><|assistant|>"
    ids = tok.encode(prompt)
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tok.hf.convert_tokens_to_ids("<|assistant|>")
    tok.save(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.encode(prompt) == ids and again.apply_chat_template(msgs) == prompt


def test_hf_without_chat_template_raises(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    tok.hf.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
