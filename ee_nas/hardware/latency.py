"""Latency look-up table: measured batch-1 latency of every supernet component, summed per genome.

Same additive structure as `ee_nas.hardware.macs.CostModel`: the stem, every
backbone block at each elastic setting (expand x kernel), the final head, and
every branch *layer* (op, input channels, width, resolution) plus the branch
classifier are timed once, lazily, and a genome's latency is a sum:

    cum_latency[k] = stem + active blocks up to exit k's tap + branches 1..k
                     + one exit decision per exit evaluated

(the decision is what the dynamic runtime does after each head: confidence
and the threshold test). Timings are medians of repeated runs after a warm-up,
at batch size 1 on `threads` torch threads (restored afterwards), on the
calling thread's CPU time when `threads` is 1 (other jobs on shared cores do
not inflate it), else on the wall clock.

Components timed alone run from warm caches; a whole network does not. A
calibration (`calibrate`, part of `measure_all`) fits
``measured = scale * component sum + per_exit * exits + fixed`` on a dozen
whole subnets run end to end by the dynamic runtime; `predict` applies it.
On the digits supernet this took the error on unseen subnets from ~29% to ~2%
(experiments/results/bench_latency.md).

Entries are cached in a JSON file keyed by the machine (CPU model, machine
architecture, torch version, thread count, clock). Each entry is keyed by a
fingerprint of the module's structure and input shape, so the same file serves
any supernet on that machine (calibrations are stored per supernet); loading a
file made on another machine (or with other threads) fails with a clear message.

    python -m ee_nas.hardware.latency run_dir=RUN_DIR [out=lut.json] [threads=1]   (--help: the keys)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ee_nas.cli import arg

log = logging.getLogger(__name__)

FORMAT = 1
BYTES_PER_VALUE = 4  # float32 activations


class LatencyTableMismatch(ValueError):
    """A LUT file measured on another machine (or torch version, or thread count)."""


# -- machine key ------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor(), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(threads: int, clock: str = "auto") -> dict:
    """What a latency measurement depends on (and what must match to reuse one)."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": int(threads), "clock": resolve_clock(clock, threads)}


def machine_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("EE_NAS_CACHE", Path.home() / ".cache" / "ee_nas"))


# -- timing -----------------------------------------------------------------------------------------

CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


def resolve_clock(clock: str, threads: int) -> str:
    """``auto``: the calling thread's CPU time on 1 thread (robust to other processes sharing the cores:
    time spent preempted is not counted), wall time with more threads (worker threads run elsewhere)."""
    if clock == "auto":
        return "cpu" if int(threads) == 1 else "wall"
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: valid are auto, {', '.join(CLOCKS)}")
    return clock


def time_call(fn: Callable[[], object], repeats: int = 15, warmup: int = 3, sample_s: float = 5e-4,
              clock: str = "wall") -> float:
    """Median time of `fn()` in ms: `warmup` calls, then `repeats` samples of enough calls for ~`sample_s`.

    `clock`: ``wall`` (perf_counter) or ``cpu`` (this thread's CPU time; right for 1 torch thread).
    """
    now = CLOCKS[clock]
    for _ in range(max(1, warmup)):
        fn()
    t0 = now()
    fn()
    once = (now() - t0) / 1e9
    inner = int(min(100, max(1, sample_s / max(once, 1e-7))))
    samples = []
    for _ in range(max(1, repeats)):
        t0 = now()
        for _ in range(inner):
            fn()
        samples.append((now() - t0) / inner)
    return statistics.median(samples) / 1e6


