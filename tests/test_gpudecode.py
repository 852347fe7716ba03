"""torchvision's batched JPEG decoder (`convcache.gpudecode`, nvJPEG on a GPU) and extract's use of it.

The decoder's own tests need torch and torchvision (skipped without them: the CI's environment has neither; on
this project's CPU machines they ran with PyPI's torch 2.14.1 / torchvision 0.29.1, on their CPU path, which is
the same code as the GPU's but for the device). The engine's side - batching on the decoder's thread, Pillow for
what it leaves, decode once, the decoder recorded with the run's device, a decoder that cannot start - is tested
everywhere, with OpenCV's JPEG decoder standing in for torchvision's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, run_cli
from PIL import Image

from convcache import gpudecode
from convcache.errors import ConvcacheError
from convcache.extract import FeatureStore
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.imaging import decode_image

needs_torchvision = pytest.mark.skipif(gpudecode.unavailable("cpu") is not None,
                                       reason=f"torchvision: {gpudecode.unavailable('cpu')}")


def extract(model, data, out, **kw):
    kw.setdefault("progress", False)
    return run_extract(ExtractConfig(model=str(model), data=str(data), output=str(out), **kw))


def jpeg(pixels: np.ndarray, orientation: int = 1, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def quadrants(h: int = 120, w: int = 200) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def photo(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """Smooth colour fields, a fine texture (a 3-pixel pattern) and noise: a photo's mix of frequencies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    yy, xx = y / max(h, w), x / max(h, w)
    img = np.stack([128 + 100 * np.sin(6 * xx + 3 * yy), 128 + 100 * np.cos(5 * yy), 90 + 80 * xx], -1)
    img += 40 * np.sign(np.sin(2.1 * x) + np.sin(1.7 * y))[..., None]
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the choice of decoder (no torch needed)

def test_the_decoder_choice_follows_the_device_and_refuses_what_it_cannot_honour(monkeypatch):
    monkeypatch.setattr(gpudecode, "torchvision_installed", lambda: True)
    assert gpudecode.resolve_decoder("auto", "cuda") == "nvjpeg"
    assert [gpudecode.resolve_decoder("auto", w) for w in ("cpu", "openvino", "null", None)] == ["pillow"] * 4
    assert gpudecode.resolve_decoder("pillow", "cuda") == "pillow"
    assert gpudecode.resolve_decoder("nvjpeg", "null") == "nvjpeg"  # the pipeline's ceiling with GPU decoding
    assert gpudecode.resolve_decoder("torchvision-cpu", "cpu") == "torchvision-cpu"
    with pytest.raises(ConvcacheError, match="not on a Dask cluster"):
        gpudecode.resolve_decoder("nvjpeg", None)
    with pytest.raises(ConvcacheError, match="one of auto, pillow"):
        gpudecode.resolve_decoder("nvjpg", "cuda")
    # resuming a store whose rows Pillow decoded (any made before decoders were recorded): auto keeps to Pillow
    assert gpudecode.resolve_decoder("auto", "cuda", {"pillow"}) == "pillow"
    assert gpudecode.resolve_decoder("auto", "cuda", {"nvjpeg"}) == "nvjpeg"
    assert gpudecode.resolve_decoder("nvjpeg", "cuda", {"pillow"}) == "nvjpeg"  # asked for: refused later, by name
    monkeypatch.setattr(gpudecode, "torchvision_installed", lambda: False)
    assert gpudecode.resolve_decoder("auto", "cuda") == "pillow"  # no torchvision: auto never fails
    with pytest.raises(ConvcacheError, match=r"needs torch and torchvision \(pip install 'convcache\[nvjpeg\]'\)"):
        gpudecode.resolve_decoder("nvjpeg", "cuda")


