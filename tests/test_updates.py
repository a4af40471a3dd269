"""Aggregation: bad updates are left out and named; DP-FedAvg clips, noises and divides by a fixed denominator."""

import torch

from server.aggregate import aggregate, sample_clients
from shared.updates import clip_update, update_norm

REF = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}


def upd(x: float) -> dict:
    return {"a": torch.full((3,), x), "b": torch.full((2, 2), x)}


def test_fedavg_is_the_plain_mean_and_rejects_bad_updates():
    bad_shape = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    nan = upd(float("nan"))
    missing = {"a": torch.zeros(3)}
    result = aggregate([("c1", upd(1.0)), ("c2", upd(3.0)), ("c3", bad_shape), ("c4", nan), ("c5", missing)], REF)
    assert result.accepted == 2
    assert torch.allclose(result.delta["a"], torch.full((3,), 2.0))
    assert len(result.rejected) == 3
    assert "shape (4,)" in result.rejected[0] and "c3" in result.rejected[0]
    assert "NaN" in result.rejected[1]
    assert "missing tensors ['b']" in result.rejected[2]


def test_no_valid_update_leaves_the_model_unchanged():
    assert aggregate([("c", upd(float("inf")))], REF).delta is None


def test_clip_update_bounds_the_global_norm():
    u = upd(10.0)
    clipped = clip_update(u, 0.5)
    assert abs(update_norm(clipped) - 0.5) < 1e-6
    small = upd(0.01)
    assert torch.equal(clip_update(small, 0.5)["a"], small["a"])


def test_dp_fedavg_rejects_unclipped_updates_and_uses_the_fixed_denominator():
    g = torch.Generator().manual_seed(0)
    clipped = clip_update(upd(1.0), 1.0)
    result = aggregate([("ok", clipped), ("big", upd(1.0))], REF, user_dp=True, clip_norm=1.0,
                       noise_multiplier=0.0, expected_clients=4, generator=g)
    assert result.accepted == 1 and "exceeds the clip norm" in result.rejected[0]
    assert torch.allclose(result.delta["a"], clipped["a"] / 4)  # fixed denominator, not 1
    noisy = aggregate([("ok", clipped)], REF, user_dp=True, clip_norm=1.0, noise_multiplier=1.0,
                      expected_clients=4, generator=g)
    assert not torch.allclose(noisy.delta["a"], clipped["a"] / 4)


def test_sampling_everyone_is_not_random_and_poisson_is():
    nodes = list(range(1000))
    everyone, random_sample = sample_clients(nodes, 1.0)
    assert everyone == nodes and not random_sample
    sample, random_sample = sample_clients(nodes, 0.1)
    assert random_sample and 50 < len(sample) < 150


def test_server_optimizers():
    from server.aggregate import ServerOptimizer

    state = {"w": torch.zeros(2)}
    delta = {"w": torch.tensor([1.0, -0.001])}
    assert torch.allclose(ServerOptimizer("sgd", 10.0).step(state, delta)["w"], torch.tensor([10.0, -0.01]))
    # FedAdam's first step moves every coordinate by about lr in the update's direction, however small.
    moved = ServerOptimizer("adam", 0.1, tau=1e-9).step(state, delta)["w"]
    assert torch.allclose(moved, torch.tensor([0.1, -0.1]), atol=1e-4)


def test_server_momentum_averages_successive_updates():
    from server.aggregate import ServerOptimizer

    state = {"w": torch.zeros(2)}
    opt = ServerOptimizer("sgd", 1.0, momentum=0.5)
    state = opt.step(state, {"w": torch.tensor([1.0, 0.0])})
    state = opt.step(state, {"w": torch.tensor([0.0, 1.0])})
    # m1 = d1, m2 = 0.5 d1 + d2: the noise of one round keeps acting, halved, in the next
    torch.testing.assert_close(state["w"], torch.tensor([1.5, 1.0]))
    plain = ServerOptimizer("sgd", 1.0)
    assert torch.equal(plain.step({"w": torch.zeros(2)}, {"w": torch.ones(2)})["w"], torch.ones(2))
