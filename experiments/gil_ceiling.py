"""The input pipeline's ceiling from its own Python: null-device extracts (no inference) in which the two calls
that release the GIL, the JPEG decode (`imaging.decode_image`) and the warp (`augment.warp`, OpenCV), are
replaced by ones that cost nothing (a zero image, the image itself). What is left is everything else a row
costs: reading and hashing the files, planning, the warp maps, the thread pools, batches, the store's writes
and commits, most of it Python under one GIL. Its rate bounds what the pipeline can feed a fast runtime however
many cores decode and warp beside it (issue 29: a GPU host with 16 cores), and its CPU a row is the work that
does not spread over them. Printed beside it, in the same process: the real pipeline (decode and warp as they
ship), for scale. Stores are bitwise meaningless here (every image is zeros); only rates are kept.

`--gpu-decoder`: two arms more, the `--decoder nvjpeg` path (issue 29 item 4) with its decode made free: the
photos go through the engine's GPU groups (reader threads, one decoder thread, 64 a call) to a decoder that
parses each header as the real one does (`gpudecode.header`, Pillow's parser) and returns zeros, and one that
skips the headers too. What they leave is the Python a row costs on that path, whatever the GPU's speed: the
ceiling of `extract --device cuda --decoder nvjpeg` from this process's GIL (torch's per-group kernel launches
are not in it).

    PYTHONPATH=. .venv/bin/python experiments/gil_ceiling.py --model runs/ext.onnx \\
        --data ../shared/data/cats_and_dogs_small --images 2000 --augment 15 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from convcache.benchmarks.extract import subset_and_output, subset_arguments

    subset_arguments(p, images=2000, augment=15, rounds=3,
                     model_help="an extractor (the null device uses only its output shape)")
    p.add_argument("--gpu-decoder", action="store_true", help="the --decoder nvjpeg path's arms too")
    a = p.parse_args(argv)
    import numpy as np

    import convcache.extract.mapper as mapper
    from convcache import gpudecode
    from convcache.benchmarks.threadcpu import ThreadCPU
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.runtime import cpu_model

    data, out = subset_and_output(a)
    real = mapper.decode_image, mapper.warp

    def free(on: bool) -> None:
        if on:
            zeros: dict = {}
            mapper.decode_image = lambda data, size, *args, **kw: zeros.setdefault(size, np.zeros((size, size, 3),
                                                                                                   np.uint8))
            mapper.warp = lambda image, matrix, policy: image
        else:
            mapper.decode_image, mapper.warp = real

    class FreeDecoder:  # `gpudecode.TorchDecoder` with its decode free (and its header parse, unless `headers`)
        headers = True

        def __init__(self, device="cuda"):
            self.name, self.decoded, self.zeros = "nvjpeg", 0, {}

        def decode(self, datas, size, max_pixels=gpudecode.DEFAULT_MAX_PIXELS):
            if FreeDecoder.headers:
                [gpudecode.header(d, max_pixels) for d in datas]
            self.decoded += len(datas)
            z = self.zeros.setdefault(size, np.zeros((size, size, 3), np.uint8))
            return [z] * len(datas)

    gpudecode.TorchDecoder, gpudecode.torchvision_installed = FreeDecoder, lambda: True
    NVJPEG, BARE = "--decoder nvjpeg path, decode and warp free", "--decoder nvjpeg path, decode, header, warp free"

    by_thread: dict = {}

    def run(name: str, arm: str = "") -> tuple[float, float, int]:
        FreeDecoder.headers = arm != BARE
        cfg = ExtractConfig(model=str(Path(a.model).resolve()), data=str(data), output=str(out / f"{name}.zarr"),
                            augment=a.augment, progress=False, device="null", workers=a.workers,
                            decode_in="threads", decoder="nvjpeg" if arm in (NVJPEG, BARE) else "pillow")
        cpu = time.process_time()
        with ThreadCPU() as threads:
            s = run_extract(cfg)
        for thread, sec in threads.seconds.items() if arm else ():  # µs a row (the warm-up run: not kept)
            by_thread.setdefault(arm, {}).setdefault(thread, []).append(1e6 * sec / s.rows_written)
        return s.rows_written / s.seconds, 1e6 * (time.process_time() - cpu) / s.rows_written, s.rows_written

    free(True)
    run("warm")  # imports, first calls
    got: dict = {"decode and warp free (the rest of a row)": [], "as it ships": []}
    if a.gpu_decoder:
        got.update({NVJPEG: [], BARE: []})
    for r in range(a.rounds):
        for k, name in enumerate(got if r % 2 == 0 else list(got)[::-1]):
            free(name != "as it ships")
            got[name].append(run(f"{r}-{k}", name))
    free(False)
    print(f"{a.images} images x {a.augment + 1} copies, device null, {a.workers} workers, decoding in threads, "
          f"{a.rounds} rounds alternating, {cpu_model()}")
    print("| pipeline | rows/s (median; each round) | process CPU µs a row (median) |")
    print("|---|---|---|")
    for name, runs in got.items():
        rates = [x for x, _, _ in runs]
        print(f"| {name} | {np.median(rates):,.0f} ({', '.join(f'{x:,.0f}' for x in rates)}) | "
              f"{np.median([c for _, c, _ in runs]):.0f} |")
    for name, threads in by_thread.items():
        print(f"CPU µs a row by thread (median over rounds), {name}: " + ", ".join(
            f"{t} {np.median(v):.1f}" for t, v in sorted(threads.items(), key=lambda kv: -np.median(kv[1]))))


if __name__ == "__main__":
    main()
