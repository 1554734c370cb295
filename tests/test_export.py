"""Export (--export, beyond.predict.export): one file, preprocessing and net, that gives
--predict's probabilities with torch alone (.pt2) or under onnxruntime (.onnx)."""
import contextlib
import inspect
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from beyond import UserError, checkpoints, cli, datasets, photos, predict

from conftest import HERE, full_disk, run_cli, sideways, write_folder


EXPORTED = """
import json, sys
sys.modules["torchvision"] = None  # torch alone: the file needs nothing else
import numpy as np, torch
from PIL import Image
about = {"classes": "", "input": ""}
model = torch.export.load(sys.argv[1], extra_files=about).module()
images = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
          for path in sys.argv[2:]]
alone = [model(image[None])[0].tolist() for image in images]
batch = model(torch.stack(images[:-1])).tolist()  # the test images, all of one size
ours = [name for name in ("data", "finetune", "models", "train", "beyond") if name in sys.modules]
print(json.dumps(dict(about, alone=alone, batch=batch, ours=ours)))
"""


def decoded(path):
    """An image as decoded, the exported file's input: uint8 RGB, (3, height, width)."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def trained_to_export(root, folder, *mode):
    """A run of one epoch, its test images and a photo of another size, and --predict's
    probabilities for them in fp32. Every resize is by a scale whose antialiased weights are binary
    fractions (40x48 to 256; the photo by 1/2 and 1/4), where onnxruntime's uint8 resize gives
    torch's pixels to the bit: the files then differ from predict only in the order of fp32 sums
    (docs/tests.md gives the figures)."""
    assert finetune.main([*mode, "--data-dir", folder, "--epochs", "1", "--batch-size", "4",
                          "--workers", "0", "--out", str(root / "run")]) == 0
    paths = [p for p, _ in datasets.image_folders(folder)[1].samples] + [str(root / "photo.jpg")]
    resize = checkpoints.load_checkpoint(root / "run" / "model.pt")["transform"]["resize"]
    pixels = np.random.default_rng(1).integers(0, 256, (2 * resize, 4 * resize, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(paths[-1])
    predictions = predict.predict(root / "run", paths, precision="fp32", workers=0)
    probs = torch.tensor([list(p.probabilities.values()) for p in predictions])
    # images told apart, or the comparisons prove nothing
    assert probs[:, 0].max() - probs[:, 0].min() > 0.01
    return root / "run", paths, probs


def png_48_bits(path, pixels):
    """A 16-bit RGB PNG (PIL writes none): pixels (height, width, 3) of uint16."""
    def chunk(kind, body):
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    height, width, _ = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, RGB
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # each unfiltered
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def photos_of_every_kind(folder):
    """One picture (128x64: resized to 256 by exact scales) as every kind of file --predict reads
    (PIL reads rgb16.png as 8 bits itself; the others need the decoding)."""
    rgb = np.random.default_rng(2).integers(10, 120, (64, 128, 3)).astype(np.uint8)
    grey = rgb.mean(axis=2).astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "grey16.png")
    Image.fromarray(grey).save(folder / "grey16.tif")
    Image.fromarray((grey / 65535).astype(np.float32)).save(folder / "float.tif")
    png_48_bits(folder / "rgb16.png", rgb.astype(np.uint16) * 257 + 100)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    sideways(Image.fromarray(rgb), folder / "turned.jpg")
    kinds = {"grey16.png": "I;16", "grey16.tif": "I;16", "float.tif": "F", "rgb16.png": "RGB",
             "cmyk.jpg": "CMYK", "palette.png": "P", "turned.jpg": "RGB"}
    assert {kind: Image.open(folder / kind).mode for kind in kinds} == kinds
    return [str(folder / kind) for kind in kinds]


def docs_snippets_agree_with_predict(run, model_file, folder):
    """docs/use-elsewhere.md's decoding and its snippet for model_file's format, run as written on
    photos of every kind, print --predict --precision fp32's class and probability; with PIL's
    plain convert("RGB") in place of the decoding, they would not, where the decoding matters."""
    text = open(os.path.join(HERE, "docs", "use-elsewhere.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    decoding = next(b for b in blocks if b.startswith("# read a photo as --predict does"))
    assert (inspect.getsource(photos.upright_rgb) in decoding
            and inspect.getsource(photos.eight_bits) in decoding)  # --predict's, word for word
    snippet = next(b for b in blocks if f'"best.{model_file.suffix[1:]}"' in b)
    load, use = re.sub(r'"best\.\w+"', repr(str(model_file)), snippet).split("photo = ")
    scope = {}
    exec(decoding + load, scope)
    paths = photos_of_every_kind(folder)
    expected = dict(zip(paths, predict.predict(run, paths, precision="fp32", workers=0)))

    def off(path, decode):  # how far what the snippet prints is from --predict's
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec("photo = " + use.replace('"photo.jpg"', repr(path)),
                 dict(scope, upright_rgb=decode))
        label, probability = printed.getvalue().split()
        return abs(float(probability) - expected[path].probabilities[label])
    assert [path for path in paths if off(path, scope["upright_rgb"]) >= 6e-4] == []
    plain = [os.path.basename(p) for p in paths if off(p, lambda img: img.convert("RGB")) >= 6e-4]
    assert plain == ["grey16.png", "grey16.tif", "float.tif", "turned.jpg"]  # or it proves nothing


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, folder):
    return trained_to_export(tmp_path_factory.mktemp("export"), folder, "--pretrained")


def test_export_pt2_loads_with_torch_alone_and_gives_predicts_probabilities(
        exported_run, tmp_path, capsys):
    run, paths, probs = exported_run
    status, out, err = run_cli(capsys, "--export", run)
    assert status == 0 and out == f"wrote {run / 'best.pt2'}\n", err
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", EXPORTED, run / "best.pt2", *paths],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    result = json.loads(result.stdout)
    assert result["ours"] == [] and json.loads(result["classes"]) == ["hotdog", "not-hotdog"]
    assert result["input"].startswith("images: uint8 RGB pixels as decoded, "
                                      "shape (batch, 3, height, width), any")
    torch.testing.assert_close(torch.tensor(result["alone"]), probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(result["batch"]), probs[:-1], rtol=0, atol=1e-4)
    docs_snippets_agree_with_predict(run, run / "best.pt2", tmp_path)


def test_export_onnx_under_onnxruntime_gives_predicts_probabilities(exported_run, tmp_path, capsys):
    for exporter in ("onnx", "onnxscript"):  # what --export-format onnx needs
        pytest.importorskip(exporter)
    onnxruntime = pytest.importorskip("onnxruntime")
    run, paths, probs = exported_run
    status, out, err = run_cli(capsys, "--export", run / "best.pt", "--export-format", "onnx",
                               "--out", tmp_path / "hotdog.onnx")
    assert (status == 0 and out == f"wrote {tmp_path / 'hotdog.onnx'}\n"
            and os.listdir(tmp_path) == ["hotdog.onnx"])
    session = onnxruntime.InferenceSession(tmp_path / "hotdog.onnx")
    about = session.get_modelmeta().custom_metadata_map
    assert (json.loads(about["classes"]) == ["hotdog", "not-hotdog"]
            and "(batch, 3, height, width)" in about["input"])
    alone = [session.run(None, {"images": decoded(p)[None].numpy()})[0][0] for p in paths]
    batch = session.run(None, {"images": torch.stack([decoded(p) for p in paths[:-1]]).numpy()})[0]
    torch.testing.assert_close(torch.tensor(np.array(alone)), probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(batch), probs[:-1], rtol=0, atol=1e-4)
    docs_snippets_agree_with_predict(run, tmp_path / "hotdog.onnx", tmp_path)


def test_export_of_another_family_gives_predicts_probabilities(tmp_path):
    # convnext: LayerNorm, a resize to 236; mobilenet and efficientnet from random weights give
    # every image the same probabilities, which would prove nothing
    folder = write_folder(tmp_path / "data", size=(59, 118))  # to 236: by 4 and 2, bit-exact
    run, paths, probs = trained_to_export(tmp_path, folder, "--scratch", "--arch", "convnext_tiny")
    assert predict.export(run / "model.pt") == str(run / "model.pt2")  # named after the checkpoint
    extra = {"classes": "", "input": ""}
    model = torch.export.load(run / "model.pt2", extra_files=extra).module()
    torch.testing.assert_close(torch.cat([model(decoded(p)[None]) for p in paths]), probs, rtol=0,
                               atol=1e-4)
    assert (json.loads(extra["classes"]) == ["hotdog", "not-hotdog"]
            and "resized to 236x236 (bilinear" in extra["input"])
    for exporter in ("onnx", "onnxscript"):
        pytest.importorskip(exporter)
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(predict.export(run, format="onnx"))
    alone = np.concatenate([session.run(None, {"images": decoded(p)[None].numpy()})[0]
                            for p in paths])
    torch.testing.assert_close(torch.tensor(alone), probs, rtol=0, atol=1e-4)


def test_export_bad_input_is_one_line_and_leaves_nothing(
        exported_run, tmp_path, capsys, monkeypatch):
    run, _, _ = exported_run
    best = (run / "best.pt").read_bytes()
    status, _, err = run_cli(capsys, "--export", run, "--out", run / "best.pt")
    assert status == 2 and "is not a .pt2 file; give --out a name that ends in .pt2" in err, err
    assert (run / "best.pt").read_bytes() == best
    # pt2 by default
    status, _, err = run_cli(capsys, "--export", run, "--out", tmp_path / "net.onnx")
    assert status == 2 and err.endswith("net.onnx is not a .pt2 file; give --export-format onnx "
                                        "to export onnx\n"), err
    # a checkpoint named as an export: never written over
    (tmp_path / "named.pt2").write_bytes(best)
    status, _, err = run_cli(capsys, "--export", tmp_path / "named.pt2")
    assert status == 2 and ("is the checkpoint exported, which the export would write over; "
                            "give --out") in err, err
    assert (tmp_path / "named.pt2").read_bytes() == best
    (tmp_path / "empty.pt").touch()
    (tmp_path / "truncated.pt").write_bytes((run / "best.pt").read_bytes()[:100_000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    os.makedirs(tmp_path / "no-run")
    out = tmp_path / "out" / "x.pt2"
    for model, message in ((tmp_path / "empty.pt", "empty.pt is not a checkpoint of this program"),
                           (tmp_path / "truncated.pt",
                            "truncated.pt is not a checkpoint of this program"),
                           (tmp_path / "other.pt",
                            "other.pt is not a checkpoint of this program; give the model.pt"),
                           (tmp_path / "no-run",
                            "no-run holds no model.pt; give the model.pt of a training run")):
        status, _, err = run_cli(capsys, "--export", model, "--out", out)
        assert status == 2 and err.strip().splitlines() == [err.strip()] and message in err, err
    status, _, err = run_cli(capsys, "--export", run, "--out", tmp_path / "empty.pt" / "x.pt2")
    assert (status == 2 and f"cannot write in the folder {tmp_path / 'empty.pt'}" in err
            and "a file stands where a folder would be" in err)
    with monkeypatch.context() as m:
        full_disk(m, "x.pt2", at_call=1)
        status, _, err = run_cli(capsys, "--export", run, "--out", out)
    assert status == 2 and err == (f"error: cannot write {out} (No space left on device); free "
                                   "some space there, or write to another folder\n")
    # not onnx's to name
    for error in (RuntimeError("data-dependent\nx"), ImportError("data-dependent")):
        # every torchvision classifier tried is captured: a failure simulated
        with monkeypatch.context() as m:
            m.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(error))
            status, _, err = run_cli(capsys, "--export", run, "--out", out)
        assert status == 2 and err == ("error: a resnet18 cannot be captured as pt2 "
                                       "(data-dependent); give --export-format onnx, or classify "
                                       "with --predict\n")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        status, _, err = run_cli(capsys, "--export", run, "--export-format", "onnx",
                                 "--out", out.with_suffix(".onnx"))
    assert status == 2 and err.startswith("error: --export-format onnx needs the packages onnx "
                                          "and onnxscript (")
    assert err.strip().endswith("; pip install onnx onnxscript")
    assert os.listdir(tmp_path / "out") == []  # nothing half-written
    with pytest.raises(SystemExit):
        cli.parse_args(["--pretrained", "--export-format", "onnx"])
    with pytest.raises(UserError,
                       match="format=tar is not one this program exports; give format=pt2 or "
                             "format=onnx"):
        predict.export(run, format="tar")


def test_an_exported_file_refuses_other_types_and_a_diverged_net_is_not_exported(
        scratch_run, tmp_path, capsys, monkeypatch):
    run, _ = scratch_run
    out = predict.export(run, tmp_path / "best.pt2")
    model = torch.export.load(out).module()
    for dtype in (torch.int64, torch.bfloat16, torch.float32):
        with pytest.raises(RuntimeError, match="dtype mismatch! Expected: Byte"):
            model(torch.zeros(1, 3, 40, 48, dtype=dtype))
    status, _, err = run_cli(capsys, "--export", out)
    assert status == 2 and "is a file --export wrote; give the run's folder" in err, err
    os.mkdir(tmp_path / "folder.pt2")
    status, _, err = run_cli(capsys, "--export", run, "--out", tmp_path / "folder.pt2")
    assert status == 2 and "is a folder; give --out the name of a file" in err, err
    diverged = torch.load(run / "best.pt", weights_only=True)
    diverged["model"] = {k: v.float() * float("nan") if v.is_floating_point() else v
                         for k, v in diverged["model"].items()}
    torch.save(diverged, tmp_path / "best.pt")
    status, _, err = run_cli(capsys, "--export", tmp_path / "best.pt")
    assert status == 2 and "(NaN): its training diverged" in err and \
        sorted(os.listdir(tmp_path)) == ["best.pt", "best.pt2", "folder.pt2"], err
