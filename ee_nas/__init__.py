"""ee_nas: hardware-aware evolutionary NAS for early-exit networks (AEBNAS, arXiv 2512.10671)."""
from pathlib import Path

# the Hydra config tree ships inside the package, so a non-editable install finds it from any folder
CONF_DIR = Path(__file__).resolve().parent / "conf"


def _register_schemas() -> None:  # the structured-config schemas the group files name (ee_nas.schemas)
    from ee_nas.schemas import register

    register()


_register_schemas()
