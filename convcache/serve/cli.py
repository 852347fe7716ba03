"""`convcache predict` and `convcache serve`."""

from __future__ import annotations

import json
import socket
import sys


def register(sub) -> None:
    from dataclasses import fields

    from convcache.serve.config import HEALTH_RESERVE, ServeConfig

    d = {f.name: f.default for f in fields(ServeConfig)}
    p = sub.add_parser("predict", help="classify images with a fused model (one JSON line per image)")
    p.add_argument("--model", required=True, help="fused .onnx from `convcache fuse`")
    p.add_argument("images", nargs="+", help="image files, folders (every file under them, sorted; hidden ones "
                                             "skipped), or - for paths on standard input, one per line")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                   help="jsonl: one JSON object per image; csv: a header, then image, class, one probability column "
                        "per class, error")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default="auto")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference call (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads decoding ahead of inference (default: the cores this process may use)")
    p.add_argument("--decode-memory", default="1GiB",
                   help="all decodes at once, every intermediate counted (default: %(default)s)")
    p.set_defaults(func=run_predict)

    s = sub.add_parser("serve", help="HTTP service for a fused model (FastAPI + uvicorn)",
                       description="Endpoints: POST /v1/predict, POST /v1/features, GET /v1/model, /healthz, "
                                   "/readyz, /metrics (Prometheus), /docs and /redoc (OpenAPI, offline); the Open "
                                   "Inference Protocol (KServe v2 REST, tritonclient): /v2, /v2/health/{live,ready}, "
                                   "/v2/models/NAME[/ready], POST /v2/models/NAME/infer.")
    s.add_argument("--model", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default="auto")
    s.add_argument("--max-batch", type=int, default=d["max_batch"], help="images per inference call")
    s.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], help="how long a batch waits to fill")
    s.add_argument("--grpc-port", type=int, default=0,
                   help="also serve KServe's v2 gRPC inference protocol (tritonclient.grpc) on this port, behind the "
                        "same batching, cache, limits and metrics (needs the 'grpc' extra)")
    s.add_argument("--batch-wait", choices=("adaptive", "fixed"), default=d["batch_wait"],
                   help="adaptive: a batch waits (up to --max-wait-ms) only while more images are on their way, so a "
                        "lone client never waits; fixed: always waits, as Triton's max_queue_delay")
    s.add_argument("--max-queue", type=int, default=d["max_queue"], help="images waiting before 503")
    s.add_argument("--cache-mb", type=float, default=d["cache_bytes"] / (1 << 20),
                   help="cached answers, bounded by the memory they hold (default: %(default)g MiB; 0 disables)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (413 above)")
    s.add_argument("--max-pixels", type=int, default=d["max_pixels"], help="decoded size limit (422 above)")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    g = s.add_argument_group("limits against hostile clients")
    g.add_argument("--max-connections", type=int, default=d["max_connections"],
                   help="requests in flight (503 past it); health probes and /metrics keep "
                        f"{HEALTH_RESERVE} connections of their own")
    g.add_argument("--body-timeout", type=float, default=d["body_timeout_s"], metavar="S",
                   help="each chunk of a request body must arrive within this (408)")
    g.add_argument("--body-min-rate", type=float, default=d["body_min_rate"], metavar="BYTES_PER_S",
                   help="a body must average at least this once the grace period is over (408; 0: off)")
    g.add_argument("--body-grace", type=float, default=d["body_grace_s"], metavar="S",
                   help="seconds before the minimum body rate applies")
    g.add_argument("--body-deadline", type=float, default=d["body_deadline_s"], metavar="S",
                   help="a whole body must be in within this (408)")
    g.add_argument("--body-memory", default="512MiB",
                   help="bytes all request bodies may hold at once (503 + Retry-After past it)")
    g.add_argument("--decode-memory", default="1GiB",
                   help="memory all image decodes may use at once, every intermediate counted (decodes wait "
                        "for room; one image may use at most 256 MiB)")
    g.add_argument("--max-header-bytes", type=int, default=d["max_header_bytes"],
                   help="request line + headers (431 past it)")
    g.add_argument("--max-header-fields", type=int, default=d["max_header_fields"],
                   help="request header lines (431 past it)")
    s.add_argument("--name", help="the model's name on the Open Inference Protocol (/v2/models/NAME; default: "
                                  "the file's stem)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=run_serve)

    t = sub.add_parser("triton", help="a Triton Inference Server model repository for a fused model",
                       description="Writes DIR/<name>/1/model.onnx, DIR/<name>/labels.txt and "
                                   "DIR/<name>/config.pbtxt (tensor names, datatypes and dims read from the graph; "
                                   "dynamic batching; one instance group per device; the classification "
                                   "extension's labels; a warm-up request). --backend python adds 1/model.py "
                                   "(ONNX Runtime in Triton's python backend: the only backend in PyPI's "
                                   "nvidia-pytriton; the stub's interpreter needs numpy and onnxruntime). Serve it "
                                   "with `tritonserver --model-repository DIR`.")
    t.add_argument("--model", required=True, help="fused .onnx from `convcache fuse`")
    t.add_argument("-o", "--output", required=True, help="the model repository folder (created if absent)")
    t.add_argument("--name", help="the model's name in Triton (default: the file's stem)")
    t.add_argument("--max-batch", type=int, default=32, help="Triton's max_batch_size")
    t.add_argument("--preferred-batch", type=int, nargs="+", default=[8, 32], help="dynamic batching's sizes")
    t.add_argument("--max-queue-delay-us", type=int, default=5000, help="dynamic batching's queue delay")
    t.add_argument("--backend", choices=["onnxruntime", "openvino", "python"], default="onnxruntime",
                   help="Triton's backend (python: model.py running ONNX Runtime)")
    t.add_argument("--threads", type=int, help="ONNX Runtime's intra-op threads per instance (python backend; "
                                                "default: the runtime's)")
    t.add_argument("--device", choices=["cpu", "gpu"], nargs="+", default=["cpu"],
                   help="one instance group per device kind")
    t.add_argument("--instances", type=int, default=1, help="model instances per group")
    t.set_defaults(func=run_triton)


def _predict_paths(items: list[str]):
    """The paths `predict` was given: files as they are, folders walked (sorted, hidden entries skipped), `-`
    read from standard input (one path a line, blank lines skipped)."""
    from pathlib import Path

    for item in items:
        if item == "-":
            yield from (line.rstrip("\n") for line in sys.stdin if line.strip())
        elif Path(item).is_dir():
            root = Path(item)
            yield from (str(f) for f in sorted(root.rglob("*"))
                        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))
        else:
            yield item


