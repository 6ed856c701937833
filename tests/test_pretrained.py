"""The default backbone's ImageNet weights really loaded: scikit-image's photos get their classes."""
import pytest

torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")

from edgexfer.backbones import LITE_MEAN, LITE_STD, build_backbone  # noqa: E402
from edgexfer.runtime.metadata import Preprocessing  # noqa: E402
from edgexfer.runtime.preprocess import preprocess  # noqa: E402

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0():
    feats = build_backbone("efficientnet_lite0", weights="imagenet", image_size=224).eval()
    return feats


def imagenet_top5(lite0, photo) -> list[int]:
    pp = Preprocessing(resize=256, crop=224, mean=LITE_MEAN, std=LITE_STD)
    x = torch.from_numpy(preprocess(photo, pp)[None])
    with torch.no_grad():
        logits = lite0.classifier()(lite0(x))
    return logits[0].topk(5).indices.tolist()


def test_chelsea_is_a_cat(lite0):
    assert imagenet_top5(lite0, skdata.chelsea())[0] in CATS


def test_coffee_is_espresso(lite0):
    assert imagenet_top5(lite0, skdata.coffee())[0] == ESPRESSO


def espresso_probability(feats) -> float:
    pp = Preprocessing(resize=256, crop=224, mean=LITE_MEAN, std=LITE_STD)
    with torch.no_grad():
        logits = feats.classifier()(feats(torch.from_numpy(preprocess(skdata.coffee(), pp)[None])))
    return float(logits.softmax(1)[0, ESPRESSO])


def test_random_init_is_not(lite0):
    """weights="none" loads nothing: no convolution keeps its ImageNet weights, and the photo of coffee that the
    pretrained network calls espresso with confidence is no more espresso than any other class to it."""
    rnd = build_backbone("efficientnet_lite0", weights="none", image_size=224).eval()
    ref = lite0.state_dict()
    convs = [k for k, v in rnd.state_dict().items() if k.endswith("weight") and v.ndim == 4]
    assert convs and not any(torch.equal(rnd.state_dict()[k], ref[k]) for k in convs)
    pretrained, random = espresso_probability(lite0), espresso_probability(rnd)
    assert pretrained > 0.3 and random < pretrained / 10, (pretrained, random)
