"""Public content reduced to principal components: the same on every device, the shapes the server
expects, absent modalities still absent, and most of the variance kept."""

import numpy as np
import pytest

from shared.principal import principal_components


def test_components_are_deterministic_centred_and_keep_absent_rows_absent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 40)) @ rng.normal(size=(40, 40))
    present = np.ones(200, dtype=bool)
    present[[3, 50]] = False
    x[~present] = 0.0
    a, b = principal_components(x, present, 8), principal_components(x.copy(), present, 8)
    assert a.shape == (200, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # what every device computes from the same catalogue
    assert not a[~present].any() and np.all(np.abs(a[present]).sum(axis=1) > 0)
    np.testing.assert_allclose(a[present].mean(axis=0), 0.0, atol=1e-4)
    # The first components carry the most variance, in order, and most of it.
    variances = a[present].var(axis=0)
    assert np.all(np.diff(variances) <= 1e-6)
    centred = x[present] - x[present].mean(axis=0)
    assert variances.sum() / centred.var(axis=0).sum() > 0.5


def test_narrow_features_are_kept_and_bad_widths_refused():
    x = np.eye(5, dtype=np.float32)
    np.testing.assert_array_equal(principal_components(x, np.ones(5, bool), 8), x)
    with pytest.raises(ValueError, match="content-dim = 0"):
        principal_components(x, np.ones(5, bool), 0)


def test_devices_and_server_agree_on_reduced_shapes(tmp_path):
    from shared.data.dataset import load_dataset
    from shared.data.synthetic import write_planted_dataset
    from shared.features import EncoderSettings, catalogue_shapes, item_content

    root = write_planted_dataset(tmp_path / "data", n_users=4, n_items=60, seed=2)
    (root / "features").mkdir(exist_ok=True)
    np.save(root / "features" / "image-precomputed.npy", np.random.default_rng(1).normal(size=(60, 40)).astype(np.float32))
    settings = EncoderSettings(content_dim=16)
    content = item_content(load_dataset(root), ["image"], tmp_path / "cache", settings)
    assert {k: tuple(v.shape) for k, v in content.features.items()} == {"image-precomputed": (60, 16)}
    assert catalogue_shapes(root, ["image"], settings) == (60, {"image-precomputed": 16})
