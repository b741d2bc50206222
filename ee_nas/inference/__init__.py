"""Deployment: dynamic early-exit runtime, BatchNorm folding, TorchScript/ONNX export, the runtime over exported files.

`ExportedRuntime`/`export_net`/`export_run` are imported lazily (ONNX is optional).
"""
from ee_nas.inference.fold import fold_batchnorm
from ee_nas.inference.runtime import EarlyExitRuntime, ExitResult, LoadedRun, load_run, load_supernet

__all__ = ["EarlyExitRuntime", "ExitResult", "LoadedRun", "fold_batchnorm", "load_run", "load_supernet",
           "ExportedRuntime", "export_net", "export_run"]


def __getattr__(name):
    if name in ("ExportedRuntime", "export_net", "export_run"):
        from ee_nas.inference import export

        return getattr(export, name)
    raise AttributeError(f"module 'ee_nas.inference' has no attribute {name!r}")