def run_predict(args) -> int:
    import csv

    from tqdm import tqdm

    from convcache.errors import ConvcacheError, ImageError
    from convcache.imaging import MemoryBudget
    from convcache.location import parse_bytes
    from convcache.serve.predictor import Predictor

    if args.workers is not None and args.workers < 1:
        raise ConvcacheError(f"--workers {args.workers}: must be at least 1")
    predictor = Predictor(args.model, args.device, args.batch_size)
    writer = None
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "class", *predictor.classes, "error"])
    failed = 0
    # decoded in threads ahead of inference, --batch-size images a call; one bad file hides no other's answer
    budget = MemoryBudget(parse_bytes(args.decode_memory, "--decode-memory"))
    paths = _predict_paths(args.images)
    total = None
    if "-" not in args.images:  # files and folders: counted first, so the progress bar has an end (and an ETA)
        paths = list(paths)
        total = len(paths)
    # progress on standard error (the answers are standard output); -q or TQDM_DISABLE turns it off
    bar = tqdm(total=total, desc="predict", unit="img", disable=args.quiet, file=sys.stderr, mininterval=0.5)
    for path, got in predictor.predict_each(paths, args.workers, budget):
        bar.update()
        if isinstance(got, ImageError):
            out, failed = {"image": path, "error": got.reason}, failed + 1
        else:
            out = {"image": path, **got.to_dict()}
        if writer is None:
            print(json.dumps(out), flush=True)
        else:
            probs = out.get("probabilities", {})
            writer.writerow([path, out.get("class", ""), *(probs.get(c, "") for c in predictor.classes),
                             out.get("error", "")])
            sys.stdout.flush()
    bar.close()
    return 3 if failed else 0


