"""JPEG decoding in batches with torchvision (`torchvision.io.decode_jpeg`): nvJPEG on a CUDA device, libjpeg-turbo
on the CPU. The optional decoder of `extract --decoder nvjpeg` (the default on CUDA when torchvision is installed) and
`--decoder torchvision-cpu`.

Why: on a GPU, inference outruns the CPU's decoding (issue 29: ONNX Runtime took ~9,900 rows a second on an
H200, Pillow decoded ~4,300 photos a second on its 16 cores). Decoded on the GPU, each photo costs the CPU only
its header's parse.

What it makes follows `imaging.decode_image` step by step (uint8 size x size x 3 RGB): the photo is decoded at
full size (nvJPEG has no DCT scaling), averaged in blocks of the factor Pillow's draft mode would have decoded
it at, made upright by its EXIF orientation, and resized with torch's antialiased bilinear filter (the triangle
filter, widened by the scale, of Pillow's BILINEAR). Not bitwise: on the cats-and-dogs photos the pixels differ
from Pillow's by 0.22 of 255 on average (libjpeg-turbo's full decode on the CPU). A store records the decoder of its
rows (a resume with another is refused without --allow-mixed); what the difference costs the task is measured
in docs/benchmarks.md.

Only plain JPEGs (RGB or greyscale, within `max_pixels`) are decoded here; anything else - CMYK, PNG, a
corrupt or truncated file, a batch the decoder refuses - is returned as None, for Pillow to decode (or to
refuse, with its reason), so a file that Pillow handles is never lost to this path.
"""

from __future__ import annotations

import io
import threading

import numpy as np

from convcache.imaging import DEFAULT_MAX_PIXELS

DECODERS = ("auto", "pillow", "nvjpeg", "torchvision-cpu")
CALL_PIXELS = 200_000_000  # a decode call's photos hold at most this many pixels (600 MB of uint8 on the GPU)...
FLOAT_PIXELS = 50_000_000  # ...and are reduced and resized this many pixels at a time (600 MB of float32)
# EXIF orientation -> the (transpose, flip rows, flip columns) that makes the image upright, as Pillow's
# `ImageOps.exif_transpose` does: 2 mirrors left-right, 3 rotates 180, 4 flips top-bottom, 5 transposes,
# 6 rotates 90 clockwise, 7 transverses, 8 rotates 90 counter-clockwise
_ORIENT = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
           6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


def resolve_decoder(choice: str, where: str | None, held: set | frozenset = frozenset()) -> str:
    """The decoder a run uses: `pillow`, `nvjpeg` (torchvision on the GPU) or `torchvision-cpu` (torchvision on the
    CPU, libjpeg-turbo: not faster than Pillow, for parity checks). `where`: the device the run extracts on (cpu,
    cuda, openvino, null), None on a Dask cluster. `auto` is nvjpeg when the run extracts on CUDA and torchvision
    is installed (there the CPU's decode rate is below the runtime's: issue 29 measured ~4,300 photos a second on
    16 cores against ~9,900 rows for ONNX Runtime), Pillow everywhere else. By device, not by a rate measured per
    run or by the copies asked for: a store's decoder must not flip between its runs (K = 0 today, --augment 15
    tomorrow), or its resumes would be refused as mixed. But a store whose rows Pillow decoded
    (`held`: the decoders of the rows the output already holds) is resumed with Pillow, so that a default never
    gets a resume refused (rows from two decoders are not bitwise comparable). A choice that cannot be honoured is
    refused at once (no torchvision, a Dask cluster) or, when torchvision cannot start (no CUDA device), before
    the run's first row."""
    from convcache.errors import ConvcacheError

    check_decoder(choice)
    installed = torchvision_installed()
    if choice == "pillow" or (choice == "auto" and (where != "cuda" or not installed or "pillow" in held)):
        return "pillow"
    if choice == "auto":
        return "nvjpeg"
    if where is None:
        raise ConvcacheError(f"--decoder {choice} decodes on this machine, not on a Dask cluster's workers")
    if not installed:
        raise ConvcacheError(f"--decoder {choice} needs torch and torchvision (pip install 'convcache[nvjpeg]'); "
                             "--decoder pillow decodes with Pillow")
    return choice


def check_decoder(choice: str) -> None:
    """A decoder's name is one of DECODERS (ConvcacheError otherwise); whether it can run is resolve_decoder's."""
    if choice not in DECODERS:
        from convcache.errors import ConvcacheError

        raise ConvcacheError(f"--decoder {choice}: one of {', '.join(DECODERS)}")


