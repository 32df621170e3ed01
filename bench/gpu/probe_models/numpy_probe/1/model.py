"""Diagnostic Python-backend model: which numpy the stub loaded, and which way of making outputs carries bytes.

Answers the question behind DESIGN.md §7's "empty output tensors on the lent H100 machine": the 2.51 stubs are
built with pybind11 2.10, which reads numpy 2's item size as 0, so an output made with ``pb_utils.Tensor(name,
array)`` would arrive with its shape and dtype but no bytes. The config's ``output_path`` picks the way:
``numpy`` (``as_numpy`` in, ``pb_utils.Tensor`` out) or ``dlpack`` (PyTorch tensors in and out through DLPack,
on CUDA when torch sees a GPU). The model writes what it found to ``probe-<model>-<pid>.json`` in its folder at
start-up and after each request, so the answer survives outputs that come back empty. No medgate code is
imported: this runs in whatever interpreter the stub found, and an import that fails is reported, not raised.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import triton_python_backend_utils as pb_utils

try:
    import numpy as np
except Exception:  # reported by initialize()
    np = None  # type: ignore[assignment]


def _last_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1][:500]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self.path = parameters.get("output_path", {}).get("string_value", "numpy")
        self.folder = args.get("model_repository") or os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        self.info: dict[str, Any] = {
            "model": args.get("model_name", ""),
            "output_path": self.path,
            "numpy_version": getattr(np, "__version__", None),
            "numpy_file": getattr(np, "__file__", None),
            "sys_executable": sys.executable,
            "sys_prefix": sys.prefix,
            "python": sys.version.split()[0],
            "path_env_first": os.environ.get("PATH", "").split(os.pathsep)[:2],
            "pid": os.getpid(),
            "errors": {},
        }
        if np is None:
            self.info["errors"]["import numpy"] = "numpy is not importable in this interpreter"
        self.torch: Any = None
        self.device = "cpu"
        if self.path == "dlpack" or parameters.get("probe_torch", {}).get("string_value", "0") == "1":
            self._probe_torch()
        self._write()

    def _probe_torch(self) -> None:
        """torch's version and CUDA as this interpreter sees them; a CUDA kernel run when there is a GPU."""
        try:
            import torch

            self.torch = torch
            report: dict[str, Any] = {"version": torch.__version__, "cuda": bool(torch.cuda.is_available())}
            if report["cuda"]:
                self.device = "cuda"
                report["device"] = torch.cuda.get_device_name(0)
                report["cuda_sum"] = float((torch.arange(4, dtype=torch.float32, device="cuda") * 2 + 1).sum().item())
            self.info["torch"] = report
        except Exception as exc:
            self.info["errors"]["import torch"] = _last_line(exc)

    def _write(self) -> None:
        with open(os.path.join(self.folder, f"probe-{self.info['model']}-{os.getpid()}.json"), "w") as handle:
            json.dump(self.info, handle)

    def _try(self, name: str, make: Any) -> Any:
        try:
            return make()
        except Exception as exc:
            self.info["errors"][name] = _last_line(exc)
            return None

    def _numpy_outputs(self, tensor: Any) -> list[Any]:
        x = self._try("as_numpy", lambda: np.array(tensor.as_numpy(), dtype=np.float32))
        if x is None:
            return []
        self.info["x_as_numpy"] = [float(v) for v in x.ravel()]
        y = np.ascontiguousarray(x * 2 + 1, dtype=np.float32)
        made = [
            self._try("y", lambda: pb_utils.Tensor("y", y)),
            self._try("x_seen", lambda: pb_utils.Tensor("x_seen", np.ascontiguousarray(x))),
            self._try(
                "info", lambda: pb_utils.Tensor("info", np.array([json.dumps(self.info).encode()], dtype=object))
            ),
        ]
        return [t for t in made if t is not None]

    def _dlpack_outputs(self, tensor: Any) -> list[Any]:
        torch = self.torch
        if torch is None:
            return []
        from torch.utils import dlpack

        x = self._try("input to torch", lambda: dlpack.from_dlpack(tensor.to_dlpack()).to(torch.float32))
        if x is None:
            return []
        self.info["x_from_dlpack"] = [float(v) for v in x.cpu().ravel()]
        outputs = []
        for name, value in (("y", x * 2 + 1), ("x_seen", x.clone())):
            on_device = value.to(self.device).contiguous()
            made = self._try(name, lambda v=on_device, n=name: pb_utils.Tensor.from_dlpack(n, dlpack.to_dlpack(v)))
            if made is None and self.device != "cpu":  # a GPU output the backend refused: say so, try host memory
                made = self._try(
                    f"{name} (cpu)",
                    lambda v=value, n=name: pb_utils.Tensor.from_dlpack(n, dlpack.to_dlpack(v.cpu().contiguous())),
                )
            if made is not None:
                outputs.append(made)
        self.info["output_device"] = self.device
        return outputs

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "x")
            outputs = self._dlpack_outputs(tensor) if self.path == "dlpack" else self._numpy_outputs(tensor)
            self._write()
            if outputs:
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            else:
                message = "; ".join(f"{k}: {v}" for k, v in self.info["errors"].items()) or "no output could be made"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses
