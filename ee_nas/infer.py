"""Classify image files with a finished run's early-exit network.

    python -m ee_nas.infer run_dir=outputs/digits_search/... input=digit.png
    python -m ee_nas.infer run_dir=... input=folder/ backend=onnx

Arguments (key=value, `--help` lists them): run_dir, input (an image file or a
folder of images), backend (eager | torchscript | onnx; the exported files are
made on first use under export_dir, default run_dir/export), threads (torch /
ONNX Runtime threads, default 1), batch_size (default 64), fold_bn (eager: BatchNorm
folded into the convolutions, `ee_nas.inference.fold`; default false), drop_unreached
(without the exits no val image reaches, `ee_nas.inference.load_run`; default false;
an export of the other kind under export_dir is replaced).

Each image is read with PIL, converted to the run's channels, resized to the
run's image size and normalized with the run's mean/std (the `data` section of
run_dir/.hydra/config.yaml). One line per file: predicted class, which exit
answered (1-based, of n_exits) and its confidence.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ee_nas.cli import arg, parse

BACKENDS = ("eager", "torchscript", "onnx")


class UsageError(ValueError):
    pass


@dataclass
class InferArgs:
    run_dir: str = arg(help="a finished ee_nas.run directory")
    input: str = arg(help="an image file or a folder of images")
    backend: str = arg("eager", "eager | torchscript | onnx (exported on first use under export_dir)")
    export_dir: Optional[str] = arg(None, "where the exported files go (default: run_dir/export)")
    threads: int = arg(1, "torch / ONNX Runtime threads")
    batch_size: int = arg(64, "images per batch")
    fold_bn: bool = arg(False, "eager backend: BatchNorm folded into the convolutions (about 12% faster on a CPU)")
    drop_unreached: bool = arg(False, "without the exits no val image reaches: the last reached one answers "
                                      "everything that gets there (ee_nas.inference.load_run)")


def parse_args(argv: Sequence[str]) -> dict:
    opts = dataclasses.asdict(parse(InferArgs, argv, "python -m ee_nas.infer", __doc__.split("\n\n")[0]))
    if opts["backend"] not in BACKENDS:
        raise UsageError(f"backend={opts['backend']!r} is invalid; valid: {', '.join(BACKENDS)}")
    if opts["fold_bn"] and opts["backend"] != "eager":
        raise UsageError(f"fold_bn=true is for backend=eager; backend={opts['backend']} runs the exported "
                         "files as they are")
    for key in ("threads", "batch_size"):
        if opts[key] < 1:
            raise UsageError(f"{key}={opts[key]!r} is invalid; must be an integer >= 1")
    return opts


# torchvision.datasets.folder.IMG_EXTENSIONS (importing torchvision costs seconds)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)
                       and not p.name.startswith("."))
        if not files:
            raise UsageError(f"input={path}: the folder holds no images ({', '.join(IMG_EXTENSIONS)})")
        return files
    raise UsageError(f"input={path}: no such file or folder")


def load_image(path: Path, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[C, H, W] float: PIL -> channels of the run -> resized (bilinear) -> [0, 1] -> normalized."""
    from PIL import Image

    c, h, w = input_shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 255.0
    except Exception as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def class_names(cfg) -> list[str] | None:
    """Folder names of an imagefolder run (index -> name); None for datasets with numeric classes."""
    try:
        if not str(cfg.data._target_).endswith("ImageFolderDataModule"):
            return None
        root = Path(str(cfg.data.root)).expanduser()
        folder = root / "train" if (root / "train").is_dir() else root
        return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
    except Exception:  # noqa: BLE001 - names are a nicety; indices are printed otherwise
        return None


def make_runtime(run, backend: str, export_dir: str | None, threads: int, fold_bn: bool = False):
    from ee_nas.inference.runtime import EarlyExitRuntime

    if backend == "eager":
        return EarlyExitRuntime(run.net, run.thresholds, run.measure, fold_bn=fold_bn)
    from ee_nas.inference.export import META, ExportedRuntime, export_loaded

    out = Path(export_dir) if export_dir else run.run_dir / "export"
    meta = out / META
    saved = json.loads(meta.read_text()) if meta.is_file() else {}
    if backend not in saved.get("backends", []) or saved.get("n_exits") != run.net.n_exits:
        export_loaded(run, out)
    return ExportedRuntime(out, backend, threads=threads)


def infer(run_dir: str | Path, input: str | Path, backend: str = "eager", export_dir: str | None = None,
          threads: int = 1, batch_size: int = 64, fold_bn: bool = False, drop_unreached: bool = False) -> list[dict]:
    """Classify every image under `input`; one dict per file (file, label, class, exit, n_exits, confidence)."""
    from ee_nas.inference.runtime import load_run

    torch.set_num_threads(threads)
    run = load_run(run_dir, drop_unreached)
    runtime = make_runtime(run, backend, export_dir, threads, fold_bn)
    names = class_names(run.cfg)
    files = image_files(Path(input))
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        x = torch.stack([load_image(f, run.input_shape, run.mean, run.std) for f in chunk])
        result = runtime.classify(x)
        for f, label, exit_, conf in zip(chunk, result.labels, result.exits, result.confidence):
            rows.append({"file": str(f), "label": int(label),
                         "class": names[label] if names and label < len(names) else str(int(label)),
                         "exit": int(exit_) + 1, "n_exits": runtime.n_exits, "confidence": float(conf)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        rows = infer(**opts)
    except SystemExit as stop:  # --help (0) or a malformed command line (2), already printed
        return int(stop.code or 0)
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        final = " (final)" if r["exit"] == r["n_exits"] else ""
        print(f"{r['file']}: class {r['class']}  exit {r['exit']}/{r['n_exits']}{final}  "
              f"confidence {r['confidence']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
