"""``detexp serve``: the session's smoke-trained checkpoint (conftest.py's ``trained_smoke``)
served on the session's Ray, on a free port, and called over real HTTP: one image, eight at
once (Ray Serve batches them), bad requests, and the endpoint taken down at the end.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train
from detexp.checkpoint.effective_config import prepare_inference
from detexp.distributed.batch_inference import detection_records, output_arrays
from detexp.errors import ConfigError
from detexp.evaluation.parity import compare
from detexp.modeling.detector import inference_model

pytest.importorskip("ray.serve")
from detexp.commands.serve import start_server  # noqa: E402 - needs ray[serve]

SCORE_THRESHOLD = 0.1  # the smoke model's scores are about 0.19: every detection is returned
MAX_BYTES = 64 * 1024  # the shapes' JPEGs are a few KB


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: bytes, content_type: str | None = "image/jpeg") -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def served(ray_cluster, trained_smoke, tmp_path_factory):
    overrides = [
        f"checkpoint={trained_smoke.root / 'train'}", f"tracking.uri={trained_smoke.uri}",
        f"serve.port={_free_port()}", f"score_threshold={SCORE_THRESHOLD}", f"serve.max_bytes={MAX_BYTES}",
    ]
    cfg = compose_train(overrides, config_name="serve")
    server = start_server(cfg, tmp_path_factory.mktemp("serve"), overrides)
    _, eff, state = prepare_inference(cfg, overrides)
    images = sorted(Path(eff.dataset.cache_dir).glob(
        f"shapes-*-train{eff.dataset.synth.num_train}-val{eff.dataset.synth.num_val}-*/JPEGImages/*.jpg"
    ))
    yield SimpleNamespace(
        server=server, model=inference_model(eff.model, len(eff.dataset.classes) + 1, state),
        classes=list(eff.dataset.classes), images=images[:8],
    )
    server.stop()


def _as_predict_writes(served, path: Path) -> list[dict]:
    """The image's detections as predict's predictions.jsonl lists them (without image_id):
    decoded as predict decodes a file, through the model predict runs, the same threshold."""
    with Image.open(path) as img:
        pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div_(255.0)
    with torch.inference_mode():
        (output,) = served.model([pixels])
    return detection_records(output_arrays(output, SCORE_THRESHOLD), served.classes)


def _same(served, answer: list[dict], expected: list[dict]) -> None:
    """The same detections, paired as the export's parity check pairs them: the smoke model's
    scores are nearly tied, so a rounding reorders them, and picks another of two boxes
    that are almost one (0.17 px apart) in NMS."""

    def tensors(records: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "boxes": torch.tensor([d["box"] for d in records], dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor([served.classes.index(d["label"]) + 1 for d in records], dtype=torch.int64),
            "scores": torch.tensor([d["score"] for d in records], dtype=torch.float64),
        }

    parity = compare([tensors(expected)], [tensors(answer)], min_score=SCORE_THRESHOLD, score_thresh=SCORE_THRESHOLD,
                     per_image=100, score_tolerance=0.01)
    assert len(answer) == len(expected) and parity.compared > 0.9 * len(expected), parity
    assert parity.max_box_px <= 0.5 and parity.max_score <= 1e-5, parity
    # At most one box traded for another where the model's 100 detections are cut: the
    # smoke model's scores there are nearly tied, and a batched forward pass rounds them
    # otherwise (seen once in CI: 98 paired, one each side unpaired). Another image's
    # detections would differ wholesale.
    assert parity.only_reference == parity.only_exported <= 1, parity


def test_an_image_posted_gets_the_detections_predict_writes(served):
    path = served.images[0]
    status, answer = _post(served.server.url, path.read_bytes())
    assert status == 200, answer
    with Image.open(path) as img:
        assert (answer["width"], answer["height"]) == img.size
    expected = _as_predict_writes(served, path)
    assert len(expected) > 0
    _same(served, answer["detections"], expected)
    assert set(answer["detections"][0]) == {"label", "box", "score"}
    assert min(d["score"] for d in answer["detections"]) >= SCORE_THRESHOLD


def test_eight_images_at_once_each_get_their_own_detections(served):
    """Four images twice over, posted at once: Ray Serve batches them, and each answer is
    that image's own (images of one size share a forward pass, the others do not)."""
    paths = served.images[:4] * 2
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: _post(served.server.url, p.read_bytes()), paths))
    assert [status for status, _ in answers] == [200] * len(paths)
    for path, (_, answer) in zip(paths, answers, strict=True):
        _same(served, answer["detections"], _as_predict_writes(served, path))


def test_bad_requests_get_a_4xx_and_one_line_and_the_replica_goes_on(served):
    url = served.server.url
    jpeg = served.images[0].read_bytes()
    cases = [
        (_post(url, b"not an image at all"), 400, "not a JPEG or PNG image"),
        (_post(url, jpeg[: len(jpeg) // 2]), 400, "a broken image"),
        (_post(url, b"{}", "application/json"), 415, "unsupported content type 'application/json'"),
        (_post(url, b"\xff" * (MAX_BYTES + 1)), 413, f"serve.max_bytes={MAX_BYTES}"),
        (_post(url + "predict", jpeg), 404, "no such route: /predict"),
    ]
    for (status, answer), expected_status, reason in cases:
        assert status == expected_status, answer
        assert set(answer) == {"error"} and reason in answer["error"] and "\n" not in answer["error"]
        assert "Traceback" not in answer["error"]
    status, answer = _post(url, jpeg, None)  # urllib's (and curl's) default type: the bytes say it is a JPEG
    assert status == 200 and answer["detections"]


def test_a_port_in_use_is_refused_before_ray_starts(served, trained_smoke, tmp_path):
    port = int(served.server.url.rsplit(":", 1)[1].strip("/"))
    overrides = [f"checkpoint={trained_smoke.root / 'train'}", f"serve.port={port}"]
    with pytest.raises(ConfigError, match=f"serve.port={port}: cannot listen on 127.0.0.1:{port}"):
        start_server(compose_train(overrides, config_name="serve"), tmp_path, overrides)


def test_stopping_takes_the_endpoint_down(served):
    served.server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(served.server.url, timeout=10)
