import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SIZE, export, in_worker, make_dataset, run_cli

from convcache.artifacts import read
from convcache.artifacts.metadata import get_metadata, graph_sha256, set_metadata
from convcache.errors import ConvcacheError

pytestmark = pytest.mark.tf


def _run(path, images):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["features"], {"images": images})[0]


@pytest.mark.parametrize("preprocess", ["caffe", "rescale"])
def test_parity_with_keras_own_preprocessing_at_32px(preprocess):
    in_worker(_parity_with_keras_own_preprocessing_at_32px, preprocess)  # converts: in the export worker


def _parity_with_keras_own_preprocessing_at_32px(preprocess):
    """Each preprocessing is inside the graph and matches Keras' own: `vgg16.preprocess_input` for caffe,
    x/255 (ImageDataGenerator(rescale=1./255)) for rescale, both fed to the bare cut base."""
    from convcache.backbone import keras_model, weights
    from convcache.export import onnx_target

    base = weights.load_vgg16("random", SIZE, seed=3)
    model = keras_model.build_extractor(base, preprocess=preprocess)
    proto = onnx_target.extractor_to_onnx(model, fold_bgr=preprocess == "caffe")
    onnx.checker.check_model(proto, full_check=True)
    images = onnx_target.sample_images(3, SIZE, seed=5)
    bare = keras_model.cut_base(base)
    diff = onnx_target.check_extractor_parity(proto, bare, images, preprocess)
    reference = bare.predict(keras_model.keras_preprocess(images, preprocess), verbose=0)
    assert diff <= 1e-4 * np.abs(reference).max()
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    a = s.run(None, {"images": images})[0]
    # the other preprocessing's reference is far away: the check can tell the two apart
    other = bare.predict(keras_model.keras_preprocess(images, {"caffe": "rescale", "rescale": "caffe"}[preprocess]),
                         verbose=0)
    assert np.abs(a - other).max() > 100 * diff
    with pytest.raises(ConvcacheError, match="parity failed"):
        onnx_target.check_extractor_parity(proto, bare, images, {"caffe": "rescale", "rescale": "caffe"}[preprocess])
    # caffe swaps channels (a channel swap changes the output); rescale keeps RGB order, and scales
    b = s.run(None, {"images": images[..., ::-1].copy()})[0]
    assert not np.allclose(a, b)


def test_export_cli_preprocess_rescale_is_recorded_and_never_mixed(extractor, tmp_path):
    from conftest import make_dataset

    out = tmp_path / "rescale.onnx"
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--seed", 1, "--preprocess", "rescale",
                "-o", out)
    assert r.returncode == 0, r.stderr
    assert "rescale preprocessing" in r.stdout
    ext = read(out)
    assert ext.preprocess == "rescale" and ext.metadata["preprocess"] == "rescale"
    assert read(extractor).preprocess == "caffe"
    assert ext.identity != read(extractor).identity  # the preprocessing is part of the identity
    assert not any(n.op_type == "Sub" for n in onnx.load(out).graph.node[:2])  # no mean subtracted
    data = make_dataset(tmp_path / "data", splits={"train": 2, "validation": 2})
    store = tmp_path / "s.zarr"
    assert run_cli("extract", "--model", extractor, "--data", data, "-o", store, "-q").returncode == 0
    r = run_cli("extract", "--model", out, "--data", data, "-o", store, "-q")
    assert r.returncode == 2 and "refusing to mix" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--preprocess", "none", "-o", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_rgb_to_bgr_is_folded_into_the_first_conv():
    in_worker(_rgb_to_bgr_is_folded_into_the_first_conv)  # converts: in the export worker


