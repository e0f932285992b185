"""Reading a config from YAML, however hostile the file: `load_config` and the safe reading under it.

The text is a regular file of bounded size in UTF-8 (or UTF-16 with its byte-order mark); the YAML is
parsed by the safe loader, refusing duplicate keys, alias bombs, recursive aliases and deep nesting before
any Python object is built; `--set section.key=value` overrides are parsed the same way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .build import _build, _show
from .checks import _check
from .schema import Config, ConfigError


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# what a config may hold: far more than any real config, far less than a hostile one can make YAML build
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB of text
MAX_YAML_DEPTH = 32  # nesting of mappings and lists (a real config nests 4 deep)
MAX_YAML_NODES = 100_000  # values after expanding aliases (a "billion laughs" file expands to 10**9)


def _yaml_shape_problem(root: yaml.Node) -> str | None:
    """Why a composed YAML document is refused (recursive or exploding aliases, deep nesting), or None.

    Aliases share nodes, so the expanded size is counted once per node (memoised); a node met again on its
    own path is a recursive alias."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep")
        key = id(node)
        if key in on_path:
            raise _Refused("an alias refers to itself (recursive structure)")
        if key in sizes:
            return sizes[key]
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            on_path.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            for child in children:
                total += visit(child, depth + 1)
                if total > MAX_YAML_NODES:
                    raise _Refused(f"holds more than {MAX_YAML_NODES} values once its aliases are expanded "
                                   "(an alias bomb?)")
            on_path.discard(key)
        sizes[key] = total
        return total

    try:
        visit(root, 0)
    except _Refused as why:
        return str(why)
    return None


class _Refused(ValueError):
    pass


def _safe_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader, refusing duplicate keys, alias bombs, recursive
    aliases and deep nesting before any Python object is built; every failure is a one-line ConfigError."""
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _yaml_shape_problem(node)
        if problem is not None:
            raise ConfigError(f"{source}: YAML {problem}")
        return loader.construct_document(node)
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.reader.ReaderError as err:  # a control character, a NUL byte
        raise ConfigError(f"{source}: invalid YAML (character #x{err.character:04x} at offset {err.position}: "
                          f"{err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or getattr(err, "context", None)
        why = f" ({' '.join(str(problem).split())[:120]})" if problem else ""
        raise ConfigError(f"{source}: invalid YAML{where}{why}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ConfigError:
        raise
    except ValueError as err:  # e.g. an integer of more than 4300 digits (Python refuses to read it)
        why = "a number of more than 4300 digits" if "digits" in str(err) else " ".join(str(err).split())[:120]
        raise ConfigError(f"{source}: invalid YAML value ({why})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_config_text(path: str | Path, source: str) -> str:
    """The text of a config file: a regular file (not a folder, FIFO or device, which could block or never
    end) of at most MAX_CONFIG_BYTES, in UTF-8 (or UTF-16 with its byte-order mark)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror or err})") from None
    except ValueError as err:  # a NUL byte in the path
        raise ConfigError(f"{source}: cannot read config ({err})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{source}: is a folder, not a config file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{source}: not a regular file (a FIFO, device or socket); give a YAML file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file is a short YAML text")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not {encoding.upper()} text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value parsed as YAML like a file's."""
    if "=" not in text:
        raise ConfigError(f"--set {_show(text, 200)}: expected section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if any(not k.strip() for k in keys):
        raise ConfigError(f"--set {_show(text, 200)}: expected section.key=value, with no empty part in the key")
    # YAML parsing gives numbers, booleans, null and lists their natural types
    value = _safe_yaml(raw, f"--set {_show(text, 200)}") if raw != "" else ""
    return [k.strip() for k in keys], value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the defaults when `path` is None) and apply `section.key=value` overrides.

    Every problem, however hostile the file (random bytes, another encoding, an alias bomb, a FIFO), is a
    one-line ConfigError naming the file (or the --set) and the key."""
    source = str(path) if path is not None else "<defaults>"
    if any(not c.isprintable() for c in source):  # a line break or a NUL byte in the path: quoted, escaped
        source = repr(source)
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _safe_yaml(_read_config_text(path, source), source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level: expected a mapping of sections")
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {_show(text, 200)}: '{k}' is not a section")
        node[keys[-1]] = value
    where = source if not overrides else f"{source} (with --set overrides)"
    try:
        cfg = _build(Config, raw, "", where)
    except RecursionError:  # pragma: no cover - _safe_yaml bounds the depth first
        raise ConfigError(f"{where}: nested too deeply") from None
    cfg.source = where
    cfg.config_file = None if path is None else str(path)
    _check(cfg)
    return cfg

