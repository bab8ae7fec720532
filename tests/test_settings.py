"""Settings are read in one place: every environment variable the package reads is named in
exo_stable/settings.py, and no other module reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

from exo_stable import settings

PACKAGE = Path(settings.__file__).parent
# The package's __init__ sets one MLX variable before MLX loads; platform copies the environment to re-run the
# process with OpenBLAS preloaded. Neither reads a setting.
ALLOWED = {"settings.py", "__init__.py", "engine/platform.py"}


def environment_reads(path: Path) -> list[int]:
    """Lines of ``path`` that touch ``os.environ`` or call ``os.getenv``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
        and node.attr in ("environ", "getenv", "environb")
    ]


def test_only_settings_reads_the_environment() -> None:
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in ALLOWED and (lines := environment_reads(path))
    }
    assert not found, f"read the environment through exo_stable.settings: {found}"


def test_variables_are_named_once_and_read_from_the_mapping_given() -> None:
    names = [v.name for v in settings.VARIABLES]
    assert len(names) == len(set(names))
    env = {settings.FAULTS.name: "drop=0.5", settings.LOG.name: ""}
    assert settings.FAULTS.get(env) == "drop=0.5"
    assert settings.LOG.get(env) == "INFO"  # empty: the default
    assert settings.LOG.is_set(env) and not settings.PEERS.is_set(env)
    assert settings.PEERS.get(env) == ""
