"""Production code apart from dev tooling (service/devtools, the ``embedded`` extra).

Each check runs in a fresh interpreter in which the dev package and the extra's
modules cannot be imported (``sys.modules[name] = None``, as if not installed),
the way ``creditnotes`` runs from the production image or a plain
``pip install creditnotes``. tests/integration/test_wheel_install.py checks the
same on a real wheel in a venv without extras.
"""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import service
from service.entrypoints.cli import EMBEDDED_EXTRA_MODULES

DEV_TOOLING = ("service.devtools", *EMBEDDED_EXTRA_MODULES)
ROOT = Path(__file__).resolve().parents[2]


def without_dev_tooling(code: str, *args: str,
                        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor name in {DEV_TOOLING!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def test_the_modules_dev_and_demo_check_for_are_the_embedded_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    distributions = {re.split(r"[<>=!~\[; ]", requirement)[0] for requirement in extras["embedded"]}
    assert {name.replace("-", "_") for name in distributions} == set(EMBEDDED_EXTRA_MODULES)


def production_modules() -> list[str]:
    return sorted(module.name for module in pkgutil.walk_packages(service.__path__, "service.")
                  if not module.name.startswith("service.devtools"))


def test_every_production_module_imports_without_the_dev_tooling_or_the_extra() -> None:
    modules = production_modules()
    assert {"service.main", "service.entrypoints.cli", "service.entrypoints.dlq"} <= set(modules)
    done = without_dev_tooling(
        "import importlib\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported")


def test_the_production_modules_do_not_load_the_dev_tooling_where_it_is_installed() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import importlib, json, sys\n"
         f"for name in {production_modules()!r}:\n    importlib.import_module(name)\n"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert not set(json.loads(loaded.stdout)) & set(DEV_TOOLING)


def test_dev_and_demo_without_the_extra_name_it_in_one_line_and_exit_2() -> None:
    for command in ("dev", "demo"):
        done = without_dev_tooling("from service.entrypoints.cli import main\n"
                                   "sys.exit(main(sys.argv[1:]))", command)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"creditnotes {command}: ")
        assert line.endswith("pip install 'creditnotes[embedded]'")
        assert "Traceback" not in done.stderr


def test_an_ops_command_without_the_dev_tooling_uses_its_settings() -> None:
    # a dev running from here would otherwise be found through .creditnotes/dev/servers.json
    done = without_dev_tooling(
        "from service.entrypoints.ops_context import with_dev_servers\n"
        "from service.settings import Settings\n"
        "print(with_dev_servers(Settings(_env_file=None)).origin)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "settings"
