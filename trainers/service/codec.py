"""Protobuf bodies to backend types and back: forward_backward requests in, outputs out.

Decoding checks everything a client controls (dtypes, byte lengths, shapes, token ranges,
chunk kinds) and raises ``WireError`` naming the field, which the API answers with 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.message import DecodeError

from trainers.service import wire
from trainers.service.backend import Datum, ForwardBackwardResult, SampleResult

_NUMPY = {wire.DTYPE_FLOAT32: np.float32, wire.DTYPE_INT64: np.int64, wire.DTYPE_INT32: np.int32}


class WireError(ValueError):
    """A request body the server cannot use; ``field`` names the offending part."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool
    data: list[Datum]

    @property
    def tokens(self) -> int:
        return sum(d.tokens.numel() for d in self.data)


def _tensor(msg, field: str) -> torch.Tensor:
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise WireError(field, f"unsupported dtype {msg.dtype} (float32 or int64)")
    shape = list(msg.shape)
    if any(s < 0 for s in shape):
        raise WireError(field, f"negative shape {shape}")
    if msg.WhichOneof("encoding") == "sparse_csr":
        return _sparse(msg.sparse_csr, dtype, shape, field)
    raw = msg.dense
    if len(raw) % np.dtype(dtype).itemsize:
        raise WireError(field, f"{len(raw)} bytes is not a whole number of {np.dtype(dtype).name}")
    array = np.frombuffer(raw, dtype=dtype)
    if shape and math.prod(shape) != array.size:
        raise WireError(field, f"shape {shape} does not hold {array.size} values")
    out = torch.from_numpy(array.copy()).reshape(shape or [array.size])
    return out.long() if dtype != np.float32 else out


def _sparse(csr, dtype, shape: list[int], field: str) -> torch.Tensor:
    if len(shape) != 2:
        raise WireError(field, "a sparse tensor needs a 2-D shape")
    try:
        values = torch.from_numpy(np.frombuffer(csr.values, dtype=dtype).copy())
        crow = torch.from_numpy(np.frombuffer(csr.crow_indices, dtype=np.int64).copy())
        col = torch.from_numpy(np.frombuffer(csr.col_indices, dtype=np.int64).copy())
        dense = torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=True).to_dense()
    except (ValueError, RuntimeError) as err:
        raise WireError(field, f"invalid sparse CSR tensor: {str(err).splitlines()[0]}") from None
    return dense.long() if dtype != np.float32 else dense


def _datum(msg, index: int, vocab: int) -> Datum:
    where = f"data[{index}]"
    parts = []
    for j, chunk in enumerate(msg.model_input):
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise WireError(f"{where}.model_input[{j}]", "only encoded_text chunks are supported")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise WireError(f"{where}.model_input[{j}].tokens", "must be int32 little-endian bytes")
        parts.append(np.frombuffer(raw, dtype="<i4"))
    tokens = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int32)).long()
    if tokens.numel() == 0:
        raise WireError(f"{where}.model_input", "is empty")
    inputs = {key: _tensor(value, f"{where}.loss_fn_inputs.{key}") for key, value in msg.loss_fn_inputs.items()}
    for key, ids in (("model_input", tokens), ("loss_fn_inputs.target_tokens", inputs.get("target_tokens"))):
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise WireError(f"{where}.{key}", f"token ids must lie in [0, {vocab})")
    return Datum(tokens=tokens, loss_fn_inputs=inputs)


def decode_forward_backward(body: bytes, vocab: int) -> ForwardBackwardCall:
    """The request in ``body``; ``vocab`` bounds every token id."""
    try:
        msg = wire.ForwardBackwardRequest.FromString(body)
    except DecodeError as err:
        raise WireError("body", f"not a ForwardBackwardRequest protobuf ({err})") from None
    config: dict[str, float] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise WireError(f"loss_fn_config.{key}", "text values are not supported")
        config[key] = value.number
    data = [_datum(d, i, vocab) for i, d in enumerate(msg.data)]
    if not data:
        raise WireError("data", "must hold at least one datum")
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.loss_fn, config, msg.forward_only, data)


def model_and_seq(body: bytes) -> tuple[str, int]:
    """Only the routing fields of a forward_backward body (for deduplication)."""
    try:
        msg = wire.ForwardBackwardRequest.FromString(body)
    except DecodeError as err:
        raise WireError("body", f"not a ForwardBackwardRequest protobuf ({err})") from None
    return msg.model_id, msg.seq_id


def encode_forward_backward(result: ForwardBackwardResult) -> bytes:
    """One ArrayRecord with a float32 BatchedTensor per output field, offsets in bytes."""
    out = wire.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.metrics.update(result.metrics)
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(result.outputs))
    for name in (result.outputs[0] if result.outputs else {}):
        arrays = [o[name].detach().to(torch.float32).numpy().reshape(-1) for o in result.outputs]
        offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype(np.int64)
        field = record.fields[name]
        field.data = np.concatenate(arrays).astype("<f4").tobytes()
        field.offsets = offsets.tobytes()
        field.dtype = wire.DTYPE_FLOAT32
    return out.SerializeToString()


def encode_sample(result: SampleResult) -> bytes:
    out = wire.SampleResponse()
    for seq in result.sequences:
        item = out.sequences.add(stop_reason=wire.STOP_REASONS[seq.stop_reason])
        item.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        item.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_prompt is not None:
        ids, lps = result.topk_prompt
        top = out.topk_prompt_logprobs
        top.token_ids = np.asarray(ids, dtype="<i4").tobytes()
        top.logprobs = np.asarray(lps, dtype="<f4").tobytes()
        top.length, top.k = len(ids), (len(ids[0]) if ids else 0)
    return out.SerializeToString()