class threads_set:
    """Context manager: torch.set_num_threads(n), restored on exit."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n != self.before:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


def module_fingerprint(module: nn.Module, in_shape: Sequence[int]) -> str:
    """Structure of a module (its repr plus plain attributes of every submodule) and its input shape."""
    attrs = []
    for name, m in module.named_modules():
        plain = {k: v for k, v in vars(m).items()
                 if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}
        attrs.append((name, type(m).__name__, sorted(plain.items())))
    text = json.dumps([repr(module), attrs, list(in_shape)], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def peak_activation_bytes(module: nn.Module, in_shape: Sequence[int]) -> int:
    """Conservative peak activation memory of one batch-1 forward pass (float32).

    The module's input stays alive throughout (residual adds; a tap's features
    while its branch runs), plus the largest input+output of any leaf module.
    """
    peak = [0]

    def hook(m, inputs, output):
        n = sum(t.numel() for t in inputs if torch.is_tensor(t))
        n += output.numel() if torch.is_tensor(output) else 0
        peak[0] = max(peak[0], n)

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            module.eval()(torch.zeros(1, *in_shape))
    finally:
        for h in handles:
            h.remove()
    return int((math.prod(in_shape) + peak[0]) * BYTES_PER_VALUE)


# -- per-genome results -----------------------------------------------------------------------------

def cum_latency(segment_ms: Sequence[float], head_ms: Sequence[float]) -> np.ndarray:
    """cum_latency[k]: every segment up to k plus every head (with its exit decision) up to k."""
    return np.cumsum(segment_ms) + np.cumsum(head_ms)


def avg_latency(exit_rates: Sequence[float], cum_ms: Sequence[float]) -> float:
    """sum_k exit_rate[k] * cum_latency[k] (ms): the mean latency of a sample."""
    rates = np.asarray(exit_rates, dtype=float)
    if rates.shape != np.shape(cum_ms) or not np.isclose(rates.sum(), 1.0):
        raise ValueError(f"exit_rates {rates.tolist()} must sum to 1 and match the {len(cum_ms)} exits")
    return float(rates @ np.asarray(cum_ms, dtype=float))


@dataclass(frozen=True)
class LatencyCosts:
    segment_ms: np.ndarray   # backbone latency between consecutive taps (stem in the first, final segment last)
    head_ms: np.ndarray      # each exit head + its exit decision (final classifier last)
    backbone_ms: float       # the same backbone with no early exits: segments + final head + one decision

    @property
    def cum_ms(self) -> np.ndarray:
        return cum_latency(self.segment_ms, self.head_ms)

    def avg_latency(self, exit_rates) -> float:
        return avg_latency(exit_rates, self.cum_ms)


# -- the table --------------------------------------------------------------------------------------

class LatencyTable:
    """Per-component batch-1 latency of any subnet of a supernet on this machine, memoized and cached.

    `path`: JSON cache; loaded when it exists (its machine key must match this
    machine's, else `LatencyTableMismatch`) and written by `save()`.
    `clock`: see `resolve_clock` (part of the file's key). `timer(fn) -> ms` replaces the timer (tests).
    """

    def __init__(self, supernet, threads: int = 1, path: str | Path | None = None, measure: str = "max_softmax",
                 repeats: int = 15, warmup: int = 3, sample_s: float = 5e-4, clock: str = "auto",
                 calibration_subnets: int = 12, calibration_rounds: int = 3,
                 timer: Callable[[Callable[[], object]], float] | None = None):
        if int(threads) < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        self.supernet, self.threads, self.measure = supernet, int(threads), measure
        self.repeats, self.warmup, self.sample_s = repeats, warmup, sample_s
        self.calibration_subnets, self.calibration_rounds = calibration_subnets, calibration_rounds
        self.clock = resolve_clock(clock, self.threads)
        self.timer = timer or (lambda fn: time_call(fn, self.repeats, self.warmup, self.sample_s, self.clock))
        self.key = machine_key(self.threads, self.clock)
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict] = {}
        self.n_measured = 0
        if self.path is not None and self.path.is_file():
            self.entries = self.read(self.path, self.key)
        bb = supernet.backbone
        self._in_shape = (bb.in_channels, bb.image_size, bb.image_size)
        self._tap_shape = [(c, r, r) for c, r in zip(bb.block_out, bb.tap_resolution)]
        with torch.no_grad():
            self._stem_shape = tuple(bb.extract_stem().eval()(torch.zeros(1, *self._in_shape)).shape[1:])
        self.block_ms = lru_cache(maxsize=None)(self._block_ms)
        self.branch_ms = lru_cache(maxsize=None)(self._branch_ms)
        self._layer = lru_cache(maxsize=None)(self._layer_uncached)
        self._classifier_ms = lru_cache(maxsize=None)(self._classifier_uncached)
        self._memory = lru_cache(maxsize=None)(self._memory_uncached)
        self._stem_ms = self._head_ms = self._decision_ms = self._correction = self._supernet_fp = None

    # -- file ------------------------------------------------------------------------------------
    @staticmethod
    def read(path: str | Path, key: dict | None = None) -> dict[str, dict]:
        """Entries of a LUT file; with `key`, the file's machine key must equal it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            theirs, entries = data["machine"], data["entries"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"latency LUT {path} is not a LUT file written by ee_nas ({err})") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"latency LUT {path} has format {data.get('format')}, expected {FORMAT}; re-measure it")
        if key is not None and theirs != key:
            diff = ", ".join(f"{k}: LUT {theirs.get(k)!r} vs here {key.get(k)!r}"
                             for k in sorted(set(theirs) | set(key)) if theirs.get(k) != key.get(k))
            raise LatencyTableMismatch(
                f"latency LUT {path} was measured on another machine or setup ({diff}); its latencies do not "
                f"hold here. Re-measure on this machine (hardware.latency_lut=measure) or point "
                f"hardware.latency_lut at a LUT made here.")
        return dict(entries)

    def save(self, path: str | Path | None = None) -> Path:
        from ee_nas.utils import atomic_write_json

        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("LatencyTable.save: no path given and the table has none")
        entries = dict(self.entries)
        if path.is_file():  # keep what another run measured into the same file meanwhile
            entries = {**self.read(path, self.key), **entries}
        return atomic_write_json(path, {"format": FORMAT, "machine": self.key, "entries": entries})

    # -- measuring ---------------------------------------------------------------------------------
    def _time(self, name: str, module: nn.Module, in_shape: Sequence[int]) -> float:
        fp = module_fingerprint(module, in_shape)
        entry = self.entries.get(fp)
        if entry is None:
            module = module.eval()
            x = torch.randn(1, *in_shape)
            with threads_set(self.threads), torch.inference_mode():
                ms = float(self.timer(lambda: module(x)))
            entry = self.entries[fp] = {"name": name, "in_shape": list(in_shape), "ms": ms}
            self.n_measured += 1
        return float(entry["ms"])

    def _block_in_shape(self, block: int) -> tuple[int, int, int]:
        return self._stem_shape if block == 0 else self._tap_shape[block - 1]

    def _block_ms(self, block: int, expand: float, kernel: int) -> float:
        bb = self.supernet.backbone
        module = bb.blocks[block].extract(bb.block_in(block), expand, kernel)
        return self._time(f"block{block}_e{expand:g}_k{kernel}", module, self._block_in_shape(block))

    @property
    def stem_ms(self) -> float:
        if self._stem_ms is None:
            self._stem_ms = self._time("stem", self.supernet.backbone.extract_stem(), self._in_shape)
        return self._stem_ms

    @property
    def head_ms(self) -> float:
        if self._head_ms is None:
            bb = self.supernet.backbone
            self._head_ms = self._time("head", bb.extract_head(), self._tap_shape[bb.n_blocks - 1])
        return self._head_ms

    @property
    def decision_ms(self) -> float:
        """One exit decision of the dynamic runtime (confidence of 1 x C logits, threshold test, argmax)."""
        if self._decision_ms is None:
            from ee_nas.inference.runtime import row_confidence

            c = self.supernet.backbone.num_classes
            fp = f"decision:row-py:{self.measure}:{c}"  # "-py": timed since the runtime computes it on Python floats
            if fp not in self.entries:
                logits = torch.randn(1, c)

                def decide():  # as EarlyExitRuntime does at batch size 1
                    return row_confidence(logits, self.measure) >= 0.5, logits.numpy().argmax(-1)

                with threads_set(self.threads):
                    ms = float(self.timer(decide))
                self.entries[fp] = {"name": f"decision_{self.measure}", "in_shape": [c], "ms": ms}
                self.n_measured += 1
            self._decision_ms = float(self.entries[fp]["ms"])
        return self._decision_ms

    def _layer_uncached(self, tap: int, slot: int, in_shape: tuple, layer) -> tuple[float, tuple]:
        module = self.supernet.branches[str(tap)].layers[slot].extract(in_shape[0], layer)
        with torch.no_grad():
            out = tuple(module.eval()(torch.zeros(1, *in_shape)).shape[1:])
        ms = self._time(f"branch_{layer.op}_w{layer.width}_in{in_shape[0]}_r{in_shape[-1]}", module, in_shape)
        return ms, out

    def _classifier_uncached(self, tap: int, in_shape: tuple) -> float:
        linear = self.supernet.branches[str(tap)].classifiers["none"].extract(in_shape[0])  # same shape for every kind
        module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
        return self._time(f"classifier_in{in_shape[0]}_r{in_shape[-1]}", module, in_shape)

    def _branch_ms(self, tap: int, layers) -> float:
        """A branch's latency: its layers, then pooling + linear classifier."""
        shape, total = self._tap_shape[tap], 0.0
        for slot, layer in enumerate(layers):
            ms, shape = self._layer(tap, slot, shape, layer)
            total += ms
        return total + self._classifier_ms(tap, shape)

    # -- genomes -------------------------------------------------------------------------------------
    def raw_costs(self, genome) -> tuple[np.ndarray, np.ndarray]:
        """Summed component latencies (ms) per segment and per exit head, without decisions or calibration."""
        bb = self.supernet.backbone
        exits = {e.tap: e.layers for e in genome.exits}
        seg, head, current = [], [], self.stem_ms
        for b in bb.active_blocks(genome.depths):
            current += self.block_ms(b, genome.expands[b], genome.kernels[b])
            if b in exits:
                seg.append(current)
                head.append(self.branch_ms(b, exits[b]))
                current = 0.0
        seg.append(current)
        head.append(self.head_ms)
        return np.array(seg), np.array(head)

    def costs(self, genome) -> LatencyCosts:
        """Per-segment and per-head latency with the table's correction (see `calibrate`):
        head k gets one exit decision, the first segment the runtime's fixed cost."""
        raw_seg, raw_head = self.raw_costs(genome)
        a, b, c = self.correction()
        seg, head = a * raw_seg, a * raw_head + b
        seg[0] += c
        return LatencyCosts(seg, head, float(a * (raw_seg.sum() + self.head_ms) + b + c))

    # -- calibration ---------------------------------------------------------------------------------
    def supernet_fingerprint(self) -> str:
        """Structure of the supernet (its largest subnet): what a calibration belongs to."""
        if self._supernet_fp is None:
            self._supernet_fp = module_fingerprint(self.supernet.extract(self.supernet.space.largest()),
                                                   self._in_shape)
        return self._supernet_fp

    def correction(self) -> tuple[float, float, float]:
        """(scale, per-exit ms, fixed ms): measured ~= scale * component sum + per_exit * exits run + fixed.

        Uncalibrated: (1, measured decision, 0). `calibrate` fits them on whole subnets, which absorbs
        what component timings miss: caches shared along the network, the runtime's own work. A
        degenerate fit (scale 0) is not used: it would predict one latency for every subnet.
        """
        if self._correction is None:
            cal = self.entries.get(f"calibration:{self.supernet_fingerprint()}")
            usable = cal is not None and float(cal["scale"]) > 0
            self._correction = ((float(cal["scale"]), float(cal["per_exit_ms"]), float(cal["base_ms"]))
                                if usable else (1.0, self.decision_ms, 0.0))
        return self._correction

    @property
    def calibration(self) -> dict | None:
        return self.entries.get(f"calibration:{self.supernet_fingerprint()}")

    def calibrate(self, n_subnets: int | None = None, seed: int = 12345, rounds: int | None = None) -> dict:
        """Fit `correction` on whole subnets run end to end by the dynamic runtime (to the final exit).

        Random subnets of the space plus its largest subnet and largest backbone, each timed batch-1
        in `rounds` interleaved rounds (median); non-negative least squares of measured latency on
        [component sum, number of exits, 1]. Stored in the LUT file next to the components.
        """
        from scipy.optimize import nnls

        from ee_nas.inference.runtime import EarlyExitRuntime

        n_subnets = self.calibration_subnets if n_subnets is None else n_subnets
        rounds = self.calibration_rounds if rounds is None else rounds
        space = self.supernet.space
        rng = np.random.default_rng(seed)
        genomes = [space.largest(), space.largest_backbone()] + [space.sample(rng) for _ in range(n_subnets)]
        x = torch.randn(1, *self._in_shape)
        runtimes = [EarlyExitRuntime(self.supernet.extract(g).eval(), [None] * (g.n_exits - 1)) for g in genomes]
        times = [[] for _ in genomes]
        with threads_set(self.threads), torch.inference_mode():
            for _ in range(max(1, rounds)):
                for rt, t in zip(runtimes, times):
                    t.append(float(self.timer(lambda rt=rt: rt.classify(x))))
        measured = np.array([statistics.median(t) for t in times])
        raw = np.array([sum(self.raw_costs(g)[0]) + sum(self.raw_costs(g)[1]) for g in genomes])
        design = np.stack([raw, [g.n_exits for g in genomes], np.ones(len(genomes))], 1)
        (a, b, c), _ = nnls(design, measured)
        fit = design @ np.array([a, b, c])
        cal = {"name": "calibration", "scale": float(a), "per_exit_ms": float(b), "base_ms": float(c),
               "n_subnets": len(genomes), "fit_mape_pct": float(np.mean(np.abs(fit - measured) / measured) * 100),
               "uncalibrated_mape_pct": float(np.mean(np.abs(raw + self.decision_ms * design[:, 1] - measured)
                                                      / measured) * 100)}
        if a <= 0:
            log.warning("latency calibration is degenerate: over %d subnets measured latency did not grow with "
                        "the summed component latencies (timing noise, or too few subnets/rounds: %d/%d), so the "
                        "fit would set a subnet's latency by its number of exits alone; predictions stay "
                        "uncalibrated (component sums)", len(genomes), n_subnets, rounds)
        self.entries[f"calibration:{self.supernet_fingerprint()}"] = cal
        self._correction = None
        return cal

    def predict(self, genome) -> np.ndarray:
        """Per-exit cumulative latency (ms, batch 1): what a sample leaving at exit k waited."""
        return self.costs(genome).cum_ms

    def avg_latency(self, genome, exit_rates) -> float:
        return self.costs(genome).avg_latency(exit_rates)

    def backbone_latency(self, genome) -> float:
        """The genome's backbone alone (no early exits, no decisions): stem + active blocks + final head."""
        return self.costs(genome).backbone_ms

    def measure_all(self, save: bool = True, calibrate: bool = True) -> int:
        """Measure every component any genome of the search space can use, then (unless this supernet
        has one already, or `calibrate` is false) fit the calibration; returns how many were new."""
        bb, space = self.supernet.backbone, self.supernet.space
        before = self.n_measured
        self.stem_ms, self.head_ms, self.decision_ms  # noqa: B018 - properties measure
        for b in range(bb.n_blocks):
            for e in space.expand_choices:
                for k in space.kernel_choices:
                    self.block_ms(b, float(e), int(k))
        designs = self._layer_designs()
        for tap in map(int, self.supernet.branches):  # the taps the supernet built branches for (a static space: none)
            states = {self._tap_shape[tap]}
            for slot in range(space.max_layers + 1):
                if slot >= space.min_layers:
                    for shape in states:
                        self._classifier_ms(tap, shape)
                if slot == space.max_layers:
                    break
                states = {self._layer(tap, slot, shape, layer)[1] for shape in states for layer in designs}
        if calibrate and self.calibration is None:
            self.calibrate()
        if save and self.path is not None:
            self.save()
        return self.n_measured - before

    def _layer_designs(self) -> list:
        from ee_nas.genome import POOL_OPS, BranchLayer

        space = self.supernet.space
        return [BranchLayer(op, 0) if op in POOL_OPS else BranchLayer(op, w)
                for op in space.ops for w in ([0] if op in POOL_OPS else space.widths)]

    # -- memory ----------------------------------------------------------------------------------------
    def _memory_uncached(self, kind: str, *args) -> int:
        bb = self.supernet.backbone
        if kind == "stem":
            return peak_activation_bytes(bb.extract_stem(), self._in_shape)
        if kind == "head":
            return peak_activation_bytes(bb.extract_head(), self._tap_shape[bb.n_blocks - 1])
        if kind == "block":
            b, e, k = args
            return peak_activation_bytes(bb.blocks[b].extract(bb.block_in(b), e, k), self._block_in_shape(b))
        tap, layers = args
        return peak_activation_bytes(self.supernet.branches[str(tap)].extract(layers), self._tap_shape[tap])

    def peak_memory_bytes(self, genome) -> int:
        """Conservative peak activation memory (bytes, batch 1, float32) of dynamic inference of `genome`."""
        bb = self.supernet.backbone
        peaks = [self._memory("stem"), self._memory("head")]
        peaks += [self._memory("block", b, genome.expands[b], genome.kernels[b])
                  for b in bb.active_blocks(genome.depths)]
        peaks += [self._memory("branch", e.tap, e.layers) for e in genome.exits]
        return int(max(peaks))

    # -- construction from a hardware profile ------------------------------------------------------------
    @classmethod
    def from_profile(cls, supernet, profile, cache_dir: str | Path | None = None, measure: str = "max_softmax",
                     **kwargs) -> "LatencyTable | None":
        """The profile's LUT: None without one; ``measure``: this machine, cached under `cache_dir`
        (default ~/.cache/ee_nas or $EE_NAS_CACHE) in a file named by the machine key; a path: that
        file, which must have been measured on this machine (missing entries are measured here)."""
        lut = profile.latency_lut
        if lut is None:
            return None
        threads = profile.lut_threads
        if lut == "measure":
            key = machine_key(threads)
            path = Path(cache_dir or default_cache_dir()) / f"latency_lut_{machine_hash(key)}.json"
        else:
            path = Path(lut).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"hardware.latency_lut={lut!r}: no such LUT file; use "
                                        f"hardware.latency_lut=measure to time this machine")
        return cls(supernet, threads=threads, path=path, measure=measure, **kwargs)


@dataclass
class LatencyArgs:  # the command line (ee_nas.cli)
    run_dir: str = arg(help="a finished ee_nas.run directory (its supernet is measured)")
    out: Optional[str] = arg(None, "the LUT file to write (default: run_dir/latency_lut.json)")
    threads: int = arg(1, "torch threads while timing (batch size 1)")


def _main(argv: Sequence[str] | None = None) -> None:
    """python -m ee_nas.hardware.latency run_dir=RUN_DIR [out=PATH] [threads=N]: measure a run's supernet."""
    import sys

    from ee_nas.cli import parse
    from ee_nas.inference.runtime import load_supernet

    args = list(sys.argv[1:] if argv is None else argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):  # the older positional RUN_DIR
        args[0] = f"run_dir={args[0]}"
    a = parse(LatencyArgs, args, "python -m ee_nas.hardware.latency", "Measure a run's supernet: its latency LUT.")
    run_dir = Path(a.run_dir)
    table = LatencyTable(load_supernet(run_dir), threads=a.threads, path=a.out or run_dir / "latency_lut.json")
    t0 = time.perf_counter()
    n = table.measure_all()
    print(f"measured {n} components in {time.perf_counter() - t0:.1f} s on {table.key}; written to {table.path}")


if __name__ == "__main__":
    _main()