def torchvision_installed() -> bool:
    """Whether torch and torchvision are installed (found, not imported: importing torch takes seconds)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def report() -> str:
    """The JPEG decoders this machine has (`convcache info --runtime`): Pillow always; torchvision's on the CPU and,
    with a CUDA device, nvJPEG (what `--decoder auto` picks when extracting on CUDA)."""
    if not torchvision_installed():
        return "pillow (nvjpeg: no torch/torchvision installed; the 'nvjpeg' extra)"
    why = unavailable("cpu")
    if why:
        return f"pillow ({why})"
    import torch
    import torchvision

    cuda = unavailable("cuda")
    nvjpeg = (f"nvjpeg (torchvision {torchvision.__version__}, torch {torch.__version__}: --decoder auto on CUDA)"
              if cuda is None else f"no nvjpeg ({cuda})")
    return f"pillow, torchvision-cpu, {nvjpeg}"


def decoder_device(name: str) -> str:
    """Where a resolved decoder (`resolve_decoder`) other than Pillow runs."""
    return "cuda" if name == "nvjpeg" else "cpu"


def unavailable(device: str) -> str | None:
    """Why torchvision's decoder cannot run on `device` (cpu or cuda) here, or None when it can."""
    try:
        import torch
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        return (f"torchvision is not importable ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); "
                "pip install 'convcache[nvjpeg]'")
    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """A JPEG this decoder takes: (its EXIF orientation 1-8, its pixels); None for anything else (left to Pillow).
    Its markers are walked here (`_markers`: ~5x cheaper than Pillow's parser, which was most of this path's Python
    a photo); anything they do not settle is asked of Pillow."""
    if data[:2] != b"\xff\xd8":
        return None
    got = _markers(data)
    if got is None:
        return _pillow_header(data, max_pixels)
    sof, precision, w, h, components, orientation = got
    if sof not in _SOF_TAKEN or precision != 8 or components not in (1, 3) or w * h > max_pixels or min(w, h) < 1:
        return None
    return orientation, w * h


_SOF_TAKEN = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman); not lossless, not arithmetic
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker (C4 DHT, C8 JPG, CC DAC are not)


def _markers(data: bytes) -> tuple | None:
    """(SOF marker, precision, width, height, components, EXIF orientation) from the segments before the first scan,
    as Pillow reads them (the first EXIF block's orientation, wherever it stands before the scan); None when the
    stream is not plainly laid out (the caller asks Pillow)."""
    i, n, orientation, frame = 2, len(data), None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # the first scan: every header before it has been read
            return None if frame is None else (*frame, 1 if orientation is None else orientation)
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker == 0xE1 and orientation is None and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _orientation(data[i + 10 : i + 2 + length])
            if orientation is None:
                return None
        elif marker in _SOF and frame is None:
            if i + 10 > n:
                return None
            frame = (marker, data[i + 4], int.from_bytes(data[i + 7 : i + 9], "big"),
                     int.from_bytes(data[i + 5 : i + 7], "big"), data[i + 9])
        i += 2 + length
    return None


def _orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of an EXIF block's first IFD, 1 when it has none, None when the block is not
    plainly readable; what Pillow's `getexif().get(0x0112)` reads."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or int.from_bytes(tiff[2:4], order) != 42:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[e : e + 2], order) == 0x0112:
            value = int.from_bytes(tiff[e + 8 : e + 10], order)
            return value if value in range(1, 9) else 1
    return 1


def _pillow_header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # the header only: nothing is decoded
        w, h = img.size
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or w * h > max_pixels or min(w, h) < 1:
            return None
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (orientation if orientation in range(1, 9) else 1), w * h


class TorchDecoder:
    """Bytes of many photos -> their model-size pixels, decoded and resized on `device` as one batch.

    `decode(datas)` returns one array or None per input (None: not decoded here, see the module). Thread-safe
    (one batch at a time). Created once per run: importing torch and starting CUDA take seconds."""

    def __init__(self, device: str = "cuda"):
        why = unavailable(device)
        if why is not None:
            raise RuntimeError(why)
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self.name = "nvjpeg" if device == "cuda" else "torchvision-cpu"
        self._torch, self._decode, self._rgb = torch, decode_jpeg, ImageReadMode.RGB
        self._lock = threading.Lock()
        self.batches = self.decoded = 0  # counts: decode calls made, images decoded here (the rest: Pillow's)
        if device == "cuda":  # CUDA's context and nvJPEG's handle made now, not in the first batch
            self._decode([torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)], mode=self._rgb, device=device)

    def decode(self, datas: list[bytes], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray | None]:
        """Each photo's size x size x 3 uint8 pixels, or None where it is left to Pillow."""
        out: list[np.ndarray | None] = [None] * len(datas)
        take = [(i, *h) for i, h in ((i, header(d, max_pixels)) for i, d in enumerate(datas)) if h is not None]
        calls, pixels = [[]], 0  # photos split into calls of at most CALL_PIXELS (a photo larger: a call alone)
        for i, orientation, n in take:
            if calls[-1] and pixels + n > CALL_PIXELS:
                calls, pixels = [*calls, []], 0
            calls[-1].append((i, orientation))
            pixels += n
        with self._lock, self._torch.inference_mode():
            for call in calls:
                if call:
                    for (i, _), px in zip(call, self._batch([datas[i] for i, _ in call], [o for _, o in call], size)):
                        out[i] = px
            self.decoded += sum(px is not None for px in out)
        return out

    def _batch(self, datas: list[bytes], orientations: list[int], size: int) -> list[np.ndarray | None]:
        torch = self._torch
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            images = self._decode(tensors, mode=self._rgb, device=self.device)
        except Exception:  # one bad file fails the whole call ("no partial results"): then one at a time
            images = []
            for t in tensors:
                try:
                    images.append(self._decode(t, mode=self._rgb, device=self.device))
                except Exception:
                    images.append(None)
        self.batches += 1
        ok = [k for k, im in enumerate(images) if im is not None]
        out: list[np.ndarray | None] = [None] * len(datas)
        if not ok:
            return out
        # photos of one shape and orientation (a camera's, a resized dataset's) are reduced and resized together:
        # a few kernel launches a group, not a few a photo
        groups: dict = {}
        for k in ok:
            groups.setdefault((tuple(images[k].shape), orientations[k]), []).append(k)
        parts = []  # (photos, orientation): a group in pieces of at most FLOAT_PIXELS
        for (shape, o), ks in groups.items():
            step = max(1, FLOAT_PIXELS // (shape[1] * shape[2]))
            parts += [(ks[j : j + step], o) for j in range(0, len(ks), step)]
        order = [k for ks, _ in parts for k in ks]
        resized = [self._square(images[ks[0]][None] if len(ks) == 1 else torch.stack([images[k] for k in ks]), o, size)
                   for ks, o in parts]  # float; rounded to uint8 once, all together
        square = torch.cat(resized).round_().clamp_(0, 255).to(torch.uint8)
        host = square.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # one copy back, NHWC
        for j, k in enumerate(order):
            out[k] = host[j]
        return out

    def _square(self, nchw, orientation: int, size: int):
        """Decoded NCHW uint8 images of one shape, as Pillow's path makes each: reduced by the factor of JPEG's
        draft mode (averaged in s x s blocks, s the power of 2 up to 8 that keeps both sides >= size: libjpeg's
        DCT scaling at 1/s is close to that average), then made upright, then resized to size x size
        (antialiased bilinear, Pillow's BILINEAR), as float (the caller rounds every group's at once: on a GPU each
        op a group is a kernel launch, under the GIL)."""
        torch = self._torch
        x = nchw.float()
        scale = draft_scale(nchw.shape[3], nchw.shape[2], size)
        if scale > 1:
            x = torch.nn.functional.avg_pool2d(x, scale, ceil_mode=True)
        if orientation in _ORIENT:
            transpose, rows, cols = _ORIENT[orientation]
            if transpose:
                x = x.transpose(2, 3)
            flips = [d for d, f in ((2, rows), (3, cols)) if f]
            if flips:
                x = x.flip(flips)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
        return x


def draft_scale(w: int, h: int, size: int) -> int:
    """The reduction Pillow's JPEG draft mode decodes a w x h photo at for a size x size target (its rule: the
    largest of 8, 4, 2 not above min(w // size, h // size), else 1)."""
    fits = min(w // size, h // size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _tiny_jpeg() -> bytes:
    """An 8 x 8 grey baseline JPEG: the CUDA warm-up's one decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "JPEG")
    return buf.getvalue()
