import asyncio
import io
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import export, run_cli, wait_for
from PIL import Image

from convcache.serve import Predictor

pytestmark = pytest.mark.serve


def jpeg(seed: int, size=48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args, python=(sys.executable, "-m", "convcache")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*python, "serve", "--model", str(model), "--port",
                                      str(self.port), *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


class InProcess:
    """The app in this process through `httpx.ASGITransport` (no socket, no server process), with the
    service started and stopped as the lifespan would: for tests of answers, not of the transport."""

    def __init__(self, fused_model, **config):
        from convcache.serve.app import ServeConfig, create_app

        self.app = create_app(ServeConfig(model=str(fused_model), **config))
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.app.state.service.start())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://asgi")

    def get(self, path, **kwargs):
        return self.loop.run_until_complete(self.client.get(path, **kwargs))

    def post(self, path, **kwargs):
        return self.loop.run_until_complete(self.client.post(path, **kwargs))

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.app.state.service.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def api(fused_model):
    s = InProcess(fused_model, max_body_bytes=1 << 20, max_pixels=1_000_000, max_wait_ms=10)
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(fused_model):
    s = Server(fused_model, "--max-body-mb", 1, "--max-pixels", 1_000_000, "--max-wait-ms", 10)
    yield s
    s.stop()


def test_predictions_equal_predictor(api, fused_model):
    predictor = Predictor(fused_model)
    images = [jpeg(i) for i in range(3)]
    expected = predictor.predict(images)
    r = api.post("/v1/predict", files=[("images", (f"{i}.jpg", b, "image/jpeg"))
                                                      for i, b in enumerate(images)])
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [p["class"] for p in got] == [e.label for e in expected]
    for p, e in zip(got, expected):
        for c in predictor.classes:
            assert p["probabilities"][c] == pytest.approx(e.probabilities[c], abs=1e-5)
    raw = api.post("/v1/predict", content=images[0], headers={"content-type": "image/jpeg"})
    assert raw.json()["predictions"][0]["class"] == expected[0].label
    feats = api.post("/v1/features", content=images[1]).json()["features"][0]["features"]
    np.testing.assert_allclose(feats, predictor.features(images[1])[0], atol=1e-4)


def test_predictor_inputs_agree(fused_model, tmp_path):
    predictor = Predictor(fused_model)
    data = jpeg(5)
    (tmp_path / "a.jpg").write_bytes(data)
    img = Image.open(io.BytesIO(data))
    by_path, by_bytes, by_pil = predictor.predict([tmp_path / "a.jpg", data, img])
    assert by_path == by_bytes == by_pil
    arr = predictor.predict(np.asarray(img))
    assert arr.label == by_path.label
    r = run_cli("predict", "--model", fused_model, tmp_path / "a.jpg", tmp_path / "missing.jpg")
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 2 and '"class"' in lines[0] and '"error"' in lines[1]


