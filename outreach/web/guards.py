"""The API's door for path and query values: the text rule of :mod:`outreach.core.inputs`, for every route at once.

Bodies are checked by their models (:class:`~outreach.core.inputs.InputModel`); path and query values are plain
strings that routes compare with columns, so one dependency on every ``/api`` router checks them all before the
route runs: a NUL (``%00``) is a 422 naming the parameter, whatever the route does with the value. Query strings
and paths are decoded from UTF-8 with replacement, so they never hold a lone surrogate.
"""

from __future__ import annotations

from fastapi import Request

from outreach.core.errors import ValidationError
from outreach.core.inputs import clean_text

__all__ = ["clean_parameters"]


def clean_parameters(request: Request) -> None:
    """Refuse a path or query value (or query name) the database cannot hold, naming the parameter."""
    named = [*request.path_params.items(), *request.query_params.multi_items()]
    problems: list[tuple[str, str]] = []
    for name, value in named:
        for text in (name, value):
            try:
                clean_text(text)
            except ValueError as exc:
                problems.append((clean_name(name), str(exc)))
                break
    if problems:
        raise ValidationError.of(problems)


def clean_name(name: str) -> str:
    """A parameter's name fit to be echoed in an error (NULs shown as ``\\0``)."""
    return name.replace("\x00", "\\0")[:64] or "(query)"
