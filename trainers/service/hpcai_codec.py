"""The hpcai client's JSON training data and results, to and from the service's own forms.

A JSON forward/forward_backward call becomes the same protobuf ``ForwardBackwardRequest`` a
tinker client posts, so one decoder checks both and the executor (and the restart's
recomputation of gradients) reads one format. Results go back as the JSON the client parses:
``TensorData`` holds exactly ``data``, ``dtype``, ``shape``; unscored prompt positions are
``null``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from trainers.service import wire
from trainers.service.api_models import CallInputBody, TensorBody
from trainers.service.backend import ForwardBackwardResult, SampleResult
from trainers.service.codec import WireError

INT32_MAX = 2**31 - 1


def forward_backward_request(model_id: str, call: CallInputBody, forward_only: bool) -> bytes:
    """The serialized ``ForwardBackwardRequest`` of a JSON call (``seq_id`` 0: the store
    numbers hpcai requests)."""
    msg = wire.ForwardBackwardRequest(model_id=model_id, loss_fn=call.loss_fn, forward_only=forward_only)
    for i, datum in enumerate(call.data):
        out = msg.data.add()
        for j, chunk in enumerate(datum.model_input.chunks):
            where = f"data[{i}].model_input.chunks[{j}]"
            if chunk.type != "encoded_text":
                raise WireError(where, "only encoded_text chunks are supported")
            tokens = np.asarray(chunk.tokens, dtype=np.int64)
            if tokens.size and (tokens.min() < 0 or tokens.max() > INT32_MAX):
                raise WireError(f"{where}.tokens", "token ids must be non-negative 32-bit integers")
            out.model_input.add().encoded_text.tokens = tokens.astype("<i4").tobytes()
        for key, tensor in datum.loss_fn_inputs.items():
            _tensor(out.loss_fn_inputs[key], tensor, f"data[{i}].loss_fn_inputs.{key}")
    return msg.SerializeToString()


def _tensor(msg, tensor: TensorBody, field: str) -> None:
    values = np.asarray(tensor.data, dtype=np.float64)
    if tensor.dtype == "int64":
        if not np.array_equal(values, np.round(values)):
            raise WireError(field, "int64 data must be whole numbers")
        msg.dtype, msg.dense = wire.DTYPE_INT64, values.astype("<i8").tobytes()
    else:
        msg.dtype, msg.dense = wire.DTYPE_FLOAT32, values.astype("<f4").tobytes()
    msg.shape.extend(tensor.shape if tensor.shape is not None else [values.size])


def _tensor_json(value: torch.Tensor) -> dict:
    return {"data": value.detach().to(torch.float32).reshape(-1).tolist(), "dtype": "float32",
            "shape": list(value.shape)}


def forward_backward_json(result: ForwardBackwardResult) -> bytes:
    return json.dumps({"loss_fn_output_type": "TensorData",
                       "loss_fn_outputs": [{name: _tensor_json(t) for name, t in out.items()}
                                           for out in result.outputs],
                       "metrics": result.metrics}).encode()


def sample_json(result: SampleResult) -> bytes:
    prompt = result.prompt_logprobs
    return json.dumps({
        "type": "sample",
        "sequences": [{"stop_reason": s.stop_reason, "tokens": [int(t) for t in s.tokens],
                       "logprobs": [float(lp) for lp in s.logprobs]} for s in result.sequences],
        "prompt_logprobs": None if prompt is None else [None if math.isnan(lp) else float(lp) for lp in prompt],
    }).encode()