def _rgb_to_bgr_is_folded_into_the_first_conv():
    """The Tensordot the converter makes of the RGB->BGR matmul is gone: the graph starts
    Sub(mean) -> Transpose -> Conv, and still equals Keras at saturated borders (mean subtracted
    before the Conv pads), on pure-colour images where a wrong channel order shows."""
    from convcache.artifacts import compose as onnxcompose
    from convcache.artifacts import convert as onnxtools
    from convcache.backbone import keras_model, weights
    from convcache.export import onnx_target

    model = keras_model.build_extractor(weights.load_vgg16("random", SIZE, seed=3), "block1_conv2")
    proto = onnx_target.extractor_to_onnx(model)
    assert [n.op_type for n in proto.graph.node[:3]] == ["Sub", "Transpose", "Conv"]
    assert not any(n.op_type in ("MatMul", "Shape", "Gather") for n in proto.graph.node)
    images = np.zeros((4, SIZE, SIZE, 3), np.float32)
    images[0] = 255
    images[1, ..., 0] = 255  # red only
    images[2, ..., 2] = 255  # blue only
    images[3] = onnx_target.sample_images(1, SIZE, seed=1)[0]
    reference = model.predict(images, verbose=0)
    got = onnxtools.session(proto).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, reference, atol=1e-4 * np.abs(reference).max())
    # the unfolded conversion agrees too, and folding twice finds nothing left to fold
    raw = onnxtools.keras_to_onnx(model, "images", (SIZE, SIZE, 3), "features", 17)
    assert any(n.op_type == "MatMul" for n in raw.graph.node)
    np.testing.assert_allclose(onnxtools.session(raw).run(None, {"images": images})[0], got,
                               atol=1e-5 * np.abs(reference).max())
    assert not onnxcompose.fold_channel_permutation(proto)


def test_the_direct_writer_gives_tf2onnx_graph_identity_and_outputs():
    in_worker(_the_direct_writer_gives_tf2onnx_graph_identity_and_outputs)  # converts: in the export worker


