"""The Open Inference Protocol (KServe V2, Triton's HTTP API): /v2 health, metadata, infer; JSON or binary tensors."""

import math
import re
import struct

import numpy as np
import orjson
from flask import Blueprint, Response, request

from app import errors
from app.auth import auth
from app.errors import ApiError
from app.health import models_answer
from app.openapi import PREDICT_STATUSES, json_answer, json_body, models_for, one_of_models, predict_answer
from app.pipeline import Prediction
from app.protocols import cache_headers, json_response, log_model, max_rows, parse_json, read_body, registry, run
from app.registry import Model, Registry, version_key
from app.validation import check_array, column_order, field_name, invalid

# The prefix also gives this protocol the routing failures under /v2 (an unknown path), so a V2 client gets V2's
# error shape for those too (errors._blueprint).
bp = Blueprint("v2", __name__, url_prefix="/v2")
# The protocol's one error shape, {"error": "<message>"}: what tritonclient and KServe's clients read (the request id
# travels in the X-Request-ID header).
errors.register_handlers(bp, lambda status, code, message, request_id: {"error": message})

PUBLIC = frozenset({"v2.live", "v2.ready"})
ERROR_SCHEMA = (
    "V2Error",
    {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what went wrong and how to fix the request"}},
    },
)

# The version of Sibyl's API (the one /openapi.json's info.version gives), never a library's.
_SERVER = {"name": "sibyl", "version": "1", "extensions": ["binary_tensor_data"]}
# Binary tensors are little-endian, row-major, unpadded; BOOL is one byte, 0 or 1.
_DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The JSON values each kind of datatype takes: a float is no INT64, and true is no number.
_JSON_TYPES = {"b": frozenset({bool}), "i": frozenset({int}), "u": frozenset({int}), "f": frozenset({int, float})}
_TYPE_NAMES = {str: "a string", bool: "a boolean", type(None): "null", list: "a list", dict: "an object"}
_OUTPUTS = ("predict", "predict_proba")
# When a request names no outputs, only the labels: probabilities cost a second call and are asked for by name.
_DEFAULT_OUTPUTS = ("predict",)
# model_name and model_version appear in Triton's own examples of request bodies; the URL decides both.
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_HEADER = "Inference-Header-Content-Length"
_EXAMPLE = '{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [[...]]}]}'
_DIGITS = re.compile(r"[0-9]{1,15}")


@bp.get("")
@auth.login_required
def server_metadata() -> Response:
    """Server metadata: name, API version and the protocol extensions served."""
    return json_response(_SERVER)


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the process answers."""
    return json_response({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness: every model this worker loaded answers a sample row."""
    if not models_answer():
        raise ApiError(503, "unavailable", "A model did not answer a sample row; the server log says why.")
    return json_response({"ready": True})


@bp.get("/models/<name>")
@auth.login_required
def model_metadata(name: str) -> Response:
    """A model's default version: its versions, inputs and outputs (names, datatypes, shapes; -1 is the batch)."""
    served = registry()
    entry = served.entry(name)
    model = served.resolve(name, entry.default)
    return json_response(_metadata(model, sorted(entry.versions, key=version_key)))


@bp.get("/models/<name>/versions/<version>")
@auth.login_required
def version_metadata(name: str, version: str) -> Response:
    """One version of a model (named or by alias): its inputs and outputs."""
    model = registry().resolve(name, version)
    return json_response(_metadata(model, [model.version]))


@bp.get("/models/<name>/ready")
@auth.login_required
def model_ready(name: str) -> Response:
    """Whether this worker loaded the model's default version and it answers a sample row."""
    served = registry()
    return _ready(served.resolve(name, served.entry(name).default))


@bp.get("/models/<name>/versions/<version>/ready")
@auth.login_required
def version_ready(name: str, version: str) -> Response:
    """Whether this worker loaded that version and it answers a sample row."""
    return _ready(registry().resolve(name, version))


@bp.post("/models/<name>/infer")
@auth.login_required
def infer(name: str) -> Response:
    """Predict with a model's default version (or a version drawn by its traffic split)."""
    return _infer(registry().resolve(name))


@bp.post("/models/<name>/versions/<version>/infer")
@auth.login_required
def infer_version(name: str, version: str) -> Response:
    """Predict with one version of a model, named or by alias."""
    return _infer(registry().resolve(name, version))


def _ready(model: Model) -> Response:
    """200 when the model answers a sample row, else a 503 (tritonclient's is_model_ready reads either)."""
    if not models_answer([model]):
        raise ApiError(503, "unavailable", "The model did not answer a sample row; the server log says why.")
    return json_response({"name": model.name, "ready": True})


