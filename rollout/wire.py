"""The SGLang wire format as our types, in one place for the client and the server.

- `/generate`: `GenerateRequest` -> request body (`generate_payload`), result
  body -> `GenerateOutput` (`parse_generate_response`), and the finish-reason
  dicts both ways (`finish_reason_json` / `parse_finish_reason`);
- weight versions: SGLang's strings <-> our integers;
- `/update_weights_from_tensor`: the per-rank blob for a list of (name, tensor)
  pairs or, with `load_format="flattened_bucket"`, a bucket: base64 of either
  `torch.save` bytes (CPU tensors, `encode_tensor_payload`) or, as real SGLang
  sends it, a `ForkingPickler` pickle whose CUDA tensors travel as IPC handles
  (`encode_cuda_ipc_payload`). The decoder tells them apart by torch.save's zip
  magic and opens the pickle with an allowlist of globals (`_IPC_GLOBALS`), so
  a payload cannot name anything else to call;
- SGLang's own flattened buckets (`sglang.srt.weight_sync.tensor_bucket`):
  `{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata]}`,
  read by the exact class name into a local stand-in (nothing imported from
  SGLang) and reconstructed as SGLang does (`sglang_named_tensors`); written by
  `sglang_bucket` (what our trainer sends, to SGLang and to us);
- error bodies -> their human message.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 - registers the CUDA-IPC tensor reductions with ForkingPickler

from slime_rl.buckets import (SGLANG_METADATA, FlattenedTensorMetadata, dumps_sglang, sglang_bucket,
                              sglang_named_tensors)
from slime_rl.types import BucketEntry, GenerateOutput, GenerateRequest, SampleStatus, WeightBucket

FINISH_TYPES = {"length": SampleStatus.TRUNCATED, "stop": SampleStatus.COMPLETED, "abort": SampleStatus.ABORTED}
ABORT_MESSAGE = "Request aborted (abort_request, pause_generation, weight update or client disconnect)."


# What a client sees of an engine failure (GenerateOutput.error, with the exception, stays in the
# process and its log: error bodies never carry internal exception text).
ENGINE_ERROR_MESSAGE = "the engine failed on this request; the other requests go on (the server log has the details)"


def finish_reason_json(out: GenerateOutput) -> dict[str, Any] | None:
    """`meta_info.finish_reason` of an output (None while it runs)."""
    if out.finish_reason is None:
        return None
    if out.finish_reason == SampleStatus.COMPLETED:
        return {"type": "stop", "matched": out.matched_stop}
    if out.finish_reason == SampleStatus.TRUNCATED:
        return {"type": "length", "length": len(out.output_ids)}
    if out.error is not None:  # the engine failed this request: SGLang's shape of an internal error
        return {"type": "abort", "message": ENGINE_ERROR_MESSAGE, "status_code": 500,
                "err_type": "InternalServerError"}
    return {"type": "abort", "message": ABORT_MESSAGE, "status_code": None, "err_type": None}


def generate_payload(req: GenerateRequest, rid: str, stream: bool = False) -> dict[str, Any]:
    """The `/generate` body for one request (SGLang native field names)."""
    s = req.sampling
    sampling: dict[str, Any] = {
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
        "max_new_tokens": s.max_new_tokens, "min_new_tokens": s.min_new_tokens,
    }
    if s.stop_token_ids:
        sampling["stop_token_ids"] = list(s.stop_token_ids)
    if s.stop:
        sampling["stop"] = list(s.stop)
    if s.seed is not None:
        sampling["sampling_seed"] = s.seed  # SGLang has no "seed" key; unknown keys fail there
    for name, neutral in (("min_p", 0.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
        if getattr(s, name) != neutral:  # only non-default knobs: older servers need not know them
            sampling[name] = getattr(s, name)
    if s.logit_bias:
        sampling["logit_bias"] = {str(t): float(v) for t, v in s.logit_bias.items()}
    if s.return_top_p_token_ids:
        sampling["custom_params"] = {"return_top_p_token_ids": True}
    payload: dict[str, Any] = {
        "input_ids": list(req.input_ids), "sampling_params": sampling, "rid": rid, "return_logprob": True,
    }
    if req.top_logprobs_num > 0:
        payload["top_logprobs_num"] = req.top_logprobs_num
    if req.logprob_start_len >= 0:
        payload["logprob_start_len"] = req.logprob_start_len
    if stream:
        payload["stream"] = True
    return payload


def _int32_array(value: Any) -> list[int]:
    """A meta_info int array: base64 of little-endian int32 (SGLang with slime's patch) or a JSON list."""
    if isinstance(value, str):
        raw = base64.b64decode(value.encode("ascii"))
        return list(struct.unpack(f"<{len(raw) // 4}i", raw))
    return [int(v) for v in value]


def _top_p_kept(meta: dict, rid: str) -> list[list[int]]:
    """meta_info top_p_token_ids / top_p_token_offsets -> the kept ids of each output token."""
    if meta.get("top_p_token_ids") is None or meta.get("top_p_token_offsets") is None:
        raise ValueError(f"rid {rid}: return_top_p_token_ids was asked for but meta_info has no "
                         f"top_p_token_ids / top_p_token_offsets (a stock SGLang server ignores it)")
    ids, offsets = _int32_array(meta["top_p_token_ids"]), _int32_array(meta["top_p_token_offsets"])
    if not offsets or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError(f"rid {rid}: top_p_token_offsets {offsets[:5]}... do not cover {len(ids)} ids")
    return [ids[a:b] for a, b in zip(offsets, offsets[1:])]


def weight_version_int(value: Any) -> int:
    """SGLang reports versions as strings ("default" until set); non-integers read as 0."""
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def parse_generate_response(body: Any, req: GenerateRequest, rid: str, *, final: bool = True) -> GenerateOutput:
    """Map one `/generate` result (or streamed snapshot when `final` is False) to a GenerateOutput.

    Token ids come from `output_token_logprobs` when present, as they are
    aligned 1:1 with the logprobs by construction (whether a server's
    `output_ids` keeps the matched EOS differs between versions).
    """
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise ValueError(f"rid {rid}: expected a JSON object with meta_info, got {str(body)[:200]!r}")
    meta = body["meta_info"]
    triples = meta.get("output_token_logprobs")
    if triples is not None:
        output_ids = [int(t[1]) for t in triples]
        output_logprobs = [float(t[0]) for t in triples]
    else:
        output_ids = [int(t) for t in body.get("output_ids") or []]
        output_logprobs = []
    status, matched = parse_finish_reason(meta.get("finish_reason"), rid, final)
    version = weight_version_int(meta.get("weight_version", 0))
    versions = meta.get("output_weight_versions")
    top = meta.get("output_top_logprobs") if req.top_logprobs_num > 0 else None
    inputs = meta.get("input_token_logprobs") if req.logprob_start_len >= 0 else None
    input_top = meta.get("input_top_logprobs") if req.logprob_start_len >= 0 and req.top_logprobs_num > 0 else None
    kept = _top_p_kept(meta, rid) if req.sampling.return_top_p_token_ids else None
    return GenerateOutput(
        rid=str(meta.get("id", rid)),
        output_ids=output_ids,
        output_logprobs=output_logprobs,
        finish_reason=status,
        weight_version=version,
        prompt_tokens=int(meta.get("prompt_tokens", len(req.input_ids))),
        cached_tokens=int(meta.get("cached_tokens", 0)),
        output_versions=[int(v) for v in versions] if versions is not None else [version] * len(output_ids),
        matched_stop=matched,
        output_top_logprobs=None if top is None else [
            [(int(t[1]), float(t[0])) for t in position or []] for position in top
        ],
        input_logprobs=None if inputs is None else [None if t[0] is None else float(t[0]) for t in inputs],
        input_top_logprobs=None if input_top is None else [
            None if position is None else [(int(t[1]), float(t[0])) for t in position] for position in input_top
        ],
        top_p_token_ids=kept,
        e2e_latency=float(meta.get("e2e_latency") or 0.0),
    )


def parse_finish_reason(reason: Any, rid: str, final: bool) -> tuple[SampleStatus | None, int | str | None]:
    if reason is None:
        if final:
            raise ValueError(f"rid {rid}: a finished result has no meta_info.finish_reason")
        return None, None
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in FINISH_TYPES:
        raise ValueError(f"rid {rid}: unknown finish_reason {reason!r} (expected type length/stop/abort)")
    matched = reason.get("matched") if isinstance(reason, dict) and kind == "stop" else None
    return FINISH_TYPES[kind], matched


def error_message(body: Any) -> str:
    """The human message of an error body: SGLang `{"error":{"message"}}`, FastAPI
    `{"object":"error","message"}`, weight updates `{"success":false,"message"}`, or plain text."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if key in body:
                return str(body[key])
    text = body if isinstance(body, str) else json.dumps(body)
    return text.strip()[:2000] or "(empty body)"


def parse_body(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _bucket_dict(bucket: WeightBucket, buffer: torch.Tensor) -> dict[str, Any]:
    return {"flattened_tensor": buffer, "metadata": [
        {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset} for e in bucket.entries]}


def encode_tensor_payload(tensors: list[tuple[str, torch.Tensor]] | WeightBucket) -> tuple[str, str | None]:
    """(blob, load_format) for `/update_weights_from_tensor`; tensors are copied to the CPU."""
    if isinstance(tensors, WeightBucket):
        obj: Any = _bucket_dict(tensors, tensors.buffer.detach().to("cpu"))
        load_format = "flattened_bucket"
    else:
        obj, load_format = [(name, t.detach().to("cpu").contiguous()) for name, t in tensors], None
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii"), load_format


def encode_cuda_ipc_payload(tensors: list[tuple[str, torch.Tensor]] | WeightBucket) -> str:
    """The blob real SGLang reads: base64 of a `ForkingPickler` pickle of (name, tensor) pairs,
    or for a WeightBucket of SGLang's flattened-bucket dict (`sglang_bucket`, no copy; send it with
    load_format="flattened_bucket"; this server reads it too).

    CUDA tensors only: they pickle as IPC handles (no copy), so the receiver maps the sender's
    memory, which the sender must keep alive and unchanged until the receiver is done with it
    (for a staged update: until the commit). CPU tensors would pickle as shared-memory file
    descriptors, which `decode_tensor_payload` refuses; send those with `encode_tensor_payload`.
    """
    if isinstance(tensors, WeightBucket):
        named = [("flattened_tensor", tensors.buffer)]
        obj: Any = sglang_bucket(tensors.buffer.detach(), tensors.entries)
    else:
        named = list(tensors)
        obj = [(name, t.detach()) for name, t in named]
    cpu = [name for name, t in named if not t.is_cuda]
    if cpu:
        raise ValueError(f"CUDA IPC payloads carry CUDA tensors only; {cpu[:3]} are on another device "
                         f"(use encode_tensor_payload)")
    return base64.b64encode(dumps_sglang(obj)).decode("ascii")


# Every global a ForkingPickler pickle of CUDA tensors (in a list of pairs or a bucket dict of plain
# containers) names, per torch.multiprocessing.reductions.reduce_tensor: the rebuild function, the
# tensor class (Parameter when the sender passed parameters), torch.Size, the storage class, and the
# dtype (a `torch` attribute, allowed in `find_class`). Anything else is refused.
_IPC_GLOBALS = frozenset({
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"),
    ("torch.storage", "TypedStorage"),
})


class _CudaIpcUnpickler(pickle.Unpickler):
    """Unpickles CUDA-IPC tensor payloads and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) == SGLANG_METADATA:
            return FlattenedTensorMetadata
        if (module, name) in _IPC_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise ValueError(f"forbidden global {module}.{name} in a CUDA IPC payload (only CUDA tensors may be sent)")


