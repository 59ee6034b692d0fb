"""Marks of tests that run a real nginx gateway in front of a real tritonserver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from triton_testing import requires_triton

from fv_serving.errors import ServerError
from fv_serving.gateway import find_nginx


def nginx_available() -> bool:
    """Debian's nginx with the Lua module and lua-cjson, as `fv serve --public` needs it."""
    try:
        find_nginx()
    except ServerError:
        return False
    return True


requires_nginx = pytest.mark.skipif(not nginx_available(), reason="no nginx with the Lua module and lua-cjson")


def live(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks of a test that runs real Triton and nginx processes."""
    for mark in (pytest.mark.triton, pytest.mark.gateway, requires_triton, requires_nginx):
        test = mark(test)
    return test
