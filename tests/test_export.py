"""``detexp export``: the session's smoke-trained checkpoint (conftest.py's ``trained_smoke``)
exported to TorchScript and to ONNX, each checked against the PyTorch model on the val
images, and what a user does with the files: load them, call them, read model.json. A
corrupted export fails the parity check with its figures.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_train
from detexp.checkpoint.effective_config import prepare_inference
from detexp.commands.export import check_parity, export, parity_images
from detexp.data.shapes import SHAPES_CLASSES
from detexp.errors import ConfigError, ParityError
from detexp.modeling.detector import inference_model
from detexp.modeling.export import load_exported

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def _overrides(trained, store, *extra: str) -> list[str]:
    return [f"checkpoint={trained.root / 'train'}", f"tracking.uri=sqlite:///{store}", *extra]


@pytest.fixture(scope="module")
def exported(trained_smoke, _mlflow_schema, tmp_path_factory) -> SimpleNamespace:
    """Both exports of the smoke model, made once, in a store of their own."""
    root = tmp_path_factory.mktemp("export")
    store = root / "mlflow.db"
    shutil.copyfile(_mlflow_schema, store)
    results = {}
    for fmt in ("torchscript", "onnx"):
        overrides = _overrides(trained_smoke, store, f"format={fmt}")
        results[fmt] = export(compose_train(overrides, config_name="export"), root / fmt, overrides)
    # the PyTorch model and the val images, as the export compared them
    _, eff, state = prepare_inference(compose_train(overrides, config_name="export"), overrides)
    return SimpleNamespace(
        root=root, uri=f"sqlite:///{store}", results=results, trained=trained_smoke, settings=eff.export,
        reference=inference_model(eff.model, len(eff.dataset.classes) + 1, state), images=parity_images(eff.dataset, 8),
    )


def _files(result) -> dict:
    run_dir = result["run_dir"]
    return {name: json.loads(open(f"{run_dir}/{name}").read()) for name in ("model.json", "parity.json")}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_predicts_the_val_images_as_the_checkpoint_does(exported, fmt):
    result = exported.results[fmt]
    files = _files(result)
    parity = files["parity.json"]
    assert parity["checked"] and parity["passed"]
    assert parity["images"] == len(parity["image_ids"]) == 8  # the smoke run's whole val split
    assert parity["compared"] > 100, parity  # boxes were compared, not skipped at the cuts
    assert parity["max_box_px"] <= parity["tolerance_px"] == 0.5
    assert parity["max_score"] <= parity["tolerance_score"] == 0.01
    assert parity["only_reference"] == parity["only_exported"] == 0
    card = files["model.json"]
    assert card["classes"] == list(SHAPES_CLASSES)
    assert card["format"] == fmt and card["file"] == ("model.pt" if fmt == "torchscript" else "model.onnx")
    assert card["input"]["range"] == [0.0, 1.0] and card["input"]["channels"] == "RGB"
    assert card["transform"]["min_size"] == card["transform"]["max_size"] == 128  # the smoke model's
    assert card["transform"]["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert card["torch"] == torch.__version__ and card["opset"] == (17 if fmt == "onnx" else None)
    assert card["train_run_id"] == exported.trained.result["run_id"]

    client = MlflowClient(tracking_uri=exported.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["detexp.train_run_id"] == exported.trained.result["run_id"]
    assert {a.path for a in client.list_artifacts(result["run_id"])} >= {card["file"], "model.json", "parity.json"}


def test_the_torchscript_file_is_called_as_docs_deploy_says(exported):
    model = torch.jit.load(exported.results["torchscript"]["model"])
    image = exported.images[0][1]
    with torch.inference_mode():
        losses, detections = model([image, image.flip(-1)])  # a list of images, any sizes
    assert losses == {} and len(detections) == 2
    assert set(detections[0]) == {"boxes", "labels", "scores"} and detections[0]["boxes"].shape[1] == 4
    assert int(detections[0]["labels"].min()) >= 1  # label i is classes[i - 1]


def test_detexps_own_run_of_the_torchscript_file_prints_no_warning(exported):
    """The parity check (and anything else detexp runs the file for) says nothing about
    torchvision's scripted (losses, detections) return: a warning users cannot act on."""
    run = load_exported(Path(exported.results["torchscript"]["model"]), "torchscript")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detections = run(exported.images[0][1])
    assert set(detections) == {"boxes", "labels", "scores"}
    assert [str(w.message) for w in caught] == []


def test_the_onnx_file_takes_any_image_size_in_onnxruntime(exported):
    session = onnxruntime.InferenceSession(exported.results["onnx"]["model"], providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and image_input.shape == [3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    image = exported.images[0][1]
    for pixels in (image, torch.nn.functional.interpolate(image[None], size=(90, 200))[0]):
        boxes, labels, scores = session.run(None, {"image": pixels.numpy()})
        assert boxes.shape == (len(labels), 4) and labels.dtype == np.int64 and len(scores) == len(labels)
        assert boxes[:, 2].max() <= pixels.shape[2] and boxes[:, 3].max() <= pixels.shape[1]  # the input's pixels


def test_a_corrupted_export_fails_the_parity_check_with_its_figures(exported, tmp_path):
    """One weight of the box regression changed in the ONNX file: the check says by how much
    the boxes moved, in one line."""
    model = onnx.load(exported.results["onnx"]["model"])
    bbox_pred = next(i for i in model.graph.initializer if "bbox_pred.weight" in i.name)
    weights = onnx.numpy_helper.to_array(bbox_pred).copy()
    weights *= 1.5
    bbox_pred.CopyFrom(onnx.numpy_helper.from_array(weights, bbox_pred.name))
    corrupted = tmp_path / "model.onnx"
    onnx.save(model, corrupted)

    with pytest.raises(ParityError) as failed:
        check_parity(corrupted, "onnx", exported.reference, exported.images, exported.settings, tmp_path / "parity.json")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("parity check failed: model.onnx against the PyTorch model: ")
    assert "(tolerance 0.5)" in message and "(tolerance 0.01)" in message
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert not parity["passed"]
    assert parity["max_box_px"] > 0.5 or parity["only_reference"] + parity["only_exported"] > 0
    assert f"boxes within {parity['max_box_px']:.4g} px" in message


@pytest.mark.no_mlflow_store
def test_impossible_settings_are_refused_before_anything_starts(tmp_path):
    for override, named in (("export.tolerance_px=-1", "export.tolerance_px=-1"), ("export.opset=9", "export.opset=9"),
                            ("export.parity_images=-2", "export.parity_images=-2")):
        overrides = ["checkpoint=nowhere", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", override]
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            export(compose_train(overrides, config_name="export"), tmp_path / "run", overrides)
    overrides = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        export(compose_train(overrides, config_name="export"), tmp_path / "run", overrides)
    assert not (tmp_path / "mlflow.db").exists()
