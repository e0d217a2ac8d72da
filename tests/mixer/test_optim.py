"""Adam/AdamW: a hand-computed step, torch parity, clipping, noise, state round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixer.config import TrainConfig
from mixer.optim import Adam, StepStats, sam_gradients


def make_params(seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "blocks.0.fc.w": rng.standard_normal((4, 3)).astype(dtype),
        "blocks.0.fc.b": rng.standard_normal(4).astype(dtype),
        "head.w": rng.standard_normal((1, 4)).astype(dtype),
    }


def make_grads(step: int, seed: int = 100, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + step)
    shapes = {"blocks.0.fc.w": (4, 3), "blocks.0.fc.b": (4,), "head.w": (1, 4)}
    return {k: (rng.standard_normal(s) * 0.5).astype(dtype) for k, s in shapes.items()}


def copy(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in d.items()}


def test_first_step_matches_hand_computed_adam():
    # One scalar parameter p=1, g=0.5, lr=0.1: m = 0.05, v = 0.00025 (1e-3 * 0.25),
    # m_hat = 0.5, v_hat = 0.25, update = 0.1 * 0.5 / (0.5 + 1e-8) = 0.09999999800...
    params = {"w": np.array([1.0], dtype=np.float64)}
    opt = Adam(params, lr=0.1)
    stats = opt.step(params, {"w": np.array([0.5])})
    assert params["w"][0] == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8), abs=1e-15)
    assert params["w"][0] == pytest.approx(0.900000002, abs=1e-9)
    assert stats.grad_norm == pytest.approx(0.5)
    assert stats.update_ratio == pytest.approx(0.1 * 0.5 / (0.5 + 1e-8), rel=1e-12)
    state = opt.state_dict()
    assert state["m.w"][0] == pytest.approx(0.05)
    assert state["v.w"][0] == pytest.approx(0.00025)
    assert int(state["step"]) == 1


def test_second_step_matches_hand_computed_adam_with_l2_weight_decay():
    # p=1, wd=0.1, g1=0.5 -> g1' = 0.6; then g2=-0.2 at p1 -> g2' = -0.2 + 0.1 * p1.
    params = {"w": np.array([1.0])}
    opt = Adam(params, lr=0.01, weight_decay=0.1, eps=1e-8)
    opt.step(params, {"w": np.array([0.5])})
    p1 = 1.0 - 0.01 * 0.6 / (0.6 + 1e-8)  # the first Adam step is lr * sign(g) (up to eps)
    assert params["w"][0] == pytest.approx(p1, abs=1e-15)
    opt.step(params, {"w": np.array([-0.2])})
    g2 = -0.2 + 0.1 * p1
    m = 0.9 * (0.1 * 0.6) + 0.1 * g2
    v = 0.999 * (0.001 * 0.36) + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    assert params["w"][0] == pytest.approx(p1 - 0.01 * m_hat / (math.sqrt(v_hat) + 1e-8), abs=1e-14)


def test_decoupled_weight_decay_shrinks_params_by_lr_times_wd():
    # A zero gradient leaves Adam's update at 0, so only the decay moves the parameter.
    params = {"w": np.array([2.0, -4.0])}
    opt = Adam(params, lr=0.1, weight_decay=0.5, decoupled=True)
    opt.step(params, {"w": np.zeros(2)})
    np.testing.assert_allclose(params["w"], [2.0 * (1 - 0.05), -4.0 * (1 - 0.05)], rtol=1e-15)
    # The same with L2 weight decay moves each parameter by ~lr (Adam normalises the L2 gradient).
    params = {"w": np.array([2.0, -4.0])}
    Adam(params, lr=0.1, weight_decay=0.5).step(params, {"w": np.zeros(2)})
    np.testing.assert_allclose(params["w"], [1.9, -3.9], rtol=1e-7)


def test_step_updates_the_callers_arrays_in_place_and_leaves_grads_alone():
    params = make_params()
    held = params["head.w"]
    grads = make_grads(0)
    grads_before = copy(grads)
    before = held.copy()
    Adam(params, lr=1e-2).step(params, grads)
    assert params["head.w"] is held
    assert not np.array_equal(held, before)
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_before[k])


def test_state_stays_in_the_params_dtype():
    params = make_params(dtype=np.float32)
    opt = Adam(params, lr=1e-3)
    opt.step(params, make_grads(0, dtype=np.float64))  # float64 grads are cast, not upcasting state
    assert all(p.dtype == np.float32 for p in params.values())
    assert all(v.dtype == np.float32 for k, v in opt.state_dict().items() if k != "step")


def test_clipping_scales_the_update_to_the_clipped_gradient():
    params = {"w": np.array([1.0, 1.0])}
    grads = {"w": np.array([3.0, 4.0])}  # norm 5
    opt = Adam(params, lr=0.1, clip_norm=1.0)
    stats = opt.step(params, grads)
    assert stats.grad_norm == pytest.approx(5.0)  # reported before clipping
    # The clipped gradient (0.6, 0.8) is what enters the moments.
    np.testing.assert_allclose(opt.state_dict()["m.w"], 0.1 * np.array([3.0, 4.0]) / (5.0 + 1e-6))
    # Below the threshold nothing changes.
    small = Adam({"w": np.ones(2)}, lr=0.1, clip_norm=10.0)
    small.step({"w": np.ones(2)}, grads)
    np.testing.assert_allclose(small.state_dict()["m.w"], [0.3, 0.4])


def test_grad_noise_is_reproducible_with_a_seed_and_differs_with_another():
    def run(seed: int) -> np.ndarray:
        params = make_params()
        opt = Adam(params, lr=1e-2, grad_noise=0.3, rng=np.random.default_rng(seed))
        for step in range(3):
            opt.step(params, make_grads(step))
        return np.concatenate([p.ravel() for p in params.values()])

    def no_noise() -> np.ndarray:
        params = make_params()
        opt = Adam(params, lr=1e-2)
        for step in range(3):
            opt.step(params, make_grads(step))
        return np.concatenate([p.ravel() for p in params.values()])

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))
    assert not np.allclose(run(7), no_noise())


def test_grad_noise_std_decays_with_the_step_count():
    # With zero gradients, m after one step is (1 - b1) * noise, so its spread measures the noise std.
    n = 200_000
    params = {"w": np.zeros(n)}
    opt = Adam(params, lr=1e-3, beta1=0.0, grad_noise=2.0, grad_noise_decay=0.55,
               rng=np.random.default_rng(0))
    opt.step(params, {"w": np.zeros(n)})
    assert opt.state_dict()["m.w"].std() == pytest.approx(2.0, rel=0.01)  # t = 0: std = grad_noise
    for _ in range(8):
        opt.step(params, {"w": np.zeros(n)})
    # Step 10 (t = 9 steps before it): std = 2 / 10 ** 0.55.
    opt.step(params, {"w": np.zeros(n)})
    assert opt.state_dict()["m.w"].std() == pytest.approx(2.0 / 10**0.55, rel=0.01)


def test_grad_noise_without_rng_is_refused():
    with pytest.raises(ValueError, match="grad_noise=0.1 needs rng"):
        Adam(make_params(), lr=1e-3, grad_noise=0.1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr": 1e-3, "beta1": 1.0}, "beta1 must be in"),
    ({"lr": 1e-3, "beta2": -0.1}, "beta2 must be in"),
    ({"lr": 1e-3, "eps": 0.0}, "eps must be > 0"),
    ({"lr": 1e-3, "weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"lr": 1e-3, "clip_norm": -1.0}, "clip_norm must be >= 0"),
])
def test_out_of_range_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam(make_params(), **kwargs)


def test_state_dict_is_a_copy_not_a_live_view():
    params = make_params()
    opt = Adam(params, lr=1e-2)
    opt.step(params, make_grads(0))
    state = opt.state_dict()
    m = state["m.head.w"].copy()
    opt.step(params, make_grads(1))
    np.testing.assert_array_equal(state["m.head.w"], m)


def test_step_names_a_missing_or_misshapen_gradient():
    params = make_params()
    opt = Adam(params, lr=1e-2)
    grads = make_grads(0)
    with pytest.raises(KeyError, match="grads: missing key 'head.w'"):
        opt.step(params, {k: v for k, v in grads.items() if k != "head.w"})
    renamed = {("head.W" if k == "head.w" else k): v for k, v in grads.items()}
    with pytest.raises(KeyError, match="grads: missing key 'head.w'"):
        opt.step(params, renamed)
    with pytest.raises(ValueError, match=r"grads\['head.w'\]: shape \(4, 1\), expected \(1, 4\)"):
        opt.step(params, {**grads, "head.w": np.zeros((4, 1), np.float32)})


def test_from_config_maps_adamw_to_decoupled_weight_decay():
    params = make_params()
    config = TrainConfig(optimizer="adamw", lr=2e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.05,
                         clip_norm=1.5, grad_noise=0.01, grad_noise_decay=0.6)
    opt = Adam.from_config(config, params, rng=np.random.default_rng(0))
    assert (opt.lr, opt.beta1, opt.beta2, opt.eps) == (2e-3, 0.8, 0.99, 1e-7)
    assert (opt.weight_decay, opt.decoupled, opt.clip_norm) == (0.05, True, 1.5)
    assert (opt.grad_noise, opt.grad_noise_decay) == (0.01, 0.6)
    assert not Adam.from_config(TrainConfig(optimizer="adam"), params, rng=None).decoupled


def test_step_stats_report_the_update_to_weight_ratio():
    params = {"a": np.array([3.0]), "b": np.array([4.0])}  # ||p|| = 5
    stats = Adam(params, lr=0.1).step(params, {"a": np.array([1.0]), "b": np.array([-1.0])})
    assert isinstance(stats, StepStats)
    # Both move by ~lr: ||update|| = 0.1 * sqrt(2).
    assert stats.update_ratio == pytest.approx(0.1 * math.sqrt(2) / 5.0, rel=1e-6)
    assert stats.grad_norm == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize(("optimizer", "weight_decay", "clip_norm"), [
    ("adam", 0.0, 0.0), ("adam", 0.1, 0.0), ("adamw", 0.1, 0.0), ("adam", 0.0, 0.7), ("adamw", 0.05, 0.7),
])
def test_matches_torch_over_several_steps(optimizer, weight_decay, clip_norm):
    torch = pytest.importorskip("torch")  # optional: torch is an extra, not a runtime dependency
    params = make_params(dtype=np.float64)
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    topt = cls(list(tparams.values()), lr=0.05, betas=(0.85, 0.99), eps=1e-6, weight_decay=weight_decay)
    opt = Adam(params, lr=0.05, beta1=0.85, beta2=0.99, eps=1e-6, weight_decay=weight_decay,
               decoupled=optimizer == "adamw", clip_norm=clip_norm)
    for step in range(6):
        grads = make_grads(step, dtype=np.float64)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        if clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip_norm)
        topt.step()
        stats = opt.step(params, grads)
        if clip_norm:
            assert stats.grad_norm == pytest.approx(float(norm), rel=1e-12)
    for k in params:
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sam_takes_the_gradient_at_the_hand_computed_ascent_point_of_a_quadratic():
    # L(w) = 1/2 w'Aw: g = Aw, the ascent point is w + rho g/||g||, and SAM's gradient is A there.
    a = np.array([[3.0, 1.0], [1.0, 2.0]])
    w0 = np.array([1.0, -2.0])
    params = {"w": w0.copy()}
    rho = 0.1
    g = a @ w0                                      # [1, -3]
    ascent = w0 + rho * g / math.sqrt(10.0)         # ||g|| = sqrt(1 + 9)
    seen = []

    def gradient():
        seen.append(params["w"].copy())
        return {"w": a @ params["w"]}

    sam = sam_gradients(params, {"w": g}, rho, gradient)
    np.testing.assert_allclose(seen[0], ascent, rtol=1e-15)
    np.testing.assert_allclose(sam["w"], a @ ascent, rtol=1e-15)
    np.testing.assert_array_equal(params["w"], w0)  # restored exactly
    # The step itself, plain SGD at lr 0.5, as SAM's paper writes it: w - lr * grad L(w + eps).
    np.testing.assert_allclose(w0 - 0.5 * sam["w"], w0 - 0.5 * (a @ ascent), rtol=1e-15)


def test_sam_restores_float32_weights_bit_for_bit_and_keeps_a_zero_gradient():
    params = make_params(dtype=np.float32)
    before = copy(params)
    grads = make_grads(0)
    out = sam_gradients(params, grads, 0.05, lambda: {k: v * 2 for k, v in params.items()})
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert not np.array_equal(out[k], before[k] * 2)  # taken at the moved weights
    zero = {k: np.zeros_like(v) for k, v in grads.items()}
    assert sam_gradients(params, zero, 0.05, lambda: pytest.fail("no ascent direction")) is zero
    with pytest.raises(ValueError, match="rho"):
        sam_gradients(params, grads, 0.0, lambda: grads)


def test_ema_update_follows_the_hand_computed_average_with_its_ramp():
    from mixer.optim import ema_update

    average = {"w": np.array([1.0, 2.0])}
    ema_update(average, {"w": np.array([3.0, 0.0])}, 0.99, step=1)  # d = min(0.99, 2/11)
    d = 2 / 11
    np.testing.assert_allclose(average["w"], d * np.array([1.0, 2.0]) + (1 - d) * np.array([3.0, 0.0]))
    before = average["w"].copy()
    ema_update(average, {"w": np.array([0.0, 0.0])}, 0.5, step=1000)  # the ramp is past: d = 0.5
    np.testing.assert_allclose(average["w"], 0.5 * before)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update(average, average, 1.0, step=1)
