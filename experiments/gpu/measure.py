"""Everything issue 29 measures on a GPU, in one command, into --out (gpu.json after every section, gpu.md at the
end), so a 15-minute device loan is one prepared call. Each section is timed and caught on its own: a failure is
recorded and the next section runs.

Sections (rows/s and images/s are medians of --repeats; every ratio is against a peer in the same run):
  env        GPU (nvidia-smi), CPU model and count, ONNX Runtime and its providers, PyTorch/torchvision
  bare       the runtime alone on pre-decoded, pre-augmented pixels: fp32 and fp16, batch 128 and 256, three
             ways: plain (session.run on float32), bound (uint8 through IO binding, the copy to the GPU
             included: what extract does) and prestaged (the batch already on the GPU: the runtime's ceiling)
  decode     Pillow decode + resize in 1 and N processes; nvJPEG (torchvision.io.decode_jpeg on the GPU,
             batched) when torchvision is there; the product's decoder (`extract --decoder nvjpeg`) as it calls
             it, and its pixels against Pillow's and against torchvision's CPU decode
  null       `convcache extract --device null --augment K`: the input pipeline without inference (Pillow in
             processes and in threads, and --decoder nvjpeg)
  pipeline   `convcache extract --device cuda --augment K` as it ships (bound IO, batch by device), plain IO,
             and fp16; each as rows/s and as a ratio to the bare bound rate at the same batch and precision,
             three ways: end to end (the CUDA session's creation included), the run phase (decode, infer,
             write), and for as it ships the marginal rate (every photo against a quarter of them)
  parity     CUDA features (TF32, and --exact) against the CPU's on the same pixels: max abs diff / max |x|
  resume     a store made in one math mode, extended in another: the refusal's text
  probe      fp32 (CPU) and fp16 (CUDA) features of the labelled photos, saved (features.npz) and, when
             scikit-learn is there, the paired probe (`export --probe`'s)
  serve      `convcache bench serve --device cuda --clients 1 4 16 64` on --fused (or --model fused with --head
             here), when the serving extra is there
  predict    `convcache predict`'s loop on the fused model: photos one at a time (predict before stop 43) against
             `Predictor.predict_each` (decoded in threads ahead, a batch an inference call)

On the GPU machine (../shared/gpu/README.md; experiments/gpu/prepare.sh fills .gpu/):
    . .gpu/w/setup.sh && python3 experiments/gpu/measure.py --model /tmp/parts/ext.onnx \
        --head .gpu/w/head --data .gpu/data --out $OUT
Here, on the CPU, the same script end to end at a small size (what tests/test_experiments.py runs):
    .venv/bin/python experiments/gpu/measure.py --device cpu --quick --model runs/ext.onnx --data DIR --out /tmp/g
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def this_checkout() -> None:
    """Measure this checkout's convcache (it travels with every device call), never a copy found ahead of it:
    setup.sh puts /tmp/site, with the project's wheel from prepare.sh, first on PYTHONPATH, and a wheel left from
    an older prepare.sh would measure old code. If convcache would be found elsewhere, the script starts again
    with the checkout first on PYTHONPATH (as `PYTHONPATH=. python3 experiments/...` would), which the processes
    it starts inherit."""
    import importlib.util

    spec = importlib.util.find_spec("convcache")
    if spec and spec.origin and Path(spec.origin).resolve().parent == ROOT / "convcache":
        return
    if os.environ.get("CONVCACHE_MEASURE_RESTARTED"):
        raise SystemExit(f"convcache is found at {spec and spec.origin}, not in {ROOT}, even with the checkout "
                         "first on PYTHONPATH")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "PYTHONPATH": path, "CONVCACHE_MEASURE_RESTARTED": "1"})

# issue 29's own figures first; predict (stop 43) last
SECTIONS = ("env", "bare", "decode", "null", "pipeline", "parity", "resume", "probe", "serve", "predict")


def timed(fn, n_items: int, repeats: int) -> tuple[float, list[float]]:
    """Median items/s of `repeats` calls of fn (after one warm-up call), and every rate."""
    fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(n_items / (time.perf_counter() - t))
    return float(np.median(rates)), [round(r, 1) for r in rates]


def photos(data: str, limit: int) -> list:
    from convcache.datasets import discover

    items, _ = discover(data)
    items = sorted(items, key=lambda i: i.path)
    return items[:: max(1, len(items) // limit)][:limit]


def pixels(items, size: int, copies: int) -> np.ndarray:
    """uint8 rows: each photo decoded once, its copies 0..copies-1 warped as extract warps them."""
    import hashlib

    from convcache.augment import AugmentPolicy, augment
    from convcache.imaging import read_and_decode

    rows = []
    for it in items:
        raw, px = read_and_decode(it.path, size)
        sha = hashlib.sha256(raw).hexdigest()
        rows += [augment(px, AugmentPolicy(), 0, sha, c) for c in range(copies)]
    return np.stack(rows)


def env(a) -> dict:
    import onnxruntime as ort

    import convcache
    from convcache.runtime import cpu_model

    out = {"convcache": str(Path(convcache.__file__).parent),
           "pythonpath": os.environ.get("PYTHONPATH", "").split(os.pathsep), "cpu": cpu_model(), "cores": os.cpu_count(),
           "onnxruntime": ort.__version__,
           "providers": ort.get_available_providers(), "python": sys.version.split()[0]}
    try:
        out["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        out["gpu"] = f"none ({exc.__class__.__name__})"
    for mod in ("torch", "torchvision", "sklearn", "cv2", "fastapi"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # absent, or broken: said, not fatal
            out[mod] = f"absent ({exc.__class__.__name__})"
    return out


def bare(a, rows: np.ndarray) -> dict:
    from convcache.extract.engine import ExtractorSession

    out = {}
    for precision in ("fp32", "fp16"):
        plain = ExtractorSession(a.model, a.device, precision=precision, io="plain")
        bound = ExtractorSession(a.model, a.device, precision=precision, io="bound")
        for batch in a.batches:
            b = rows[:batch] if len(rows) >= batch else np.resize(rows, (batch, *rows.shape[1:]))
            for way, rate in _ways(plain, bound, b, max(1, a.calls), a.repeats).items():
                out[f"{precision} batch {batch} {way}"] = {**rate, "provider": plain.provider}
    return out


def _ways(plain, bound, b: np.ndarray, calls: int, repeats: int) -> dict:
    """One batch `calls` times: plain (float32, session.run), bound (uint8 staged then run: the copy to the
    device included) and prestaged (staged once: the runtime alone)."""
    f32, staged = b.astype(np.float32), bound.stage(b)
    ways = {"plain": lambda: [plain(f32) for _ in range(calls)], "bound": lambda: [bound(b) for _ in range(calls)],
            "prestaged": lambda: [bound.run_staged(staged) for _ in range(calls)]}
    out = {}
    for way, fn in ways.items():
        med, rates = timed(fn, calls * len(b), repeats)
        out[way] = {"images_per_s": round(med, 1), "rounds": rates}
    return out


def _decode_one(path: str, size: int) -> int:
    from convcache.imaging import read_and_decode

    read_and_decode(path, size)
    return 1


def decode(a, items) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    paths = [it.path for it in items]
    out = {}

    def pillow(workers):
        def go():
            if workers == 1:
                [_decode_one(p, a.size) for p in paths]
            else:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as ex:
                    list(ex.map(_decode_one, paths, [a.size] * len(paths), chunksize=8))
        return go

    for w in (1, a.workers):
        med, rates = timed(pillow(w), len(paths), a.repeats)
        out[f"pillow, {w} processes"] = {"images_per_s": round(med, 1), "rounds": rates}
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2.functional import resize

        if a.device == "cuda" and torch.cuda.is_available():
            datas = [torchvision.io.read_file(p) for p in paths]

            def nvjpeg():
                for img in decode_jpeg(datas, device="cuda"):  # one batched call: nvJPEG on the GPU
                    resize(img, [a.size, a.size], antialias=True)
                torch.cuda.synchronize()

            med, rates = timed(nvjpeg, len(paths), a.repeats)
            out["nvjpeg (torchvision, batched) + resize on the GPU"] = {"images_per_s": round(med, 1),
                                                                        "rounds": rates}
    except Exception as exc:
        out["nvjpeg"] = f"not measured ({exc.__class__.__name__}: {str(exc)[:200]})"
    out.update(product_decoder(a, paths))
    return out


def gpu_decoder(a) -> tuple[str, str | None]:
    """The product's torchvision decoder for this run's device (nvjpeg on cuda, torchvision-cpu on a dry run),
    and why it cannot run here (None when it can)."""
    from convcache.gpudecode import unavailable

    name = "nvjpeg" if a.device == "cuda" else "torchvision-cpu"
    return name, unavailable("cuda" if name == "nvjpeg" else "cpu")


def product_decoder(a, paths: list[str]) -> dict:
    """`extract --decoder nvjpeg`'s decoder as the product calls it (`gpudecode.TorchDecoder.decode`: the headers
    parsed, one batched decode, the draft-mode reduction, EXIF orientation, the resize, one copy back), 64 photos a
    call, and its pixels against Pillow's (`imaging.decode_image`) and, on the GPU, against torchvision's CPU
    decode (libjpeg-turbo) through the same code: what nvJPEG itself changes."""
    from convcache.gpudecode import TorchDecoder
    from convcache.imaging import decode_image

    name, why = gpu_decoder(a)
    if why:
        return {f"product decoder ({name})": f"not measured ({why})"}
    dec = TorchDecoder("cuda" if name == "nvjpeg" else "cpu")
    datas = [Path(p).read_bytes() for p in paths]

    def run():
        for i in range(0, len(datas), 64):
            dec.decode(datas[i : i + 64], a.size)

    med, rates = timed(run, len(paths), a.repeats)
    got = [px for i in range(0, len(datas), 64) for px in dec.decode(datas[i : i + 64], a.size)]
    pil = [decode_image(d, a.size) for d in datas]
    diff = [float(np.abs(g.astype(int) - p).mean()) for g, p in zip(got, pil) if g is not None]
    out = {f"product decoder ({name}), 64 a call": {
        "images_per_s": round(med, 1), "rounds": rates, "left_to_pillow": sum(g is None for g in got),
        "pixels_vs_pillow_mean_abs": round(float(np.mean(diff)), 3) if diff else None,
        "pixels_vs_pillow_worst_photo": round(float(np.max(diff)), 3) if diff else None}}
    if name == "nvjpeg":
        cpu = [px for i in range(0, len(datas), 64) for px in TorchDecoder("cpu").decode(datas[i : i + 64], a.size)]
        d2 = [float(np.abs(g.astype(int) - c).mean()) for g, c in zip(got, cpu) if g is not None and c is not None]
        out[f"product decoder ({name}), 64 a call"].update({
            "pixels_vs_torchvision_cpu_mean_abs": round(float(np.mean(d2)), 3) if d2 else None,
            "pixels_vs_torchvision_cpu_worst_photo": round(float(np.max(d2)), 3) if d2 else None})
    return out


def extract_rate(a, data: str, out: Path, **kw) -> dict:
    from convcache.benchmarks.threadcpu import ThreadCPU
    from convcache.extract.runner import ExtractConfig, run_extract

    kw.setdefault("augment", a.augment)
    with ThreadCPU() as cpu:
        s = run_extract(ExtractConfig(model=a.model, data=data, output=str(out), progress=False, workers=a.workers,
                                      **kw))
    run = s.phases.get("run", 0.0)  # decode, infer, write: from the first block to the last commit
    return {"rows": s.rows_written, "rows_per_s": round(s.rows_per_second, 1), "seconds": round(s.seconds, 2),
            "run_rows_per_s": round(s.rows_written / run, 1) if run else None,
            "provider": s.provider, "math": s.math, "batch_size": s.batch_size, "decodes": s.decodes,
            "decode_in": s.decode_in, "decoder": s.decoder, "decoded_by_decoder": s.decoded_by_decoder,
            "phases": {k: round(v, 2) for k, v in s.phases.items()},
            "thread_cpu_s": dict(sorted(cpu.seconds.items(), key=lambda kv: -kv[1])),
            "main_thread_busy": round(cpu.seconds.get("MainThread", 0.0) / s.seconds, 2) if s.seconds else None}


def subset(items, dst: Path) -> str:
    for it in items:
        d = dst / "train" / Path(it.path).parent.name
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(it.path).name).symlink_to(Path(it.path).resolve())
    return str(dst)


def null(a, data: str, tmp: Path) -> dict:
    """The input pipeline without inference, with copies (--augment) and without (K = 0: every row a decode,
    what an nvJPEG path would be for), as it ships (auto) and each way; and in threads with the decode and the
    warp made free (experiments/gil_ceiling.py's arm: what is left is the Python under one GIL, the feed's
    ceiling however many cores decode and warp)."""
    import convcache.extract.mapper as mapper

    out = {f"null, K={k}, {way}": extract_rate(a, data, tmp / f"null-{k}-{way}.zarr", device="null",
                                               decode_in=way, augment=k)
           for k in dict.fromkeys((a.augment, 0)) for way in ("auto", "processes", "threads")}
    name, why = gpu_decoder(a)  # decoded by torchvision's decoder (nvJPEG on the GPU), the rest as it ships
    for k in dict.fromkeys((a.augment, 0)):
        try:
            out[f"null, K={k}, --decoder {name}"] = extract_rate(a, data, tmp / f"null-{k}-{name}.zarr",
                                                                 device="null", augment=k, decoder=name) \
                if why is None else {"not measured": why}
        except Exception as exc:  # recorded; the arms after it still run
            out[f"null, K={k}, --decoder {name}"] = {"not measured": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
    real, zeros = (mapper.decode_image, mapper.warp), {}
    mapper.decode_image = lambda data, size, *args, **kw: zeros.setdefault(size, np.zeros((size, size, 3), np.uint8))
    mapper.warp = lambda image, matrix, policy: image
    try:
        out[f"null, K={a.augment}, threads, decode and warp free"] = extract_rate(
            a, data, tmp / "null-free.zarr", device="null", decode_in="threads")
    finally:
        mapper.decode_image, mapper.warp = real
    return out


QUARTER = "as it ships, a quarter of the photos"


def pipeline(a, data: str, tmp: Path, bare_rates: dict, quarter: str) -> dict:
    """Each arm's rows/s three ways, each against the bare bound rate at its batch and precision: end to end
    (`rows_per_s`: the whole command, the CUDA session's creation included), the run phase (`run_rows_per_s`:
    decode, infer, write, from the first block to the last commit) and, as it ships, the marginal rate (the rows a
    run of every photo adds over a run of a quarter of them, over the seconds it adds: the fixed costs out). Arms:
    as it ships (--augment copies; --decoder auto: nvJPEG where torchvision is installed), plain IO, fp16, a
    quarter of the photos, the originals only (K = 0: method 1, every row a decode), and both with Pillow
    decoding (--decoder pillow: what nvJPEG is measured against)."""
    out = {}
    arms = {"as it ships": {}, "plain io": {"io": "plain"}, "fp16": {"precision": "fp16"}, QUARTER: {},
            "originals only (K = 0)": {"augment": 0}, "Pillow decode": {"decoder": "pillow"},
            "originals only (K = 0), Pillow decode": {"augment": 0, "decoder": "pillow"}}
    failed: dict = {}  # an arm that fails (nvJPEG's torch beside ONNX Runtime, say) is recorded; the others run on
    for r in range(a.repeats):  # arms interleaved, repeat by repeat
        for name, kw in arms.items():
            if name in failed:
                continue
            try:
                got = extract_rate(a, quarter if name == QUARTER else data,
                                   tmp / f"p-{name.replace(' ', '-').replace(',', '')}-{r}.zarr", device=a.device, **kw)
            except Exception as exc:
                failed[name] = f"{exc.__class__.__name__}: {str(exc)[:500]}"
                continue
            out.setdefault(name, []).append(got)
    summary = {name: {"error": why} for name, why in failed.items()}
    for name, runs in out.items():
        if name in failed:
            continue
        rate = float(np.median([x["rows_per_s"] for x in runs]))
        run_rate = float(np.median([x["run_rows_per_s"] or 0.0 for x in runs]))
        batch, precision = runs[0]["batch_size"], "fp16" if name == "fp16" else "fp32"
        measured = sorted(int(k.split()[2]) for k in bare_rates if k.startswith(precision) and k.endswith(" bound"))
        at = batch if batch in measured else (measured[-1] if measured else None)  # else the largest bare batch
        ref = bare_rates[f"{precision} batch {at} bound"]["images_per_s"] if at else None
        start_up = {k: [x["phases"].get(k) for x in runs] for k in ("session", "session_warm", "session_wait")}
        summary[name] = {"rows_per_s": round(rate, 1), "batch_size": batch, "math": runs[0]["math"],
                         "decoder": runs[0]["decoder"],
                         "session_s": start_up["session"], "session_warm_s": start_up["session_warm"],
                         "session_wait_s": start_up["session_wait"],
                         "vs_bare_bound": round(rate / ref, 3) if ref else None, "bare_batch": at,
                         "run_rows_per_s": round(run_rate, 1),
                         "run_vs_bare_bound": round(run_rate / ref, 3) if ref else None, "runs": runs}
        if name == "as it ships" and QUARTER in out and QUARTER not in failed:
            from convcache.stats import marginal_rate

            lines = [marginal_rate(w["rows"], w["seconds"], q["rows"], q["seconds"]) for w, q in zip(runs, out[QUARTER])]
            rates = [rate for rate, _ in lines if rate == rate]  # NaN: the larger run took no longer (noise)
            m = float(np.median(rates)) if rates else None
            summary[name].update({"marginal_rows_per_s": round(m, 1) if m else None,
                                  "marginal_vs_bare_bound": round(m / ref, 3) if m and ref else None,
                                  "fixed_s": [round(f, 2) for _, f in lines if f == f]})
    return summary


def parity(a, rows: np.ndarray) -> dict:
    from convcache.extract.engine import ExtractorSession

    x = rows[:64]
    ref = next(iter(ExtractorSession(a.model, "cpu", io="plain")(x.astype(np.float32)).values()))
    out = {}
    for name, kw in {"tf32": {}, "exact": {"exact": True}, "fp16": {"precision": "fp16"}}.items():
        s = ExtractorSession(a.model, a.device, **kw)
        got = next(iter(s(x).values()))
        out[name] = {"math": s.math, "max_abs_diff": float(np.abs(got - ref).max()),
                     "relative_to_max": float(np.abs(got - ref).max() / np.abs(ref).max())}
    return out


def resume(a, data: str, tmp: Path) -> dict:
    from convcache.errors import ConvcacheError

    store = tmp / "mixed.zarr"  # (Pillow's decode both times: the math mode is what changes)
    first = extract_rate(a, data, store, device=a.device, decoder="pillow")
    other = {"exact": True} if a.device == "cuda" else {"precision": "fp16"}  # TF32 -> fp32; a CPU: fp32 -> fp16
    try:
        extract_rate(a, data, store, device=a.device, decoder="pillow", **other)
        return {"first": first["math"], "refused": False}
    except ConvcacheError as exc:
        return {"first": first["math"], "refused": True, "message": str(exc)}


def probe(a, items, out_dir: Path) -> dict:
    import onnx

    from convcache.errors import ConvcacheError
    from convcache.export.probe import features, probe_accuracy
    from convcache.export.quantize import cosines
    from convcache.runtime import to_fp16

    images = pixels(items, a.size, 1).astype(np.float32)
    labels = np.array([it.label for it in items])
    fp32 = onnx.load(a.model)
    f32 = features(fp32, images)
    f16 = features(to_fp16(fp32), images, a.device)
    np.savez_compressed(out_dir / "features.npz", fp32=f32, fp16=f16, labels=labels)
    cos = cosines(f32, f16)
    out = {"images": len(labels), "fp16_device": a.device, "cosine_mean": float(cos.mean()),
           "cosine_min": float(cos.min()), "max_abs_diff_relative": float(np.abs(f16 - f32).max() / np.abs(f32).max())}
    try:
        out["probe"] = probe_accuracy(f32, f16, labels, name="fp16")
    except ImportError as exc:
        out["probe"] = f"not here ({exc}); features.npz holds both, probe them with convcache.export.probe"
    except ConvcacheError as exc:  # too few photos per class for the probe's folds
        out["probe"] = str(exc)
    return out


def fused_model(a, tmp: Path) -> str | None:
    if a.fused:
        return a.fused
    if not a.head:
        return None
    fused = tmp / "model.onnx"
    if not fused.is_file():  # fused here, from the extractor and the head prepare.sh trained
        from convcache.train.fuse import fuse

        fuse(a.model, a.head, str(fused))
    return str(fused)


def predict(a, items, tmp: Path) -> dict:
    """`convcache predict`'s loop on the fused model: photos answered one at a time (predict before stop 43:
    batch 1, one thread's decode) against `predict_each` (decoded in threads ahead, a batch a call)."""
    from convcache.serve.predictor import Predictor

    fused = fused_model(a, tmp)
    if not fused:
        return {"skipped": "no --fused model and no --head"}
    paths = [str(i.path) for i in items]
    out = {}
    for batch in (32, a.batches[-1]):
        p = Predictor(fused, a.device, batch)
        p.predict(paths[:batch])  # warm: kernels, arena, the files in the page cache

        def one_at_a_time(p=p):
            for x in paths:
                p.predict(x)

        def each(p=p):
            for _, got in p.predict_each(paths, a.workers):
                assert not isinstance(got, Exception), got

        for name, fn in (("one at a time (before)", one_at_a_time), ("predict_each", each)):
            if name.startswith("one") and batch != 32:
                continue  # (batch 1 whatever the batch size)
            rate, rates = timed(fn, len(paths), a.repeats)
            out[f"{name}, batch {1 if name.startswith('one') else batch}"] = {
                "images_per_s": rate, "rounds": rates, "provider": p.provider, "io": p.io, "workers": a.workers}
    return out


