"""The private parts of Celery, kombu and redis-py that smmf-queue leans on (smmf_queue/hooks.py)
are all there, and pyproject.toml pins the three libraries to the versions they were checked
against (#20)."""

from __future__ import annotations

import importlib.metadata
import tomllib

import redis

from smmf_queue import hooks

from .conftest import ROOT


def test_every_hooked_attribute_is_still_there() -> None:
    gone = hooks.missing()
    assert not gone, "hooked attributes gone from the installed libraries (checked against " + \
        f"{hooks.CHECKED}): " + "; ".join(f"{h.owner}.{h.attribute} ({h.used_by})" for h in gone)
    # and the one instance attribute that no class shows: a registered script's digest
    assert redis.Redis().register_script("return 1").sha


def test_the_libraries_are_pinned_to_the_checked_minor_versions() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, minor in hooks.CHECKED.items():
        major, low = minor.split(".")
        [pin] = [d for d in dependencies if d.split("[")[0].split(">")[0].split("=")[0] == name]
        assert pin.endswith(f">={minor},<{major}.{int(low) + 1}"), pin
        assert importlib.metadata.version(name).startswith(f"{minor}."), name
