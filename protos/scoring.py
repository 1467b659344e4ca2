"""Wire schemas of the inference service: model info, tokenisation and soft-prompt scoring."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.arrays import Array

Head = Literal["mlm", "causal", "embedding"]

INPUT_SLOT = "{input}"
MASK_SLOT = "{mask}"
MAX_LABELS = 128
MAX_TEXTS = 65_536
# p0's default text: of the task-neutral candidates, the one whose state-0 accuracy beat zero-shot by
# the most in the worst task (benchmarks/prompt_init.py on train samples; docs/results.md).
DEFAULT_INIT_TEXT = "In a few words:"


class Strict(BaseModel):
    """Base of every wire schema: unknown fields are an error, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelInfo(Strict):
    """``GET /v1/model``: what a client may know about the model. No weights, no embeddings."""

    model_id: str
    head: Head
    hidden_size: int
    vocab_size: int
    max_length: int
    mask_token_id: int | None
    special_token_ids: list[int]
    backend: str = "transformers"
    dtype: str = "float32"
    max_rows: int = Field(default=0, description="largest P*B one /v1/score call may ask for")
    input_handles: bool = Field(
        default=False,
        description="the service keeps registered inputs: POST /v1/inputs, POST /v1/score/handle",
    )


class TokenizeRequest(Strict):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)


class TokenizeResponse(Strict):
    """Token ids of the input text only: no special tokens, no template."""

    input_ids: list[list[int]]


class ProjectionSpec(Strict):
    """Everything that determines the random projection A (intrinsic_dim x prompt_length*hidden).

    The service derives A from this on a seeded CPU generator, so the same spec gives the same A on
    every replica and machine. Entries ~ N(0, s^2) with s = alpha * std(word embeddings) /
    (sqrt(intrinsic_dim) * sigma0) (BBT's scaling); ``uniform`` draws U(-s*sqrt(3), s*sqrt(3)).
    ``init`` / ``init_text`` fix p0, the prompt at z = 0 (the tokens of a text, or BBT's
    placeholders); they do not change A. Same spec -> same A and same p0 on every replica. (Not a
    nullable field: JSON writers that drop nulls would silently turn "placeholder" into the default.)
    """

    seed: int = Field(default=1234, ge=0, le=2**63 - 1)
    intrinsic_dim: int = Field(default=500, ge=1, le=100_000)
    prompt_length: int = Field(default=50, ge=1, le=1024)
    sigma0: float = Field(default=1.0, gt=0)
    alpha: float = Field(default=1.0, gt=0)
    distribution: Literal["normal", "uniform"] = "normal"
    init: Literal["text", "placeholder"] = Field(
        default="text",
        description="where the prompt starts (p0): text = the embeddings of init_text's tokens, repeated "
        "or cut to prompt_length; placeholder = BBT's placeholder ids 1000.. (the reference)",
    )
    init_text: str = Field(default=DEFAULT_INIT_TEXT, min_length=1, max_length=1000)

    @property
    def p0_text(self) -> str | None:
        """The text whose tokens fill the prompt slot, or None for BBT's placeholder ids."""
        return self.init_text if self.init == "text" else None