def test_draft_scale_is_pillows_rule():
    """The reduction each photo gets before its resize is the one Pillow's draft mode decodes it at."""
    for w, h in ((500, 375), (299, 300), (150, 150), (149, 600), (2000, 1500), (4000, 3000), (1200, 301)):
        img = Image.open(io.BytesIO(jpeg(np.zeros((h, w, 3), np.uint8))))
        img.draft("RGB", (150, 150))
        assert -(-w // gpudecode.draft_scale(w, h, 150)) == img.size[0], (w, h)


def test_the_header_walk_reads_what_pillow_reads():
    """`gpudecode.header` walks the JPEG markers itself (Pillow's parser was most of the path's Python a photo): it
    must give Pillow's (orientation, pixels) for every file the path takes, and take none that Pillow's would not."""
    def pillow(data, max_pixels=10**9):
        return gpudecode._pillow_header(data, max_pixels)

    cases = [jpeg(quadrants(), o) for o in range(1, 9)] + [jpeg(photo(60, 80)), jpeg(photo(60, 80)[..., 0])]
    prog = io.BytesIO()
    Image.fromarray(photo(60, 80)).save(prog, "JPEG", progressive=True)
    cmyk = io.BytesIO()
    Image.fromarray(photo(60, 80)).convert("CMYK").save(cmyk, "JPEG")
    no_tag = io.BytesIO()  # EXIF without an orientation
    exif = Image.Exif()
    exif[0x010F] = "maker"
    Image.fromarray(photo(60, 80)).save(no_tag, "JPEG", exif=exif.tobytes())
    mm = jpeg(photo(60, 80), 6)  # Pillow writes EXIF big-endian (MM); the same block little-endian (II), as 8:
    little_endian = mm.replace(b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06",
                               b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x08\x00")
    assert little_endian != mm  # (the big-endian block was there to swap)
    garbled = jpeg(photo(60, 80), 3).replace(b"Exif\x00\x00MM\x00*", b"Exif\x00\x00XX\x00*")
    segments, i, d = [], 2, jpeg(photo(60, 80), 5)  # the EXIF block moved after the frame header (Pillow reads it)
    while d[i + 1] != 0xDA:
        n = int.from_bytes(d[i + 2 : i + 4], "big")
        segments.append(d[i : i + 2 + n])
        i += 2 + n
    exif_block = next(x for x in segments if x[1] == 0xE1)
    frame = next(x for x in segments if x[1] == 0xC0)
    late = d[:2] + b"".join(x for x in segments if x is not exif_block).replace(frame, frame + exif_block) + d[i:]
    assert late != d and len(late) == len(d)
    cases += [prog.getvalue(), cmyk.getvalue(), no_tag.getvalue(), little_endian, garbled, late]
    for k, data in enumerate(cases):
        assert gpudecode.header(data, 10**9) == pillow(data), k
    assert gpudecode.header(little_endian, 10**9) == (8, 4800)  # II order read as such
    assert gpudecode.header(late, 10**9) == (5, 4800)
    assert gpudecode.header(cases[0], 10**9) == (1, 24000) and gpudecode.header(cases[5], 10**9) == (6, 24000)
    assert gpudecode.header(cmyk.getvalue(), 10**9) is None and gpudecode.header(b"\x89PNG\r\n", 10**9) is None
    assert gpudecode.header(cases[0], 23999) is None and gpudecode.header(cases[0][:40], 10**9) is None


def test_without_torchvision_the_decoder_is_a_one_line_error_and_nothing_is_written(extractor, tmp_path,
                                                                                      monkeypatch):
    if gpudecode.torchvision_installed():
        pytest.skip("torchvision is installed here")
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "s.zarr", "--decoder", "nvjpeg", "-q")
    assert r.returncode != 0 and "needs torch and torchvision" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------- the engine's side, with a stand-in decoder

class OpenCVDecoder:
    """Stands in for `gpudecode.TorchDecoder` (the same `decode(datas, size, max_pixels)` contract) where torch is
    not installed: JPEGs by OpenCV's libjpeg, resized with its area filter; anything else (PNG, a file named in
    not ending with JPEG's end marker: truncated) left to Pillow, as the real one leaves what it does not take."""

    calls: list = []
    fail_after: int | None = None  # raise on every call from this one on
    start_error: str | None = None

    def __init__(self, device: str = "cuda"):
        if OpenCVDecoder.start_error:
            raise RuntimeError(OpenCVDecoder.start_error)
        self.device, self.name, self.decoded = device, "nvjpeg", 0

    def decode(self, datas, size, max_pixels=None):
        import cv2

        OpenCVDecoder.calls.append(len(datas))
        if OpenCVDecoder.fail_after is not None and len(OpenCVDecoder.calls) > OpenCVDecoder.fail_after:
            raise RuntimeError("CUDA out of memory (simulated)")
        out = []
        for d in datas:
            if d[:2] != b"\xff\xd8" or not d.endswith(b"\xff\xd9"):
                out.append(None)
                continue
            bgr = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
            out.append(None if bgr is None else
                       np.ascontiguousarray(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[..., ::-1]))
        self.decoded += sum(o is not None for o in out)
        return out


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(gpudecode, "torchvision_installed", lambda: True)
    monkeypatch.setattr(gpudecode, "TorchDecoder", OpenCVDecoder)
    OpenCVDecoder.calls, OpenCVDecoder.fail_after, OpenCVDecoder.start_error = [], None, None
    return OpenCVDecoder


def _mixed_dataset(root: Path) -> Path:
    """12 train JPEGs and 8 validation ones (conftest), plus a PNG (not the decoder's), and a corrupt JPEG."""
    make_dataset(root)
    Image.fromarray(photo(48, 40, seed=5)).save(root / "train" / "cats" / "cat.png.png")
    good = (root / "train" / "dogs" / "dogs.0.jpg").read_bytes()
    (root / "train" / "dogs" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_the_decoder_takes_the_jpegs_in_batches_pillow_the_rest_each_image_once(extractor, tmp_path, stand_in):
    """--decoder nvjpeg: the decoder decodes every JPEG it takes, once per run (copies are warps of it); Pillow
    decodes the PNG (its rows bitwise those of a Pillow run) and tries the file the decoder could not, skipped
    with Pillow's reason; the decoder is recorded with the run's device, so a Pillow resume is refused."""
    data = _mixed_dataset(tmp_path / "data")
    s = extract(extractor, data, tmp_path / "gpu.zarr", augment=2, decoder="nvjpeg", workers=2)
    ref = extract(extractor, data, tmp_path / "pillow.zarr", augment=2, decoder="pillow", workers=2)
    assert s.decoder == "nvjpeg" and ref.decoder == "pillow"
    assert s.rows_written == ref.rows_written == 13 * 3 + 8 and set(s.skipped) == set(ref.skipped)
    broken = next(iter(s.skipped))
    assert broken.endswith("broken.jpg") and s.skipped[broken] == ref.skipped[broken]  # Pillow's own reason
    assert s.decodes == 21 and s.decoded_by_decoder == 20  # each image once: 20 JPEGs by the decoder, the PNG by Pillow
    assert sum(stand_in.calls) == 21 + 1  # the corrupt one was offered too (and left); no image offered twice
    a, b = FeatureStore(tmp_path / "gpu.zarr"), FeatureStore(tmp_path / "pillow.zarr")
    ta, tb = a.load("train"), b.load("train")
    png = [i for i, p in enumerate(ta.paths) if p.endswith(".png")]
    assert len(png) == 3 and [tb.paths[i] for i in png] == [ta.paths[i] for i in png]
    np.testing.assert_array_equal(ta.features[png], tb.features[png])  # Pillow's pixels: Pillow's rows
    jpg = [i for i in range(len(ta.paths)) if i not in png]
    assert not np.array_equal(ta.features[jpg], tb.features[jpg])  # another decoder's pixels
    assert {"provider": "CPUExecutionProvider", "math": "fp32", "decoder": "nvjpeg"} in a.attrs("train")["devices"]
    assert a.runs("train")[-1]["decoder"] == "nvjpeg" and b.runs("train")[-1]["decoder"] == "pillow"
    assert a.decoders() == {"nvjpeg"} and b.decoders() == {"pillow"}  # what `--decoder auto` keeps to on a resume
    with pytest.raises(ConvcacheError, match=r"decoded by nvjpeg\).*--allow-mixed"):
        extract(extractor, data, tmp_path / "gpu.zarr", augment=3, decoder="pillow")
    with pytest.raises(ConvcacheError, match=r"this run is on CPUExecutionProvider \(fp32, decoded by nvjpeg\)"):
        extract(extractor, data, tmp_path / "pillow.zarr", augment=3, decoder="nvjpeg")


def test_auto_on_cuda_is_told_what_decoded_the_rows_the_store_holds(extractor, tmp_path, monkeypatch):
    """A store made before decoders were recorded (or by Pillow) is resumed on CUDA with --decoder auto: the choice
    is made knowing its rows are Pillow's (so auto keeps to Pillow, not a refusal the user never asked for)."""
    from convcache.extract import runner

    data = make_dataset(tmp_path / "data", splits={"train": 3})
    extract(extractor, data, tmp_path / "s.zarr", decoder="pillow")
    seen = []

    def resolve(choice, where, held=frozenset()):
        seen.append((choice, where, held))
        raise ConvcacheError("stop here")

    monkeypatch.setattr(runner, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(runner, "resolve_decoder", resolve)
    for out in ("s.zarr", "new.zarr"):
        with pytest.raises(ConvcacheError, match="stop here"):
            extract(extractor, data, tmp_path / out)
    assert seen == [("auto", "cuda", {"pillow"}), ("auto", "cuda", set())]


def test_files_not_read_by_the_hashing_are_read_by_the_decoder_and_a_failing_call_falls_back_to_pillow(
        extractor, tmp_path, stand_in):
    """A resume whose hashes come from the stat cache reads nothing while hashing: the decoder's thread reads the
    files (checking each still hashes as recorded). A decoder call that raises (out of GPU memory) leaves its
    images to Pillow: the run completes, every row there."""
    import os
    import time

    data = make_dataset(tmp_path / "data")
    for f in data.rglob("*.jpg"):  # not "racily clean": their hashes may be cached
        os.utime(f, (time.time() - 100, time.time() - 100))
    first = extract(extractor, data, tmp_path / "s.zarr", augment=1, decoder="nvjpeg")
    assert first.files_hashed == 20 and first.decoded_by_decoder == 20
    stand_in.calls.clear()
    again = extract(extractor, data, tmp_path / "s.zarr", augment=2, decoder="nvjpeg")
    assert again.files_from_stat_cache == 20 and again.rows_written == 12 and again.decoded_by_decoder == 12
    stand_in.calls.clear()
    stand_in.fail_after = 0
    pillow = extract(extractor, data, tmp_path / "t.zarr", augment=1, decoder="nvjpeg")
    assert pillow.rows_written == 12 * 2 + 8 and not pillow.skipped and pillow.decoded_by_decoder == 0
    assert pillow.decodes == 20 and stand_in.calls  # offered, failed, decoded by Pillow


def test_a_decoder_that_cannot_start_fails_the_run_before_any_row(extractor, tmp_path, stand_in):
    data = make_dataset(tmp_path / "data")
    stand_in.start_error = "torch 2.14.1 sees no CUDA device"
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "s.zarr", "--decoder", "nvjpeg",
                "-q")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "torchvision's decoder (nvjpeg) could not start (RuntimeError: torch 2.14.1 sees no CUDA device)" in r.stderr
    assert "--decoder pillow" in r.stderr
    store = FeatureStore(tmp_path / "s.zarr")
    assert all(store.rows(split) == 0 and not store.attrs(split).get("devices") for split in store.splits)


# ---------------------------------------------------------------- torchvision's decoder itself

@needs_torchvision
def test_each_exif_orientation_is_made_upright_as_pillow_does():
    dec = gpudecode.TorchDecoder("cpu")
    for orientation in range(1, 9):
        data = jpeg(quadrants(), orientation)
        got, want = dec.decode([data], SIZE)[0], decode_image(data, SIZE)
        assert np.abs(got.astype(int) - want).mean() < 1.0, orientation
    upright = dec.decode([jpeg(quadrants(), 6)], SIZE)[0]  # a wrong turn would be far off
    assert np.abs(upright.astype(int) - decode_image(jpeg(quadrants(), 8), SIZE)).mean() > 50


@needs_torchvision
def test_photos_decode_within_a_level_of_pillow_at_every_draft_scale():
    """Full decode, block average by the draft factor, antialiased bilinear: within ~1 level of Pillow's draft
    decode on average at factors 1, 2, 4 and 8 (measured 0.08-0.68 levels; without the block average 2.6-5.6 at
    factors 2-8)."""
    dec = gpudecode.TorchDecoder("cpu")
    for h, w in ((150, 200), (375, 500), (700, 1000), (1300, 1300)):
        data = jpeg(photo(h, w), quality=90)
        got, want = dec.decode([data], 150)[0], decode_image(data, 150)
        assert got.shape == want.shape == (150, 150, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).mean() < 1.0, (h, w)


@needs_torchvision
def test_what_the_decoder_does_not_take_is_left_to_pillow_and_one_bad_file_spoils_no_other():
    dec = gpudecode.TorchDecoder("cpu")
    good = jpeg(photo(100, 120))
    png = io.BytesIO()
    Image.fromarray(photo(60, 60)).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.fromarray(photo(60, 60)).convert("CMYK").save(cmyk, "JPEG")
    grey = io.BytesIO()
    Image.fromarray(photo(60, 60)[..., 0]).save(grey, "JPEG")
    truncated = good[: len(good) // 2]
    out = dec.decode([good, png.getvalue(), cmyk.getvalue(), truncated, b"\xff\xd8 not a jpeg", grey.getvalue(),
                      good], SIZE, max_pixels=1_000_000)
    assert [o is None for o in out] == [False, True, True, True, True, False, False]
    np.testing.assert_array_equal(out[0], out[6])
    assert np.abs(out[5].astype(int) - decode_image(grey.getvalue(), SIZE)).mean() < 1.0  # grey -> RGB as Pillow
    assert dec.decode([good], SIZE, max_pixels=100 * 119)[0] is None  # over the pixel limit: Pillow refuses it


@needs_torchvision
def test_a_batch_of_mixed_shapes_and_orientations_gives_each_photo_what_it_gives_alone(monkeypatch):
    """Photos of one shape and orientation are reduced and resized together, a call's photos split by their pixels
    (CALL_PIXELS a decode call, FLOAT_PIXELS a resize): each comes back in its place, with the bytes it gets
    decoded alone."""
    dec = gpudecode.TorchDecoder("cpu")
    datas = [jpeg(photo(375, 500, seed=1)), jpeg(photo(300, 200, seed=2)), jpeg(photo(375, 500, seed=3), 6),
             jpeg(photo(375, 500, seed=4)), jpeg(photo(300, 200, seed=5), 3), jpeg(photo(375, 500, seed=6))]
    together = dec.decode(datas, 64)
    assert dec.batches == 1
    for d, got in zip(datas, together):
        np.testing.assert_array_equal(got, dec.decode([d], 64)[0])
    assert len({g.tobytes() for g in together}) == 6
    monkeypatch.setattr(gpudecode, "CALL_PIXELS", 2 * 375 * 500)  # 3 calls of 2 photos each
    monkeypatch.setattr(gpudecode, "FLOAT_PIXELS", 375 * 500)  # each 375 x 500 resized alone
    dec.batches = 0
    split = dec.decode(datas, 64)
    assert dec.batches == 3 and all(np.array_equal(a, b) for a, b in zip(split, together))


@needs_torchvision
def test_a_store_decoded_by_torchvision_is_close_to_pillows(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "data")
    s = extract(pooled_extractor, data, tmp_path / "tv.zarr", augment=1, decoder="torchvision-cpu")
    assert s.decoder == "torchvision-cpu" and s.decoded_by_decoder == s.decodes == 20
    extract(pooled_extractor, data, tmp_path / "pil.zarr", augment=1)
    a, b = FeatureStore(tmp_path / "tv.zarr").load("train"), FeatureStore(tmp_path / "pil.zarr").load("train")
    assert a.paths == b.paths and np.array_equal(a.copy, b.copy)
    fa, fb = a.features.reshape(len(a), -1), b.features.reshape(len(b), -1)
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(fa, fb)


@needs_torchvision
def test_the_null_bench_measures_torchvisions_decoder_beside_pillows(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4})
    r = run_cli("bench", "extract", "--device", "null", "--data", data, "--images", 8, "--augment", 2, "--model",
                pooled_extractor, "--size", SIZE, "--batch-size", 4, "--workers", 2, "--decoder", "torchvision-cpu")
    assert r.returncode == 0, r.stderr
    arm = next(x for x in r.stdout.splitlines() if x.startswith("| --decoder torchvision-cpu |"))
    assert arm.rstrip("| ").endswith("| 8")  # each photo decoded once, by torchvision


def test_info_says_which_decoders_this_machine_has_and_a_store_which_made_its_rows(extractor, tmp_path, stand_in):
    r = run_cli("info", "--runtime")
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("decoders:"))
    assert line.split(":", 1)[1].strip().startswith("pillow")
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    extract(extractor, data, tmp_path / "s.zarr", decoder="nvjpeg")
    assert "made on CPUExecutionProvider (fp32, decoded by nvjpeg)" in run_cli("info", tmp_path / "s.zarr").stdout


def test_fit_and_compare_pass_the_device_and_decoder_to_extract_and_refuse_a_bad_one_before_any_export(
        tmp_path, monkeypatch):
    """`fit` and `compare` extract as `extract` does: --device and --decoder reach the extract they run, and a
    decoder that cannot be honoured is refused before the export: an unknown one by the config, torchvision's
    without torchvision when the run starts."""
    import convcache.extract.runner as runner
    from convcache.cli import build_parser
    from convcache.pipeline import compare, fit

    seen = []
    monkeypatch.setattr(runner, "run_extract", lambda cfg: seen.append(cfg) or runner.ExtractSummary())
    (tmp_path / "d").mkdir()
    parser = build_parser()
    args = parser.parse_args(["fit", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "f"), "--device", "cpu",
                              "--decoder", "pillow"])
    cfg = fit.FitConfig(data=args.data, output=args.output, device=args.device, decoder=args.decoder)
    fit._extract(cfg, tmp_path / "x.onnx", tmp_path / "s.zarr", 2)
    args = parser.parse_args(["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "c"), "--device",
                              "openvino", "--decoder", "pillow"])
    compare._extract(compare.CompareConfig(data=args.data, output=args.output, device=args.device,
                                           decoder=args.decoder), tmp_path / "x.onnx", tmp_path / "s.zarr")
    assert [(c.device, c.decoder) for c in seen] == [("cpu", "pillow"), ("openvino", "pillow")]
    assert parser.parse_args(["compare", "--data", "d", "-o", "c"]).decoder == "auto"
    with pytest.raises(ConvcacheError, match="--decoder jpegli: one of"):
        fit.FitConfig(data=str(tmp_path / "d"), output=str(tmp_path / "f"), decoder="jpegli")
    monkeypatch.setattr(gpudecode, "torchvision_installed", lambda: False)
    # (a config naming it is still made: compare --report-only reads back one a GPU box wrote)
    for run in (lambda: fit.run_fit(fit.FitConfig(data=str(tmp_path / "d"), output=str(tmp_path / "f"),
                                                  decoder="nvjpeg")),
                lambda: compare.run_compare(compare.CompareConfig(data=str(tmp_path / "d"),
                                                                  output=str(tmp_path / "c"), decoder="nvjpeg"))):
        with pytest.raises(ConvcacheError, match="needs torch and torchvision"):
            run()
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()
    r = run_cli("fit", "--data", tmp_path / "d", "-o", tmp_path / "f2", "--decoder", "torchvision-cpu", "-q")
    if not gpudecode.torchvision_installed():  # (the CI's environment): one line, and no export started
        assert r.returncode not in (0, 1) and "Traceback" not in r.stderr and "needs torch" in r.stderr, r.stderr
        assert not (tmp_path / "f2").exists()
