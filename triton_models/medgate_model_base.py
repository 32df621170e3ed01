"""One base for medgate's Triton Python-backend models: ONNX Runtime set-up, the batched execute loop, errors.

A plain file at the root of the model repository, because Triton takes every *folder* there for a model and
skips files (checked with the wheel's Triton 2.51, which medgate embeds without explicit model control): it
travels with ``triton_models/`` into the embedded server and into a stock NGC container, which has nothing the
``medgate`` package could install.  The stub puts only a model's folder and version folder on ``sys.path`` and
ignores ``PYTHONPATH``, so each ``model.py`` adds the root, from its real path (a model folder symlinked into
another repository, as ``training/evaluate_report.py`` does, still finds this file), and turns bytecode writing
off first: a ``__pycache__/`` at the root is a model that fails to load and stops the server.  Where Triton
fetches a repository model by model (cloud storage; not checked here), copy this file into each model folder.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:
    import onnxruntime as ort

# The square model space (pixels) of every image model; services/imaging/preprocess.py letterboxes into the
# same size (the services cannot be imported here, so tests/test_triton_model_base.py checks the two agree).
MODEL_SIZE = 1024

P = TypeVar("P")  # one request, as a model's parse() reads it
E = TypeVar("E")  # what an image model's request carries beside its images
R = TypeVar("R")  # an image model's result for one image

# A string: the stub attaches Tensor, TritonError, InferenceResponse, ... to pb_utils only after it has imported
# model.py (checked with 2.51), so this module may use them inside functions only.
Outputs = Sequence["pb_utils.Tensor"]


class RequestError(ValueError):
    """A problem with one request; answered with an INVALID_ARG error for that request only."""


class Cancelled(Exception):
    """The request is no longer wanted: its client cancelled it or its timeout passed (answered CANCELLED)."""


@dataclass(frozen=True)
class Failed:
    """A valid request that could not be computed; ``reason`` names the stage and the exception type, no data.

    ``cancelled``: it was given up part-way because the client no longer wants it (answered CANCELLED).
    """

    reason: str
    cancelled: bool = False


CANCELLED = Failed("request cancelled", cancelled=True)


def error_response(message: str, *, invalid: bool = False, cancelled: bool = False) -> pb_utils.InferenceResponse:
    """An error response with Triton's INVALID_ARG or CANCELLED code where this backend has them."""
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    elif cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


def is_cancelled(request: pb_utils.InferenceRequest) -> bool:
    """Whether the client gave up on ``request`` (Python backend 23.10 and later); False where it cannot tell."""
    check = getattr(request, "is_cancelled", None)
    return bool(check()) if check is not None else False


def deadline_of(request: pb_utils.InferenceRequest, received: float) -> float:
    """When (``time.monotonic()``) the client stops waiting for ``request``: ``received`` plus its timeout.

    The gateway sends each call's remaining deadline as the request timeout (microseconds; 0 = none); counted
    from when this stub received the batch, so time spent in Triton's queue only makes it more generous.
    """
    timeout = getattr(request, "timeout", None)
    microseconds = int(timeout()) if callable(timeout) else 0
    return received + microseconds / 1e6 if microseconds > 0 else float("inf")


def input_array(request: pb_utils.InferenceRequest, name: str) -> np.ndarray:
    """Input ``name`` of ``request`` as numpy; RequestError when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"missing input {name!r}")
    return tensor.as_numpy()


def check_images(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``image`` if it is uint8 [batch, MODEL_SIZE, MODEL_SIZE] with batch >= 1; RequestError saying what is wrong."""
    if image.dtype != np.uint8:
        raise RequestError(f"input {name!r} must be UINT8, got {image.dtype}")
    if image.ndim != 3 or image.shape[1:] != (MODEL_SIZE, MODEL_SIZE) or image.shape[0] < 1:
        raise RequestError(
            f"input {name!r} must have shape [batch, {MODEL_SIZE}, {MODEL_SIZE}], got {list(image.shape)}"
        )
    return image


