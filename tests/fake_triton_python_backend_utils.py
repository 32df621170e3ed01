"""A FAKE standing in for Triton's in-process ``triton_python_backend_utils``, for tests without tritonserver.

Only what medgate's models use, shaped as Triton 2.51's Python backend has it (error codes as class attributes,
``InferenceRequest.is_cancelled()``).  Tests put it into ``sys.modules`` under the real name; it is never
shipped to Triton, which provides the real module to the stub.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TritonError:
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, data: np.ndarray[Any, Any]) -> None:
        self._name = name
        self._data = data

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray[Any, Any]:
        return self._data


class InferenceRequest:
    """A request holding ``inputs`` by name; ``cancelled`` is what ``is_cancelled()`` answers."""

    def __init__(self, inputs: dict[str, np.ndarray[Any, Any]], *, cancelled: bool = False) -> None:
        self._inputs = [Tensor(name, value) for name, value in inputs.items()]
        self.cancelled = cancelled

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return ""

    def is_cancelled(self) -> bool:
        return self.cancelled


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Logger:
    lines: list[str] = []  # noqa: RUF012 (a shared log the tests read)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.lines.append(message)

    log_warn = log_error = log_verbose = log_info


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None