def run_serve(args) -> int:
    import os
    from dataclasses import asdict

    import uvicorn

    from convcache.errors import ConvcacheError
    from convcache.location import parse_bytes
    from convcache.serve.app import CONFIG_ENV, create_app
    from convcache.serve.config import HEALTH_RESERVE, ServeConfig
    from convcache.serve.http_timeouts import BYTES_ENV, FIELDS_ENV
    from convcache.serve.http_timeouts import ENV as HEADER_TIMEOUT_ENV

    if not 0 < args.port < 65536:
        raise ConvcacheError(f"--port {args.port}: must be 1..65535")
    if args.grpc_port and not 0 < args.grpc_port < 65536:
        raise ConvcacheError(f"--grpc-port {args.grpc_port}: must be 1..65535")
    if args.grpc_port == args.port:
        raise ConvcacheError(f"--grpc-port {args.grpc_port}: the HTTP port; give another")
    if args.grpc_port:
        import convcache.serve.grpc_service  # noqa: F401  (a missing 'grpc' extra is one line, before anything starts)
    if args.workers < 1:
        raise ConvcacheError(f"--workers {args.workers}: must be at least 1")
    if not args.max_body_mb > 0:
        raise ConvcacheError(f"--max-body-mb {args.max_body_mb}: must be > 0")
    with socket.socket() as probe:  # refuse a busy port before loading anything or printing "serving"
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise ConvcacheError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    config = ServeConfig(model=args.model, device=args.device, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         batch_wait=args.batch_wait, max_queue=args.max_queue, grpc_port=args.grpc_port,
                         grpc_host=args.host,
                         cache_bytes=int(args.cache_mb * (1 << 20)) if args.cache_mb >= 0 else -1,
                         max_body_bytes=int(args.max_body_mb * (1 << 20)), max_pixels=args.max_pixels,
                         name=args.name, max_connections=args.max_connections, body_timeout_s=args.body_timeout,
                         body_min_rate=args.body_min_rate, body_grace_s=args.body_grace,
                         body_deadline_s=args.body_deadline,
                         body_memory_bytes=parse_bytes(args.body_memory, "--body-memory"),
                         decode_memory_bytes=parse_bytes(args.decode_memory, "--decode-memory"),
                         max_header_bytes=args.max_header_bytes, max_header_fields=args.max_header_fields)
    if min(config.max_connections, config.max_header_bytes, config.max_header_fields) < 1 or min(
            config.body_timeout_s, config.body_deadline_s) <= 0 or config.body_min_rate < 0 or config.body_grace_s < 0:
        raise ConvcacheError("serve: the limits must be positive")
    common = {"host": args.host, "port": args.port, "log_level": args.log_level, "timeout_graceful_shutdown": 30,
              "server_header": False, "limit_concurrency": config.max_connections + HEALTH_RESERVE,
              "timeout_keep_alive": config.keep_alive_s, "http": "convcache.serve.http_timeouts:HeaderTimeoutProtocol",
              "h11_max_incomplete_event_size": config.max_header_bytes}
    os.environ[HEADER_TIMEOUT_ENV] = str(config.header_timeout_s)
    os.environ[BYTES_ENV], os.environ[FIELDS_ENV] = str(config.max_header_bytes), str(config.max_header_fields)
    if args.workers > 1:
        import tempfile

        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        # one /metrics exposition across the workers: prometheus_client's multiprocess mode
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="convcache-metrics-"))
        uvicorn.run("convcache.serve.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        app = create_app(config)  # load errors surface here, before the port opens
        grpc_line = f", gRPC on {args.host}:{args.grpc_port}" if args.grpc_port else ""
        print(f"serving {args.model} on http://{args.host}:{args.port} (docs at /docs){grpc_line}", file=sys.stderr,
              flush=True)
        uvicorn.run(app, **common)
    return 0


def run_triton(args) -> int:
    from convcache.serve.triton import write_repository

    folder = write_repository(args.model, args.output, args.name, max_batch=args.max_batch,
                              preferred=tuple(args.preferred_batch), delay_us=args.max_queue_delay_us,
                              backend=args.backend, devices=tuple(args.device), instances=args.instances,
                              threads=args.threads)
    script = " 1/model.py," if args.backend == "python" else ""
    print(f"wrote {folder}: 1/model.onnx,{script} labels.txt, config.pbtxt; serve with: "
          f"tritonserver --model-repository {args.output}")
    return 0