def _the_direct_writer_gives_tf2onnx_graph_identity_and_outputs():
    """`convcache.artifacts.keras_onnx` writes the graph tf2onnx's conversion (with the fold) makes: the same graph
    identity, so stores made with either extractor are the same store's, and the same outputs, for both
    preprocessings, pooled or not, and a tapped model; the converter is in the producer name. Caffe left
    unfolded (not what export writes) gives the same outputs from another graph: a Gather where tf2onnx
    has its Tensordot.
    Cut at block2 so that tf2onnx converts in seconds and little memory; real weights (non-zero biases)."""
    from convcache import artifacts
    from convcache.artifacts import convert as onnxtools
    from convcache.artifacts.metadata import graph_sha256
    from convcache.backbone import keras_model, weights
    from convcache.export import onnx_target

    base = weights.load_vgg16("hed", SIZE)
    images = onnx_target.sample_images(3, SIZE, seed=2)
    taps = tuple(artifacts.Tap.parse(t) for t in ("block1_pool:max", "block2_pool:avg", "block2_pool"))
    cases = [(keras_model.build_extractor(base, "block2_pool", pooling, pre), pre == "caffe" and fold, None)
             for pre in ("caffe", "rescale") for pooling in (None, "avg", "max") for fold in (True, False)
             if fold or pre == "caffe"]
    cases.append((keras_model.build_tapped_extractor(base, taps), True, [t.name for t in taps]))
    for model, fold, names in cases:
        direct = onnx_target.extractor_to_onnx(model, fold_bgr=fold, output_names=names, converter="direct")
        converted = onnx_target.extractor_to_onnx(model, fold_bgr=fold, output_names=names, converter="tf2onnx")
        onnx.checker.check_model(direct, full_check=True)
        assert onnx_target.converter_of(direct) == "direct" and onnx_target.converter_of(converted) == "tf2onnx"
        unfolded_caffe = not fold and type(model.layers[1]).__name__ == "CaffePreprocess"
        assert (graph_sha256(direct) == graph_sha256(converted)) != unfolded_caffe, (model.name, fold, names)
        assert [o.name for o in direct.graph.output] == [o.name for o in converted.graph.output]
        ours = onnxtools.session(direct).run(None, {"images": images})
        theirs = onnxtools.session(converted).run(None, {"images": images})
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
        keras_out = model.predict(images, verbose=0)
        for a, b in zip(ours, keras_out if names else [keras_out]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    # a wrong channel order changes the identity (the check can fail): unfolded caffe is another graph
    model = keras_model.build_extractor(base, "block1_pool", None, "caffe")
    assert graph_sha256(onnx_target.extractor_to_onnx(model, converter="direct")) != graph_sha256(
        onnx_target.extractor_to_onnx(model, fold_bgr=False, converter="direct"))


def test_a_layer_the_direct_writer_does_not_cover_goes_to_tf2onnx():
    in_worker(_a_layer_the_direct_writer_does_not_cover_goes_to_tf2onnx)


def _a_layer_the_direct_writer_does_not_cover_goes_to_tf2onnx():
    """`auto` converts a model with another kind of layer with tf2onnx (and it is right); `direct` refuses it
    in one line."""
    from convcache.artifacts import convert as onnxtools
    from convcache.export import onnx_target
    from convcache.tfquiet import import_keras

    _, keras = import_keras()
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    proto = onnx_target.extractor_to_onnx(model, fold_bgr=False)
    assert onnx_target.converter_of(proto) == "tf2onnx"
    images = onnx_target.sample_images(2, SIZE, seed=1)
    np.testing.assert_allclose(onnxtools.session(proto).run(None, {"images": images})[0],
                               model.predict(images, verbose=0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConvcacheError, match="--converter direct: layer 'bn' of type BatchNormalization"):
        onnx_target.extractor_to_onnx(model, fold_bgr=False, converter="direct")


def test_parity_failure_is_detected():
    in_worker(_parity_failure_is_detected)  # converts: in the export worker


def _parity_failure_is_detected():
    from convcache.backbone import keras_model, weights
    from convcache.export import onnx_target

    base = weights.load_vgg16("random", SIZE, seed=3)
    model = keras_model.build_extractor(base)
    proto = onnx_target.extractor_to_onnx(model)
    other = keras_model.build_extractor(weights.load_vgg16("random", SIZE, seed=4))
    with pytest.raises(ConvcacheError, match="parity failed"):
        onnx_target.check_extractor_parity(proto, other, onnx_target.sample_images(2, SIZE))


def test_dynamic_batch_gives_same_rows(extractor):
    from convcache.export.onnx_target import sample_images

    images = sample_images(5, SIZE, seed=2)
    five = _run(extractor, images)
    ones = np.concatenate([_run(extractor, images[i : i + 1]) for i in range(5)])
    assert five.shape == (5, 1, 1, 512)
    np.testing.assert_allclose(five, ones, rtol=1e-5, atol=1e-5)


def test_metadata_round_trip(extractor, tmp_path):
    meta = read(extractor).metadata
    assert meta["kind"] == "extractor"
    assert meta["weights"]["source"] == "random" and len(meta["weights"]["sha256"]) == 64
    assert meta["input"]["size"] == SIZE and meta["output"]["name"] == "features"
    assert meta["output"]["shape"] == [None, 1, 1, 512]
    assert "caffe" in meta["preprocessing"] and "tensorflow" in meta["versions"] and meta["created"]
    model = onnx.load(str(extractor))
    assert meta["graph_sha256"] == graph_sha256(model)
    set_metadata(model, {"note": {"a": [1, 2]}})
    assert get_metadata(model)["note"] == {"a": [1, 2]}
    assert get_metadata(model)["kind"] == "extractor"


def test_pooling_and_layer(pooled_extractor):
    meta = read(pooled_extractor).metadata
    assert meta["layer"] == "block3_pool" and meta["output"]["shape"] == [None, 256]


def test_hed_weights_load_and_differ_from_random():
    in_worker(_hed_weights_load_and_differ_from_random)  # converts: in the export worker


def _hed_weights_load_and_differ_from_random():
    from convcache.backbone import weights

    hed = weights.load_vgg16("hed", SIZE)
    rnd = weights.load_vgg16("random", SIZE)
    a = hed.get_layer("block1_conv1").get_weights()[0]
    b = rnd.get_layer("block1_conv1").get_weights()[0]
    assert a.shape == b.shape and not np.allclose(a, b)
    assert weights.weights_sha256(hed) != weights.weights_sha256(rnd)
    # The bundled weights are trained: the first conv layer's biases are not zero-initialised.
    assert np.abs(hed.get_layer("block5_conv3").get_weights()[1]).sum() > 0


def test_cli_export_and_info(tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--weights", "random", "--input-size", 32, "--pooling", "max", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "parity max abs diff" in r.stdout and "direct graph" in r.stdout and "Traceback" not in r.stderr
    assert read(out).metadata["converter"] == "direct"
    info = run_cli("info", out)
    assert info.returncode == 0 and "block5_pool" in info.stdout
    # tf2onnx on request (cut early: its conversion of the whole base holds ~3.4 GiB): the same identity
    small = [tmp_path / f"{c}.onnx" for c in ("direct", "tf2onnx")]
    for path in small:
        r = run_cli("export", "--weights", "random", "--input-size", 32, "--layer", "block1_pool", "--converter",
                    path.stem, "-q", "-o", path)
        assert r.returncode == 0, r.stderr
    a, b = (read(p) for p in small)
    assert a.metadata["converter"] == "direct" and b.metadata["converter"] == "tf2onnx"
    assert a.identity == b.identity


@pytest.mark.parametrize("args, message", [
    (["--weights", "nonsense"], "unknown weights source"),
    (["--weights", "/no/such/file.h5"], "unknown weights source"),
    (["--weights", "random", "--input-size", "31"], "minimum of 32"),
    (["--weights", "random", "--input-size", "32", "--layer", "block9_pool"], "unknown layer"),
    (["--weights", "random", "--input-size", "32", "--precision", "int8"], "needs --calibration"),
    (["--weights", "random", "--input-size", "32", "--converter", "onnx2tf"], "invalid choice"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    r = run_cli("export", *args, "-o", tmp_path / "x.onnx")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_imagenet_offline_is_a_clear_error(tmp_path):
    # An empty Keras cache and an unreachable proxy make the download fail as it does offline.
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    r = run_cli("export", "--weights", "imagenet", "--input-size", 32, "-o", tmp_path / "x.onnx", env=env)
    assert r.returncode == 2
    assert "ImageNet" in r.stderr and "--weights hed" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_for_info(tmp_path):
    r = run_cli("info", tmp_path / "nope.onnx")
    assert r.returncode == 2 and "model not found" in r.stderr


def test_int8_on_tiny_calibration_set(tmp_path):
    calib = make_dataset(tmp_path / "calib", splits={"train": 5})
    out = tmp_path / "int8.onnx"
    meta = export("random", SIZE, str(out), precision="int8", calibration=str(calib), seed=1)
    q = meta["quantization"]
    assert q["held_out_images"] >= 1 and 0.9 < q["cosine_mean"] <= 1.0001
    model = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert read(out).metadata["precision"] == "int8"
    assert "at least 6" in q["probe"]["skipped"]  # 5 images per class: too few for a probe, said so
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert q["keep_fp32"] == "first-last" and _fp32_convs(model) == [convs[0], convs[-1]]
    export("random", SIZE, str(out), precision="int8", calibration=str(calib), seed=1, keep_fp32="none")
    assert _fp32_convs(onnx.load(str(out))) == []


def _fp32_convs(model) -> list[str]:
    """Convs whose weights are a plain float initializer (not dequantized int8)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def test_int8_probe_reports_the_task_effect(tmp_path):
    """export --precision int8 --probe DIR: a paired, cross-validated logistic-regression probe on fp32
    and int8 features of labelled images, with the difference and its standard error."""
    calib = make_dataset(tmp_path / "calib", splits={"train": 4})
    probe = make_dataset(tmp_path / "probe", splits={"validation": 9}, seed=3)
    out = tmp_path / "int8.onnx"
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--seed", 1, "--precision", "int8",
                "--calibration", calib, "--probe", probe / "validation", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "probe accuracy on 18 images" in r.stdout
    pr = read(out).metadata["quantization"]["probe"]
    assert pr["images"] == 18 and pr["classes"] == 2 and pr["class_names"] == ["cats", "dogs"]
    assert 0 <= pr["accuracy_fp32"] <= 1 and 0 <= pr["accuracy_int8"] <= 1
    assert pr["difference"] == pytest.approx(pr["accuracy_int8"] - pr["accuracy_fp32"])
    assert pr["difference_se"] >= 0 and 0 <= pr["mcnemar_p"] <= 1
    assert pr["accuracy_fp32"] > 0.8  # the fixture's classes differ in colour layout: a probe finds it


def test_fp16_probe_reports_the_task_effect_and_where_it_ran(tmp_path):
    """export --precision fp16 --probe DIR (issue 29): fp16 is a first-class precision, its cost to the task
    measured by the same paired probe as int8's, on the device named in the report (CUDA where ONNX Runtime
    has it, else the CPU); fp16's features stay within a cosine of 1 - 1e-4 of fp32's."""
    from convcache.export.probe import probe_device

    probe = make_dataset(tmp_path / "probe", splits={"validation": 9}, seed=3)
    out = tmp_path / "fp16.onnx"
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--seed", 1, "--precision", "fp16",
                "--probe", probe / "validation", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "fp16 cosine vs fp32" in r.stdout and "probe accuracy on 18 images" in r.stdout
    meta = read(out).metadata
    assert meta["precision"] == "fp16"
    h = meta["fp16"]
    assert h["sample_images"] == 4 and 1 - 1e-4 < h["cosine_min"] <= h["cosine_mean"] <= 1 + 1e-6
    pr = h["probe"]
    assert pr["precision"] == "fp16" and pr["device"] == probe_device("fp16") and pr["images"] == 18
    assert pr["difference"] == pytest.approx(pr["accuracy_fp16"] - pr["accuracy_fp32"])
    assert set(pr["discordant"]) == {"fp32_only", "fp16_only"} and pr["cosine_min"] > 1 - 1e-3
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(out)).graph.initializer)


def test_probe_statistics_are_paired():
    from convcache.export.probe import probe_accuracy

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    good = rng.normal(0, 1, (80, 16)) + 3 * labels[:, None]
    same = probe_accuracy(good, good.copy(), labels)
    assert same["difference"] == 0 and same["difference_se"] == 0 and same["mcnemar_p"] == 1
    assert same["accuracy_fp32"] > 0.95
    noise = probe_accuracy(good, rng.normal(0, 1, (80, 16)), labels)  # "int8" that lost the signal
    assert noise["difference"] < -0.2 and noise["mcnemar_p"] < 1e-3
    assert noise["discordant"]["fp32_only"] > noise["discordant"]["int8_only"]


@pytest.mark.parametrize("args, message", [
    (["--probe", "."], "needs --precision int8 or fp16"),
    (["--precision", "int8", "--calibration", ".", "--probe", "/nonexistent"], "not a directory"),
])
def test_probe_arguments(tmp_path, args, message):
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, *args, "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_fp16_variant(tmp_path):
    out = tmp_path / "fp16.onnx"
    export("random", SIZE, str(out), precision="fp16", seed=1)
    model = onnx.load(str(out))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    from convcache.export.onnx_target import sample_images

    assert _run(out, sample_images(2, SIZE)).shape == (2, 1, 1, 512)