def _load_payload(raw: bytes) -> Any:
    """A torch.save zip (magic "PK", loaded weights_only) or a CUDA-IPC pickle (allowlisted globals)."""
    if raw[:2] == b"PK":
        try:
            with torch.serialization.safe_globals([FlattenedTensorMetadata]):
                return torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's payload
            raise ValueError(f"serialized_named_tensors[0] is not a valid torch.save payload: {exc}") from exc
    try:
        return _CudaIpcUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # noqa: BLE001 - as above; the message names a forbidden global
        raise ValueError(f"serialized_named_tensors[0] is neither torch.save bytes nor a CUDA IPC pickle "
                         f"this server can open: {exc}") from exc


def bucket_entries(metadata: Any) -> list[BucketEntry]:
    """Flattened-bucket metadata (`[{name, dtype, shape, offset}]`) as BucketEntry objects."""
    if not isinstance(metadata, list):
        raise ValueError(f"flattened_bucket metadata must be a list, got {type(metadata).__name__}")
    return [_bucket_entry(m, i) for i, m in enumerate(metadata)]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bucket_entry(m: Any, i: int) -> BucketEntry:
    """One metadata entry: {"name": str, "dtype": str, "shape": [int >= 0, ...], "offset": int >= 0}."""
    need = "an object with name (string), dtype (string), shape (list of integers >= 0) and offset (integer >= 0)"
    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("dtype"), str)
            and isinstance(m.get("shape"), list) and all(_count(d) for d in m["shape"]) and _count(m.get("offset"))):
        raise ValueError(f"flattened_bucket metadata[{i}] must be {need}")
    return BucketEntry(m["name"], m["dtype"].removeprefix("torch."), tuple(m["shape"]), m["offset"])


