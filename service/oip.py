"""Open Inference Protocol v2 (KServe / Triton HTTP) routes, so their unmodified clients work.

Input: one BYTES tensor `text` (shape [n] or [n, 1]), as JSON data or with Triton's binary tensor
extension (the default of tritonclient). Request `parameters`: `preference` (a JSON string, or an
object/list where the client allows it), optional `tasks` (comma-separated), `quality_kept` (boolean),
`truncate` (boolean: cut texts over the length limit instead of refusing them, as /v1's field) and Triton's
`timeout` (microseconds; it can shorten the request's deadline, never extend it). Outputs per task:
`<task>_probabilities` FP32 [n, K_t] and `<task>_label` BYTES [n]. Response `parameters` echo the
preference and, when asked, carry `quality_kept`, JSON text {task: value in [0, 1]} as in /v1/predict
(OIP parameters are scalars). Responses are always JSON.
The model has one version, "1"; every model route also answers under `/versions/1`, and other
versions are 404. `/config` is a Triton-style model configuration (perf_analyzer reads it).
"""

from __future__ import annotations

import json
import math
import struct
import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reprmerge_core import __version__
from reprmerge_core.preference import Preference
from service.deps import disconnected, get_service, problems, set_timings
from service.errors import InvalidInput, MalformedRequest, NotFound, field_of, printable
from service.runtime import TIMEOUT_HEADER, Service
from service.schemas import QUALITY_KEPT, Text, unicode_text

INPUT = "text"
VERSION = "1"
BINARY_HEADER = "inference-header-content-length"


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class OutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='`preference`: JSON text such as "{\\"sst2\\": 1}" (or an object); `tasks`: "a,b"; '
        "`quality_kept`: true for the trade-off per task; `truncate`: true cuts texts over the service's length "
        "limit (`max_text_chars`, /v1/info) to that limit instead of refusing them with 413")
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputRequest] | None = None


class TensorOut(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(description="`bundle_id`, `preference_fingerprint`, `preference` (JSON text) and "
                                       "`quality_kept` (JSON text, when the request sets the boolean parameter `quality_kept`; per task "
                                       "answered: " + QUALITY_KEPT + ")")
    outputs: list[TensorOut]


router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])


def _check_model(name: str, service: Service, version: str | None = None) -> None:
    if name != service.settings.model_name:
        raise NotFound(f"unknown model {printable(name, 100)!r}; this server serves {service.settings.model_name!r}")
    if version is not None and version != VERSION:
        raise NotFound(f"unknown version {printable(version, 100)!r} of model {name!r}; it has version {VERSION!r}")


@router.get("", summary="server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "reprmerge", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="server is alive")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="server is ready", responses=problems(503))
async def ready(service: Service = Depends(get_service)) -> dict[str, bool]:
    service.require_ready()
    return {"ready": True}


@router.get("/models/{name}", summary="model metadata", responses=problems(404))
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(
    name: str, version: str | None = None, service: Service = Depends(get_service),
) -> dict[str, Any]:
    _check_model(name, service, version)
    engine = service.engine
    outputs = [{"name": out, "datatype": kind, "shape": shape} for out, kind, shape in _outputs(service)]
    return {"name": name, "versions": [VERSION], "platform": "reprmerge", "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs, "parameters": {"bundle_id": engine.bundle_id, "tasks": ",".join(engine.tasks)}}


def _outputs(service: Service) -> list[tuple[str, str, list[int]]]:
    """(name, OIP datatype, shape) of every output tensor: per task, probabilities and label."""
    specs = []
    for task in service.engine.tasks:
        specs.append((f"{task}_probabilities", "FP32", [-1, len(service.engine.labels[task])]))
        specs.append((f"{task}_label", "BYTES", [-1]))
    return specs


@router.get("/models/{name}/ready", summary="model is ready", responses=problems(404, 503))
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: str, version: str | None = None, service: Service = Depends(get_service)) -> dict[str, Any]:
    _check_model(name, service, version)
    service.require_ready()
    return {"name": name, "ready": True}


@router.get("/models/{name}/config", summary="Triton-style model configuration", responses=problems(404))
@router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
async def model_config(
    name: str, version: str | None = None, service: Service = Depends(get_service),
) -> dict[str, Any]:
    """What perf_analyzer and model_analyzer read: no implicit batch dimension (max_batch_size 0), full shapes."""
    _check_model(name, service, version)
    engine, s = service.engine, service.settings
    triton_type = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}
    outputs = [{"name": out, "data_type": triton_type[kind], "dims": shape} for out, kind, shape in _outputs(service)]
    return {
        "name": name, "platform": "reprmerge", "backend": "reprmerge", "max_batch_size": 0,
        "version_policy": {"specific": {"versions": [VERSION]}},
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "dims": [-1]}], "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": round(s.max_batch_wait * 1e6)},
        "parameters": {"bundle_id": {"string_value": engine.bundle_id},
                       "tasks": {"string_value": ",".join(engine.tasks)},
                       "max_inputs": {"string_value": str(s.max_inputs)}},
    }


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined, to document a body that FastAPI does not parse."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            return resolve(defs[ref.rsplit("/", 1)[-1]]) if ref else {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


