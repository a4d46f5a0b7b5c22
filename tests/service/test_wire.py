"""The server's own protobuf declarations against the official client's schema: what the
client sends decodes here, what the server answers decodes there (the client is imported
only by this test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto import request_conv, response_conv

from trainers.service.backend import ForwardBackwardResult, SampledSequence, SampleResult
from trainers.service.codec import WireError, decode_forward_backward, encode_forward_backward, encode_sample


def _request(**inputs) -> bytes:
    datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs=inputs)
    req = types.ForwardBackwardRequest(model_id="m:train:0", seq_id=4, forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.9}))
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def test_client_request_decodes():
    call = decode_forward_backward(_request(target_tokens=[6, 7, 8], logprobs=[-1.0, -2.0, -3.0],
                                            advantages=[0.5, 0.0, -0.5]), vocab=100)
    assert (call.model_id, call.seq_id, call.loss_fn, call.loss_fn_config) == ("m:train:0", 4, "ppo",
                                                                               {"clip_low_threshold": 0.9})
    assert call.data[0].tokens.tolist() == [5, 6, 7]
    assert call.data[0].loss_fn_inputs["target_tokens"].dtype == torch.int64
    assert call.data[0].loss_fn_inputs["advantages"].tolist() == [0.5, 0.0, -0.5]


def test_bad_bodies_name_the_field():
    with pytest.raises(WireError, match="body"):
        decode_forward_backward(b"\xff\xff\xff", vocab=100)
    with pytest.raises(WireError, match=r"data\[0\]\.loss_fn_inputs\.target_tokens"):
        decode_forward_backward(_request(target_tokens=[6, 7, 800]), vocab=100)


def test_outputs_decode_in_the_client():
    result = ForwardBackwardResult([{"logprobs": torch.tensor([-1.0, -2.0])}, {"logprobs": torch.tensor([-3.0])}],
                                   {"loss:sum": 6.0})
    out = response_conv.deserialize_forward_backward_output(encode_forward_backward(result))
    assert out.metrics == {"loss:sum": 6.0}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-3.0]]
    sample = SampleResult([SampledSequence([3, 4], [-0.5, -0.25], "stop"), SampledSequence([9], [-1.0], "length")],
                          [math.nan, -1.5], ([[0, 0], [4, 5]], [[math.nan, math.nan], [-0.1, -0.2]]))
    got = response_conv.deserialize_sample_response(encode_sample(sample))
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in got.sequences] == [
        ([3, 4], [-0.5, -0.25], "stop"), ([9], [-1.0], "length")]
    assert got.prompt_logprobs == [None, -1.5]
    assert [t for t, _ in got.topk_prompt_logprobs[1]] == [4, 5]
    assert np.allclose([lp for _, lp in got.topk_prompt_logprobs[1]], [-0.1, -0.2])