def decode_tensor_payload(serialized: Any, load_format: Any) -> list[tuple[str, torch.Tensor]] | WeightBucket:
    """`serialized_named_tensors` -> (name, tensor) pairs, or a WeightBucket for "flattened_bucket".
    Raises ValueError naming what is wrong."""
    if load_format not in (None, "flattened_bucket"):
        raise ValueError(f"load_format must be null or 'flattened_bucket', got {load_format!r}")
    if not isinstance(serialized, list) or len(serialized) != 1 or not isinstance(serialized[0], str):
        raise ValueError("serialized_named_tensors must be a list with one base64 string (this server has one TP rank)")
    try:
        raw = base64.b64decode(serialized[0], validate=True)
    except ValueError as exc:
        raise ValueError(f"serialized_named_tensors[0] is not base64: {exc}") from exc
    obj = _load_payload(raw)
    if load_format == "flattened_bucket":
        if not isinstance(obj, dict) or not isinstance(obj.get("flattened_tensor"), torch.Tensor):
            raise ValueError("a flattened_bucket payload must be a dict with 'flattened_tensor' and 'metadata'")
        metadata = obj.get("metadata") or []
        if isinstance(metadata, list) and any(isinstance(m, FlattenedTensorMetadata) for m in metadata):
            return sglang_named_tensors(obj["flattened_tensor"], metadata)  # SGLang's own bucket
        return WeightBucket(obj["flattened_tensor"], bucket_entries(metadata))
    if not isinstance(obj, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
        for p in obj
    ):
        raise ValueError("the payload must be a list of (name, tensor) pairs")
    return [(name, t) for name, t in obj]
