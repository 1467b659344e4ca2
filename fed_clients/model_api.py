"""The inference service as the client sees it: model info, tokenisation, scoring.

Scoring honours the service's ``max_rows`` (largest P*B of one call) and a client-side cap on the
token ids one body may carry: when P x B is too large, B (and, if need be, P) is split into as few
calls as fit, and the logits are put back together as [P, B, C].

The lean link (default where the service offers it, ``ModelInfo.input_handles``): the ids of each
call's inputs are registered once (``POST /v1/inputs``, in the smallest integer dtype the
vocabulary allows) and every call scores against the handle (``POST /v1/score/handle``), so the
generations of a round send only their prompts. The handle is the content's hash, computed here
first: inputs already registered are not sent again. A 404 (the service evicted or expired them,
or restarted) registers them again and repeats the call once. Services without handles, and input
sets larger than the service's cache (413), get the stateless ``POST /v1/score``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from fed_clients.transport import FatalServiceError, JsonService, Traffic
from protos import (
    Array,
    ArrayError,
    HandlePart,
    HandleScoreRequest,
    InputsHandle,
    InputsRegistration,
    ModelInfo,
    ProjectionSpec,
    ScoreRequest,
    ScoreResponse,
    TaskSpec,
    TemplatePerturbation,
    TokenizeRequest,
    TokenizeResponse,
)
from protos.frames import PACKED_IDS, SCORE_FRAME, answered_as, decode_score_frame
from protos.inputs import PackedIds, flatten_inputs, ids_dtype, inputs_handle

log = logging.getLogger(__name__)

# One part of a multi-part score: (inputs' token ids, template perturbation or None).
Part = tuple[Sequence[Sequence[int]], TemplatePerturbation | None]

TOKENIZE_CHUNK = 2048
KNOWN_HANDLES = 256  # handles remembered as registered (a round's sets: train, perturbed, val, test)
DEFAULT_MAX_IDS_PER_CALL = 1_000_000  # ~7 MB of JSON: well under the service's 64 MiB body limit


def batch_slices(lengths: Sequence[int], max_items: int, max_ids: int) -> list[slice]:
    """Consecutive slices of the inputs, each at most ``max_items`` inputs and ``max_ids`` ids
    (a single longer input goes alone)."""
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    out: list[slice] = []
    start = 0
    ids = 0
    for i, n in enumerate(lengths):
        if i > start and (i - start >= max_items or ids + n > max_ids):
            out.append(slice(start, i))
            start, ids = i, 0
        ids += n
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


class ModelService:
    """Typed calls to the inference service over a retrying :class:`JsonService`."""

    def __init__(
        self,
        http: JsonService,
        max_ids_per_call: int = DEFAULT_MAX_IDS_PER_CALL,
        input_handles: bool = True,
        compact_answers: bool = True,
    ) -> None:
        self.http = http
        self.max_ids_per_call = max_ids_per_call
        self.input_handles = input_handles  # False: always the stateless /v1/score
        self.compact_answers = compact_answers  # False: the JSON forms (ids as lists, logits in base64)
        self._info: ModelInfo | None = None
        self._registered: OrderedDict[str, None] = OrderedDict()
        self._handles_refused = False

    def uses_handles(self) -> bool:
        return self.input_handles and not self._handles_refused and self.info().input_handles

    @property
    def traffic(self) -> Traffic:
        return self.http.traffic

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = self.http.get("/v1/model", ModelInfo)
        return self._info

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (input text only: no special tokens, no template)."""
        out: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = list(texts[start : start + TOKENIZE_CHUNK])
            ids = self._tokenize_call(chunk)
            if len(ids) != len(chunk):
                raise FatalServiceError(
                    self.http.name, f"tokenize returned {len(ids)} rows for {len(chunk)} texts"
                )
            out.extend(ids)
        return out

    def score(
        self,
        task: TaskSpec,
        input_ids: Sequence[Sequence[int]],
        z: np.ndarray | None = None,
        projection: ProjectionSpec | None = None,
        perturb_template: TemplatePerturbation | None = None,
    ) -> np.ndarray:
        """Label logits [P, B, C] of P prompts (rows of ``z``; none: zero-shot, P = 1) on B inputs.

        One call when P*B fits the service's ``max_rows``; otherwise the fewest calls that do. The
        service seeds ``perturb_template`` rows by (seed, index within the call), so a split call
        offsets the seed by its first input: inputs of different calls never share a draw, and the
        same split (same B, same P) reproduces the same perturbed copy in every generation.
        """
        if (z is None) != (projection is None):
            raise ValueError("z and projection go together")
        num_prompts = 1 if z is None else int(z.shape[0])
        max_rows = self.info().max_rows or 10**12
        p_groups = [slice(p, min(p + max_rows, num_prompts)) for p in range(0, num_prompts, max_rows)]
        lengths = [len(ids) for ids in input_ids]
        blocks: list[np.ndarray] = []
        for pg in p_groups:
            p_count = pg.stop - pg.start
            z_part = None if z is None else Array.from_numpy(np.asarray(z[pg], dtype=np.float32))
            row_blocks: list[np.ndarray] = []
            for bs in batch_slices(lengths, max(1, max_rows // p_count), self.max_ids_per_call):
                template = (
                    None
                    if perturb_template is None
                    else TemplatePerturbation(
                        rate=perturb_template.rate, seed=(perturb_template.seed + bs.start) % (2**63)
                    )
                )
                rows = [list(ids) for ids in input_ids[bs]]
                response = self._score_call(task, rows, z_part, projection, template)
                expected = (p_count, bs.stop - bs.start, len(task.labels))
                row_blocks.append(self._checked(response, expected))
            blocks.append(np.concatenate(row_blocks, axis=1))
        return np.concatenate(blocks, axis=0)

    def score_parts(
        self,
        task: TaskSpec,
        parts: Sequence[Part],
        z: np.ndarray | None = None,
        projection: ProjectionSpec | None = None,
    ) -> list[np.ndarray]:
        """Logits [P, B_i, C] of the same P prompts on each part (inputs, template perturbation).

        Where the service keeps inputs and every part fits one call, the parts go in ONE handle
        call (the prompts travel once: a FedBPT generation's clean and perturbed scoring); else
        each part is scored as :meth:`score` scores it. Same logits either way.
        """
        num_prompts = 1 if z is None else int(z.shape[0])
        max_rows = self.info().max_rows or 10**12
        fits = all(
            num_prompts * len(ids) <= max_rows and sum(map(len, ids)) <= self.max_ids_per_call
            for ids, _ in parts
        )
        if len(parts) > 1 and fits and self.uses_handles():
            z_part = None if z is None else Array.from_numpy(np.asarray(z, dtype=np.float32))
            rows = [([list(x) for x in ids], template) for ids, template in parts]
            answer = self._handle_call(task, rows, z_part, projection)
            if answer is not None:
                widths = [len(ids) for ids, _ in parts]
                logits = self._checked(answer, (num_prompts, sum(widths), len(task.labels)))
                return np.split(logits, np.cumsum(widths)[:-1], axis=1)
        return [self.score(task, ids, z, projection, template) for ids, template in parts]

    def _tokenize_call(self, texts: list[str]) -> list[list[int]]:
        """One tokenize call; the ids packed (protos/frames.py: the smallest integer dtype, not
        JSON lists) where this client asks and the service answers so, else as JSON lists."""
        request = TokenizeRequest(texts=texts)
        if not self.compact_answers:
            return self.http.post("/v1/tokenize", request, TokenizeResponse).input_ids
        response = self.http.post_raw("/v1/tokenize", request, accept=f"{PACKED_IDS}, application/json;q=0.5")
        if answered_as(response.headers.get("content-type")) == PACKED_IDS:
            return self.http.parse(response, PackedIds).input_ids()
        return self.http.parse(response, TokenizeResponse).input_ids

    def _post_score(self, path: str, body: BaseModel) -> ScoreResponse:
        """One score call; the answer in the binary frame where this client asks for it and the
        service sends it (protos/frames.py: the same logits, a quarter fewer bytes), else JSON."""
        if not self.compact_answers:
            return self.http.post(path, body, ScoreResponse)
        response = self.http.post_raw(path, body, accept=f"{SCORE_FRAME}, application/json;q=0.5")
        if answered_as(response.headers.get("content-type")) != SCORE_FRAME:
            return self.http.parse(response, ScoreResponse)  # a service that answers JSON only
        try:
            return decode_score_frame(response.content)
        except ArrayError as exc:
            raise FatalServiceError(
                self.http.name, f"POST {path} answered a bad score frame: {exc}"
            ) from None

    def _checked(self, answer: ScoreResponse, expected: tuple[int, int, int]) -> np.ndarray:
        logits = answer.logits.numpy()
        if tuple(logits.shape) != expected:
            raise FatalServiceError(
                self.http.name, f"score returned logits of shape {logits.shape}, expected {expected}"
            )
        self.http.traffic.rows += answer.rows
        return np.asarray(logits, dtype=np.float64)

    def _score_call(
        self,
        task: TaskSpec,
        rows: list[list[int]],
        z: Array | None,
        projection: ProjectionSpec | None,
        template: TemplatePerturbation | None,
    ) -> ScoreResponse:
        """One score call: against the handle of ``rows`` where the service keeps inputs, else
        stateless."""
        if self.uses_handles():
            answer = self._handle_call(task, [(rows, template)], z, projection)
            if answer is not None:
                return answer
        request = ScoreRequest(
            projection=projection, z=z, task=task, input_ids=rows, perturb_template=template
        )
        return self._post_score("/v1/score", request)

    def _handle_call(
        self,
        task: TaskSpec,
        parts: list[tuple[list[list[int]], TemplatePerturbation | None]],
        z: Array | None,
        projection: ProjectionSpec | None,
    ) -> ScoreResponse | None:
        """One ``/v1/score/handle`` call over ``parts``, registering the inputs this client has not
        registered yet. A 404 (evicted, expired, restarted) registers them again and repeats the
        call once. None where the service will not keep these inputs: score them stateless."""
        for attempt in (0, 1):
            found = [self._handle_for(rows) for rows, _ in parts]
            handles = [h for h in found if h is not None]
            if len(handles) < len(parts):
                return None
            body = HandleScoreRequest(
                projection=projection,
                z=z,
                task=task,
                parts=[
                    HandlePart(handle=h, perturb_template=t) for h, (_, t) in zip(handles, parts, strict=True)
                ],
            )
            try:
                return self._post_score("/v1/score/handle", body)
            except FatalServiceError as exc:
                if exc.status != 404 or attempt == 1:
                    raise
                log.info("input handles unknown to the service (evicted or expired); registering again")
                for h in handles:
                    self._registered.pop(h, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _handle_for(self, rows: list[list[int]]) -> str | None:
        """The handle of ``rows``, registering them unless this client already did; None where
        the service refuses (no handles after all: stateless from now on; too large: this call)."""
        ids, lengths = flatten_inputs(rows)
        handle = inputs_handle(ids, lengths)
        if handle in self._registered:
            self._registered.move_to_end(handle)
            return handle
        registration = InputsRegistration(
            ids=Array.from_numpy(ids, ids_dtype(self.info().vocab_size)),  # type: ignore[arg-type]
            lengths=Array.from_numpy(lengths, "int32"),
        )
        try:
            answer = self.http.post("/v1/inputs", registration, InputsHandle)
        except FatalServiceError as exc:
            if exc.status in (404, 405):
                log.info("the model service keeps no inputs (%s); scoring stateless", exc.status)
                self._handles_refused = True
                return None
            if exc.status == 413:
                log.info("inputs too large for the service's input cache; this call goes stateless")
                return None
            raise
        finally:
            self.http.traffic.registrations += 1
        if answer.handle != handle:
            raise FatalServiceError(
                self.http.name, f"registered inputs answered handle {answer.handle}, expected {handle}"
            )
        self._registered[handle] = None
        while len(self._registered) > KNOWN_HANDLES:
            self._registered.popitem(last=False)
        return handle
