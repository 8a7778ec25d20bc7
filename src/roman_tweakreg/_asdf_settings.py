"""asdf settings the package changes while it reads or writes files, and restores.

asdf keeps some of its behaviour in process-global state (its configuration, its
module-level schema loader and reference resolvers).  The package changes some of it
around its own reads and writes, never beyond:

- :func:`no_validation_on_read`: models are opened without schema validation (it is
  most of the time of opening one; outputs are validated when they are written);
- :func:`schemas_parsed_once`: while outputs are written, each schema a file's
  validation refers to is parsed from its YAML once, not once per file, and the
  references between schemas are resolved once.

Both are held by :func:`_held`: the first holder changes the setting, the last one
to finish restores it, whatever the order in which holders in several threads end,
so no change outlives the calls that made it.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

import asdf
import asdf.schema

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterator

__all__ = ["no_validation_on_read", "schemas_parsed_once"]

_lock = threading.Lock()
_holds: dict = {}  # key -> [holders, undo]


@contextmanager
def _held(key: Hashable, change: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """Hold a setting: ``change()`` (returning its undo) by the first holder of ``key``."""
    with _lock:
        hold = _holds.get(key)
        if hold is None:
            hold = _holds[key] = [0, change()]
        hold[0] += 1
    try:
        yield
    finally:
        with _lock:
            hold[0] -= 1
            if hold[0] == 0:
                del _holds[key]
                hold[1]()


@contextmanager
def no_validation_on_read() -> Iterator[None]:
    """asdf's ``validate_on_read`` off meanwhile (on the configuration in effect).

    Set on asdf's configuration and restored, not ``asdf.config_context()``: that
    reloads every extension on each open, costing more than the validation it skips.
    """
    config = asdf.get_config()

    def change():
        before = config.validate_on_read
        config.validate_on_read = False

        def undo():
            config.validate_on_read = before

        return undo

    with _held(("validate_on_read", id(config)), change):
        yield


@contextmanager
def schemas_parsed_once() -> Iterator[None]:
    """Each schema asdf's validation refers to parsed once meanwhile, not once per file.

    asdf (5.x) validates a tree with a new reference resolver per file, whose schema
    loader parses again the YAML of every schema the tree's schemas refer to: for a
    Roman L2 model about 80 parses per file, 40 % of the time of writing it.  Here
    the loader asdf makes for each resolver (``asdf.schema._make_schema_loader``)
    keeps what it parsed for the next file.  The schemas, the validation and the
    files written are unchanged: only the repeated parsing is saved (asdf 4's loader
    takes a URL resolver: what it parsed is kept per resolver).  Where asdf has no
    such loader (another asdf version) this does nothing.

    The resolvers themselves (``asdf.schema._make_jsonschema_refresolver``) also keep,
    for the next file, what they worked out from the references: each is still new
    (a file's validation has its own scope stack, so threads and failed validations
    share nothing), but its caches of joined URLs and of resolved documents are those
    of the first resolver made meanwhile with the same arguments (7 % of the CPU time
    of saving an aligned image and its product, measured in pairs; docs/performance).
    """
    make_loader = getattr(asdf.schema, "_make_schema_loader", None)
    make_resolver = getattr(asdf.schema, "_make_jsonschema_refresolver", None)
    if make_loader is None:
        yield
        return

    def change():
        parsed: dict = {}

        def make_loader_once(*args):  # asdf 4 passes its URL resolver, asdf 5 nothing
            load = make_loader(*args)

            def load_once(url):
                key = (*args, url)
                found = parsed.get(key)
                if found is None:
                    found = parsed[key] = load(url)
                return found

            return load_once

        asdf.schema._make_schema_loader = make_loader_once
        if make_resolver is not None:
            asdf.schema._make_jsonschema_refresolver = _sharing_caches(make_resolver)

        def undo():
            asdf.schema._make_schema_loader = make_loader
            if make_resolver is not None:
                asdf.schema._make_jsonschema_refresolver = make_resolver

        return undo

    with _held("schemas", change):
        yield


def _sharing_caches(make_resolver: Callable) -> Callable:
    """``make_resolver`` whose resolvers share the first one's caches (same arguments).

    The first resolver made for given arguments is asdf's own; each later one is a new
    resolver of the same class, handlers and base, with the first one's caches of
    joined URLs and of resolved documents (jsonschema ``RefResolver``'s
    ``urljoin_cache`` and ``remote_cache``).  A resolver without them (another
    jsonschema) is made by asdf each time, as without this.
    """
    lock = threading.Lock()
    later: dict = {}  # arguments -> how the later resolvers for them are made

    def make(*args):
        with lock:
            made = later.get(args)
            if made is None:
                first = make_resolver(*args)
                later[args] = _like(first) or functools.partial(make_resolver, *args)
                return first
        return made()

    return make


def _like(first) -> Callable | None:
    """A maker of new resolvers like ``first``, sharing its caches (None: it has none)."""
    joined = getattr(first, "_urljoin_cache", None)
    resolved = getattr(first, "_remote_cache", None)
    if joined is None or resolved is None:
        return None
    return functools.partial(
        type(first),
        first.resolution_scope,  # its base: read before any use moves its scope
        first.referrer,
        cache_remote=first.cache_remote,
        handlers=first.handlers,
        urljoin_cache=joined,
        remote_cache=resolved,
    )
