"""Config files read as data (ast, never executed), --key=value converted by field type, --help from field comments.

    cfg = parse_config(TrainConfig, sys.argv[1:], __doc__)   # python train.py configs/tiny.py --batch_size=4
    values = read_config_file("configs/sherlock.py")           # {"batch_size": 8, ...}: literals, arithmetic, names

Names used only to compute other values start with `_` (`_width = 512`, then `n_embd = _width`); every other name
must be a key of the script, so a misspelt key is an error, not a silently ignored line.

Bad input is a ValueError naming the file, line, key and value; scripts print it as one line (common.user_errors).
`--help` prints the script's docstring and every key with its default and the comment beside its field.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import operator
import os
import re
from typing import Any

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
# bounds on what a config value may evaluate to, checked before each operation: `9**9**9` or `"a" * 10**11` would
# otherwise hang or fill memory before any check on the result could run
MAX_NUMBER = 10 ** 18
MAX_LENGTH = 10_000
# bounds on a config file's syntax: Python's own parser runs out of memory or stack on 100k nested signs or a 200k-term
# sum, and a real config is a few dozen short lines
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 50


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Pow) and _number(a) and _number(b) and abs(b) > 64:
        raise ValueError(f"the exponent {b} is too large (at most 64)")
    if isinstance(op, ast.Mult) and isinstance(a, (str, list)) + isinstance(b, (str, list)) == 1:
        seq, n = (a, b) if isinstance(a, (str, list)) else (b, a)
        if not isinstance(n, int) or len(seq) * max(n, 0) > MAX_LENGTH:
            raise ValueError(f"a text or list longer than {MAX_LENGTH} items")
    value = _BINOPS[type(op)](a, b)
    if _number(value) and not abs(value) <= MAX_NUMBER:  # also catches inf and nan
        raise ValueError(f"{value:.3g} is out of range (at most {MAX_NUMBER:.0e} in size)")
    if isinstance(value, (str, list)) and len(value) > MAX_LENGTH:
        raise ValueError(f"a text or list longer than {MAX_LENGTH} items")
    return value


def _eval_node(node: ast.AST, names: dict[str, Any], where: str, depth: int = 0) -> Any:
    """Evaluate a literal, a list/tuple of literals, bounded arithmetic, or a name assigned earlier in the file."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: the value is nested more than {MAX_DEPTH} deep; write it more simply")
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval_node(e, names, where, depth + 1) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, names, where, depth + 1)
        if not _number(v):
            raise ValueError(f"{where}: a sign only goes before a number, got `{ast.unparse(node)}`")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval_node(node.left, names, where, depth + 1), _eval_node(node.right, names, where, depth + 1)
        try:
            return _binop(node.op, a, b)
        except (ArithmeticError, TypeError, ValueError) as e:  # 1/0, "abc" - 1, 10.0 ** 400, ...
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{where}: `{ast.unparse(node)}` cannot be evaluated: {reason}") from None
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    raise ValueError(f"{where}: only literals, arithmetic and earlier names are allowed, got `{ast.unparse(node)}`")


def read_config_file(path: str) -> dict[str, Any]:
    """Read `key = value` lines from a .py config file as data (parsed with ast, not exec'd)."""
    not_config = (f"config file {path}: not a text file of `key = value` lines; only a config file may come first, "
                  "every other option is --key=value (e.g. --ckpt=<file>)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"config file {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(not_config) from None
    if len(text) > MAX_FILE_BYTES:
        raise ValueError(f"config file {path}: larger than {MAX_FILE_BYTES >> 20} MB; a config file is a few "
                         "`key = value` lines")
    try:
        tree = ast.parse(text, filename=path)
    except (MemoryError, RecursionError):
        raise ValueError(f"config file {path}: nested too deeply to parse (at most {MAX_DEPTH} levels)") from None
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: not valid Python syntax ({e.msg})") from None
    except ValueError:  # a NUL byte
        raise ValueError(not_config) from None
    lines = text.splitlines()
    values: dict[str, Any] = {}
    for stmt in tree.body:
        where = f"config file {path}, line {stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            # the line as written: ast.unparse of a deeply nested statement would exceed the recursion limit
            raise ValueError(f"{where}: expected `key = value`, got `{lines[stmt.lineno - 1].strip()[:60]}`")
        key = stmt.targets[0].id
        values[key] = _eval_node(stmt.value, values, f"{where}, key {key}")
    return values


def _convert(key: str, value: Any, typ: type, where: str) -> Any:
    """Convert a config value (a string from the command line, or a literal from a file) to the field's type."""
    if isinstance(value, str) and typ is not str:
        s = value.strip().lower()
        if typ is bool:
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
        else:
            try:
                number = float(s)
                # ints may be written as 1e4, but 2.5 is not an int
                value = number if typ is float else int(number) if number.is_integer() else value
            except ValueError:
                pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # max_iters = 5e3
    if typ is str and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # the shell does not expand ~ after --key=
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {key}={value!r} is not a valid {typ.__name__}")
    if typ is float and not math.isfinite(value):
        raise ValueError(f"{where}: {key}={value!r} must be a finite number")
    return value


def parse_config(cls: type, argv: list[str], doc: str = "") -> Any:
    """Build a `cls` dataclass from its defaults, an optional config file (first argument), then --key=value.

    `--help` prints `doc` and every key with its type and default, then exits.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = {name: type(f.default) for name, f in fields.items()}
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\noptions (--key=value, default shown):")
        # the comment beside each field in the dataclass source is its help text
        comments = dict(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.MULTILINE))
        for name, f in fields.items():
            print(f"  --{name}={f.default!r}".ljust(36) + f" {comments.get(name, types[name].__name__)}")
        raise SystemExit(0)
    values: dict[str, Any] = {}
    args = list(argv)
    if args and not args[0].startswith("--") and not ("=" in args[0] and not os.path.exists(args[0])):
        path = args.pop(0)
        for key, value in read_config_file(path).items():
            # helper names start with _: any other name must be a key, so a misspelt key is never silently ignored
            if key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(f"config file {path}: unknown key '{key}' (known keys: {', '.join(fields)}); a name "
                                 f"that only helps later lines starts with _, e.g. `_{key} = ...`")
            values[key] = _convert(key, value, types[key], f"config file {path}")
    for arg in args:
        if arg.startswith("--") and "=" not in arg and types.get(arg[2:]) is bool:
            arg += "=true"  # a bare --flag turns a boolean on
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument '{arg}': expected --key=value (a config file may only come first)")
        key, value = arg[2:].split("=", 1)
        if key not in fields:
            raise ValueError(f"argument '{arg}': unknown key '{key}' (run with --help to list the keys)")
        values[key] = _convert(key, value, types[key], "command line")
    return cls(**values)


def command_line_keys(argv: list[str]) -> set[str]:
    """The keys argv sets with --key=value or a bare --flag: tells `--text=` apart from no --text at all."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def check_ranges(cfg: Any, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 rules: tuple[tuple[str, bool, str], ...] = ()) -> None:
    """A parsed config's numbers: keys that must be >= 1, keys that must be >= 0, and (key, ok, "be ...") rules.
    ValueError naming the first key out of range, its value and the range."""
    for key in at_least_one:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)}: must be at least 1")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}={getattr(cfg, key)}: must not be negative")
    for key, ok, rule in rules:
        if not ok:
            raise ValueError(f"{key}={getattr(cfg, key)}: must {rule}")
