"""Version floors of the packages sap-ds calls into, checked before anything heavy is imported.

Why: an older package does not fail cleanly. transformers < 4.56 takes ``dtype=`` as an
unknown model kwarg; DeepSpeed < 0.19.6 scales a torch-style backward (the probe pass's
``autograd.grad``) by the accumulation steps only when the last ``engine.backward`` asked
for it, so the probe gradient would silently change weight from step to step. Each floor
below is the first release that has what sap-ds uses, with the reason; setup.py states
the same floors (tests/test_versions.py keeps them equal).

Versions are read from the installed metadata (``importlib.metadata``), so the check costs
milliseconds and imports none of the packages it checks.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional


@dataclass(frozen=True)
class Floor:
    package: str  # distribution name, as pip knows it
    minimum: str
    why: str  # what sap-ds uses that the first release at ``minimum`` has
    optional: bool = False  # absent is fine (e.g. triton: the PyTorch twins run instead)


FLOORS: tuple[Floor, ...] = (
    Floor("torch", "2.6", "the release that ships triton 3.2 (the Triton floor); nothing in sap_ds/ or kernels/ needs "
          "a newer torch API"),
    Floor("deepspeed", "0.19.6", "torch-style backward hook scaling by gradient_accumulation_steps unless the graph came "
          "through engine.backward (_ENGINE_BACKWARD_GRAPH_TRACKER), which the probe gradient's weighting relies on"),
    Floor("transformers", "4.56", "the dtype= keyword of from_pretrained/from_config (4.55 reads only torch_dtype)"),
    Floor("peft", "0.13", "LoraConfig, get_peft_model, merge_and_unload"),
    Floor("datasets", "3.0", "load_dataset for local json/csv/text files, Dataset.to_list"),
    Floor("pydantic", "2.5", "ConfigDict(coerce_numbers_to_str=True)"),
    Floor("triton", "3.2", "the kernels' tests pass in its interpreter (3.0 and 3.1 return wrong sums and drop "
          "stores there); triton.knobs (3.4+) is read where it exists, TRITON_INTERPRET otherwise", optional=True),
)

# Which packages each command imports (eval needs no DeepSpeed, peft or Triton).
COMMAND_PACKAGES = {
    "train": ("torch", "deepspeed", "transformers", "peft", "datasets", "pydantic", "triton"),
    "bench": ("torch", "deepspeed", "transformers", "peft", "datasets", "pydantic", "triton"),
    "eval": ("torch", "transformers", "datasets", "pydantic"),
    "data": ("torch", "transformers", "datasets", "pydantic"),
}


class VersionError(RuntimeError):
    """An installed package is older than sap-ds needs (or missing); the message says which."""


def parse_version(text: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``2.13.0+cpu`` -> (2, 13, 0), ``0.19.8`` ->
    (0, 19, 8), ``3.1.0rc1`` -> (3, 1, 0). A pre-release counts as its release: a floor is
    about APIs, and a release candidate already has its release's APIs."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _at_least(installed: str, minimum: str) -> bool:
    have, need = parse_version(installed), parse_version(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def problems(packages: Iterable[str], version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """One line per package in ``packages`` that is missing (unless optional) or too old."""
    by_name = {f.package: f for f in FLOORS}
    found = []
    for name in packages:
        floor = by_name[name]
        have = version_of(name)
        if have is None:
            if not floor.optional:
                found.append(f"{name} is not installed; sap-ds needs {name}>={floor.minimum} ({floor.why})")
            continue
        try:
            ok = _at_least(have, floor.minimum)
        except ValueError:
            continue  # an unparsable local build: let it run rather than refuse it
        if not ok:
            found.append(f"{name} {have} is installed; sap-ds needs {name}>={floor.minimum} ({floor.why})")
    return found


def check_versions(command: str = "train", version_of: Callable[[str], Optional[str]] = installed_version) -> None:
    """Raise VersionError naming every package below its floor for ``command``."""
    found = problems(COMMAND_PACKAGES[command], version_of)
    if found:
        raise VersionError("sap-ds " + command + ": installed packages are too old:\n  " + "\n  ".join(found)
                           + "\nupgrade them, e.g. pip install -U " + " ".join(
                               f"'{line.split()[0]}>={_floor(line.split()[0])}'" for line in found))


def _floor(package: str) -> str:
    return next(f.minimum for f in FLOORS if f.package == package)


def refuse_old_packages(command: str) -> Optional[int]:
    """For a command's ``main``: print the problem and return exit code 2 (a user error, as
    sap_ds.errors reports them), or None when every floor holds. Imports nothing heavy."""
    import sys

    try:
        check_versions(command)
    except VersionError as exc:
        print(f"sap-ds: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return None
