"""From a composed Hydra config to typed settings, once, at the edge.

:func:`load_settings` turns the ``DictConfig`` Hydra composes from ``conf/`` into
:class:`~deltanmf.settings.RunSettings`: every key is checked (type, range, unknown keys with
their close matches) before anything heavy is imported or read. :func:`default_settings`
composes the configuration itself, for the Python API and for code that needs the defaults.
"""
from __future__ import annotations

import difflib
from dataclasses import fields
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import InputError
from ..settings import RunSettings, Settings

# Hydra's own settings, which the run does not read.
_HYDRA = "hydra"


def conf_dir() -> Path:
    """The configuration folder: ``conf/`` at the top of the source tree, installed as the
    ``deltanmf.conf`` package data (pyproject maps one onto the other)."""
    return Path(str(resources.files("deltanmf.conf")))


def _close(name: str, names) -> str:
    by_lower = {n.lower(): n for n in names}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    # and abbreviations either way (tolerance for tol, n_top for n_top_genes)
    matches += [n for n in by_lower if n not in matches and min(len(n), len(name)) >= 3
                and (n.startswith(name.lower()) or name.lower().startswith(n))][:3 - len(matches)]
    return f" (did you mean {', '.join(by_lower[m] for m in matches)}?)" if matches else ""


def _build(cls: type[Settings], values, path: str) -> Settings:
    """``cls`` from the mapping ``values`` found at ``path``: unknown keys are refused with
    their close matches, missing ones named; nested groups built recursively."""
    where = path or "the configuration"
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a group of settings, got {values!r}")
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise InputError(f"unknown setting {full}{_close(str(key), names)}; the settings of {where} are: "
                             f"{', '.join(names)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}: restore them in conf/ (the defaults live there)")
    kwargs = {}
    for f in fields(cls):
        nested = f.metadata.get("group")
        key = f"{path}.{f.name}" if path else f.name
        kwargs[f.name] = _build(nested, values[f.name], key) if nested else values[f.name]
    return cls(**kwargs)


def check_override_keys(overrides) -> None:
    """Refuse an override ``key=value`` whose key is no setting, with its close matches.

    Hydra would stop such a command with a hint to add the key (``+k=20``), which then runs
    silently with the default; here the command stops at once with what was meant. Keys are
    checked against the typed settings; group choices (``data=h5ad``), Hydra's own keys,
    additions (``+``), deletions (``~``) and the arguments of Lightning or resource objects
    (``trainer.*``, ``logger.*``, ``resource.*``) are left to Hydra and to their checks.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    items = [o for o in overrides if not o.startswith("-")]  # -m, --multirun, --cfg job, ...
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except HydraException:
        return  # a syntax error: Hydra names it
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}
    for override in parsed:
        key = override.key_or_group
        if (override.type != OverrideType.CHANGE or override.package or "/" in key or key in groups
                or key.split(".")[0] == _HYDRA):
            continue
        cls, path = RunSettings, ""
        for part in key.split("."):
            found = {f.name: f for f in fields(cls)}
            if part not in found:
                full = f"{path}.{part}" if path else part
                raise InputError(f"unknown setting {full}{_close(part, found)}; the settings of "
                                 f"{path or 'the configuration'} are: {', '.join(found)}")
            cls = found[part].metadata.get("group")
            if cls is None:  # a value, or a mapping handed to Lightning or a resource
                break
            path = f"{path}.{part}" if path else part


def _strip_target(values: dict | None) -> dict | None:
    return None if values is None else {k: v for k, v in values.items() if k != "_target_"}


def load_settings(cfg: DictConfig) -> RunSettings:
    """Check every value of a composed config and return the typed settings.

    Raises
    ------
    InputError
        Naming the key, what it must be, and (for an unknown key) the close matches.
    """
    try:
        values = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != _HYDRA]), resolve=True)
    except OmegaConfBaseException as err:
        raise InputError(f"the configuration cannot be resolved: {err}") from None
    values["trainer"] = _strip_target(values.get("trainer"))
    return _build(RunSettings, values, "")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` (Hydra's override syntax), outside a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_override_keys(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
            return hydra_compose("config", overrides=list(overrides))
    except HydraException as err:
        raise InputError(str(err).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()


def default_settings(*overrides: str) -> RunSettings:
    """The typed settings of ``conf/`` (the defaults), with Hydra-style ``overrides``."""
    return load_settings(compose(overrides))
