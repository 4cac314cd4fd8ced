"""What the stages read that dvc.yaml cannot list precisely, as fingerprints: the code each stage runs, and
the reward's inputs from outside the repository's declared files.

The ``fingerprints`` stage (``always_changed`` in dvc.yaml, so it runs on every `dvc repro`, first; it imports
no torch and takes a fraction of a second) writes them, and the other stages depend on them: each file changes
only when what it fingerprints was edited, and then exactly the stages that read it re-run.

- ``fingerprints/code/<stage>.json``: every project file the stage's command runs (``code_fingerprints``): the
  script and the launcher, followed through their imports (function-local ones included, found with ``ast``)
  inside ``rlhf_core`` and ``stages``, but for the code that cannot change an output (``OUTPUT_NEUTRAL``).  The walk runs on every repro, so a new import is covered the moment it is
  written, and dvc.yaml lists one file per stage instead of twenty modules (a slimmer dvc.lock, which DVC
  re-reads and rewrites after every stage).
- ``fingerprints/reward.json`` (``reward_inputs``), read by ``score`` and ``evaluate``:

  - a ``python`` scorer's source: the file of ``module`` in ``module:function``, and every file it imports
    from the same place (its directory on ``sys.path``; for an installed package, that package only);
  - an ``hf_classifier`` model given as a local directory, outside the repository or inside it, other than the
    ``train_reward`` stage's outputs under ``reward_models/`` (a declared dependency already).

- ``fingerprints/reference.json``: ``{"uses_reference": …}`` (``Params.uses_reference``), read by ``rollout``,
  ``advantages`` and ``optimize``: whether π_ref is loaded at all (KL-free when both KL coefficients are 0).  It
  changes only when that flips, so a new ``kl.reward_coef`` re-runs no rollout.

Files are hashed by content (sha256), except files above ``CONTENT_HASH_LIMIT`` bytes (model weights), which are
fingerprinted by size and modification time, to keep the stage cheap on multi-GB checkpoints.  A Hub id is
recorded as the id only.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
from pathlib import Path

from rlhf_core.errors import DataError

CONTENT_HASH_LIMIT = 64 * 2**20
CODE_DIR = "fingerprints/code"  # <stage>.json: the code the stage runs
REWARD_FILE = "fingerprints/reward.json"  # what the reward reads from outside the declared files
ENVIRONMENT_FILE = "fingerprints/environment.json"  # the source of a python environment (environment.class_path)
REFERENCE_FILE = "fingerprints/reference.json"  # whether the rollout loads π_ref (Params.uses_reference)
PACKAGES = ("rlhf_core", "stages")  # the project's own code, followed through imports
# Code that cannot change what a stage writes, left out of every stage's fingerprint (and not followed through its
# imports), so that editing it re-runs nothing: the warm-start server (it forks the same stage code; warm and cold
# give the same bytes, tests/e2e), the Ray launcher (local and Ray give the same bytes), progress lines and stage timing (stderr, MLflow
# only), and the params renderer and the docs generator (params.yaml, docs/, README blocks).
OUTPUT_NEUTRAL = ("rlhf_core.runtime.warm", "rlhf_core.runtime.ray_launch", "rlhf_core.runtime.progress", "rlhf_core.runtime.stage_times",
                  "rlhf_core.config.rendering", "rlhf_core.tooling.docs")
STAGE = "fingerprints"  # the stage that writes them (dvc.yaml)


def file_fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of the content, or ``size:<bytes>,mtime_ns:<ns>`` for a file above CONTENT_HASH_LIMIT."""
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"size:{stat.st_size},mtime_ns:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name the file at ``path`` (in package ``package``) imports anywhere, function-local
    imports included; ``from a import b`` gives both ``a`` and ``a.b`` (b may be a submodule); relative
    imports are resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                kept = parts[: len(parts) - node.level + 1]
                base = ".".join(kept + ([node.module] if node.module else []))
            if base:
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_file(root: Path, name: str) -> Path | None:
    """The source file of module ``name`` under the sys.path entry ``root`` (a package's __init__.py), or None."""
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def import_closure(root: Path, module: str, follow=lambda name: True,
                   parsed: dict[Path, set[str]] | None = None) -> dict[str, Path]:
    """The source files reached from ``module`` through imports that resolve under ``root`` (parent packages'
    __init__ included) and that ``follow(name)`` accepts: {module name: file}.  ``parsed``: {file: the names it
    imports}, shared by several walks over the same files so that each file is parsed once."""
    parsed = {} if parsed is None else parsed
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            prefix = ".".join(parts[:depth])
            if prefix in found or not follow(prefix):
                continue
            path = module_file(root, prefix)
            if path is None:
                continue
            found[prefix] = path
            if path not in parsed:
                parsed[path] = imported_names(path, prefix if path.name == "__init__.py" else prefix.rpartition(".")[0])
            todo.extend(parsed[path])
    return found