class TaskSpec(Strict):
    """How an input becomes a model sequence and which outputs are the label logits.

    ``template`` holds ``{input}`` once; for the ``mlm`` head it holds ``{mask}`` (the scored
    position); for ``causal`` an optional ``{mask}`` marks the answer position and must end the
    template (absent: the end). ``labels`` are label words (mlm/causal: each word's first token)
    or, for the ``embedding`` head, anchor sentences. The soft prompt always sits right after the
    first special token ([CLS], <s>, BOS).
    """

    template: str = Field(min_length=1, max_length=4096)
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)

    @model_validator(mode="after")
    def _check_template(self) -> TaskSpec:
        if self.template.count(INPUT_SLOT) != 1:
            raise ValueError(f"template must contain {INPUT_SLOT} exactly once: {self.template!r}")
        if self.template.count(MASK_SLOT) > 1:
            raise ValueError(f"template may contain {MASK_SLOT} at most once: {self.template!r}")
        if any(not label.strip() for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct: {self.labels}")
        return self


class TemplatePerturbation(Strict):
    """Ask the service to also perturb the positions the client cannot see (the reference's
    "perturb every position"): special tokens, prompt placeholders, template words and the mask are
    each replaced by a uniform random vocabulary id with probability ``rate``. The positions of the
    input text are left alone (the client perturbs those itself). Seeded per row: row b uses
    ``seed`` and b, so every candidate of a round sees the same perturbed copy."""

    rate: float = Field(ge=0, le=1)
    seed: int = Field(ge=0, le=2**63 - 1)


class ScoreRequest(Strict):
    """``POST /v1/score``: P candidate prompts x B inputs -> label logits [P, B, C].

    The prompt comes as ``projection`` + ``z`` [P, d] (the service computes A.z), as dense
    ``prompt_embeds`` [P, L, hidden], or not at all (zero-shot: P = 1, no soft prompt rows).
    Inputs come as ``input_ids`` (from /v1/tokenize, possibly perturbed) or raw ``texts``.
    """

    projection: ProjectionSpec | None = None
    z: Array | None = None
    prompt_embeds: Array | None = None
    task: TaskSpec
    input_ids: list[list[int]] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    texts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    perturb_template: TemplatePerturbation | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> ScoreRequest:
        if (self.input_ids is None) == (self.texts is None):
            raise ValueError("give exactly one of input_ids or texts")
        if self.input_ids is not None and any(len(ids) == 0 for ids in self.input_ids):
            raise ValueError("input_ids holds an empty sequence")
        check_prompt(self.projection, self.z, self.prompt_embeds)
        return self

    @property
    def num_prompts(self) -> int:
        if self.z is not None:
            return self.z.shape[0]
        if self.prompt_embeds is not None:
            return self.prompt_embeds.shape[0]
        return 1

    @property
    def num_inputs(self) -> int:
        if self.input_ids is not None:
            return len(self.input_ids)
        return len(self.texts or [])


def check_prompt(projection: ProjectionSpec | None, z: Array | None, prompt_embeds: Array | None) -> None:
    """The prompt part of a score request: ``projection`` + ``z`` [P, d], ``prompt_embeds``
    [P, L, hidden], or neither. Raises ValueError saying what is wrong."""
    if z is not None and prompt_embeds is not None:
        raise ValueError("give z (with projection) or prompt_embeds, not both")
    if (z is None) != (projection is None):
        raise ValueError("z and projection go together: give both or neither")
    if z is not None and projection is not None:
        if z.dtype not in ("float32", "float64"):
            raise ValueError(f"z must be float32 or float64, not {z.dtype}")
        if len(z.shape) != 2 or z.shape[0] < 1:
            raise ValueError(f"z must have shape [P, d] with P >= 1; got {z.shape}")
        if z.shape[1] != projection.intrinsic_dim:
            raise ValueError(
                f"z has d={z.shape[1]} but projection.intrinsic_dim is {projection.intrinsic_dim}"
            )
    if prompt_embeds is not None:
        if prompt_embeds.dtype not in ("float32", "float16"):
            raise ValueError(f"prompt_embeds must be float32 or float16, not {prompt_embeds.dtype}")
        shape = prompt_embeds.shape
        if len(shape) != 3 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"prompt_embeds must have shape [P, L, hidden]; got {shape}")


class ScoreStats(Strict):
    """How the rows of one call went through the model (for benchmarks and dashboards)."""

    forward_passes: int
    real_tokens: int
    padded_tokens: int
    seconds: float


class ScoreResponse(Strict):
    logits: Array
    rows: int
    stats: ScoreStats | None = None
