"""Dynamic early-exit inference: run segment by segment, stop each sample at its first confident exit.

The rule is DESIGN.md's: a sample leaves at the first exit k with
conf_k(x) >= t_k; the last exit always accepts. Confidence is computed by
`ee_nas.thresholds.confidence` on the exit's logits (float64, the function the
thresholds were tuned with; at batch size 1 and few classes the same formula on Python floats, with
near-ties settled by `confidence`), so the runtime decides exactly as
``exit_indices(confidence(logits), thresholds)`` does on the same logits.

Batches: samples that left are dropped from later segments by index
selection; at batch size 1 no selection happens (the sample either leaves or
goes on whole).

    runtime = EarlyExitRuntime.from_run_dir("outputs/digits_search/...")
    labels, exits = runtime.predict(images)          # images: [N, C, H, W], normalized
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ee_nas.inference.fold import fold_batchnorm
from ee_nas.thresholds.confidence import MEASURES, confidence


def normalize_thresholds(thresholds, n_exits: int) -> np.ndarray:
    """Thresholds as float64 [n_exits]: None/nan -> +inf (exit disabled); the last one -> 0.0 (always accepts).

    Accepts n_exits values, or n_exits - 1 (the early exits only).
    """
    values = [math.inf if t is None else float(t) for t in np.asarray(
        thresholds.detach().cpu().numpy() if hasattr(thresholds, "detach") else thresholds, dtype=object).ravel()]
    if len(values) == n_exits - 1:
        values.append(0.0)
    if len(values) != n_exits:
        raise ValueError(f"{len(values)} thresholds for a network with {n_exits} exits "
                         f"(give one per exit, or one per early exit)")
    t = np.array([math.inf if math.isnan(v) else v for v in values], dtype=np.float64)
    t[-1] = 0.0
    return t


TIE = 1e-9  # |conf - threshold| below which a batch-1 decision is recomputed exactly


def _to_numpy(logits) -> np.ndarray:
    return logits.detach().float().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits)


PY_CLASSES = 64  # up to this many classes, a row's confidence is computed on Python floats (see below)


def row_confidence(logits, measure: str) -> float:
    """Confidence of one row of logits [1, C], as `ee_nas.thresholds.confidence` computes it (float64).

    This runs after every head at batch size 1, so its cost is latency. Measured on the 2-core CPU, right
    after a network's ops, for C = 10: ~20 us on Python floats, ~45 us in numpy, ~65 us as six small
    torch ops; alone, Python floats beat numpy up to ~64 classes and lose from ~128 on, where `confidence`
    itself does the work. On Python floats the value may differ from `confidence` in the last bits
    (summation order); the runtime settles near-ties with `confidence` itself.
    """
    flat = (logits.detach() if torch.is_tensor(logits) else np.asarray(logits)).reshape(-1)  # exported: numpy
    if len(flat) <= PY_CLASSES:
        return _confidence_of(flat.tolist(), measure)
    return float(confidence(_to_numpy(flat)[None], measure)[0])


def _confidence_of(z: list[float], measure: str) -> float:
    """`row_confidence` on Python floats (float64, like `confidence`)."""
    m = max(z)
    z = [v - m for v in z]
    e = [math.exp(v) for v in z]
    s = sum(e)
    if measure == "max_softmax":
        return 1.0 / s  # the largest p is exp(0) / s
    c = len(z)
    if c == 1:
        return 1.0
    if measure == "entropy":
        log_s = math.log(s)
        h = -sum(ei / s * (v - log_s) for ei, v in zip(e, z))
        return min(max(1.0 - h / math.log(c), 0.0), 1.0)
    second, first = sorted(e)[-2:]
    return first / s - second / s


@dataclass(frozen=True)
class ExitResult:
    """Per-sample outcome of dynamic inference."""

    labels: np.ndarray      # [N] int64 predicted class
    exits: np.ndarray       # [N] int64 index of the exit that answered (0-based; n_exits-1 = final classifier)
    confidence: np.ndarray  # [N] float64 confidence of the answering exit
    logits: np.ndarray      # [N, C] float32 logits of the answering exit


class _ExitRule:
    """The segment-by-segment loop, shared by the eager runtime and the exported ones.

    Subclasses implement `_segment(k, x)` (features -> features), `_head(k, x)`
    (features -> logits as a numpy array) and `_take(x, idx)` (rows of x).
    """

    n_exits: int

    def __init__(self, thresholds, measure: str, n_exits: int):
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}")
        self.n_exits, self.measure = int(n_exits), measure
        self.thresholds = normalize_thresholds(thresholds, self.n_exits)

    def _segment(self, k: int, x):
        raise NotImplementedError

    def _head_native(self, k: int, x):
        """Logits of head k as the backend gives them (torch tensor or numpy array)."""
        raise NotImplementedError

    def _head(self, k: int, x) -> np.ndarray:
        return _to_numpy(self._head_native(k, x))

    def _take(self, x, idx: np.ndarray):
        raise NotImplementedError

    def _prepare(self, x):
        return x

    def decide(self, k: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, accept) of exit k for logits [n, C]; the last exit accepts every sample."""
        conf = confidence(logits, self.measure)
        accept = np.ones(len(conf), bool) if k == self.n_exits - 1 else conf >= self.thresholds[k]
        return conf, accept

    def _classify_one(self, x) -> ExitResult:
        """Batch size 1: the same rule without the bookkeeping of a batch.

        The confidence is computed where the logits are (torch, float64); only within `TIE` of the
        threshold is it recomputed by `confidence` itself, so every decision is exactly the batch rule's.
        """
        last = self.n_exits - 1
        for k in range(self.n_exits):
            x = self._segment(k, x)
            native = self._head_native(k, x)
            conf, t = row_confidence(native, self.measure), self.thresholds[k]
            if k < last and abs(conf - t) <= TIE:
                conf = float(confidence(_to_numpy(native), self.measure)[0])
            if k == last or conf >= t:
                logits = _to_numpy(native).astype(np.float32, copy=False)
                return ExitResult(logits.argmax(-1).astype(np.int64), np.array([k], np.int64),
                                  np.array([conf]), logits)
        raise AssertionError("the last exit always accepts")

    def classify(self, x) -> ExitResult:
        """Dynamic inference on a batch [N, C, H, W] (or one image [C, H, W])."""
        x = self._prepare(x)
        n = x.shape[0]
        if n == 1:
            return self._classify_one(x)
        labels = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        conf_out = np.zeros(n, np.float64)
        logits_out: np.ndarray | None = None
        alive = np.arange(n)
        for k in range(self.n_exits):
            if len(alive) == 0:
                break
            x = self._segment(k, x)
            logits = self._head(k, x)
            conf, accept = self.decide(k, logits)
            if logits_out is None:
                logits_out = np.zeros((n, logits.shape[1]), np.float32)
            if accept.all():
                done, rest = alive, None
            else:
                done, rest = alive[accept], np.flatnonzero(~accept)
            labels[done] = logits[accept].argmax(-1)
            exits[done] = k
            conf_out[done] = conf[accept]
            logits_out[done] = logits[accept]
            if rest is None:
                break
            if len(rest) < len(alive):
                x = self._take(x, rest)
            alive = alive[rest]
        if logits_out is None:
            logits_out = np.zeros((0, 0), np.float32)
        return ExitResult(labels, exits, conf_out, logits_out)

    def predict(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(predicted labels [N], exit index per sample [N])."""
        result = self.classify(x)
        return result.labels, result.exits


class EarlyExitRuntime(_ExitRule):
    """Dynamic early-exit inference of a static `MultiExitNet` (eager PyTorch)."""

    def __init__(self, net: nn.Module, thresholds, measure: str = "max_softmax", device: str | torch.device = "cpu",
                 fold_bn: bool = False):
        """`fold_bn`: run a copy with BatchNorm folded into the convolutions (`ee_nas.inference.fold`): 12% faster
        at batch size 1 on a CPU (digits), logits equal up to float rounding."""
        super().__init__(thresholds, measure, len(net.heads))
        self.device = torch.device(device)
        if fold_bn:
            net = fold_batchnorm(net)
        self.net = net.to(self.device).eval()
        self.segments, self.heads = list(net.segments), list(net.heads)

    def _prepare(self, x):
        x = torch.as_tensor(x, dtype=torch.float32)
        return (x[None] if x.dim() == 3 else x).to(self.device)

    def _segment(self, k, x):
        return self.segments[k](x)

    def _head_native(self, k, x):
        return self.heads[k](x)

    def _take(self, x, idx):
        return x.index_select(0, torch.as_tensor(idx, device=x.device))

    def classify(self, x) -> ExitResult:
        if torch.is_inference_mode_enabled():  # a caller's serving loop holds it: entering it again costs ~20 us
            return super().classify(x)
        with torch.inference_mode():
            return super().classify(x)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, device: str | torch.device = "cpu",
                     fold_bn: bool = False, drop_unreached: bool = False) -> "EarlyExitRuntime":
        """The chosen subnet of a finished run (arch.yaml + subnet.pt), with its tuned thresholds
        (`drop_unreached`: see `load_run`)."""
        run = load_run(run_dir, drop_unreached)
        rt = cls(run.net, run.thresholds, run.measure, device=device, fold_bn=fold_bn)
        rt.run = run
        return rt


# -- loading a run directory ----------------------------------------------------------------------

@dataclass
class LoadedRun:
    run_dir: Path
    cfg: object                       # the run's composed config (.hydra/config.yaml)
    genome: object                    # ee_nas.genome.Genome
    net: nn.Module                    # static MultiExitNet with the saved (BN-recalibrated) weights
    thresholds: np.ndarray
    measure: str
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


def _run_config(run_dir: Path):
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not the run directory of `python -m ee_nas.run`")
    return OmegaConf.load(path)


def _shapes_from_state(state: dict, n_exits: int) -> tuple[int, int]:
    """(in_channels, num_classes) from the saved weights: the stem's first conv and the final classifier."""
    conv = next(v for k, v in state.items() if k.startswith("segments.0.") and v.dim() == 4)
    final = [v for k, v in state.items() if k.startswith(f"heads.{n_exits - 1}.") and v.dim() == 2]
    return int(conv.shape[1]), int(final[-1].shape[0])


def build_supernet(cfg, in_channels: int, num_classes: int):
    """The run's (untrained) supernet, rebuilt from its config exactly as ``ee_nas.run`` builds it."""
    from hydra.utils import instantiate

    from ee_nas.models.multi_exit import MultiExitSupernet

    backbone = instantiate(cfg.backbone, in_channels=in_channels, num_classes=num_classes,
                           image_size=int(cfg.data.image_size))
    space = instantiate(cfg.search_space, backbone=backbone)
    return MultiExitSupernet(backbone, space)


def load_supernet(run_dir: str | Path):
    """The supernet structure of a run (weights as initialized: for latency tables, not for accuracy)."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    state, n_exits = _saved_subnet(run_dir)
    return build_supernet(cfg, *_shapes_from_state(state["state_dict"], n_exits))


def _saved_subnet(run_dir: Path) -> tuple[dict, int]:
    path = run_dir / "subnet.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run in {run_dir} did not finish (no chosen subnet)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    from ee_nas.genome import Genome

    return saved, Genome.from_dict(saved["genome"]).n_exits


def _per_channel(values, default, channels: int) -> tuple[float, ...]:
    values = default if values is None else values
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * channels if len(values) == 1 else values)


def load_run(run_dir: str | Path, drop_unreached: bool = False) -> LoadedRun:
    """Rebuild the chosen static subnet of a run: config -> supernet -> extract(genome) -> saved weights.

    `drop_unreached`: keep only the exits that answer some val image under the tuned thresholds
    (`reached_exits`); the last of them then takes every sample that gets there, and the blocks after
    it are cut from the network (not run, not exported). Nothing changes on val; a test image that would
    have gone on is answered there instead."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from ee_nas.genome import Genome

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    saved, n_exits = _saved_subnet(run_dir)
    genome = Genome.from_dict(saved["genome"])
    arch = run_dir / "arch.yaml"
    if arch.is_file() and Genome.load(arch) != genome:
        raise ValueError(f"{arch} and {run_dir / 'subnet.pt'} hold different genomes; rerun the report stage")
    in_channels, num_classes = _shapes_from_state(saved["state_dict"], n_exits)
    supernet = build_supernet(cfg, in_channels, num_classes)
    net = supernet.extract(genome)
    net.load_state_dict(saved["state_dict"])
    net.eval()
    data = OmegaConf.to_container(cfg.data, resolve=False)
    dm_cls = None
    if data.get("mean") is None or data.get("std") is None:  # the datamodule's defaults (imports lightning)
        try:
            dm_cls = get_class(data["_target_"])
        except Exception:  # noqa: BLE001 - a renamed class only loses its default normalization
            pass
    size = int(data["image_size"])
    thresholds, measure = normalize_thresholds(saved["thresholds"], n_exits), str(saved["measure"])
    if drop_unreached:
        keep = reached_exits(run_dir, thresholds, measure)
        net, thresholds = net.truncated(keep), normalize_thresholds(thresholds[:keep], keep)
    return LoadedRun(
        run_dir=run_dir, cfg=cfg, genome=genome, net=net, thresholds=thresholds, measure=measure,
        input_shape=(in_channels, size, size),
        mean=_per_channel(data.get("mean"), getattr(dm_cls, "default_mean", (0.5,)), in_channels),
        std=_per_channel(data.get("std"), getattr(dm_cls, "default_std", (0.5,)), in_channels),
        num_classes=num_classes,
    )


def reached_exits(run_dir: Path, thresholds: np.ndarray, measure: str) -> int:
    """1 + the last exit that answers a val image under `thresholds`, from the run's val outputs
    (`val_logits.npz`, written with summary.json: those the thresholds were tuned on)."""
    from ee_nas.thresholds.tuner import exit_indices

    path = run_dir / "val_logits.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: drop_unreached needs the val outputs the run's report "
                                "stage writes; use the full network (drop_unreached=false)")
    with np.load(path) as saved:
        logits = saved["logits"]
    if logits.ndim != 3 or logits.shape[1] != len(thresholds):
        raise ValueError(f"{path} holds logits of shape {logits.shape}, not [N, {len(thresholds)}, classes]: "
                         "it is not this subnet's; rerun the report stage")
    return int(exit_indices(confidence(logits, measure), thresholds).max()) + 1


def feature_shapes(net: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Shapes (without batch) along the segments: [input, after segment 0, ..., after segment K-1].

    Segment k maps shapes[k] -> shapes[k + 1]; head k reads shapes[k + 1].
    """
    x = torch.zeros(1, *input_shape)
    shapes = [tuple(x.shape[1:])]
    with torch.inference_mode():
        for segment in net.segments:
            x = segment.eval()(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes
