"""Ray Serve: the detector eval and predict run, behind HTTP.

One application (:data:`APP`) of ``num_replicas`` :class:`Detector` replicas, each with
the model loaded once (:func:`detexp.modeling.detector.inference_model`). A request is a
POST of one JPEG or PNG image to ``/``; the answer is JSON:
``{"width": W, "height": H, "detections": [{"label", "box", "score"}, ...]}``, the records
of predictions.jsonl without ``image_id`` (box in the image's pixels, score >= the
threshold). Requests that arrive together run through the model as one batch
(``@serve.batch``, up to ``max_batch_size``), one forward pass per image size, so that an
answer does not depend on the other images of its batch.

A request that cannot be an image is answered with a 4xx status and
``{"error": "<one line>"}`` (415 for another content type, 413 for a body or image over
the limits, 400 for a body that is no JPEG or PNG); the replica goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from detexp.distributed.batch_inference import detection_records, output_arrays
from detexp.errors import ConfigError, ResourceError

APP = "detexp"
IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png")
# The body says what it is: no type, bytes, or what curl --data-binary and urllib send unless told
SNIFFED_TYPES = ("application/octet-stream", "", "application/x-www-form-urlencoded")
FORMATS = ("JPEG", "PNG")

log = logging.getLogger("detexp")
replica_log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


class BadRequest(Exception):
    """A request answered with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (413) as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"the body has {int(declared)} bytes, more than serve.max_bytes={max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"the body has more than serve.max_bytes={max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_request(method: str, path: str, content_type: str | None) -> None:
    if path.rstrip("/"):
        raise BadRequest(404, f"no such route: {path}; POST an image to /")
    if method != "POST":
        raise BadRequest(405, f"{method} is not served; POST a JPEG or PNG image to /")
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind not in IMAGE_TYPES + SNIFFED_TYPES:
        raise BadRequest(
            415, f"unsupported content type {kind!r}: send the image's bytes with Content-Type: image/jpeg or image/png"
        )


def decode_image(body: bytes, limits: Limits) -> torch.Tensor:
    """The body's image as the detector takes it (RGB float in [0, 1], 3 x H x W)."""
    if not body:
        raise BadRequest(400, "the body is empty: POST the bytes of a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(body)) as img:
            if img.format not in FORMATS:
                raise BadRequest(400, f"a {img.format} image: send a JPEG or PNG")
            if img.width * img.height > limits.max_pixels:
                raise BadRequest(
                    413, f"the image has {img.width} x {img.height} pixels, more than serve.max_pixels={limits.max_pixels}"
                )
            pixels = np.array(img.convert("RGB"))
    except BadRequest:
        raise
    except Image.DecompressionBombError as exc:
        raise BadRequest(413, f"the image is too large to decode: {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(400, "not a JPEG or PNG image") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a broken file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadRequest(400, f"a broken image ({reason})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class Detector:
    """One replica: the detector on its device, answering HTTP requests (see the module).

    A plain class that :func:`start` makes a deployment of: Ray pickles it by reference
    (its module is importable on every node) rather than by value with all it refers to."""

    def __init__(
        self, model_cfg: dict[str, Any], classes: list[str], state: Any, *, use_gpu: bool, score_threshold: float,
        limits: Limits, max_batch_size: int, batch_wait_timeout_s: float, threads: int | None, sharing: int,
    ):
        import ray

        from detexp.distributed.cluster import torch_threads
        from detexp.modeling.detector import inference_model

        threads = torch_threads(threads, sharing)
        if threads:
            torch.set_num_threads(threads)
        if isinstance(state, list):  # [ObjectRef]: kept wrapped so that Ray passes the ref
            state = ray.get(state[0])
        self.classes = list(classes)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = inference_model(model_cfg, len(self.classes) + 1, state, self.device)
        self.score_threshold = score_threshold
        self.limits = limits
        self.detect.set_max_batch_size(max_batch_size)
        self.detect.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            check_request(request.method, request.url.path, request.headers.get("content-type"))
            image = decode_image(await read_body(request, self.limits.max_bytes), self.limits)
        except BadRequest as bad:
            return _error(bad.status, bad.reason)
        try:
            detections = await self.detect(image)
        except Exception as exc:  # noqa: BLE001 - the client gets one line, the replica's log the rest
            replica_log.exception("detexp: the model failed on a %s image", tuple(image.shape))
            return _error(500, f"the model failed on this image: {type(exc).__name__}")
        return JSONResponse({"width": int(image.shape[2]), "height": int(image.shape[1]), "detections": detections})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect(self, images: list[torch.Tensor]) -> list[list[dict[str, Any]]]:
        # In a thread: the replica's event loop keeps taking requests (the next batch) meanwhile.
        return await asyncio.to_thread(self._predict, images)

    def _predict(self, images: list[torch.Tensor]) -> list[list[dict[str, Any]]]:
        # One forward pass per image size: images of other sizes would be padded to a common
        # one, which moves boxes near the edges, and an answer would depend on its batch.
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        outputs: list[Any] = [None] * len(images)
        with torch.inference_mode():
            for indices in by_size.values():
                for i, out in zip(indices, self.model([images[i].to(self.device) for i in indices]), strict=True):
                    outputs[i] = detection_records(output_arrays(out, self.score_threshold), self.classes)
        return outputs


@dataclass(frozen=True)
class Replicas:
    """What the deployment asks of the cluster."""

    count: int
    cpus: float
    gpus: float
    threads: int | None


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something on this machine already listens on (Serve's proxy would
    fail to start behind the scenes and the deployment wait)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"serve.port={port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port") from None


def check_replicas(replicas: Replicas) -> None:
    """Fail at once where Ray Serve would wait for ever for resources that never come."""
    from detexp.distributed.cluster import usable_resources

    have, which = usable_resources()
    for resource, each in (("CPU", replicas.cpus), ("GPU", replicas.gpus)):
        need = replicas.count * each
        if need > have.get(resource, 0.0):
            raise ResourceError(
                f"serve.num_replicas={replicas.count} replicas x {each:g} {resource}s = {need:g} {resource}s, but the Ray "
                f"cluster has {have.get(resource, 0.0):g} {resource}s {which}; lower serve.num_replicas"
                + (" or scaling.cpus_per_worker" if resource == "CPU" else " or serve.gpus_per_replica")
            )


@dataclass(frozen=True)
class Deployed:
    """A running :data:`APP`: whether Ray Serve ran before it (then only the app is taken
    down at the end), and the weights in the object store, held while it serves."""

    shared_serve: bool
    state_ref: Any


def start(
    model_cfg: dict[str, Any], classes: list[str], state: dict[str, torch.Tensor], replicas: Replicas, *,
    host: str, port: int, score_threshold: float, limits: Limits, max_batch_size: int, batch_wait_timeout_s: float,
    verbose: bool = False,
) -> Deployed:
    """Deploy :data:`APP` on the running Ray; returns when every replica is ready. The
    weights go to the object store once and every replica reads them from there."""
    import ray

    if not verbose:  # Serve's own lines ("Started Serve", "Application ... is ready"): we say it
        replica_log.setLevel(logging.WARNING)
    already = bool(serve.status().applications)
    if already:
        log.warning("Ray Serve already runs on this cluster: its HTTP proxies keep their host and port")
    serve.start(http_options={"host": host, "port": port})
    state_ref = ray.put(state)
    app = serve.deployment(Detector).options(
        num_replicas=replicas.count,
        ray_actor_options={"num_cpus": replicas.cpus, "num_gpus": replicas.gpus},
        # room for a full batch waiting while another runs
        max_ongoing_requests=2 * max_batch_size,
    ).bind(
        model_cfg, list(classes), [state_ref], use_gpu=replicas.gpus > 0, score_threshold=score_threshold,
        limits=limits, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
        threads=replicas.threads, sharing=replicas.count,
    )
    serve.run(app, name=APP, route_prefix="/")
    return Deployed(already, state_ref)


def stop(deployed: Deployed) -> None:
    """Take :data:`APP` down, and Ray Serve with it unless it served other applications before."""
    with contextlib.suppress(Exception):  # Ray itself may be gone (Ctrl-C reaches every process)
        if deployed.shared_serve:
            serve.delete(APP)
        else:
            serve.shutdown()
