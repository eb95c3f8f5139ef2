"""The examples in docstrings run, and say what they print: every module of the three
packages (the generated stubs aside)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import remat
import remat_proto
import remat_server

MODULES = sorted(
    info.name
    for package in (remat, remat_server, remat_proto)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    if ".v1" not in info.name
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