# The body is parsed by hand (the binary tensor extension is not JSON), so it is only documented.
_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(InferRequest)}}}}


@router.post("/models/{name}/infer", response_model=InferResponse, summary="classify texts under a preference",
             responses=problems(400, 401, 404, 413, 415, 422, 429, 503, 504), openapi_extra=_INFER_BODY,
             response_model_exclude_none=True)
@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, include_in_schema=False,
             response_model_exclude_none=True)
async def infer(
    name: str, request: Request, response: Response, version: str | None = None,
    timeout: str | None = Header(None, alias=TIMEOUT_HEADER),
    service: Service = Depends(get_service),
) -> InferResponse:
    _check_model(name, service, version)
    deadline = service.deadline(timeout)
    req, blob = _split(await request.body(), request.headers.get(BINARY_HEADER))
    params = req.parameters or {}
    deadline = min(deadline, _triton_deadline(params.get("timeout")))
    texts, field = _texts(req, blob)
    texts = service.check_texts(texts, field=field, truncate=_flag(params.get("truncate"), "truncate"),
                                truncate_field="parameters.truncate")
    pref = _preference(params.get("preference"), service)
    tasks = service.tasks(_task_list(params.get("tasks")), field="parameters.tasks")
    wanted = _wanted_outputs(req, tasks)
    kept = (await service.quality_kept([pref], deadline))[0] if _flag(params.get("quality_kept"), "quality_kept") else None
    result = await service.infer(texts, [pref], deadline, partial(disconnected, request), field="inputs[0].data")
    set_timings(request, response, result)
    probs = result.probabilities[0]
    outputs = []
    for task in tasks:
        p = probs[:, service.engine.slices[task]]
        labels = service.engine.labels[task]
        outputs.append(TensorOut(name=f"{task}_probabilities", shape=list(p.shape), datatype="FP32", data=p.flatten().tolist()))
        outputs.append(TensorOut(name=f"{task}_label", shape=[len(texts)], datatype="BYTES",
                                 data=[labels[i] for i in p.argmax(dim=1).tolist()]))
    parameters = {"bundle_id": service.engine.bundle_id, "preference_fingerprint": pref.fingerprint,
                  "preference": json.dumps(pref.as_dict())}
    if kept is not None:
        parameters["quality_kept"] = json.dumps({t: kept[service.engine.tasks.index(t)] for t in tasks})
    return InferResponse(
        model_name=name, model_version=VERSION, id=req.id, outputs=[o for o in outputs if wanted is None or o.name in wanted],
        parameters=parameters,
    )


def _triton_deadline(timeout_us: Any) -> float:
    """Triton's `timeout` request parameter (microseconds) as a monotonic deadline; inf when absent."""
    if timeout_us is None:
        return math.inf
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or not 0 < timeout_us < math.inf:
        raise InvalidInput(f"must be a positive number of microseconds, got {printable(repr(timeout_us), 50)}",
                           field="parameters.timeout")
    return time.monotonic() + min(timeout_us, 1e15) / 1e6  # clamped: an integer past float's range cannot divide