def serve(a, tmp: Path) -> dict:
    fused = fused_model(a, tmp)
    if not fused:
        return {"skipped": "no --fused model and no --head"}
    r = subprocess.run([sys.executable, "-m", "convcache", "bench", "serve", "--model", fused, "--data", a.data,
                        "--device", a.device, "--clients", "1", "4", "16", "64", "--soak", "0",
                        "--images", str(min(64, a.images))], capture_output=True, text=True,
                       timeout=a.serve_timeout)
    return {"returncode": r.returncode, "stdout": r.stdout[-6000:], "stderr": r.stderr[-2000:]}


_ROWS: dict = {}


def run_section(section: str, a, items, data: str, tmp: Path, out_dir: Path, res: dict):
    if section in ("bare", "parity") and "rows" not in _ROWS:
        _ROWS["rows"] = pixels(items, a.size, 2)
    rows = _ROWS.get("rows")
    if section == "env":
        return env(a)
    if section == "bare":
        return bare(a, rows)
    if section == "decode":
        return decode(a, items)
    if section == "null":
        return null(a, data, tmp)
    if section == "pipeline":
        return pipeline(a, data, tmp, res.get("bare", {}), subset(items[::4], tmp / "quarter"))
    if section == "parity":
        return parity(a, rows)
    if section == "resume":
        return resume(a, data, tmp)
    if section == "probe":
        return probe(a, items, out_dir)
    if section == "predict":
        return predict(a, items, tmp)
    return serve(a, tmp)


