"""Calling a handler: which parameter gets the context and which the (validated) body."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from pydantic import TypeAdapter, ValidationError

from sdk.context import Context
from sdk.errors import BadMessage, DefinitionError

_CONTEXT_NAMES = frozenset({"ctx", "context"})


class Invoker:
    """Calls one handler with the arguments its signature asks for.

    A parameter annotated `Context` (or named `ctx`/`context` without an
    annotation) gets the context. At most one other parameter gets the body,
    validated against its annotation when it has one.
    """

    def __init__(self, func: Callable[..., Any], *, blocking: bool, where: str) -> None:
        self.func = func
        self.blocking = blocking
        self.is_async = inspect.iscoroutinefunction(func)
        if blocking and self.is_async:
            raise DefinitionError(f"{where} is async; blocking=True is for plain functions")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise DefinitionError(
                f"{where} is a generator: a handler returns its reply (or None); use return, not yield"
            )
        self._context_index, self._body_index, self._adapter = _inspect(func, where)
        self._arity = max(self._context_index, self._body_index) + 1

    def convert(self, body: Any) -> Any:
        """Validate the decoded body for this handler; raise BadMessage naming the fields."""
        if self._adapter is None:
            return body
        try:
            return self._adapter.validate_python(body)
        except ValidationError as exc:
            errors = [
                {"field": ".".join(str(p) for p in item["loc"]) or "(body)", "message": item["msg"]}
                for item in exc.errors(include_url=False)
            ]
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise BadMessage(f"invalid body: {detail}", errors) from None
        except Exception as exc:
            # A validator of the user's model may raise anything; the body is still the culprit.
            raise BadMessage(f"invalid body: {type(exc).__name__}: {exc}") from None

    async def __call__(self, ctx: Context, body: Any) -> Any:
        args: list[Any] = [None] * self._arity
        if self._context_index >= 0:
            args[self._context_index] = ctx
        if self._body_index >= 0:
            args[self._body_index] = body
        if self.is_async:
            return await self.func(*args)
        if self.blocking:
            # Abandoned at a timeout: a thread cannot be stopped, but its slot is freed.
            return await anyio.to_thread.run_sync(lambda: self.func(*args), abandon_on_cancel=True)
        result = self.func(*args)
        if inspect.isawaitable(result):
            return await result
        return result


def _inspect(func: Callable[..., Any], where: str) -> tuple[int, int, TypeAdapter[Any] | None]:
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise DefinitionError(f"cannot read the annotations of {where}: {exc}") from exc
    every = list(inspect.signature(func).parameters.values())
    unusable = [
        p.name
        for p in every
        if p.kind == p.VAR_POSITIONAL or (p.kind == p.KEYWORD_ONLY and p.default is p.empty)
    ]
    if unusable:
        raise DefinitionError(
            f"{where} has parameters a handler cannot fill ({', '.join(unusable)}): "
            "expected (ctx), (ctx, body) or (body) as positional parameters"
        )
    params = [p for p in every if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    context_index = body_index = -1
    adapter: TypeAdapter[Any] | None = None
    for index, param in enumerate(params):
        hint = hints.get(param.name, inspect.Parameter.empty)
        if hint is Context or (hint is inspect.Parameter.empty and param.name in _CONTEXT_NAMES):
            context_index = index
        elif body_index < 0:
            body_index = index
            if hint not in (inspect.Parameter.empty, Any):
                adapter = TypeAdapter(hint)
        elif param.default is inspect.Parameter.empty:
            raise DefinitionError(
                f"{where} takes more parameters than a handler gets: "
                "expected (ctx), (ctx, body) or (body), got "
                f"({', '.join(p.name for p in params)})"
            )
    return context_index, body_index, adapter
