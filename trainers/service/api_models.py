"""Request bodies of the JSON endpoints (pydantic): a malformed body is answered 422 with the
field's location; unknown extra fields sent by newer clients are ignored. The hpcai client's
bodies (no sessions, no seq_id, training data as JSON) are at the end."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class SessionBody(Body):
    tags: list[str] | None = None
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None


class HeartbeatBody(Body):
    session_id: str


class FinishBody(Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraBody(Body):
    rank: int = Field(32, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraBody = Field(default_factory=LoraBody)
    user_metadata: dict[str, Any] | None = None


class ModelIdBody(Body):
    model_id: str


class SeqBody(ModelIdBody):
    seq_id: int = Field(ge=1, lt=2**31)


class AdamBody(Body):
    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)

    _finite = field_validator("*")(classmethod(lambda cls, v: _finite(v)))


class OptimBody(SeqBody):
    adam_params: AdamBody


class SaveBody(SeqBody):
    path: str | None = None
    ttl_seconds: int | None = Field(None, ge=1)
    user_metadata: dict[str, str] | None = None


class SaveForSamplerBody(SaveBody):
    sampling_session_seq_id: int | None = Field(None, ge=0)


class LoadBody(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = Field(None, ge=1, lt=2**31)
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    user_metadata: dict[str, Any] | None = None


class SamplingSessionBody(Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class Chunk(Body):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class Prompt(Body):
    chunks: list[Chunk] = Field(min_length=1)


class SamplingParamsBody(Body):
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)

    _finite = field_validator("temperature", "top_p")(classmethod(lambda cls, v: _finite(v)))


class SampleBody(Body):
    num_samples: int = Field(1, ge=1)
    prompt: Prompt
    sampling_params: SamplingParamsBody
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = Field(None, ge=0)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0, le=100)


class FutureBody(Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(Body):
    tinker_path: str


class TtlBody(Body):
    ttl_seconds: int | None = Field(None, ge=1)


# --- the hpcai client's dialect -----------------------------------------------------------
class HpcaiCreateModelBody(Body):
    base_model: str
    lora_config: LoraBody = Field(default_factory=LoraBody)


class TensorBody(Body):
    data: list[float]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None


class DatumBody(Body):
    model_input: Prompt
    loss_fn_inputs: dict[str, TensorBody]


class CallInputBody(Body):
    data: list[DatumBody] = Field(min_length=1)
    loss_fn: str


class HpcaiForwardBackwardBody(ModelIdBody):
    forward_backward_input: CallInputBody


class HpcaiForwardBody(ModelIdBody):
    forward_input: CallInputBody


class HpcaiOptimBody(ModelIdBody):
    adam_params: AdamBody


class HpcaiPathBody(ModelIdBody):
    path: str
