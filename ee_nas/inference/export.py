"""Export a static early-exit network for deployment: TorchScript and ONNX, one file per segment and head.

Layout of an export directory::

    segment_0.pt / segment_0.onnx    input image [N,C,H,W] -> features after exit 0's tap
    head_0.pt    / head_0.onnx       features -> logits of exit 0
    ...                              (segment k: features of tap k-1 -> features of tap k)
    thresholds.json                  thresholds, measure, n_exits, input_shape, feature shapes

The batch dimension is dynamic, so the runtime can drop samples that left.
`ExportedRuntime(dir, backend)` runs the same exit rule as the eager
`EarlyExitRuntime` on the exported files.

    export_run("outputs/.../run_dir")                       # -> run_dir/export
    ExportedRuntime("outputs/.../run_dir/export", "onnx").predict(images)
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ee_nas.inference.runtime import _ExitRule, feature_shapes, load_run, normalize_thresholds

log = logging.getLogger(__name__)

BACKENDS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
META = "thresholds.json"
OPSET = 17


def _check_backends(backends: Sequence[str]) -> list[str]:
    backends = [backends] if isinstance(backends, str) else list(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ValueError(f"export backends {backends}: valid are {', '.join(BACKENDS)}")
    return backends


def _torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    """ONNX with a dynamic batch axis. The TorchScript-based exporter is ~30x faster per file here;
    the torch.export-based one (needs onnxscript) is the fallback, or the choice with exporter='dynamo'."""
    names = dict(input_names=["input"], output_names=["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter in ("auto", "legacy"):
            try:
                torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **names)
                return
            except Exception as err:  # noqa: BLE001 - removed or failing legacy exporter: try the new one
                if exporter == "legacy":
                    raise
                log.info("legacy ONNX export failed (%s); using the dynamo exporter", err)
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    opset_version=max(OPSET, 18), verbose=False, **names)
        program.save(str(path), external_data=False)


def export_net(net: nn.Module, out_dir: str | Path, input_shape: Sequence[int], thresholds, measure: str,
               backends: Sequence[str] = BACKENDS, onnx_exporter: str = "auto", extra: dict | None = None) -> Path:
    """Write every segment and head of a static `MultiExitNet` plus thresholds.json into `out_dir`."""
    backends = _check_backends(backends)
    if onnx_exporter not in ("auto", "legacy", "dynamo"):
        raise ValueError(f"onnx_exporter={onnx_exporter!r}: valid are auto, legacy, dynamo")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    n_exits = len(net.heads)
    t = normalize_thresholds(thresholds, n_exits)
    shapes = feature_shapes(net, input_shape)
    files: dict[str, list[str]] = {b: [] for b in backends}
    with torch.no_grad():
        for k, (segment, head) in enumerate(zip(net.segments, net.heads)):
            for part, module, shape in (("segment", segment, shapes[k]), ("head", head, shapes[k + 1])):
                example = torch.randn(2, *shape)  # batch 2: nothing gets specialized to a batch of one
                for backend in backends:
                    path = out / f"{part}_{k}{SUFFIX[backend]}"
                    (_torchscript(module, example, path) if backend == "torchscript"
                     else _onnx(module, example, path, onnx_exporter))
                    files[backend].append(path.name)
    for path in out.glob("*_*.*"):  # a longer network's files from an earlier export into the same folder
        part, _, index = path.stem.partition("_")
        if part in ("segment", "head") and index.isdigit() and int(index) >= n_exits and path.suffix in SUFFIX.values():
            path.unlink()
    meta = {
        "thresholds": [float(v) if np.isfinite(v) else None for v in t],
        "measure": measure, "n_exits": n_exits, "input_shape": list(input_shape),
        "feature_shapes": [list(s) for s in shapes], "backends": backends, "files": files, **(extra or {}),
    }
    from ee_nas.utils import atomic_write_json

    atomic_write_json(out / META, meta)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, backends: Sequence[str] = BACKENDS,
               onnx_exporter: str = "auto", drop_unreached: bool = False) -> Path:
    """Export the chosen subnet of a finished run (default: into run_dir/export; `drop_unreached`: without
    the exits no val image reaches, see `load_run`)."""
    run = load_run(run_dir, drop_unreached)
    return export_loaded(run, out_dir if out_dir is not None else run.run_dir / "export", backends, onnx_exporter)


def export_loaded(run, out_dir: str | Path, backends: Sequence[str] = BACKENDS, onnx_exporter: str = "auto") -> Path:
    """Export a `LoadedRun`'s network; thresholds.json also holds its genome, normalization and how many of the
    genome's exits were dropped (`load_run(drop_unreached=True)`)."""
    extra = {"genome": run.genome.to_dict(), "mean": list(run.mean), "std": list(run.std),
             "dropped_exits": run.genome.n_exits - run.net.n_exits}
    return export_net(run.net, out_dir, run.input_shape, run.thresholds, run.measure, backends, onnx_exporter, extra)


class ExportedRuntime(_ExitRule):
    """The dynamic exit rule over exported files (TorchScript or ONNX Runtime)."""

    def __init__(self, directory: str | Path, backend: str = "torchscript", threads: int | None = None):
        self.directory, self.backend = Path(directory), backend
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: valid are {', '.join(BACKENDS)}")
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {self.directory} is not an ee_nas export directory")
        self.meta = json.loads(meta_path.read_text())
        if backend not in self.meta["backends"]:
            raise ValueError(f"{self.directory} holds no {backend} export (it has {self.meta['backends']})")
        super().__init__(self.meta["thresholds"], self.meta["measure"], self.meta["n_exits"])
        self.input_shape = tuple(self.meta["input_shape"])
        load = self._load_torchscript if backend == "torchscript" else self._load_onnx
        self.segments = [load(self.directory / f"segment_{k}{SUFFIX[backend]}", threads) for k in range(self.n_exits)]
        self.heads = [load(self.directory / f"head_{k}{SUFFIX[backend]}", threads) for k in range(self.n_exits)]

    @staticmethod
    def _load_torchscript(path: Path, threads):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").eval()

    @staticmethod
    def _load_onnx(path: Path, threads):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = opts.inter_op_num_threads = int(threads)
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def _prepare(self, x):
        if self.backend == "onnx":
            x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            x = x.astype(np.float32, copy=False)
            return x[None] if x.ndim == 3 else x
        x = torch.as_tensor(x, dtype=torch.float32)
        return x[None] if x.dim() == 3 else x

    def _segment(self, k, x):
        if self.backend == "onnx":
            return self.segments[k].run(None, {"input": x})[0]
        return self.segments[k](x)

    def _head_native(self, k, x):
        if self.backend == "onnx":
            return self.heads[k].run(None, {"input": x})[0]
        return self.heads[k](x)

    def _take(self, x, idx):
        return x[idx] if self.backend == "onnx" else x.index_select(0, torch.as_tensor(idx))

    def classify(self, x):
        with torch.inference_mode():
            return super().classify(x)