def _metadata(model: Model, versions: list[str]) -> dict:
    """Model metadata: one FP64 input of shape [-1, n_features]; the outputs, each saying if it is a default."""
    outputs = [{"name": "predict", "datatype": _label_type(model), "shape": [-1]}]
    if model.has_proba:
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(model.classes)]})
    for output in outputs:
        output["parameters"] = {"default": output["name"] in _DEFAULT_OUTPUTS}
    return {
        "name": model.name,
        "versions": versions,
        "platform": "scikit-learn",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, model.n_features]}],
        "outputs": outputs,
    }


def _infer(model: Model) -> Response:
    """Decode the request (JSON, or a JSON header and binary tensors), predict, answer in the form asked."""
    log_model(model)
    data = read_body()
    length = _header_length(len(data))
    body = parse_json(data if length is None else data[:length], _EXAMPLE)
    binary = None if length is None else memoryview(data)[length:]
    if unknown := sorted(set(body) - _REQUEST_KEYS):
        raise invalid(f"unknown field {field_name(unknown[0])}; a request takes id, parameters, inputs and outputs")
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        raise invalid("'id' must be a string")
    for key in ("model_name", "model_version"):  # the URL decides both; a sent value must still be a string
        if key in body and type(body[key]) is not str:
            raise invalid(f"{key!r} must be a string")
    parameters = _parameters(body.get("parameters"), "parameters")
    if "sequence_id" in parameters:
        raise invalid("this server serves no sequence models; drop the sequence parameters")
    binary_output = _flag(parameters, "binary_data_output", "parameters")
    outputs = _requested_outputs(body.get("outputs"), binary_output, model)
    X = _matrix(_inputs(body.get("inputs"), binary), model)
    result = run(model, X, any(name == "predict_proba" for name, _ in outputs))
    return _reply(result, outputs, request_id)


def _header_length(total: int) -> int | None:
    """The JSON header's length when the body carries binary tensors (Inference-Header-Content-Length), or None."""
    sent = request.headers.get(_HEADER)
    if sent is None:
        return None
    if not _DIGITS.fullmatch(sent.strip()):
        raise invalid(f"{_HEADER} must be the JSON header's length in bytes, a whole number")
    length = int(sent)
    if not 0 < length <= total:
        raise invalid(f"{_HEADER} is {length}, but the body holds {total} bytes; it must count the JSON header's")
    return length


def _parameters(value: object, where: str) -> dict:
    """A parameters object (absent: empty)."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise invalid(f"'{where}' must be an object")
    return value


def _flag(parameters: dict, key: str, where: str, default: bool = False) -> bool:
    """A boolean parameter, or a 400."""
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise invalid(f"{where}.{key} must be true or false")
    return value


def _requested_outputs(requested: object, binary: bool, model: Model) -> list[tuple[str, bool]]:
    """The outputs to answer, in order, each with whether it goes as binary data; none named: predict."""
    if requested is None or requested == []:
        return [(name, binary) for name in _DEFAULT_OUTPUTS]
    if type(requested) is not list:
        raise invalid('\'outputs\' must be a list, e.g. [{"name": "predict"}, {"name": "predict_proba"}]')
    chosen = []
    for i, output in enumerate(requested):
        where = f"outputs[{i}]"
        if type(output) is not dict or type(output.get("name")) is not str:
            raise invalid(f'{where} must be an object with a name, e.g. {{"name": "predict"}}')
        name = output["name"]
        if name not in _OUTPUTS:
            raise invalid(f"{where} names output {field_name(name)}; the outputs are {', '.join(_OUTPUTS)}")
        if name == "predict_proba" and not model.has_proba:
            raise invalid(f"{where}: model {model.name} is a {model.task} model and has no predict_proba output")
        if any(name == seen for seen, _ in chosen):
            raise invalid(f"{where} names output {name} a second time")
        parameters = _parameters(output.get("parameters"), f"{where}.parameters")
        if "classification" in parameters or any(key in parameters for key in _SHARED_MEMORY):
            raise invalid(f"{where}: the classification and shared-memory extensions are not served here")
        chosen.append((name, _flag(parameters, "binary_data", f"{where}.parameters", binary)))
    return chosen


def _inputs(inputs: object, binary: memoryview | None) -> list[tuple[str, np.ndarray]]:
    """Each input tensor, by name, as an array of its datatype and shape; binary data taken in the inputs' order."""
    if type(inputs) is not list or not inputs:
        raise invalid('\'inputs\' must be a non-empty list of tensors {"name", "shape", "datatype", "data"}')
    tensors, offset = [], 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if type(tensor) is not dict:
            raise invalid(f'{where} must be an object {{"name", "shape", "datatype", "data"}}')
        if unknown := sorted(set(tensor).difference(_INPUT_KEYS)):
            raise invalid(
                f"{where} has unknown field {field_name(unknown[0])}; a tensor takes {', '.join(_INPUT_KEYS)}"
            )
        name, shape, dtype = _describe(tensor, where)
        count = math.prod(shape)
        parameters = _parameters(tensor.get("parameters"), f"{where}.parameters")
        if any(key in parameters for key in _SHARED_MEMORY):
            raise invalid(f"{where}: the shared-memory extension is not served here; send data or binary data")
        if "binary_data_size" not in parameters:
            tensors.append((name, _from_json(tensor, count, dtype, where).reshape(shape)))
            continue
        size = parameters["binary_data_size"]
        if "data" in tensor:
            raise invalid(f"{where} has both data and parameters.binary_data_size; send its values one way")
        if type(size) is not int or size < 0:
            raise invalid(f"{where}.parameters.binary_data_size must be a whole number of bytes")
        if binary is None:
            raise invalid(f"{where} has binary_data_size, but no {_HEADER} header says where the binary data starts")
        if size != count * dtype.itemsize:
            raise invalid(f"{where}: binary_data_size is {size} bytes; shape {shape} needs {count * dtype.itemsize}")
        if offset + size > len(binary):
            raise invalid(f"{where}: the body's binary data ends before this tensor's {size} bytes")
        tensors.append((name, _from_bytes(binary[offset : offset + size], dtype, where).reshape(shape)))
        offset += size
    if binary is not None and offset != len(binary):
        raise invalid(
            f"the body holds {len(binary)} bytes after the JSON header; the inputs' binary_data_size add up to {offset}"
        )
    return tensors


