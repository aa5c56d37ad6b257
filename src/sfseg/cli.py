"""What every command shares: bad input ends it with one short message on stderr, not a traceback.

A mandatory key (`???` in conf/: `ckpt_path`, `input`, `data.root`) left unset prints which key, what
it expects and the command completed with an example value, and exits with status 2, before any model
is built or run folder made (the Hydra callback `MandatoryKeys`, selected by
`override hydra/callbacks: mandatory_keys` in each entry config). A wrong value (a ValueError or
FileNotFoundError; sfseg's messages name the key and what it allows) prints `error: <message>` and
exits with status 1. HYDRA_FULL_ERROR=1 shows the traceback instead, as for Hydra's own errors.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import hydra
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from sfseg import CONFIG_DIR

MISSING = "???"
USAGE_ERROR = 2  # as argparse exits on a missing argument
# What the mandatory keys of conf/ expect, and a value for the example command (data.root: see expectation).
EXPECTED = {
    "ckpt_path": (
        "a checkpoint written by `python -m sfseg.train`, a model folder or hf-hub:<owner>/<name>",
        "outputs/train/<time>/checkpoints/last.ckpt",
    ),
    "input": ("an image file, or a folder of images", "photos/"),
    "data.classes": (
        "the class names: a classes.yaml, .json or .txt file, or a list [name, ...]",
        "classes.yaml",
    ),
}
# Errors whose message is the whole story: sfseg raises them for bad config values and missing files.
USER_ERRORS = (ValueError, FileNotFoundError)


def missing_keys(cfg: DictConfig) -> list[str]:
    """The mandatory keys left unset, in config order; Hydra's own node is not looked at. Nothing is
    resolved (interpolations may need a run folder that does not exist yet)."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{key}[{index}]")
        elif node == MISSING:
            found.append(key)

    walk(
        {key: value for key, value in OmegaConf.to_container(cfg, resolve=False).items() if key != "hydra"},
        "",
    )
    return found


def expectation(key: str, cfg: DictConfig) -> tuple[str, str]:
    """What `key` expects, and an example value for it."""
    if key == "data.root":
        layout = getattr(get_class(cfg.data._target_), "layout", None)
        if layout is not None:  # a dataset on disk: its release's folder (the first line of its tree)
            folder = layout.tree.split("/")[0]
            return f"the {folder}/ folder of the {layout.name} release", f"/data/{folder}"
        return "the folder of the dataset's images and labels", "/data/<dataset>"
    return EXPECTED.get(key, ("a value (conf/ gives it none)", "<value>"))


def command_name() -> str:
    """`python -m <module>` of the running command."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"


def missing_keys_message(keys: Sequence[str], cfg: DictConfig, overrides: Sequence[str]) -> str:
    """One message for the unset `keys`: each with what it expects, then the command line as given
    (`overrides`) completed with example values."""
    expected = {key: expectation(key, cfg) for key in keys}
    needs = " and ".join(f"{key} ({what})" for key, (what, _) in expected.items())
    example = [*overrides, *(f"{key}={value}" for key, (_, value) in expected.items())]
    return f"error: {command_name()} needs {needs}\n  e.g. {command_name()} {shlex.join(example)}"


def require_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Exit with the missing-keys message if a mandatory key of `cfg` is unset."""
    keys = missing_keys(cfg)
    if keys:
        print(missing_keys_message(keys, cfg, overrides), file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


class MandatoryKeys(Callback):
    """Hydra callback: the mandatory-key check, after Hydra composed the config and before it makes the
    run folder (a single run) or runs a sweep job (whose overrides are applied only then)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_keys(config, config.hydra.overrides.task)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_keys(config, config.hydra.overrides.task)


@contextmanager
def short_errors() -> Iterator[None]:
    """Turn a bad-input error into `error: <message>` on stderr and exit status 1. Also a decorator:
    for a config resolver, whose errors OmegaConf would otherwise wrap into a traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    try:
        yield
    except InstantiationException as error:  # hydra.utils.instantiate wraps the target's own error
        if not isinstance(error.__cause__, USER_ERRORS):
            raise
        print(f"error: {error.__cause__}", file=sys.stderr)
        raise SystemExit(1) from None
    # Hydra's own compact errors too: a config group option not found, a key not in the config, ...
    except (*USER_ERRORS, CompactHydraException) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def hydra_main(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`hydra.main` on conf/<config_name>.yaml, with the task's bad-input errors as short messages."""

    def decorator(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def checked_task(cfg: DictConfig) -> Any:
            with short_errors():
                return task(cfg)

        return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(checked_task)

    return decorator
