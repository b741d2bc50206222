"""Constraints that pin every dependency to the floor pyproject.toml declares (`name>=floor` -> `name==floor`).

    python .ci/min_versions.py > /tmp/floors.txt && pip install -c /tmp/floors.txt -e ".[dev]"

CI's minimum-versions job installs with these and runs the tests, so a floor below what the code
calls (pymoo's random_state before 0.6.1.6, say) fails there, not on a user's machine.
"""
import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in ("dev",) for r in project["optional-dependencies"][extra]]
for req in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", req)
    if match:
        print(f"{match.group(1)}=={match.group(2)}")
