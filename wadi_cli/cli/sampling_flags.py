"""The sampling flags of ``wadi sample``, ``wadi eval`` and ``wadi swap``, generated from the
fields of :class:`wadi_cli.pipeline.options.SamplingOptions` (as ``wadi distill``'s are from
``DistillConfig``): a command decorated with :func:`sampling_flags` gets one flag per field
it takes, and receives their values as one ``sampling: SamplingOptions`` argument."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

F = TypeVar("F", bound=Callable[..., Any])
_KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float}


def field_kind(annotation: str) -> type:
    """``bool``, ``int``, ``float`` or ``str``: what a field's flag parses."""
    for name, kind in _KINDS.items():
        if name in annotation:
            return kind
    return str


def sampling_parameters(command: str) -> list[inspect.Parameter]:
    """One keyword parameter per :class:`SamplingOptions` field that ``command`` takes: its
    flag, help, type and default from the field's declaration."""
    from dataclasses import fields

    from wadi_cli.distill.config import flag_name
    from wadi_cli.pipeline.options import SamplingOptions, command_default, command_fields, command_help

    declared = {f.name: f for f in fields(SamplingOptions)}
    params = []
    for name in command_fields(command):
        f = declared[name]
        kind, default = field_kind(str(f.type)), command_default(command, name)
        decls = [flag_name(name), *([f.metadata["short"]] if f.metadata["short"] else [])]
        option = typer.Option(*decls, help=command_help(command, name), show_default=default is not None)
        annotation = Annotated[kind if default is not None else kind | None, option]  # type: ignore[operator]
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    return params


def sampling_flags(command: str, fixed: Mapping[str, Any] | None = None) -> Callable[[F], F]:
    """Decorator of a command callback that takes ``sampling: SamplingOptions``: the command
    gets the sampling flags of ``command`` and the callback the options they make (with
    ``fixed`` values for fields the command has no flag for, e.g. ``wadi swap``'s teacher
    column is always the teacher). Invalid values fail before the callback runs."""

    def build(values: dict[str, Any]) -> Any:
        from wadi_cli.pipeline.options import SamplingOptions

        return SamplingOptions(**values, **dict(fixed or {}))

    return functools.partial(_grouped, params=sampling_parameters(command), argument="sampling", build=build)


def option_group(cls: type, argument: str) -> Callable[[F], F]:
    """Decorator of a command callback that takes ``<argument>: cls``: the command gets one
    flag per field of the dataclass ``cls`` (each annotated ``Annotated[type, typer.Option(...)]``
    with its default), and the callback one ``cls`` instance of their values."""
    from dataclasses import fields

    hints = get_type_hints(cls, include_extras=True)
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in fields(cls)
    ]
    return functools.partial(_grouped, params=params, argument=argument, build=lambda values: cls(**values))


def _grouped(
    fn: F, *, params: list[inspect.Parameter], argument: str, build: Callable[[dict[str, Any]], Any]
) -> F:
    """``fn`` with the keyword ``params`` in place of its parameter ``argument``, which it
    receives as ``build(their values)``."""
    names = [p.name for p in params]
    # the callback names its group's class for readers only (the library loads inside bodies)
    raw = inspect.signature(fn).parameters[argument].annotation
    signature = inspect.signature(fn, eval_str=True, locals={str(raw): Any} if isinstance(raw, str) else {})
    own = [p for p in signature.parameters.values() if p.name != argument]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        return fn(*args, **{argument: build(values)}, **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *params])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *params)}
    return wrapper  # type: ignore[return-value]
