"""OpenAI-compatible ``POST /v1/embeddings``, and the submission logic other embedding routes share.

In: ``input`` (a string, a list of strings, a list of token ids or a list of such lists),
``model``, ``encoding_format`` (``float`` | ``base64``: little-endian float32 bytes, as the
official client decodes them), ``dimensions`` (Matryoshka truncation), ``user`` (accepted,
unused), and as an extension ``normalize`` (default true). Out:
``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
"usage": {"prompt_tokens", "total_tokens"}}``.

Each input is one engine embedding request (:class:`~rocmforge.pooling_params.PoolingParams`),
all submitted at once so they batch (with each other and with generation requests); one HTTP
request may start at most ``max_choices_per_request`` of them. Text is tokenized as a raw
prompt is (the tokenizer's BOS added where it adds one). Every input is checked before any is
submitted: an empty one, an id outside the vocabulary, one longer than the context are 400
naming ``input`` (too long: ``context_length_exceeded``). A server whose engine has no pooling
(a generation model started without ``--pooling``) answers 400 ``embeddings_unsupported``. A
client that goes away cancels its requests.

:func:`embed_inputs` is that logic without the HTTP shapes (the state and the inputs in, the
vectors and the token count out), for every route that embeds.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from rocmforge.engine.llm_engine import check_token_ids
from rocmforge.engine.request_stream import RequestStream
from rocmforge.errors import EmbeddingsUnsupportedError, InvalidRequestError, ModelNotFoundError
from rocmforge.pooling_params import PoolingParams
from rocmforge.server.errors import request_id_of
from rocmforge.server.prompts import encode_text
from rocmforge.server.protocol import Text, TokenIds
from rocmforge.server.state import ServerState
from rocmforge.server.streams import embeddings_or_disconnect, submit

router = APIRouter(prefix="/v1")

EmbeddingInput = str | list[int]
"""One input: text, or its token ids."""


class EmbeddingRequest(BaseModel):
    """The body (unknown fields refused, strict types: the rules of :mod:`rocmforge.server.protocol`)."""

    model_config = ConfigDict(extra="forbid")

    input: (Text | Annotated[list[Text], Field(min_length=1)] | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1)])
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    """Keep the first N dimensions (1 <= N <= the model's hidden size), then normalise."""
    user: Text | None = None
    normalize: StrictBool = True
    """Extension: false returns the pooled vector as it is (no unit L2 norm)."""

    def inputs(self) -> list[EmbeddingInput]:
        """``input`` as a list of inputs (one list of ids is one input)."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[item for item in value if isinstance(item, int)]]
        return [item for item in value if not isinstance(item, int)]


@dataclass(frozen=True, slots=True)
class Embeddings:
    """What :func:`embed_inputs` returns: one vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int
    """Tokens of all inputs together (each is pooled whole)."""


async def embed_inputs(state: ServerState, request: Request, inputs: Sequence[EmbeddingInput],
                       params: PoolingParams, request_id: str) -> Embeddings | None:
    """Embed ``inputs`` (texts or token id lists) as engine requests submitted together; None
    if the client (``request``) went away first (its requests are cancelled then). Raises
    the 400s of the module docstring, naming ``input`` (or ``dimensions``), before any
    request is submitted."""
    engine = state.engine
    if engine.pooling is None and params.pooling is None:
        raise EmbeddingsUnsupportedError(
            f"model {state.model_name!r} cannot embed: {engine.no_pooling_reason}; start the server with "
            "--pooling mean|cls|last (ROCMFORGE_POOLING) to embed with it")
    if params.dimensions is not None and params.dimensions > engine.hidden_size:
        raise InvalidRequestError(f"dimensions must be in [1, {engine.hidden_size}] (the model's hidden size), "
                                  f"got {params.dimensions}", param="dimensions")
    cap = state.config.max_choices_per_request
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > cap:
        raise InvalidRequestError(f"{len(inputs)} inputs would start {len(inputs)} embedding requests; at most "
                                  f"{cap} per request (max_choices_per_request)", param="input")
    prompts = [await _input_ids(state, item, _where(i, len(inputs))) for i, item in enumerate(inputs)]
    streams = await _submit_all(state, prompts, params, request_id)
    results = await embeddings_or_disconnect(request, streams)
    if results is None:
        return None
    return Embeddings([r.embedding for r in results], sum(r.num_prompt_tokens for r in results))


async def _input_ids(state: ServerState, item: EmbeddingInput, where: str) -> list[int]:
    """One input's token ids, checked: not empty, in the vocabulary (the length is checked
    with the rest of the request by the engine, at submission)."""
    if isinstance(item, str):
        if not item:
            raise InvalidRequestError(f"{where} must not be empty", param="input")
        ids = await encode_text(state, item, add_special=True, param="input")
        if not ids:
            raise InvalidRequestError(f"{where} has no tokens", param="input")
        return ids
    try:
        return check_token_ids(item, state.engine.vocab_size, where)
    except InvalidRequestError as exc:  # it names the input's place, the field is "input"
        raise InvalidRequestError(exc.message, param="input") from None


def _where(index: int, count: int) -> str:
    return "input" if count == 1 else f"input[{index}]"


async def _submit_all(state: ServerState, prompts: list[list[int]], params: PoolingParams,
                      request_id: str) -> list[RequestStream]:
    """Submit every input at once (admitted in the same engine round); if any is refused, the
    others are cancelled and the first refusal is raised, naming ``input``."""
    results = await asyncio.gather(
        *(submit(state, ids, params, f"{request_id}-{i}" if len(prompts) > 1 else request_id)
          for i, ids in enumerate(prompts)),
        return_exceptions=True,
    )
    streams = [r for r in results if isinstance(r, RequestStream)]
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if not failures:
        return streams
    for stream in streams:
        await stream.aclose()
    index, error = failures[0]
    if isinstance(error, InvalidRequestError) and error.param == "prompt":  # the engine's name for it
        raise type(error)(f"{_where(index, len(prompts))}: {error.message}", param="input") from None
    raise error


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@router.post("/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse | dict[str, Any]:
    state: ServerState = request.app.state.rocmforge
    if body.model is not None and body.model != state.model_name:
        raise ModelNotFoundError(f"model {body.model!r} is not served here (this server serves {state.model_name!r})")
    if body.dimensions is not None and body.dimensions < 1:
        raise InvalidRequestError(f"dimensions must be in [1, {state.engine.hidden_size}] (the model's hidden "
                                  f"size), got {body.dimensions}", param="dimensions")
    params = PoolingParams(dimensions=body.dimensions, normalize=body.normalize)
    result = await embed_inputs(state, request, body.inputs(), params, request_id_of(request) or uuid.uuid4().hex)
    if result is None:  # the client went away; its requests were cancelled
        return JSONResponse({}, status_code=499)
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
