import json

import numpy as np

from ee_nas.thresholds import threshold_sweep
from ee_nas.thresholds.plots import plot_threshold_sweep


def split_data(seed, k=3, n=150):
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.3, 0.9, k)
    conf = np.clip(skill * (0.5 + rng.random(n)[:, None]) + rng.normal(0, 0.15, (n, k)), 0, 1).round(2)
    return conf, rng.random((n, k)) < conf


def test_sweep_points_and_plot(tmp_path):
    (vc, vy), (tc, ty) = split_data(0), split_data(1)
    cum = np.array([1.0, 2.5, 4.0])
    sweep = threshold_sweep(vc, vy, tc, ty, cum, n_points=6)
    pts = sweep["points"]
    json.dumps(sweep, allow_nan=False)  # plain JSON, no nan/inf
    assert len(pts) == 6 and sweep["cum_macs"] == cum.tolist()
    assert pts[0]["target"] == cum[0] and pts[-1]["target"] == cum[-1]
    assert pts[0]["val_exit_rates"][0] == 1.0  # the cheapest target forces everyone out at exit 1
    for p in pts:
        assert p["feasible"] and p["val_avg_macs"] <= p["target"] * (1 + 1e-9)
        assert p["val_acc"] <= sweep["oracle"]["val"]["accuracy"]
        assert p["test_acc"] <= sweep["oracle"]["test"]["accuracy"]
        assert np.isclose(p["gap"], p["val_acc"] - p["test_acc"])
        assert np.isclose(sum(p["test_exit_rates"]), 1.0) and len(p["thresholds"]) == 3
    # K = 3 is tuned exactly over the val candidate grid, so a looser target never loses accuracy
    accs = [p["val_acc"] for p in pts]
    assert all(b >= a for a, b in zip(accs, accs[1:]))
    out = plot_threshold_sweep(sweep, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
