"""`key=value` command lines of the tools besides ee_nas.run (select, finetune, infer, hardware.latency).

Each tool declares its arguments as a dataclass; `OmegaConf.from_cli` reads the command line and merging it into
the structured config checks keys and types, as Hydra does for `ee_nas.run`. ``--help`` lists the keys from the
dataclass (type, default, the field's ``help`` metadata). A mistake ends as one line and exit status 2.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def arg(default=dataclasses.MISSING, help: str = ""):  # noqa: A002  (argparse's word)
    """A dataclass field with a help text (MISSING: required)."""
    return dataclasses.field(default="???" if default is dataclasses.MISSING else default, metadata={"help": help})


def usage(schema: type, prog: str, doc: str = "") -> str:
    lines = [f"usage: {prog} key=value ...", *([doc.strip(), ""] if doc else []), "keys:"]
    for f in dataclasses.fields(schema):
        default = "required" if f.default == "???" else f"default: {'null' if f.default is None else f.default}"
        kind = getattr(f.type, "__name__", str(f.type)).replace("Optional[", "").rstrip("]")
        lines.append(f"  {f.name}=<{kind}>  {f.metadata.get('help', '')} ({default})")
    return "\n".join(lines)


def parse(schema: type[T], argv: Sequence[str] | None, prog: str, doc: str = "") -> T:
    """`argv` (default sys.argv[1:]) as an instance of the dataclass `schema`; exits 0 on --help, 2 on a mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(schema, prog, doc))
        raise SystemExit(0)
    keys = [f.name for f in dataclasses.fields(schema)]
    try:
        bad = next((a for a in argv if "=" not in a), None)
        if bad is not None:
            raise ValueError(f"{bad!r}: expected key=value with key one of {', '.join(keys)}")
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_cli([a.lstrip("+-") for a in argv]))
        missing = [k for k in keys if OmegaConf.is_missing(cfg, k)]
        if missing:
            raise ValueError(f"missing {' '.join(f'{k}=...' for k in missing)}; see {prog} --help")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        value = next((a.partition("=")[2] for a in argv if a.lstrip("+-").partition("=")[0] == key), "")
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        if key not in keys:
            reason = f"expected key=value with key one of {', '.join(keys)}"
        message = f"{key}={value}: {reason}"
    except ValueError as err:
        message = str(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
