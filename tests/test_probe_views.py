"""The cross-validated probe's augmented views (issue 12 item 2): seeded random crops/flips/jitter of each
labelled image, fitted beside it, and never a view of a held-out image in its own fold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgexfer.data import Split
from edgexfer.augment import probe_view
from edgexfer.probe import cv_probe, view_folds
from edgexfer.runtime.metadata import Preprocessing
from tests.conftest import make_image

PP = Preprocessing(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _split(n=6, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    return Split([np.asarray(make_image(i % 3, rng)) for i in range(n)], np.arange(n) % 3)


def test_views_are_seeded_and_differ_between_views():
    s = _split()
    a, b, c = (probe_view(s.images, PP, v, seed=0) for v in (0, 0, 1))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, probe_view(s.images, PP, 0, seed=1))
    state = torch.random.get_rng_state()
    probe_view(s.images, PP, 2, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the training's own random stream is untouched
    grey = Preprocessing(resize=32, crop=32, color="L", mean=(0.5,), std=(0.25,))
    assert probe_view(s.images, grey, 0, seed=0).shape == (6, 1, 32, 32)


def test_view_folds_hold_out_whole_images():
    t = np.repeat(np.arange(3), 5)
    n, v = len(t), 2
    seen = []
    for tr, te in view_folds(t, 5, seed=0, views=v):
        assert te.max() < n  # scored on originals only
        assert not set(tr % n) & set(te)  # no view of a held-out image is fitted
        assert len(tr) == (v + 1) * (n - len(te))
        seen.extend(te)
    assert sorted(seen) == list(range(n))
    # no views: the plain stratified folds cv_probe always used
    assert all(len(tr) + len(te) == n for tr, te in view_folds(t, 5, seed=0, views=0))


def test_cv_probe_fits_views_beside_the_originals():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    f = torch.as_tensor(np.eye(3)[y] * 3 + rng.normal(0, 0.5, (24, 3)), dtype=torch.float32)
    views = f[None].repeat(2, 1, 1) + torch.as_tensor(rng.normal(0, 0.5, (2, 24, 3)), dtype=torch.float32)
    head = torch.nn.Linear(3, 3)
    sel = cv_probe(head, f, torch.as_tensor(y), False, 0, views)
    assert sel["images"] == 24 and sel["views"] == 2 and "2 augmented views" in sel["method"]
    assert sel["cv_accuracy"] > 0.9
    assert (head(f).argmax(1).numpy() == y).mean() > 0.9


def test_probe_strength_search_is_fine_and_warns_at_its_edge(caplog):
    """Issue 23: 25 strengths a step of x2.2 apart (not 10 at x7.7), and a warning when the chosen one is an end of
    the range, where the best may lie beyond it."""
    import logging

    import torch

    from edgexfer.probe import PROBE_CS, cv_probe

    assert len(PROBE_CS) == 25 and PROBE_CS[1] / PROBE_CS[0] < 2.2
    rng = np.random.default_rng(0)
    y = torch.as_tensor(np.repeat([0, 1], 20))
    # classes apart by a hundred-thousandth: no strength tells them apart better than another, and ties go to
    # the first (strongest) strength, as with --shots 2
    tiny = torch.as_tensor(1e-5 * (2 * y.numpy()[:, None] - 1) + 1e-7 * rng.standard_normal((40, 16)),
                           dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="edgexfer.probe"):
        sel = cv_probe(torch.nn.Linear(16, 2), tiny, y, False, 0)
    assert sel["C"] == pytest.approx(PROBE_CS[0]) and sel["C_at_edge"] and "strongest" in sel["C_at_edge"]
    assert "strongest regularisation searched" in caplog.text
    # two separable clusters with some overlap: an interior strength, no warning
    g = torch.as_tensor(rng.standard_normal((40, 16)) + 0.8 * np.repeat([[-1], [1]], 20, axis=0), dtype=torch.float32)
    sel = cv_probe(torch.nn.Linear(16, 2), g, y, False, 0)
    assert (sel["C_at_edge"] is None) == (PROBE_CS[0] < sel["C"] < PROBE_CS[-1])
    assert sel["C_range"] == [pytest.approx(1e-4), pytest.approx(1e4)]
