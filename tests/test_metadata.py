import json

import pytest

from edgexfer.runtime.errors import MetadataError
from edgexfer.runtime.metadata import META_KEY, InputSpec, ModelMeta, Preprocessing, Task


def sample_meta() -> ModelMeta:
    return ModelMeta(tasks=[Task("label", "logits", ["a", "b"])], input=InputSpec("input", 32, 32),
                     preprocessing=Preprocessing(resize=36, crop=32), provenance={"backbone": "x"})


def test_roundtrip():
    m = sample_meta()
    back = ModelMeta.from_props(m.to_props())
    assert back == m
    assert back.labels == ("a", "b")
    assert json.loads(m.to_props()[META_KEY])["labels"] == ["a", "b"]


def test_missing_metadata_is_a_clear_error():
    with pytest.raises(MetadataError, match="no edgexfer metadata"):
        ModelMeta.from_props({}, "foo.onnx")


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(schema="edgexfer.meta/99"), "unsupported"),
    (lambda d: d.pop("input"), "malformed"),
    (lambda d: d["preprocessing"].update(interpolation="magic"), "interpolation"),
    (lambda d: d["preprocessing"].update(crop=99), "crop"),
])
def test_bad_metadata(mutate, match):
    d = sample_meta().to_dict()
    mutate(d)
    with pytest.raises(MetadataError, match=match):
        ModelMeta.from_props({META_KEY: json.dumps(d)})