def markdown(res: dict, a) -> str:
    e = res.get("env", {})
    lines = [f"# GPU measurement ({time.strftime('%Y-%m-%d')})", "",
             f"GPU: {e.get('gpu')}; CPU: {e.get('cpu')}, {e.get('cores')} cores; ONNX Runtime {e.get('onnxruntime')}"
             f"; model {a.model}; {a.images} photos x {a.augment + 1} copies at {a.size} px; {a.repeats} repeats.",
             "", "Command: `python3 experiments/gpu/measure.py " + " ".join(sys.argv[1:]) + "`", "",
             "| what | images or rows/s | note |", "|---|---|---|"]
    for k, v in res.get("bare", {}).items():
        lines.append(f"| bare {k} | {v['images_per_s']:,.0f} | {v['provider']} |")
    for k, v in res.get("decode", {}).items():
        extra = "; ".join(f"{n} {x}" for n, x in v.items() if n.startswith(("pixels", "left"))) \
            if isinstance(v, dict) else ""
        lines.append(f"| decode: {k} | {v['images_per_s']:,.0f} | {extra} |" if isinstance(v, dict)
                     else f"| {k} | | {v} |")
    for k, v in res.get("null", {}).items():
        if "rows_per_s" not in v:
            lines.append(f"| pipeline, {k} | | {v} |")
            continue
        lines.append(f"| pipeline, {k} | {v['rows_per_s']:,.0f} | run phase {v['run_rows_per_s']:,.0f}; "
                     f"{v['decodes']} decodes in {v['decode_in']}"
                     + (f", {v['decoded_by_decoder']} by {v['decoder']}" if v['decoder'] != "pillow" else "") + "; "
                     f"main thread busy {v['main_thread_busy']} |")
    for k, v in res.get("pipeline", {}).items():
        if "error" in v:
            lines.append(f"| pipeline on {a.device}, {k} | | failed: {v['error'][:200]} |")
            continue
        marginal = (f"; marginal {v['marginal_rows_per_s']:,.0f} = {v['marginal_vs_bare_bound']}x (fixed "
                    f"{v['fixed_s']} s)" if v.get("marginal_rows_per_s") else "")
        lines.append(f"| pipeline on {a.device}, {k} (batch {v['batch_size']}, {v['math']}, decoder {v['decoder']}) "
                     f"| {v['rows_per_s']:,.0f} "
                     f"| end to end {v['vs_bare_bound']}x the bare bound rate at batch {v['bare_batch']}; run phase "
                     f"{v['run_rows_per_s']:,.0f} = {v['run_vs_bare_bound']}x{marginal}; runtime start-up "
                     f"{v['session_s']} s (its warm-up pass {v['session_warm_s']} s), the first batch waited "
                     f"{v['session_wait_s']} s of it |")
    for k, v in res.get("predict", {}).items():
        if isinstance(v, dict):
            lines.append(f"| predict on {a.device}, {k} | {v['images_per_s']:,.0f} | {v['provider']}, io {v['io']}, "
                         f"{v['workers']} decode workers |")
    lines += ["", "Other sections (parity, resume, probe, serve, errors): gpu.json.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    this_checkout()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an fp32 extractor (convcache export)")
    p.add_argument("--fused", help="a fused model (extractor + head) for the serve section")
    p.add_argument("--head", help="or a head folder (`convcache train -o`) on --model's features: fused here")
    p.add_argument("--data", required=True, help="photos in class folders (or split/class)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script here")
    p.add_argument("--images", type=int, help="photos (default: 320; --quick: 8)")
    p.add_argument("--augment", type=int, default=15)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--calls", type=int, default=8, help="inference calls per bare timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--serve-timeout", type=int, default=180)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs, measures nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.augment, a.batches, a.calls, a.repeats, a.serve_timeout = 2, [4], 1, 1, 60
    a.images = a.images or (8 if a.quick else 320)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-"))
    items = photos(a.data, a.images)
    data = subset(items, tmp / "data")
    res: dict = {"args": vars(a), "seconds": {}, "errors": {}}
    for section in a.sections:
        t = time.perf_counter()
        try:
            res[section] = run_section(section, a, items, data, tmp, out_dir, res)
        except Exception as exc:  # one section's failure is recorded; the others still run
            res["errors"][section] = f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        res["seconds"][section] = round(time.perf_counter() - t, 1)
        (out_dir / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"{section}: {res['seconds'][section]} s{' (failed)' if section in res['errors'] else ''}", flush=True)
    (out_dir / "gpu.md").write_text(markdown(res, a))
    print((out_dir / "gpu.md").read_text())


if __name__ == "__main__":
    main()
