"""The conda environments of the rules (`--use-conda`) agree with the pinned lock file.

`envs/*.yaml` install pinned pip packages into a conda Python 3.11, so a `--use-conda` run uses the
versions `make` installs from requirements.lock. Two checks: every pin in an env equals the lock,
and every third-party package the code of a rule imports (its entry script and, transitively, the
stepseg modules it reaches) is pinned in that rule's env, so no job fails with ImportError on a
cluster node.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
PACKAGE = ROOT / "src" / "stepseg"


def normalized(name: str) -> str:
    """PEP 503 name: case and the runs of `-_.` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalized(name)] = version.strip()
    return pins


def env_spec(path: Path) -> tuple[list[str], dict[str, str]]:
    """(conda dependencies, pip pins by normalized name) of one env file."""
    spec = yaml.safe_load(path.read_text())
    conda, pip = [], {}
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for requirement in dep["pip"]:
                match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", requirement.strip())
                assert match, f"{path.name}: pip requirement {requirement!r} is not pinned (==)"
                pip[normalized(match.group(1))] = match.group(2)
        else:
            conda.append(str(dep))
    return conda, pip


def rule_envs_and_scripts() -> dict[str, tuple[Path, Path]]:
    """rule name -> (conda env file, entry script), read from workflow/rules/*.smk."""
    found = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^(?:rule|checkpoint) (\w+):\n", smk.read_text(), flags=re.MULTILINE)
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
            conda = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", body)
            script = re.search(r"script:\s*\n\s*\"([^\"]+)\"", body)
            if conda and script:
                base = smk.parent
                found[name] = (
                    (base / conda.group(1)).resolve(),
                    (base / script.group(1)).resolve(),
                )
    return found


def stepseg_module_path(dotted: str) -> Path | None:
    parts = dotted.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names imported anywhere in a file (also inside functions), plus `stepseg.x` strings
    (modules loaded by name, as the source dispatch does with importlib)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            package = path.relative_to(PACKAGE.parent).with_suffix("").parts
            package = package[: len(package) - node.level + (path.name == "__init__.py")]
            base = ".".join([*package, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"stepseg(\.\w+)+", node.value)
        ):
            names.add(node.value)
    return names


def third_party_imports(script: Path) -> dict[str, str]:
    """Top-level third-party module -> the file that imports it, following stepseg imports."""
    seen: set[Path] = set()
    todo = [script]
    found: dict[str, str] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top == "stepseg":
                for prefix in (name, name.rsplit(".", 1)[0]):
                    module = stepseg_module_path(prefix)
                    if module:
                        todo.append(module)
                # importing stepseg.a.b runs stepseg/__init__.py and stepseg/a/__init__.py
                parts = name.split(".")
                for depth in range(1, len(parts)):
                    init = stepseg_module_path(".".join(parts[:depth]))
                    if init:
                        todo.append(init)
            elif top not in sys.stdlib_module_names and top not in {"snakemake", "__future__"}:
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_equal_the_lock(env):
    lock = lock_pins()
    conda, pip = env_spec(env)
    assert "python=3.11" in conda, f"{env.name}: conda python must be 3.11 like pyproject.toml"
    assert pip, f"{env.name} pins no pip package"
    missing = sorted(set(pip) - set(lock))
    assert not missing, f"{env.name} pins packages the lock does not have: {missing}"
    differ = {name: (pip[name], lock[name]) for name in pip if pip[name] != lock[name]}
    assert not differ, f"{env.name}: (env, lock) versions differ: {differ}"


def test_every_rule_with_a_script_has_a_conda_env():
    rules = rule_envs_and_scripts()
    assert {"manifest", "download", "convert", "train", "infer", "evaluate"} <= set(rules)
    for name, (env, script) in rules.items():
        assert env.is_file(), f"rule {name}: conda env {env} does not exist"
        assert script.is_file(), f"rule {name}: script {script} does not exist"


@pytest.mark.parametrize("rule", sorted(rule_envs_and_scripts()))
def test_env_provides_what_the_rule_imports(rule):
    env, script = rule_envs_and_scripts()[rule]
    _, pip = env_spec(env)
    distributions = packages_distributions()
    missing = {}
    for module, importer in third_party_imports(script).items():
        provided_by = {normalized(d) for d in distributions.get(module, [module])}
        if not provided_by & set(pip):
            missing[module] = f"{'/'.join(sorted(provided_by))} (imported in {importer})"
    assert not missing, f"rule {rule}: {env.name} lacks {missing}"