def _split(raw: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part of the request and the binary tail (Triton binary tensor extension)."""
    cut = len(raw)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise MalformedRequest(f"{BINARY_HEADER} must be the JSON header's length in bytes, got {header_length!r}")
        cut = int(header_length)
    try:
        payload = json.loads(raw[:cut])
    except RecursionError as exc:
        raise MalformedRequest("body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSON syntax, UTF-8, and integers past Python's 4,300-digit limit
        raise MalformedRequest(f"body is not valid JSON: {printable(str(exc), 200)}") from exc
    try:
        return InferRequest.model_validate(payload), raw[cut:]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidInput(err["msg"], field=field_of(tuple(err["loc"]))) from exc


def _texts(req: InferRequest, blob: bytes) -> tuple[list[str], str]:
    """The `text` input as strings, from JSON data or from its slice of the binary tail, and its field name."""
    offset = 0
    for i, tensor in enumerate(req.inputs):
        field = f"inputs[{i}]"
        size = _binary_size(tensor, f"{field}.parameters.binary_data_size")
        if offset + size > len(blob):
            raise MalformedRequest(f"binary_data_size {size} runs past the end of the {len(blob)} bytes of binary data",
                                   field=f"{field}.parameters.binary_data_size")
        if tensor.name != INPUT:
            offset += size
            continue
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {INPUT!r} must have datatype BYTES, got {tensor.datatype!r}", field=f"{field}.datatype")
        texts = _decode_bytes(blob[offset:offset + size], field) if size else _flat_strings(tensor.data, field)
        if not texts:
            raise InvalidInput("no texts given", field=f"{field}.data")
        count = 1
        for dim in tensor.shape:
            count *= dim
        if count != len(texts) or len(tensor.shape) not in (1, 2) or tensor.shape[-1] != (len(texts) if len(tensor.shape) == 1 else 1):
            raise InvalidInput(f"shape {tensor.shape} does not match {len(texts)} texts (use [n] or [n, 1])", field=f"{field}.shape")
        return texts, f"{field}.data"
    raise InvalidInput(f"an input named {INPUT!r} is required", field="inputs")


def _binary_size(tensor: TensorIn, field: str) -> int:
    """The tensor's `binary_data_size` parameter: absent (0, the data is JSON) or a byte count."""
    size = (tensor.parameters or {}).get("binary_data_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"must be a non-negative integer number of bytes, got {printable(repr(size), 50)}", field=field)
    return size


def _flat_strings(data: list[Any] | None, field: str) -> list[str]:
    flat: list[Any] = []
    for item in data or []:
        flat.extend(item if isinstance(item, list) else [item])
    for j, text in enumerate(flat):
        if not isinstance(text, str):
            raise InvalidInput("every element must be a string", field=f"{field}.data[{j}]")
        try:
            unicode_text(text)
        except ValueError as exc:
            raise InvalidInput(str(exc), field=f"{field}.data[{j}]") from None
    return flat


def _decode_bytes(chunk: bytes, field: str) -> list[str]:
    """BYTES elements in the binary extension: 4-byte little-endian length, then the bytes."""
    texts, pos = [], 0
    try:
        while pos < len(chunk):
            (length,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + length > len(chunk):
                raise ValueError("element runs past the end of the data")
            texts.append(chunk[pos:pos + length].decode("utf-8"))
            pos += length
    except (struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInput(f"binary BYTES data is malformed: {exc}", field=f"{field}.data") from exc
    return texts


def _preference(value: Any, service: Service) -> Preference:
    field = "parameters.preference"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"must be JSON text of a mapping or list: {exc}", field=field) from exc
        except ValueError as exc:  # an integer past Python's 4,300-digit limit
            raise InvalidInput(f"must be JSON text of a mapping or list: {exc}", field=field) from None
    return service.preference(value, field)


def _flag(value: Any, name: str) -> bool:
    """A boolean request parameter (absent: false)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidInput("must be true or false", field=f"parameters.{name}")


def _task_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()] or None
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise InvalidInput("must be a comma-separated string of task names", field="parameters.tasks")


def _wanted_outputs(req: InferRequest, tasks: list[str]) -> set[str] | None:
    if req.outputs is None:
        return None
    known = {f"{t}_{kind}" for t in tasks for kind in ("probabilities", "label")}
    for i, out in enumerate(req.outputs):
        if out.name not in known:
            raise InvalidInput(f"unknown output {out.name!r}; known: {', '.join(sorted(known))}", field=f"outputs[{i}].name")
    return {o.name for o in req.outputs}
