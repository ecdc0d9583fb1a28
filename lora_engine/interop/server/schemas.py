"""The JSON request bodies the server accepts, as pydantic models (bounds checked here, so a bad
value is a 422 naming the field, never an exception deeper in). Unknown fields are ignored:
the SDK adds informational ones from version to version."""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SAMPLES = 128  # sequences per sample request
MAX_TOPK = 64


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def _finite(v):
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class CreateSession(Body):
    project_id: str | None = Field(default=None, max_length=200)


class SessionRef(Body):
    session_id: str = Field(max_length=200)


class LoraConfigIn(Body):
    rank: int = Field(ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(Body):
    session_id: str = Field(max_length=200)
    model_seq_id: int = Field(ge=0, le=10**9)
    base_model: str = Field(max_length=4096)
    lora_config: LoraConfigIn


class ModelRef(Body):
    model_id: str = Field(max_length=300)


class AdamIn(Body):
    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)

    @field_validator("*")
    @classmethod
    def _finite_numbers(cls, v):
        return _finite(v)


class OptimStep(ModelRef):
    seq_id: int
    adam_params: AdamIn | None = None
    optimizer_params: dict | None = None


class SaveWeights(ModelRef):
    seq_id: int
    path: str = Field(max_length=200)
    overwrite: bool = False


class SaveForSampler(ModelRef):
    seq_id: int
    path: str | None = Field(default=None, max_length=200)
    sampling_session_seq_id: int | None = Field(default=None, ge=0, le=10**12)


class LoadWeights(Body):
    path: str = Field(max_length=600)
    optimizer: bool = False
    model_id: str | None = Field(default=None, max_length=300)   # TrainingClient.load_state*
    seq_id: int | None = None
    session_id: str | None = Field(default=None, max_length=200)  # ServiceClient.create_training_client_from_state*
    model_seq_id: int | None = Field(default=None, ge=0, le=10**9)
    base_model: str | None = Field(default=None, max_length=4096)


class CreateSampling(Body):
    session_id: str = Field(max_length=200)
    sampling_session_seq_id: int = Field(ge=0, le=10**12)
    model_path: str | None = Field(default=None, max_length=600)
    base_model: str | None = Field(default=None, max_length=4096)


class SamplingParamsIn(Body):
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite_numbers(cls, v):
        return _finite(v)

    @field_validator("stop")
    @classmethod
    def _short(cls, v):
        if isinstance(v, list) and len(v) > 64:
            raise ValueError("at most 64 stop tokens or strings")
        if isinstance(v, list) and any(isinstance(s, str) and not 0 < len(s) <= 256 for s in v):
            raise ValueError("stop strings must be 1..256 characters")
        return v


class Asample(Body):
    sampling_session_id: str | None = Field(default=None, max_length=300)
    seq_id: int | None = None
    num_samples: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    prompt: dict
    sampling_params: SamplingParamsIn
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=MAX_TOPK)
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict | None = None
    prompt_logprobs_last_n: int | None = None


class RetrieveFuture(Body):
    request_id: str = Field(max_length=200)