def _describe(tensor: dict, where: str) -> tuple[str, list[int], np.dtype]:
    """A tensor's name, shape and numpy dtype, each checked."""
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if type(name) is not str or not name:
        raise invalid(f"{where}.name must be a non-empty string")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise invalid(f"{where}.shape must be a list of whole numbers, e.g. [2, 4] for 2 rows of 4 features")
    if type(datatype) is not str or datatype not in _DTYPES:  # a list or an object is unhashable: not a 500
        if datatype == "BYTES":
            raise invalid(f"{where}: features are numbers; send them as FP64, FP32, INTn, UINTn or BOOL, not BYTES")
        raise invalid(f"{where}.datatype must be one of {', '.join(_DTYPES)}")
    return name, shape, _DTYPES[datatype]


def _from_json(tensor: dict, count: int, dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor's JSON data (flat or nested, row-major) as a flat array of its datatype."""
    data = tensor.get("data")
    if type(data) is not list:
        raise invalid(f"{where}.data must be a list of values (flat or nested, row-major)")
    flat = _flatten(data, where)
    if len(flat) != count:
        raise invalid(f"{where}.data holds {len(flat)} values; its shape {tensor['shape']} needs {count}")
    allowed = _JSON_TYPES[dtype.kind]
    if not allowed.issuperset(map(type, flat)):
        j = next(j for j, v in enumerate(flat) if type(v) not in allowed)
        kind = _TYPE_NAMES.get(type(flat[j]), "a number")
        want = {"b": "true or false", "f": "numbers"}.get(dtype.kind, "whole numbers")
        raise invalid(f"{where}.data[{j}] is {kind}; {tensor['datatype']} data must be {want}")
    try:
        with np.errstate(over="ignore"):  # a float past the datatype's range becomes inf, refused below
            array = np.array(flat, dtype=dtype)
    except OverflowError:
        raise invalid(f"{where}.data holds a value out of range for {tensor['datatype']}") from None
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(f"{where}.data holds a value out of range for {tensor['datatype']}")
    return array


def _from_bytes(chunk: memoryview, dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor's binary data as a flat array of its datatype."""
    if dtype.kind == "b" and len(chunk) and np.frombuffer(chunk, np.uint8).max() > 1:
        raise invalid(f"{where}: BOOL binary data must be bytes 0 or 1")
    return np.frombuffer(chunk, dtype)


def _flatten(data: list, where: str) -> list:
    """Nested lists' values in row-major order (a flat list as it is); nesting must be regular, as numpy's arrays
    are: at each level all lists of one length, or all values (ragged or mixed nesting is a 400)."""
    # Level by level, not recursively: orjson takes 1024 levels of nesting, more than Python's recursion limit.
    while any(type(v) is list for v in data):
        if not all(type(v) is list for v in data) or len({len(v) for v in data}) != 1:
            raise invalid(
                f"{where}.data is ragged: nested lists must all have the same length at each level, as the shape "
                "says; or send the values flat"
            )
        data = [x for v in data for x in v]
    return data


def _matrix(tensors: list[tuple[str, np.ndarray]], model: Model) -> np.ndarray:
    """The model's matrix from one input of shape [n, n_features], or from one input per feature ([n] or [n, 1])
    named after the features, in any order."""
    limit, n = max_rows(), model.n_features
    if len(tensors) == 1:
        name, array = tensors[0]
        if array.ndim == 2 and (name not in (model.feature_names or ()) or array.shape[1] == n):
            return check_array(array, model, limit, "inputs[0]")
    for i, (_, array) in enumerate(tensors):
        if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
            raise invalid(
                f"inputs[{i}] has shape {list(array.shape)}; send one input of shape [n, {n}], or one input per "
                "feature of shape [n] or [n, 1] named after it"
            )
    order = column_order([name for name, _ in tensors], model, "inputs")
    rows = sorted({len(array) for _, array in tensors})
    if len(rows) != 1:
        raise invalid(
            f"the inputs hold different numbers of rows ({', '.join(map(str, rows))}); each needs one per row"
        )
    columns = [array.reshape(-1).astype(np.float64) for _, array in tensors]
    if order is not None:
        columns = [columns[j] for j in order]
    return check_array(np.column_stack(columns), model, limit, "inputs")


def _reply(result: Prediction, outputs: list[tuple[str, bool]], request_id: str | None) -> Response:
    """The inference response: JSON, or a JSON header then each binary output's bytes, in the outputs' order."""
    payload: dict = {"model_name": result.model.name, "model_version": result.model.version}
    if request_id is not None:
        payload["id"] = request_id
    tensors, chunks = [], []
    for name, binary in outputs:
        datatype, array = _output(result, name)
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunks.append(_to_bytes(array, datatype))
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    payload["outputs"] = tensors
    headers = cache_headers(result)
    if not chunks:
        return json_response(payload, headers=headers)
    header = orjson.dumps(payload)
    headers[_HEADER] = str(len(header))
    return Response(b"".join([header, *chunks]), headers=headers, mimetype="application/octet-stream")


def _output(result: Prediction, name: str) -> tuple[str, np.ndarray]:
    """An output's datatype and values: labels [n], or class probabilities [n, n_classes] in class order."""
    if name == "predict_proba":
        return "FP64", np.array([list(p.values()) for p in result.probabilities], dtype=np.float64)
    datatype = _label_type(result.model)
    if datatype == "BYTES":
        return datatype, np.array([str(label) for label in result.predictions], dtype=object)
    return datatype, np.array(result.predictions, dtype=_DTYPES[datatype])


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """An output's binary data: little-endian values, or for BYTES each UTF-8 string after its 4-byte length."""
    if datatype != "BYTES":
        return array.astype(_DTYPES[datatype]).tobytes()
    encoded = [label.encode() for label in array.reshape(-1)]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def _label_type(model: Model) -> str:
    """The predict output's datatype: string labels are BYTES, integer ones INT64, a regressor's values FP64."""
    if model.classes is None:
        return "FP64"
    kinds = {type(c) for c in model.classes}
    if kinds == {bool}:
        return "BOOL"
    if kinds == {int}:
        return "INT64"
    return "FP64" if kinds <= {int, float} else "BYTES"


# --- OpenAPI ---

_INFER = {"v2.infer": "model", "v2.infer_version": "version"}
_BINARY_FORM = (
    "The JSON form is described here. The binary tensor data extension is accepted too: send the JSON request, then "
    "each binary input's raw bytes (little-endian, row-major; the input's parameters.binary_data_size gives their "
    "length) in the inputs' order, with an Inference-Header-Content-Length header giving the JSON part's length; "
    "any Content-Type, or none. Ask for binary outputs with outputs[].parameters.binary_data or "
    "parameters.binary_data_output: the reply is then application/octet-stream, its JSON header as long as its "
    "Inference-Header-Content-Length header says, each binary output's bytes after it (BYTES elements are a 4-byte "
    "little-endian length, then UTF-8). With no outputs named, the reply has predict only."
)


_BINARY_REPLY = (
    "When binary outputs are asked for (outputs[].parameters.binary_data, or parameters.binary_data_output): the "
    "JSON reply, as long as the Inference-Header-Content-Length header says, then each binary output's bytes in "
    "order (parameters.binary_data_size each)."
)


def openapi_operation(endpoint: str, method: str, registry: Registry, config) -> dict | None:
    """This protocol's part of an operation in GET /openapi.json: infer bodies and every route's answer."""
    if endpoint in _INFER:
        models = models_for(_INFER[endpoint], registry)
        schema = one_of_models([_request_schema(m, config["MAX_ROWS"]) for m in models.values()])
        body = json_body(schema, {key: _example(m) for key, m in models.items()}, single=False)
        body["description"] = _BINARY_FORM
        ok = predict_answer("The outputs asked for, and which version answered.", _RESPONSE)
        # Binary outputs, when asked for: the JSON header (Inference-Header-Content-Length bytes), then the tensors.
        binary = {"type": "string", "format": "binary", "description": _BINARY_REPLY}
        ok["content"]["application/octet-stream"] = {"schema": binary}
        return {"requestBody": body, "ok": ok, "statuses": PREDICT_STATUSES}
    answers = {
        "v2.server_metadata": ("Server metadata.", _SERVER_SCHEMA, []),
        "v2.live": ("The process answers.", _flag_schema("live"), []),
        "v2.ready": ("Every model answers a sample row.", _flag_schema("ready"), [503]),
        "v2.model_metadata": ("The model's versions, inputs and outputs.", _MODEL_SCHEMA, [503]),
        "v2.version_metadata": ("The version's inputs and outputs.", _MODEL_SCHEMA, []),
        "v2.model_ready": ("The model answers a sample row.", _flag_schema("ready", "name"), [503]),
        "v2.version_ready": ("The version answers a sample row.", _flag_schema("ready", "name"), []),
    }
    if endpoint not in answers:
        return None
    description, schema, statuses = answers[endpoint]
    return {"ok": json_answer(description, schema), "statuses": statuses}


def _flag_schema(flag: str, *strings: str) -> dict:
    """{flag: true} and string fields."""
    props = {flag: {"type": "boolean", "const": True}} | {s: {"type": "string"} for s in strings}
    return {"type": "object", "required": [flag, *strings], "properties": props}


def _example(model: Model) -> dict:
    """An infer request for a model: its sample row as one FP64 input, asking for every output it has."""
    outputs = [{"name": name} for name in _OUTPUTS if name == "predict" or model.has_proba]
    tensor = {"name": "input", "shape": [1, model.n_features], "datatype": "FP64", "data": [model.sample_row]}
    return {"id": "example-1", "inputs": [tensor], "outputs": outputs}


def _request_schema(model: Model, max_rows: int) -> dict:
    """What a model takes: one tensor [n, n_features], or one tensor per feature named after it."""
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
            "datatype": {"enum": list(_DTYPES)},
            "data": {"type": "array", "description": "Row-major values, flat or nested."},
            "parameters": {"type": ["object", "null"]},
        },
        "additionalProperties": False,
    }
    matrix = tensor | {"description": f"All features: shape [n, {model.n_features}], n at most {max_rows}."}
    inputs = {"type": "array", "minItems": 1, "items": matrix}
    if model.feature_names:
        named = {**tensor["properties"], "name": {"enum": list(model.feature_names)}}
        per_feature = tensor | {"properties": named, "description": "One feature: shape [n] or [n, 1]."}
        inputs["items"] = {"anyOf": [matrix, per_feature]}
    names = [name for name in _OUTPUTS if name == "predict" or model.has_proba]
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"enum": names},
            "parameters": {"type": ["object", "null"], "properties": {"binary_data": {"type": "boolean"}}},
        },
    }
    return {
        "title": f"{model.name} {model.version}",
        "type": "object",
        "required": ["inputs"],
        "properties": {
            # null, like absent, for the optional fields the service reads with a default.
            "id": {"type": ["string", "null"], "description": "Echoed in the reply."},
            "parameters": {"type": ["object", "null"], "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": inputs,
            "outputs": {"type": ["array", "null"], "items": output, "description": "Absent: predict only."},
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
        },
        "additionalProperties": False,
    }


_SERVER_SCHEMA = {
    "type": "object",
    "required": ["name", "version", "extensions"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}},
    },
}
_METADATA_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1: any number of rows"},
        "parameters": {"type": "object", "properties": {"default": {"type": "boolean"}}},
    },
}
_MODEL_SCHEMA = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": _METADATA_TENSOR},
        "outputs": {"type": "array", "items": _METADATA_TENSOR},
    },
}
_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string", "description": "The request's id, when it sent one."},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"enum": list(_OUTPUTS)},
                    "datatype": {"enum": ["BYTES", "INT64", "FP64", "BOOL"]},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array", "items": {"type": ["number", "string", "boolean"]}},
                },
            },
        },
    },
}
