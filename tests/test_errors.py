"""Bad input: one line on stderr, a non-zero exit, no traceback, and no half-written artifact."""
import pytest

from tests.conftest import make_image_folder, run_cli

FAST = ("--backbone", "efficientnet_lite0", "--epochs", "1", "--image-size", "32", "--bench-iters", "2")


def assert_user_error(p, *needles):
    assert p.returncode != 0, p.stdout
    err = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert err and err[-1].startswith(("error:", "Error:")), p.stderr
    for n in needles:
        assert n in err[-1], err[-1]


def no_artifacts(runs):
    return not any(p.is_file() and p.name in ("checkpoint.pt", "model.onnx", "model.int8.onnx")
                   for p in runs.rglob("*"))


def test_missing_data_folder(tmp_path):
    p = run_cli("run", "--data", tmp_path / "nope", "--runs", tmp_path / "runs", *FAST)
    assert_user_error(p, "nope")
    assert no_artifacts(tmp_path)


def test_empty_class_folder(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "empty_class").mkdir()
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", *FAST)
    assert_user_error(p, "empty_class")
    assert no_artifacts(tmp_path / "runs")


def test_corrupt_image_strict(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "red_disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", "--strict", *FAST)
    assert_user_error(p, "broken.png")
    assert no_artifacts(tmp_path / "runs")


def test_unknown_backbone(tmp_path):
    p = run_cli("run", "--runs", tmp_path / "runs", *FAST, "--backbone", "resnet9000")
    assert_user_error(p, "resnet9000")
    assert no_artifacts(tmp_path)


def test_missing_weights_file(tmp_path):
    p = run_cli("run", "--weights", tmp_path / "w.pt", "--runs", tmp_path / "runs", *FAST)
    assert_user_error(p, "w.pt")
    assert no_artifacts(tmp_path)


def test_stage_without_previous_artifact(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("export", tmp_path / "empty"), "config.json")


def test_predict_on_file_without_metadata(tmp_path, tiny_run):
    import onnx

    m = onnx.load(str(tiny_run / "model.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    img = next((tiny_run.parent.parent).rglob("*.png"), None) or (tiny_run / "confusion_matrix.png")
    assert_user_error(run_cli("predict", tmp_path / "bare.onnx", img), "no edgexfer metadata")


def test_predict_on_undecodable_image(tmp_path, tiny_run):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    assert_user_error(run_cli("predict", tiny_run / "model.onnx", bad), "cannot decode")


@pytest.mark.parametrize("data_dir", ["one_class"])
def test_single_class(tmp_path, data_dir):
    d = make_image_folder(tmp_path / "d", per_class=3)
    import shutil
    for c in ("green_bar", "blue_ring"):
        shutil.rmtree(d / c)
    assert_user_error(run_cli("run", "--data", d, "--runs", tmp_path / "runs", *FAST), "two class")