def module_sources(module: str, what: str = "python scorer") -> dict[str, str]:
    """{path relative to its sys.path entry: fingerprint} of the user's module ``module`` (a python scorer's or an
    environment's, named by ``what`` in errors) and of what it imports from the same place.  For a module in
    site-packages, only its own top-level package is followed."""
    try:  # finding a submodule imports its parent packages: the user's code may raise anything
        spec = importlib.util.find_spec(module)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{what} module {module!r} cannot be found ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise DataError(f"{what} module {module!r} is not a Python source file on the import path "
                        "(the repository root or an installed package)")
    origin = Path(spec.origin)
    depth = len(module.split(".")) - 1 + (origin.name == "__init__.py")
    root = origin.parents[depth]
    top = module.split(".")[0]
    installed = root.name in ("site-packages", "dist-packages")
    try:
        files = import_closure(root, module, follow=(lambda name: name.split(".")[0] == top) if installed else
                               (lambda name: True))
    except (SyntaxError, ValueError, OSError) as exc:
        raise DataError(f"{what} module {module!r}: a file it imports cannot be read as Python "
                        f"({type(exc).__name__}: {getattr(exc, 'filename', '') or ''} {getattr(exc, 'msg', exc)})") from None
    return {path.relative_to(root).as_posix(): file_fingerprint(path) for path in sorted(files.values())}


def directory_fingerprint(directory: Path) -> dict[str, str]:
    """{relative path: fingerprint} of every file under ``directory``."""
    return {path.relative_to(directory).as_posix(): file_fingerprint(path)
            for path in sorted(directory.rglob("*")) if path.is_file()}


def reward_inputs(scorers, repo: Path) -> dict:
    """The fingerprint of what ``scorers`` (score.scorers) read from outside the repository's declared files."""
    declared = repo.resolve() / "reward_models"  # the train_reward stage's outputs: deps of score and evaluate
    python, models = {}, {}
    for scorer in scorers:
        if scorer.kind == "python":
            module = scorer.function.split(":")[0]
            python[scorer.name] = {"function": scorer.function, "files": module_sources(module)}
        elif scorer.kind == "hf_classifier":
            for model in scorer.model:
                path = Path(model).expanduser()
                if not path.is_dir():
                    models[model] = "hub id (not fingerprinted)"
                elif declared not in (path.resolve(), *path.resolve().parents):
                    models[model] = directory_fingerprint(path)
    return {"python_scorers": python, "model_directories": models}


def environment_inputs(environment) -> dict:
    """The fingerprint of a python environment's source (environment.kind python: its module and what it imports
    from beside it); {} for none and the built-in calculator, whose code is in the stages' own fingerprints."""
    if environment.kind != "python":
        return {}
    module = environment.class_path.split(":")[0]
    return {"class_path": environment.class_path, "files": module_sources(module, "environment")}


def stage_modules(dvc: dict) -> dict[str, list[str]]:
    """{stage of dvc.yaml (a foreach stage by its name): the project modules its command runs}.  `python -m
    rlhf_core.runtime.launch stages.<name>` runs the launcher, then the script; `python -m stages.<name>` the script.  A stage
    that runs none (one you added: `bash export.sh`) is left out: its deps are its own."""
    modules = {}
    for name, stage in dvc["stages"].items():
        command = stage.get("do", stage)["cmd"]
        command = " && ".join(command) if isinstance(command, list) else str(command)
        runs = re.findall(r"python3? -m (?:rlhf_core\.runtime\.launch )?(stages(?:\.\w+)+)", command)
        if runs:
            modules[name] = [*runs, *(["rlhf_core.runtime.launch"] if "rlhf_core.runtime.launch" in command else [])]
    return modules


def code_closure(repo: Path, modules: list[str], parsed: dict[Path, set[str]] | None = None) -> dict[str, Path]:
    """{path relative to ``repo``: file} of the project files ``modules`` run, through imports (function-local ones
    included; parent packages' __init__ too); an empty file runs nothing and is left out.  ``parsed``: see
    ``import_closure``."""
    files: dict[str, Path] = {}
    for module in modules:
        for path in import_closure(repo, module, follow=lambda name: name.split(".")[0] in PACKAGES and
                                   name not in OUTPUT_NEUTRAL, parsed=parsed).values():
            if path.stat().st_size > 0:
                files[path.relative_to(repo).as_posix()] = path
    return dict(sorted(files.items()))


def code_fingerprints(repo: Path, dvc: dict) -> dict[str, dict[str, str]]:
    """{stage: {file: fingerprint}} of the code every stage of ``dvc`` (dvc.yaml, parsed) but this one runs.  The
    stages share most of their files: each is parsed and hashed once."""
    parsed: dict[Path, set[str]] = {}
    hashed: dict[Path, str] = {}

    def fingerprint(path: Path) -> str:
        if path not in hashed:
            hashed[path] = file_fingerprint(path)
        return hashed[path]

    return {stage: {name: fingerprint(path) for name, path in code_closure(repo, modules, parsed).items()}
            for stage, modules in stage_modules(dvc).items() if stage != STAGE}