def chunks(items: Sequence[P], size: int) -> Iterator[Sequence[P]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def onnx_session(path: str, args: Mapping[str, str], *, threads: int, spin: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session for ``path``: CUDA on a GPU instance when this onnxruntime has it, else CPU.

    ``spin``: ONNX Runtime's intra-op threads busy-wait for work between calls unless told not to. With several
    models sharing a few cores (the embedded default runs five) that spinning burns the CPU the other models
    and the gateway need: off, Triton's CPU per 1024x1024 Classify at 16 clients fell from 16.4-16.9 to
    12.5-13.2 ms and the gateway's req/s rose by about 11% (2 quiet cores; more on a loaded machine), with one
    request alone within 1 ms (bench/results/gateway.json, ``onnx_spinning_comparison``).
    A dedicated host may turn it on per model (config.pbtxt parameter ``intra_op_spinning``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ort.InferenceSession(path, opts, providers=providers)


class TritonModel(Generic[P]):
    """A Python-backend model: ``initialize`` reads the configuration, ``execute`` answers every request once.

    A subclass supplies ``setup`` (load what it serves), ``parse`` (one request -> its inputs, RequestError when
    they are wrong) and ``infer`` (all parsed requests of a batch at once -> one answer each).  ``execute``
    answers a cancelled request with CANCELLED without computing it, a bad one with INVALID_ARG naming the
    problem (never image or text content), and serves the rest of the batch together.  While ``infer`` runs,
    ``gone(n)`` / ``check(n)`` say whether batch item ``n`` is still wanted (checked between units of work), and
    ``run_watched`` stops an ONNX Runtime call part-way when it is not; a request given up is answered
    CANCELLED (``Failed(..., cancelled=True)``, or :class:`Cancelled` raised out of ``infer`` for the whole batch).
    """

    default_name: ClassVar[str] = "model"
    default_max_batch: ClassVar[int] = 8
    cancel_poll_s: ClassVar[float] = 0.05  # how often run_watched asks whether its requests are still wanted
    _batch: Sequence[tuple[pb_utils.InferenceRequest, float]] = ()  # the batch infer() computes: request, deadline

    name: str
    config: dict[str, Any]
    params: dict[str, str]
    version_dir: str
    max_batch: int

    def initialize(self, args: dict[str, str]) -> None:
        self.name = args.get("model_name", self.default_name)
        self.config = json.loads(args["model_config"])
        self.params = {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}
        self.max_batch = max(1, int(self.config.get("max_batch_size") or self.default_max_batch))
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = os.path.dirname(os.path.abspath(inspect.getfile(type(self))))
        self.version_dir = version_dir
        self.setup(args)

    def setup(self, args: dict[str, str]) -> None:
        """Load what the model serves (``self.params`` and ``self.version_dir`` are set)."""

    def int_param(self, key: str, default: int) -> int:
        """Parameter ``key`` of config.pbtxt as an int; ``default`` when absent or empty."""
        raw = self.params.get(key, "")
        try:
            return int(raw or default)
        except ValueError:
            raise RuntimeError(f"{self.name}: parameter {key}={raw!r} is not an integer") from None

    def bool_param(self, key: str, default: bool) -> bool:
        """Parameter ``key`` as true/false; ``default`` when absent or empty."""
        raw = (self.params.get(key, "") or "").strip().lower()
        if raw in ("", "true", "false"):
            return default if raw == "" else raw == "true"
        raise RuntimeError(f"{self.name}: parameter {key}={raw!r} must be true or false")

    def float_param(self, key: str, default: float, low: float = -np.inf, high: float = np.inf) -> float:
        """Parameter ``key`` as a float within [low, high]; ``default`` when absent or empty."""
        raw = self.params.get(key, "")
        try:
            value = float(raw) if raw != "" else default
        except ValueError:
            raise RuntimeError(f"{self.name}: parameter {key}={raw!r} is not a number") from None
        if not (low <= value <= high):
            raise RuntimeError(f"{self.name}: parameter {key}={value} must be within [{low}, {high}]")
        return value

    def require_files(self, names: Sequence[str], remedy: str) -> list[str]:
        """Paths of ``names`` in the version folder; RuntimeError naming the missing ones and ``remedy``."""
        paths = [os.path.join(self.version_dir, name) for name in names]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise RuntimeError(f"{self.name}: missing {', '.join(missing)}; {remedy}")
        return paths

    def cancelled(self, request: pb_utils.InferenceRequest) -> bool:
        """The cancellation check made before a request is computed."""
        return is_cancelled(request)

    def parse(self, request: pb_utils.InferenceRequest) -> P:
        raise NotImplementedError

    def infer(self, batch: list[P]) -> list[Outputs | Failed]:
        """One answer per parsed request, in order: its output tensors or why it failed."""
        raise NotImplementedError

    def gone(self, n: int) -> bool:
        """Whether item ``n`` of the batch being computed is no longer wanted: cancelled, or past its timeout.

        For ``infer`` to call between units of work (an encoder pass, a prompt, a report): Triton 2.51 passes a
        client's cancellation (and a gRPC deadline that ran out) on to ``request.is_cancelled()``.
        """
        if not 0 <= n < len(self._batch):
            return False
        request, deadline = self._batch[n]
        return time.monotonic() >= deadline or self.cancelled(request)

    def check(self, n: int) -> None:
        """Raise :class:`Cancelled` when item ``n`` of the batch is no longer wanted."""
        if self.gone(n):
            raise Cancelled

    def run_watched(self, session: ort.InferenceSession, outputs: list[str], feeds: dict[str, Any], items: Any) -> Any:
        """``session.run``, stopped part-way once every batch item in ``items`` is gone (raises :class:`Cancelled`).

        A watcher thread asks every ``cancel_poll_s`` and sets ONNX Runtime's ``RunOptions.terminate``, so an
        abandoned encoder pass of seconds (LiteMedSAM on 2 cores) frees the model within a poll, not a pass.
        """
        import onnxruntime as ort

        wanted = sorted(set(items))
        options = ort.RunOptions()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(self.cancel_poll_s):
                if wanted and all(self.gone(n) for n in wanted):
                    options.terminate = True
                    return

        watcher = threading.Thread(target=watch, name=f"{self.name}-cancel-watch", daemon=True)
        watcher.start()
        try:
            return session.run(outputs, feeds, options)
        except Exception:
            if options.terminate:
                raise Cancelled from None
            raise
        finally:
            done.set()
            watcher.join()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        received = time.monotonic()
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        parsed: list[tuple[int, P]] = []
        for i, request in enumerate(requests):
            try:
                if self.cancelled(request):
                    responses[i] = error_response(f"{self.name}: request cancelled", cancelled=True)
                    continue
                parsed.append((i, self.parse(request)))
            except RequestError as exc:
                responses[i] = error_response(f"{self.name}: {exc}", invalid=True)
            except Exception as exc:  # never let one request take the batch down
                responses[i] = error_response(f"{self.name}: could not read the request ({type(exc).__name__})")
        if parsed:
            self._batch = [(requests[i], deadline_of(requests[i], received)) for i, _ in parsed]
            try:
                answers = self._infer([p for _, p in parsed])
            finally:
                self._batch = ()
            for (i, _), answer in zip(parsed, answers, strict=True):
                if isinstance(answer, Failed):
                    responses[i] = error_response(f"{self.name}: {answer.reason}", cancelled=answer.cancelled)
                else:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=list(answer))
        return [r if r is not None else error_response(f"{self.name}: no answer") for r in responses]

    def _infer(self, batch: list[P]) -> list[Outputs | Failed]:
        """``infer``, with a failure of the whole call answered per request instead of failing the batch."""
        try:
            answers = self.infer(batch)
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers for {len(batch)} requests")
            return answers
        except Cancelled:
            return [CANCELLED] * len(batch)
        except Exception as exc:
            return [Failed(f"inference failed ({type(exc).__name__})")] * len(batch)

    def finalize(self) -> None:
        """Drop what ``setup`` loaded."""


class ImageBatchModel(TritonModel[tuple[np.ndarray, E]], Generic[E, R]):
    """A model with one ONNX graph from uint8 ``image`` [B,1,MODEL_SIZE,MODEL_SIZE] to ``graph_outputs``.

    Every image of every valid request of a batch goes through the graph in one ONNX Runtime call (calls of at
    most ``max_batch_size`` images, should Triton ever hand more); a failed call fails the requests that had an
    image in it.  A subclass supplies ``parse`` (-> the images and what else the request carries), ``run_images``
    (one call, through ``run_graph``) and ``respond`` (one request's results -> its output tensors).

    config.pbtxt parameter ``runtime``: ``onnxruntime`` (default) or, for a model naming ``torch_net``, ``torch``:
    the same network in PyTorch with the weights read from the same ``model.onnx`` (medgate_torch_nets.py, imported
    only then), on CUDA when torch sees a GPU, else on the CPU; calibration, post-processing and cancellation
    checks are this class's either way.
    """

    onnx_file: ClassVar[str] = "model.onnx"
    graph_outputs: ClassVar[tuple[str, ...]] = ()
    rebuild: ClassVar[str] = ""  # the command that builds the graph, named when it is missing or wrong
    torch_net: ClassVar[str] = ""  # the medgate_torch_nets network for runtime=torch ("": ONNX Runtime only)
    runtimes: ClassVar[tuple[str, ...]] = ("onnxruntime", "torch")

    session: ort.InferenceSession | None = None
    net: Any = None  # runtime=torch: medgate_torch_nets.Net

    def setup(self, args: dict[str, str]) -> None:
        threads = self.int_param("intra_op_threads", 2)
        (path,) = self.require_files([self.onnx_file], f"run `{self.rebuild}`")
        runtime = (self.params.get("runtime", "") or "onnxruntime").strip().lower()
        if runtime not in self.runtimes or (runtime == "torch" and not self.torch_net):
            offered = self.runtimes if self.torch_net else ("onnxruntime",)
            raise RuntimeError(f"{self.name}: parameter runtime={runtime!r} must be one of {', '.join(offered)}")
        if runtime == "torch":
            from medgate_torch_nets import load_net

            try:
                spin = self.bool_param("intra_op_spinning", False)
                self.net, described = load_net(self.torch_net, path, args, threads=threads, spin=spin)
            except ValueError as exc:
                raise RuntimeError(f"{self.name}: {exc}; re-run `{self.rebuild}`") from None
            if not set(self.graph_outputs) <= set(self.net.outputs):
                raise RuntimeError(f"{self.name}: the torch network gives {self.net.outputs}, not {self.graph_outputs}")
            pb_utils.Logger.log_info(f"{self.name} ({described}): loaded {path}" + self.details())
            return
        self.session = onnx_session(path, args, threads=threads, spin=self.bool_param("intra_op_spinning", False))
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if "image" not in inputs or inputs["image"].type != "tensor(uint8)" or not set(self.graph_outputs) <= outputs:
            raise RuntimeError(
                f"{self.name}: {path} must take uint8 'image' and give "
                + " and ".join(repr(name) for name in self.graph_outputs)
                + f"; re-run `{self.rebuild}`"
            )
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {path} with {self.session.get_providers()[0]}, {threads} intra-op threads"
            + self.details()
        )

    def details(self) -> str:
        """More for the load log line (``, name value`` pieces)."""
        return ""

    def run_images(self, images: np.ndarray, rows: list[tuple[E, int]]) -> Sequence[R]:
        """One ``run_graph`` call on ``images`` [n,1,S,S]; ``rows`` says whose each is (extra, index in request)."""
        raise NotImplementedError

    def run_graph(self, outputs: list[str], images: np.ndarray) -> list[np.ndarray]:
        """The graph's ``outputs`` for uint8 ``images`` [n,1,S,S], with the runtime config.pbtxt chose."""
        if self.net is not None:
            return list(self.net(images, outputs))
        assert self.session is not None
        return list(self.session.run(outputs, {"image": images}))

    def respond(self, extra: E, results: list[R]) -> Outputs:
        """The output tensors of one request from its images' results, in order."""
        raise NotImplementedError

    def infer(self, batch: list[tuple[np.ndarray, E]]) -> list[Outputs | Failed]:
        rows = [(n, k) for n, (image, _) in enumerate(batch) for k in range(image.shape[0])]
        results: list[list[R]] = [[] for _ in batch]
        failed: dict[int, Failed] = {}
        for part in chunks(rows, self.max_batch):
            for n in {n for n, _ in part if n not in failed}:
                if self.gone(n):  # between calls: a request its client gave up is not computed further
                    failed[n] = CANCELLED
            part = [(n, k) for n, k in part if n not in failed]
            if not part:
                continue
            try:
                if len(part) == 1:
                    n, k = part[0]
                    images = batch[n][0][k : k + 1, None]
                else:
                    images = np.stack([batch[n][0][k] for n, k in part])[:, None]
                out = self.run_images(np.ascontiguousarray(images), [(batch[n][1], k) for n, k in part])
                if len(out) != len(part):
                    raise RuntimeError(f"{len(out)} results for {len(part)} images")
            except Exception as exc:
                for n, _ in part:
                    failed[n] = Failed(f"inference failed ({type(exc).__name__})")
                continue
            for (n, _), result in zip(part, out, strict=True):
                results[n].append(result)  # rows are in request order, then image order
        answers: list[Outputs | Failed] = []
        for n, (_, extra) in enumerate(batch):
            if n in failed:
                answers.append(failed[n])
                continue
            try:
                answers.append(self.respond(extra, results[n]))
            except Exception as exc:
                answers.append(Failed(f"could not build the response ({type(exc).__name__})"))
        return answers

    def finalize(self) -> None:
        self.session = None
        self.net = None