def test_the_predict_command_batches_its_inference(fused_model, tmp_path, monkeypatch):
    """`convcache predict` over many photos runs --batch-size of them an inference call (it used to run each
    photo alone), the answers in the order given, a bad file answered in its place; its progress (on standard
    error, the answers being standard output) counts to the end, and -q turns it off."""
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "3.jpg").write_bytes(b"broken")
    calls, infer, decode = [], Predictor.infer, Predictor.decode
    others = threading.Semaphore(0)

    def slow_first(self, x, budget=None):
        """The first decode ends once the other 5 are decoded: the last one's decode was submitted after every
        earlier path was queued, so the first batch is full whatever the machine's timing."""
        if str(x).endswith("0.jpg"):
            assert all(others.acquire(timeout=30) for _ in range(5)), "the other decodes did not run"
            return decode(self, x, budget)
        try:
            return decode(self, x, budget)
        finally:
            others.release()

    monkeypatch.setattr(Predictor, "infer", lambda self, px: calls.append(len(px)) or infer(self, px))
    monkeypatch.setattr(Predictor, "decode", slow_first)
    r = run_cli("predict", "--model", fused_model, "--batch-size", 4, "--workers", 2, tmp_path)
    lines = [__import__("json").loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 3 and [Path(x["image"]).name for x in lines] == [f"{i}.jpg" for i in range(6)]
    assert "error" in lines[3] and all("class" in x for i, x in enumerate(lines) if i != 3)
    # the first batch: 4 photos, one broken (the code before made 5 calls of 1); the last two may come apart
    assert calls[0] == 3 and sum(calls) == 5, calls
    assert "6/6" in r.stderr and "img/s" in r.stderr, r.stderr  # progress on standard error, with its end
    monkeypatch.setattr(Predictor, "decode", decode)
    quiet = run_cli("predict", "--model", fused_model, tmp_path / "0.jpg", "-q")
    assert quiet.returncode == 0 and quiet.stdout.count("\n") == 1 and "img/s" not in quiet.stderr, quiet.stderr


def test_predict_each_batches_decodes_ahead_answers_in_order_and_isolates_bad_inputs(fused_model, tmp_path):
    """`Predictor.predict_each` (what `convcache predict` runs): every input answered in order, each as
    `predict` answers it alone, `batch_size` decoded images an inference call, an input that does not decode
    answered with its own error in its place; a lone input on a pipe is answered before the next arrives; an
    error of the inputs themselves comes after every answer before it; a caller that stops early leaves no
    thread behind."""
    from convcache.errors import ImageError

    predictor = Predictor(fused_model, "cpu", batch_size=4)
    images = [jpeg(i) for i in range(8)]
    images[5] = b"not an image"
    alone = {i: predictor.predict(x) for i, x in enumerate(images) if i != 5}
    calls, infer = [], predictor.infer
    predictor.infer = lambda px: calls.append(len(px)) or infer(px)
    queued, decode = threading.Event(), predictor.decode

    def slow_first(x, budget=None):  # the first decode ends once every input is queued: batches are then full
        if x is images[0]:
            assert queued.wait(30)
        return decode(x, budget)

    predictor.decode = slow_first

    def given():
        yield from images
        queued.set()  # (runs once the feeder asks past the last input)

    got = list(predictor.predict_each(given(), workers=2))
    assert [x for x, _ in got] == images and calls == [4, 3], calls
    assert isinstance(got[5][1], ImageError) and got[5][1].reason == "not an image"
    for i, p in alone.items():
        assert got[i][1].class_ == p.class_
        assert all(abs(got[i][1].probabilities[c] - p.probabilities[c]) < 1e-5 for c in predictor.classes)
    predictor.decode = decode

    answered = threading.Event()

    def pipe():  # the second input arrives only once the first is answered (no waiting for a batch to fill)
        yield images[0]
        assert answered.wait(30), "the first input was not answered while it was alone"
        yield images[1]
        raise OSError("standard input closed")

    each = predictor.predict_each(pipe(), workers=2)
    assert next(each)[0] is images[0]
    answered.set()
    assert next(each)[0] is images[1]
    with pytest.raises(OSError, match="standard input closed"):
        next(each)
    before = threading.active_count()
    each = predictor.predict_each(iter(images * 20), workers=2)
    next(each)
    each.close()
    assert wait_for(lambda: threading.active_count() <= before, 10, "the stream's threads to end")


def test_bound_io_serves_the_same_answers_from_uint8_and_keeps_float_pixels_exact(fused_model):
    """The CUDA serving path (issue 29) run on the CPU: decoded uint8 pixels go through IO binding to the graph
    with a Cast in front, features and probabilities bitwise the plain session's; float pixels (the Open
    Inference Protocol's FP32, not necessarily whole numbers) still go the plain way, so they are not
    rounded."""
    plain, bound = Predictor(fused_model, "cpu", io="plain"), Predictor(fused_model, "cpu", io="bound")
    assert (plain.io, bound.io) == ("plain", "bound") and Predictor(fused_model, "cpu").io == "plain"
    px = np.stack([plain.decode(jpeg(i)) for i in range(5)])
    a, b = plain.infer(px), bound.infer(px)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    half = px.astype(np.float32) + 0.5
    assert all(np.array_equal(x, y) for x, y in zip(plain.infer(half), bound.infer(half)))
    assert not np.array_equal(bound.infer(half)[1], b[1])


@pytest.mark.parametrize("body, status", [
    (b"hello, not an image", 415),
    (b"", 415),
    (jpeg(1)[:120], 422),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, 415),  # a JPEG marker, then garbage
])
def test_bad_images(api, body, status):
    r = api.post("/v1/predict", content=body)
    assert r.status_code == status and "error" in r.json()


def test_limits(api):
    big = io.BytesIO()
    Image.new("RGB", (1200, 1200)).save(big, "PNG")  # small file, 1.44 M pixels > the 1 M limit
    r = api.post("/v1/predict", content=big.getvalue())
    assert r.status_code == 422 and "too many pixels" in r.json()["error"]
    r = api.post("/v1/predict", content=b"x" * (2 << 20))
    assert r.status_code == 413
    body = b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--XyZ--\r\n'
    r = api.post("/v1/predict", content=body,
                   headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 422 and "no files" in r.json()["error"]
    assert api.get("/healthz").json() == {"status": "ok"}
    meta = api.get("/v1/model").json()
    assert meta["model"] and meta["classes"] == ["cats", "dogs"] and meta["input_size"] > 0
    assert api.get("/openapi.json").json()["paths"]["/v1/predict"]


def test_concurrent_load_and_cache_metrics(server):
    images = [jpeg(100 + i) for i in range(40)]

    def call(i):
        return httpx.post(server.url + "/v1/predict", content=images[i % 40], timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(200)))
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    assert sum(r.json()["predictions"][0]["cached"] for r in responses) >= 100
    text = httpx.get(server.url + "/metrics").text
    hits = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("convcache_cache_hits_total")]
    assert hits and hits[0] >= 100
    assert "convcache_batch_size_bucket" in text and "convcache_request_seconds_bucket" in text
    assert 'status="500"' not in text


def test_queue_bound_gives_503_not_500(fused_model):
    s = Server(fused_model, "--max-queue", 1, "--max-wait-ms", 200, "--cache-mb", 0)
    try:
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: httpx.post(s.url + "/v1/predict", content=jpeg(i), timeout=60).status_code,
                                  range(32)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    finally:
        s.stop()


def test_graceful_shutdown_drains_in_flight(fused_model):
    s = Server(fused_model, "--max-wait-ms", 2000, "--batch-wait", "fixed", "--cache-mb", 0)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(s.url + "/v1/predict", content=jpeg(3),
                                                                    timeout=30)))
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and "convcache_cache_misses_total 1.0" not in httpx.get(s.url + "/metrics").text:
        time.sleep(0.01)  # until the request is in flight, waiting in the batcher
    s.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result["r"].status_code == 200
    assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained


# what a slim serving box (`pip install 'convcache[serve,cpu]'`) does not have: the store, extraction, training
# and TensorFlow extras (issue 31, item 6)
NOT_ON_A_SERVING_BOX = ("zarr", "cv2", "sklearn", "scipy", "matplotlib", "tensorflow", "keras", "tf2onnx", "dask")
_WITHOUT = ("import sys, importlib.abc\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {NOT_ON_A_SERVING_BOX!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "from convcache.cli import main\n"
            "sys.exit(main())\n")


def test_serve_runs_on_a_slim_install(fused_model, tmp_path):
    """`convcache serve` as on a box with only the serve and cpu extras: those packages cannot be imported (a
    finder refuses them, as a missing package would), and the service answers /v1 and /v2. The extras in
    pyproject.toml bring none of them: a new import of OpenCV or Zarr on the serving side fails here."""
    s = Server(fused_model, "--max-wait-ms", 5, python=(sys.executable, "-c", _WITHOUT))
    try:
        r = httpx.post(s.url + "/v1/predict", content=jpeg(3), timeout=30)
        assert r.status_code == 200 and "probabilities" in r.json()["predictions"][0], r.text
        body = {"inputs": [{"name": "images", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": [0] * 192}]}
        r = httpx.post(s.url + "/v2/models/model/infer", json=body, timeout=30)
        assert r.status_code in (200, 400), r.text  # a wrong size is the model's 400, not a missing module
        size = Predictor(fused_model).size
        body["inputs"][0].update(shape=[1, size, size, 3], data=[7] * (size * size * 3))
        r = httpx.post(s.url + "/v2/models/model/infer", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "probabilities", r.text
    finally:
        s.stop()
    # a stage whose extra is absent: one line naming the extra, not a traceback
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    r = subprocess.run([sys.executable, "-c", _WITHOUT, "info", str(tmp_path / "s.zarr")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'convcache[store]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_serving_extras_bring_no_store_extract_train_or_tf():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras, seen, todo = project["optional-dependencies"], [], [*project["dependencies"], "convcache[serve,cpu]"]
    while todo:
        req = Requirement(todo.pop())
        if req.name == "convcache":
            todo.extend(r for e in req.extras for r in extras[e])
        else:
            seen.append(req.name.lower())
    banned = {"zarr", "opencv-python-headless", "opencv-python", "scikit-learn", "scipy", "matplotlib", "tensorflow",
              "keras", "tf2onnx", "dask"}
    assert seen and not banned & set(seen), sorted(banned & set(seen))


def test_a_lone_request_does_not_wait_for_company(fused_model):
    """--batch-wait adaptive (the default): a batch waits for more images only while more are on their way, so a
    lone client's request is not held --max-wait-ms (Triton's statistics give each request's queue time);
    fixed always waits it."""
    waits = {}
    for mode in ("adaptive", "fixed"):
        s = Server(fused_model, "--max-wait-ms", 1000, "--batch-wait", mode, "--cache-mb", 0, "--name", "m")
        try:
            for i in range(2):
                assert httpx.post(s.url + "/v1/predict", content=jpeg(40 + i), timeout=30).status_code == 200
            queue = httpx.get(s.url + "/v2/models/m/stats").json()["model_stats"][0]["inference_stats"]["queue"]
            waits[mode] = queue["ns"] / queue["count"] / 1e9
        finally:
            s.stop()
    assert waits["fixed"] >= 0.99 and waits["adaptive"] < 0.5, waits


def test_serve_rejects_a_non_fused_model(pooled_extractor):
    r = run_cli("serve", "--model", pooled_extractor, "--port", free_port())
    assert r.returncode == 2 and "not a fused convcache model" in r.stderr


def test_openapi_documents_the_upload_and_a_typed_answer(api, fused_model):
    spec = api.get("/openapi.json").json()
    op = spec["paths"]["/v1/predict"]["post"]
    upload = op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["image"]
    assert upload["items"]["format"] == "binary" and op["requestBody"]["required"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schema = spec["components"]["schemas"][ok]
    assert {"model", "predictions"} <= set(schema["properties"])
    pred = spec["components"]["schemas"]["Prediction"]["properties"]
    assert {"class", "probabilities", "cached"} <= set(pred)
    assert op["responses"]["415"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    # the documented answer is what the service answers, and its model id is the model's identity
    r = api.post("/v1/predict", files={"image": ("a.jpg", jpeg(1), "image/jpeg")})
    from convcache.artifacts import read

    identity = read(fused_model).identity
    assert r.status_code == 200 and r.json()["model"] == identity and identity.startswith(spec["info"]["version"])
    info = api.get("/v1/model").json()
    assert info["model"] == identity and "/" not in json_dumps(info.get("extractor"))  # no local paths
    assert "config" not in info and "metadata" not in info


def json_dumps(v):
    import json

    return json.dumps(v)


def test_one_error_shape_and_route_template_labels(api):
    for method, path, status in (("get", "/wp-login.php", 404), ("get", "/v1/predict", 405),
                                 ("post", "/v1/predict", 415)):
        r = getattr(api, method)(path, **({"content": b"junk"} if method == "post" else {}))
        assert r.status_code == status and set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    text = api.get("/metrics").text
    assert "/wp-login.php" not in text and 'endpoint="<unmatched>"' in text
    assert 'endpoint="/v1/predict"' in text
    model_id = api.get("/v1/model").json()["model"]
    assert f'convcache_model_info{{model="{model_id}"}} 1.0' in text  # the one model id, in metrics too


def test_metrics_are_one_exposition_across_workers(fused_model):
    s = Server(fused_model, "--workers", 2)
    try:
        for i in range(20):
            assert httpx.post(s.url + "/v1/predict", content=jpeg(300 + i), timeout=60).status_code == 200
        counts = []
        for _ in range(6):  # whichever worker answers /metrics, it reports all 20 requests
            text = httpx.get(s.url + "/metrics").text
            counts.append(sum(float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("convcache_requests_total") and '"/v1/predict"' in line))
        assert all(c == 20 for c in counts), counts
    finally:
        s.stop()


def test_hostile_clients_get_fast_clear_answers(fused_model):
    """No server header; a stalled body is cut off (408); an undecodable upload is a 4xx, never a 500;
    overload is refused before decoding, with Retry-After."""
    from test_hostile import _dds_unknown_flags

    s = Server(fused_model, "--max-queue", 1, "--max-wait-ms", 300, "--cache-mb", 0)
    try:
        r = httpx.post(s.url + "/v1/predict", content=_dds_unknown_flags())
        assert r.status_code == 422 and "NotImplementedError" in r.json()["error"] and "server" not in r.headers
        # a client that sends headers and then stalls its body
        with socket.create_connection(("127.0.0.1", s.port)) as c:
            c.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
            c.settimeout(30)
            t0 = time.time()
            answer = c.recv(4096).decode(errors="replace")
            assert answer.startswith("HTTP/1.1 408") and time.time() - t0 < 25
        # a slowloris: headers never finished; the connection is closed, not held forever
        with socket.create_connection(("127.0.0.1", s.port)) as c:
            c.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
            c.settimeout(30)
            t0 = time.time()
            assert c.recv(4096) == b"" and time.time() - t0 < 25
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: httpx.post(s.url + "/v1/predict", content=jpeg(500 + i), timeout=30),
                               range(8)))
        busy = [r for r in rs if r.status_code == 503]
        assert busy and all(r.headers.get("retry-after") == "1" for r in busy)
        assert {r.status_code for r in rs} <= {200, 503}
    finally:
        s.stop()


def test_int8_extractor_end_to_end(pooled_extractor, tmp_path):
    """int8 is a first-class path: an int8 extractor's store, a head on it, the fused model served by the
    Predictor (and on OpenVINO where installed) gives the head's own answers on the stored features."""
    import onnx
    from conftest import SIZE, make_dataset

    from convcache.artifacts.convert import session
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.runtime import openvino_version
    from convcache.store import FeatureStore
    from convcache.train.fuse import fuse
    from convcache.train.runner import train_head

    data = make_dataset(tmp_path / "data", splits={"train": 6, "validation": 4})
    ext = tmp_path / "int8.onnx"
    export("random", SIZE, str(ext), layer="block3_pool", pooling="avg", precision="int8",
                     calibration=str(data / "train"), seed=1)
    run_extract(ExtractConfig(model=str(ext), data=str(data), output=str(tmp_path / "f.zarr"), progress=False,
                              device="cpu"))
    train_head(str(tmp_path / "f.zarr"), "logreg", str(tmp_path / "head"))
    fuse(str(ext), str(tmp_path / "head"), str(tmp_path / "model.onnx"))
    fused = onnx.load(str(tmp_path / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in fused.graph.node)
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.extractor_metadata()["precision"] == "int8"
    head = session(onnx.load(str(tmp_path / "head" / "head.onnx")))
    split = store.load("validation")
    want = head.run(None, {head.get_inputs()[0].name: split.features.reshape(len(split), -1).astype(np.float32)})[0]
    paths = [str(p) for p in split.paths]
    for device in ["cpu"] + (["openvino"] if openvino_version() else []):
        got = Predictor(tmp_path / "model.onnx", device=device).predict(paths)
        probs = np.array([[p.probabilities[c] for c in store.classes] for p in got])
        # OpenVINO's int8 kernels round requantization differently from ONNX Runtime's (2e-3 seen here)
        np.testing.assert_allclose(probs, want, atol=1e-2 if device == "openvino" else 1e-5)


def test_docs_are_served_offline_with_their_own_routes(api):
    page = api.get("/docs")
    assert page.status_code == 200 and "cdn." not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
    redoc = api.get("/redoc")
    assert redoc.status_code == 200 and "cdn." not in redoc.text and "fonts.googleapis" not in redoc.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert api.get(f"/docs-assets/{asset}").status_code == 200
    spec = api.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/docs" not in spec["paths"]
    metrics_doc = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics_doc) == ["text/plain"]
    text = api.get("/metrics").text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert f'endpoint="{path}"' in text, path


def test_docs_render_in_a_headless_browser_without_network(server):
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    # the page may fetch only from the service itself: any other host is refused
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--dump-dom",
                        server.url + "/docs"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert "/v1/predict" in r.stdout and "swagger-ui" in r.stdout


def test_triton_repository_config_parses_with_tritons_schema_and_matches_the_graph(fused_model, tmp_path):
    """Nothing here can run Triton: the check is Triton's own schema (model_config_pb2) and the graph."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    from convcache.artifacts import describe, read

    r = run_cli("triton", "--model", fused_model, "-o", tmp_path / "repo", "--name", "cats_dogs",
                "--device", "cpu", "gpu")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "repo" / "cats_dogs"
    assert (folder / "1" / "model.onnx").read_bytes() == fused_model.read_bytes()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    graph = describe(fused_model)
    assert config.name == "cats_dogs" and config.backend == "onnxruntime" and config.max_batch_size == 32
    types = {v: k for k, v in model_config_pb2.DataType.items()}
    for declared, actual in ((config.input, graph["inputs"]), (config.output, graph["outputs"])):
        assert [(t.name, list(t.dims)) for t in declared] == [(a["name"], a["shape"][1:]) for a in actual]
        assert all(types[t.data_type] == "TYPE_FP32" for t in declared)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    kinds = {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
    assert kinds == {"KIND_CPU", "KIND_GPU"}
    assert config.parameters["convcache_model_id"].string_value == read(fused_model).identity
    bad = run_cli("triton", "--model", fused_model, "-o", tmp_path / "repo", "--name", "no/slash")
    assert bad.returncode == 2 and "--name" in bad.stderr


@pytest.fixture(scope="module")
def oip_server(fused_model):
    grpc_port = free_port()
    s = Server(fused_model, "--name", "cats_dogs", "--max-wait-ms", 10, "--grpc-port", grpc_port)
    s.grpc = f"127.0.0.1:{grpc_port}"
    yield s
    s.stop()


def test_grpc_with_the_real_tritonclient(oip_server, fused_model):
    """Issue 31, item 1: KServe's v2 GRPCInferenceService beside HTTP, one service behind both: health,
    metadata, Triton's config, statistics and index, inference with raw and typed contents (FP32 and UINT8
    pixels, BYTES files) equal to Predictor within 1e-5; errors as the protocol's status codes; the same metrics."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import grpc
    from tritonclient.utils import InferenceServerException

    predictor = Predictor(fused_model)
    client = grpcclient.InferenceServerClient(url=oip_server.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cats_dogs")
    meta = client.get_model_metadata("cats_dogs", as_json=True)
    size = predictor.size
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [str(-1), str(size), str(size), "3"]}
    http_config = httpx.get(oip_server.url + "/v2/models/cats_dogs/config").json()
    grpc_config = client.get_model_config("cats_dogs", as_json=True)["config"]
    assert grpc_config["name"] == http_config["name"] and grpc_config["max_batch_size"] == http_config[
        "max_batch_size"] and [i["name"] for i in grpc_config["input"]] == ["images"]
    files = [jpeg(700 + i) for i in range(3)]
    pixels = np.stack([predictor.to_pixels(f) for f in files])
    expected = np.stack([predictor.run_pixels(p[None])[0][0] for p in pixels])
    for dtype, datatype in ((np.float32, "FP32"), (np.uint8, "UINT8")):
        inp = grpcclient.InferInput("images", list(pixels.shape), datatype)
        inp.set_data_from_numpy(pixels.astype(dtype))  # raw_input_contents
        res = client.infer("cats_dogs", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities"),
                                                        grpcclient.InferRequestedOutput("features")])
        np.testing.assert_allclose(res.as_numpy("probabilities"), expected, atol=1e-5)
        assert res.as_numpy("features").shape[0] == 3
    from tritonclient.grpc import service_pb2

    typed = service_pb2.ModelInferRequest(model_name="cats_dogs")
    t = typed.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    t.contents.uint_contents.extend(pixels.ravel().tolist())
    stub = client._client_stub
    got = stub.ModelInfer(typed)
    np.testing.assert_allclose(np.frombuffer(got.raw_output_contents[0], np.float32).reshape(3, -1), expected,
                               atol=1e-5)
    encoded = grpcclient.InferInput("images", [len(files)], "BYTES")
    encoded.set_data_from_numpy(np.array(files, dtype=np.object_))
    np.testing.assert_allclose(client.infer("cats_dogs", [encoded]).as_numpy("probabilities"), expected, atol=1e-5)
    stats = client.get_inference_statistics("cats_dogs", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 9
    assert client.get_model_repository_index(as_json=True)["models"][0]["name"] == "cats_dogs"
    bad = grpcclient.InferInput("images", [1, size + 1, size, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, size + 1, size, 3), np.float32))
    for call, code, words in ((lambda: client.infer("cats_dogs", [bad]), grpc.StatusCode.INVALID_ARGUMENT,
                               "expected [N, "),
                              (lambda: client.get_model_metadata("nope"), grpc.StatusCode.NOT_FOUND, "unknown model")):
        with pytest.raises(InferenceServerException, match=re.escape(words)) as caught:
            call()
        assert caught.value.status() == f"StatusCode.{code.name}", caught.value.status()
    text = httpx.get(oip_server.url + "/metrics").text
    assert 'endpoint="/inference.GRPCInferenceService/ModelInfer",method="GRPC",status="OK"' in text
    assert 'method="GRPC",status="INVALID_ARGUMENT"' in text


def test_open_inference_protocol_with_the_real_tritonclient(oip_server, fused_model):
    """Issue 21, item 1: tritonclient[http] against the service: health, metadata, and inference with JSON
    and binary tensors, FP32 and UINT8 pixels and BYTES image files, equal to Predictor within 1e-5."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    predictor = Predictor(fused_model)
    client = httpclient.InferenceServerClient(url=oip_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cats_dogs")
    meta = client.get_model_metadata("cats_dogs")
    size = predictor.size
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, size, size, 3]}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "features"]
    files = [jpeg(500 + i) for i in range(3)]
    pixels = np.stack([predictor.to_pixels(f) for f in files])
    expected = np.stack([predictor.run_pixels(p[None])[0][0] for p in pixels])
    for binary in (True, False):
        for dtype, datatype in ((np.float32, "FP32"), (np.uint8, "UINT8")):
            inp = httpclient.InferInput("images", list(pixels.shape), datatype)
            inp.set_data_from_numpy(pixels.astype(dtype), binary_data=binary)
            outs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
                    httpclient.InferRequestedOutput("features", binary_data=binary)]
            res = client.infer("cats_dogs", [inp], outputs=outs)
            np.testing.assert_allclose(res.as_numpy("probabilities"), expected, atol=1e-5)
            assert res.as_numpy("features").shape[0] == 3
    encoded = httpclient.InferInput("images", [len(files)], "BYTES")
    encoded.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    res = client.infer("cats_dogs", [encoded])
    np.testing.assert_allclose(res.as_numpy("probabilities"), expected, atol=1e-5)
    bad = httpclient.InferInput("images", [1, size + 1, size, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, size + 1, size, 3), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected \[N, "):
        client.infer("cats_dogs", [bad])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    text = httpx.get(oip_server.url + "/metrics").text
    assert 'endpoint="/v2/models/{name}/infer"' in text  # the same metrics as /v1, by route template


def test_tritons_extensions_with_tritonclient_and_tritons_schemas(oip_server, fused_model, tmp_path):
    """Issue 31, item 2: the model-configuration extension answers the configuration `convcache triton` writes
    (with the server's batching), the statistics extension counts each phase, the repository index lists the
    model; each answer parses into Triton's own message types (unknown fields are an error there)."""
    httpclient = pytest.importorskip("tritonclient.http")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from google.protobuf import json_format, text_format

    from convcache.serve.config import ServeConfig
    from convcache.serve.triton import write_repository

    client = httpclient.InferenceServerClient(url=oip_server.url.removeprefix("http://"))
    served = json_format.ParseDict(client.get_model_config("cats_dogs"), model_config_pb2.ModelConfig())
    batch = ServeConfig.__dataclass_fields__["max_batch"].default
    folder = write_repository(str(fused_model), str(tmp_path / "repo"), name="cats_dogs", max_batch=batch,
                              preferred=(batch,), delay_us=10_000)
    written = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert len(written.model_warmup) == 1 and [o.label_filename for o in written.output] == ["", "labels.txt"]
    written.ClearField("model_warmup")  # a repository's own: the labels file and its warm-up request
    for o in written.output:
        o.ClearField("label_filename")
    assert served == written, (served, written)
    assert {"model_configuration", "statistics"} <= set(client.get_server_metadata()["extensions"])

    before = client.get_inference_statistics("cats_dogs")["model_stats"][0]
    predictor = Predictor(fused_model)
    pixels = np.stack([predictor.to_pixels(jpeg(900 + i)) for i in range(4)]).astype(np.float32)
    inp = httpclient.InferInput("images", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    client.infer("cats_dogs", [inp])
    stats = client.get_inference_statistics("cats_dogs")
    json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())  # Triton's own message: every field known
    after = stats["model_stats"][0]
    phase = lambda s, p: (s["inference_stats"][p]["count"], s["inference_stats"][p]["ns"])
    assert after["inference_count"] - before["inference_count"] == 4 and after["execution_count"] > 0
    for p in ("success", "queue", "compute_input", "compute_infer", "compute_output", "cache_miss"):
        (c0, ns0), (c1, ns1) = phase(before, p), phase(after, p)
        assert c1 - c0 == 4 and ns1 > ns0, (p, before, after)
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) == after["inference_count"]
    assert httpx.get(oip_server.url + "/v2/models/nope/stats").status_code == 404
    index = client.get_model_repository_index()
    assert index == [{"name": "cats_dogs", "version": "1", "state": "READY"}], index
    json_format.ParseDict({"models": index}, service_pb2.RepositoryIndexResponse())


def test_the_classification_extension_names_the_top_classes(oip_server, fused_model):
    """Triton's classification extension on both transports: `class_count=k` on `probabilities` answers a BYTES
    tensor [rows, k] of `score:index:label`, best first (binary and JSON over HTTP, raw over gRPC), from the
    same probabilities; a bad k or a classified `features` is a 400 / INVALID_ARGUMENT."""
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    predictor = Predictor(fused_model)
    pixels = np.stack([predictor.to_pixels(jpeg(1700 + i)) for i in range(5)]).astype(np.float32)
    probs = predictor.infer(pixels.astype(np.uint8))[0]
    k = len(predictor.classes)
    expected = [[f"{probs[r, i]:.6f}:{i}:{predictor.classes[i]}" for i in np.argsort(-probs[r], kind="stable")]
                for r in range(len(probs))]
    http = httpclient.InferenceServerClient(url=oip_server.url.removeprefix("http://"))
    grpc_ = grpcclient.InferenceServerClient(url=oip_server.grpc)
    assert "classification" in http.get_server_metadata()["extensions"]
    assert "classification" in grpc_.get_server_metadata(as_json=True)["extensions"]

    def ask(module, client, count, binary=True, name="probabilities"):
        inp = module.InferInput("images", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        out = module.InferRequestedOutput(name, class_count=count) if module is grpcclient else \
            module.InferRequestedOutput(name, binary_data=binary, class_count=count)
        return client.infer("cats_dogs", [inp], outputs=[out]).as_numpy(name)

    def parsed(answer):  # BYTES elements come back as bytes (binary, gRPC) or str (JSON), as from Triton
        text = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in answer]
        return [[(float(e.split(":")[0]), e.split(":", 1)[1]) for e in row] for row in text]

    want = [[(float(e.split(":")[0]), e.split(":", 1)[1]) for e in row] for row in expected]
    for module, client, binary in ((httpclient, http, True), (httpclient, http, False), (grpcclient, grpc_, True)):
        answer = ask(module, client, k, binary)
        assert answer.shape == (5, k), answer.shape
        got = parsed(answer)
        assert [[x[1] for x in row] for row in got] == [[x[1] for x in row] for row in want], (got, want)
        assert np.allclose([[x[0] for x in row] for row in got], [[x[0] for x in row] for row in want], atol=2e-6)
        assert ask(module, client, 1, binary).shape == (5, 1)
        assert ask(module, client, k + 3, binary).shape == (5, k)  # Triton's rule: at most the class count
        with pytest.raises(InferenceServerException) as err:
            ask(module, client, 1, binary, "features")
        assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), err.value.status()
    for bad in (0, -1, True, "2", 1.5):  # what tritonclient never sends: posted as JSON
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(pixels[:1].shape),
                            "data": pixels[:1].ravel().tolist()}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": bad}}]}
        r = httpx.post(oip_server.url + "/v2/models/cats_dogs/infer", json=body, timeout=30)
        assert r.status_code == 400 and "classification" in r.json()["error"], (bad, r.status_code, r.text)


@pytest.fixture(scope="module")
def tritonserver(fused_model, tmp_path_factory):
    """A real tritonserver (the binary in PyPI's nvidia-pytriton wheel, `make tritonserver`) serving the
    repository `convcache triton --backend python` writes; skipped, with the reason, where it cannot run."""
    from conftest import wait_for

    from convcache.serve.tritonserver import default_distribution

    dist = default_distribution(Path(__file__).resolve().parent.parent)
    problem = dist.problem()
    if problem:
        pytest.skip(f"no runnable tritonserver: {problem}")
    root = tmp_path_factory.mktemp("triton")
    r = run_cli("triton", "--model", fused_model, "-o", root / "repo", "--name", "cats_dogs", "--backend", "python",
                "--threads", "1", "--max-queue-delay-us", "20000")
    assert r.returncode == 0, r.stderr
    http, grpc_, metrics = free_port(), free_port(), free_port()
    argv, env = dist.command(root / "repo", root, http, grpc_, metrics)
    log = open(root / "tritonserver.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{http}"

    def ready():
        assert proc.poll() is None, (root / "tritonserver.log").read_text()[-3000:]
        try:
            return httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=120, what="tritonserver to load the python-backend repository", interval=0.2)
    yield {"http": url, "grpc": f"127.0.0.1:{grpc_}", "log": root / "tritonserver.log", "repo": root / "repo"}
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_a_real_tritonserver_serves_the_python_backend_repository(tritonserver, oip_server, fused_model):
    """Issue 31, item 3: tritonserver loads what `convcache triton --backend python` writes (model.py running
    ONNX Runtime, the labels file, the warm-up request) and answers tritonclient, over HTTP and gRPC, with the
    probabilities `convcache serve` gives for the same pixels (<= 1e-5); Triton's classification extension
    names the classes from labels.txt; requests that the dynamic batcher puts together each get their own rows."""
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")

    predictor = Predictor(fused_model)
    triton = httpclient.InferenceServerClient(url=tritonserver["http"], concurrency=8)
    ours = httpclient.InferenceServerClient(url=oip_server.url.removeprefix("http://"))
    assert triton.is_model_ready("cats_dogs")
    config = triton.get_model_config("cats_dogs")
    assert config["backend"] == "python" and config["model_warmup"][0]["batch_size"] == 1
    labelled = [o["name"] for o in config["output"] if o.get("label_filename") == "labels.txt"]
    assert labelled == ["probabilities"], config["output"]
    assert (tritonserver["repo"] / "cats_dogs" / "labels.txt").read_text().split() == predictor.classes

    pixels = np.stack([predictor.to_pixels(jpeg(1500 + i)) for i in range(6)]).astype(np.float32)

    def infer(client, x, module=httpclient, **output):
        inp = module.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("cats_dogs", [inp], outputs=[module.InferRequestedOutput("probabilities", **output)])

    served = infer(ours, pixels).as_numpy("probabilities")
    theirs = infer(triton, pixels).as_numpy("probabilities")
    assert theirs.shape == (6, len(predictor.classes))
    assert np.abs(theirs - served).max() <= 1e-5, np.abs(theirs - served).max()
    via_grpc = infer(grpcclient.InferenceServerClient(url=tritonserver["grpc"]), pixels, grpcclient)
    assert np.abs(via_grpc.as_numpy("probabilities") - served).max() <= 1e-5

    top = infer(triton, pixels, class_count=1).as_numpy("probabilities").ravel()
    expected = [predictor.classes[i] for i in served.argmax(1)]
    assert [t.decode().split(":")[2] for t in top] == expected, top
    k = len(predictor.classes)  # the classification extension: convcache serve answers as Triton does
    theirs_k = infer(triton, pixels, class_count=k).as_numpy("probabilities")
    ours_k = infer(ours, pixels, class_count=k).as_numpy("probabilities")
    split = lambda a: [[e.decode().split(":") for e in row] for row in a]
    assert [[e[1:] for e in row] for row in split(ours_k)] == [[e[1:] for e in row] for row in split(theirs_k)]
    assert np.allclose([[float(e[0]) for e in row] for row in split(ours_k)],
                       [[float(e[0]) for e in row] for row in split(theirs_k)], atol=2e-6)

    pending = []
    for i in range(len(pixels)):  # one image a request, all in flight at once: Triton may batch them
        inp = httpclient.InferInput("images", [1, *pixels.shape[1:]], "FP32")
        inp.set_data_from_numpy(pixels[i:i + 1])
        pending.append(triton.async_infer("cats_dogs", [inp]))
    one_by_one = np.concatenate([p.get_result().as_numpy("probabilities") for p in pending])
    assert np.abs(one_by_one - served).max() <= 1e-5
    stats = triton.get_inference_statistics("cats_dogs")["model_stats"][0]
    assert int(stats["inference_count"]) >= 3 * len(pixels) + 6, stats


def test_metrics_a_dashboard_expects_pass_promtool(oip_server):
    """Issue 31, item 7: request metrics by route template, method and status; the queue wait and the inference
    call as separate histograms; images per call; the process's own metrics; clean under `promtool check
    metrics` (Debian's prometheus; .ci/run installs it) and under prometheus_client's own parser."""
    import shutil

    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.post(oip_server.url + "/v1/predict", content=jpeg(1234), timeout=30).status_code == 200
    assert httpx.get(oip_server.url + "/v1/predict").status_code == 405
    text = httpx.get(oip_server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("convcache_queue_seconds", "convcache_compute_seconds", "convcache_batch_size",
                 "convcache_request_seconds", "process_resident_memory_bytes", "process_cpu_seconds",
                 "python_gc_collections"):
        assert name in families, (name, sorted(families))
    assert families["convcache_queue_seconds"].type == families["convcache_compute_seconds"].type == "histogram"
    labels = [s.labels for s in families["convcache_requests"].samples if s.name == "convcache_requests_total"]
    assert {"endpoint": "/v1/predict", "method": "POST", "status": "200"} in labels, labels
    assert {"endpoint": "/v1/predict", "method": "GET", "status": "405"} in labels, labels
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); the parser check above ran")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)


def test_schemathesis_finds_nothing_in_any_phase(fused_model, tmp_path):
    """Issue 31, item 4: the OpenAPI document is truthful. Schemathesis, every phase (examples, coverage,
    fuzzing, stateful) and every check but positive data acceptance (a random valid-looking tensor is rightly
    refused for its pixels), with a bounded number of examples per operation."""
    import shutil

    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(st).exists():
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    s = Server(fused_model, "--name", "m", "--max-wait-ms", 1)
    try:
        r = subprocess.run([st, "--no-color", "run", s.url + "/openapi.json",
                            "--phases", "examples,coverage,fuzzing,stateful",
                            "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "15",
                            "--workers", "1", "--seed", "1"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        s.stop()
    tail = r.stdout[-4000:]
    assert r.returncode == 0 and " passed" in tail and "failures" not in tail.split("SUMMARY")[-1], tail


def test_the_predictor_names_its_answer_as_the_service_does(fused_model):
    p = Predictor(fused_model).predict(jpeg(7))
    assert p.to_dict()["class"] == p.class_ == p.label and set(p.probabilities) == set(Predictor(fused_model).classes)


KSERVE_SESSION = """
import asyncio, json, sys
import numpy as np
import kserve

url, x = sys.argv[1], np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.float32)

async def session():
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=1))
    try:
        out = {"live": await client.is_server_live(url), "ready": await client.is_server_ready(url),
               "model_ready": await client.is_model_ready(url, "cats_dogs"), "answers": []}
        for binary in (False, True):
            tensor = kserve.InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            answer = await client.infer(url, kserve.InferRequest(model_name="cats_dogs", infer_inputs=[tensor]),
                                        model_name="cats_dogs")
            o = answer.outputs[0]
            out["answers"].append({"name": o.name, "datatype": o.datatype, "values": o.as_numpy().tolist()})
        return out
    finally:
        await client.close()

print(json.dumps(asyncio.run(session())))
"""


def test_open_inference_protocol_with_kserves_own_client(oip_server, fused_model):
    """Issue 21, item 1: KServe's InferenceRESTClient (protocol v2) against the service: health, model
    readiness, and inference with JSON and binary tensors, equal to Predictor within 1e-5. In a process of
    its own: kserve's and tritonclient's gRPC protos define the same symbols and cannot share a process."""
    import importlib.util
    import json

    if importlib.util.find_spec("kserve") is None:  # found, not imported: its protos would clash here
        pytest.skip("kserve is not installed")
    r = subprocess.run([sys.executable, "-c", KSERVE_SESSION, oip_server.url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["live"] and got["ready"] and got["model_ready"]
    x = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = Predictor(fused_model).run_pixels(x.astype(np.uint8))[0]
    for answer in got["answers"]:
        assert answer["name"] == "probabilities" and answer["datatype"] == "FP32"
        assert np.abs(np.array(answer["values"]) - expected).max() < 1e-5
