"""The docs stay true: the migration example runs (and differs from the dense loop by exactly the
import plus three lines), and the API reference names every public name."""
from __future__ import annotations

import ast
import collections
import contextlib
import difflib
import inspect
import io
import math
import re
from pathlib import Path

import pytest
import torch

import set_kernels as sk

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_block(code: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "__doc_example__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs/migration.md>", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace, out.getvalue()


def test_migration_diff_is_the_import_plus_three_lines():
    dense, sparse = python_blocks(DOCS / "migration.md")[:2]
    diff = [d for d in difflib.ndiff(dense.splitlines(), sparse.splitlines()) if d[:1] in "+-"]
    removed = [d for d in diff if d.startswith("-")]
    added = [d[2:].strip() for d in diff if d.startswith("+")]
    assert not removed, removed
    assert added[0] == "import set_kernels as sk"
    assert len(added) == 4, added
    assert added[1].startswith("sk.sparsify(model")
    assert added[2].startswith("evo = sk.SET(model, opt")
    assert added[3] == "evo.step()"


def test_migration_examples_run():
    dense, sparse = python_blocks(DOCS / "migration.md")[:2]
    ns_dense, out_dense = run_block(dense)
    assert "final loss" in out_dense
    ns, out = run_block(sparse)
    assert "final loss" in out
    model, evo = ns["model"], ns["evo"]
    assert isinstance(evo, sk.SET)
    layers = [m for m in model.modules() if isinstance(m, sk.SparseLinear)]
    assert len(layers) == 2 and isinstance(model[4], torch.nn.Linear)
    assert evo.step_count == 120
    loss = ns["loss"].item()
    assert math.isfinite(loss) and loss < math.log(10), f"the SET example did not learn: loss {loss:.3f}"
    # The total density over the sparsified layers is about 10% (ERK, whole blocks).
    live = sum(m.layout.nnz_blocks * m.block_size**2 for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    assert abs(live / total - 0.1) < 0.02


# ------------------------------------------------------------------------------ the API reference
API = DOCS / "api.md"
BACKEND_FUNCTIONS = ("resolve", "availability", "unsupported_reasons", "load", "get")
BACKEND_CONSTANTS = ("BACKENDS", "AUTO_ORDER", "OPS", "ENV_VAR")
CLASSES = (sk.BlockSparseLayout, sk.SparseLinear, sk.MaskedLinear, sk.optim.MaskedAdam, sk.SET)
# Members that are not API of their own: the layer's forward is documented as the layer's call.
NOT_API = ("training", "forward", "extra_repr")
# Documented without a call signature on purpose: BlockSparseLayout's constructor is private
# (inputs trusted); the reference lists random / from_block_mask / from_csr as the constructors.
NO_SIGNATURE = {id(sk.BlockSparseLayout)}
_NAME = r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
_CALL = re.compile(_NAME + r"\(((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)\)")
Member = collections.namedtuple("Member", "cls name")  # a public member of a public class
_PARAM = re.compile(r"(\*{0,2})([A-Za-z_]\w*)(?:\s*=\s*(.+))?", re.S)


def _public_api() -> dict[str, object]:
    """``{qualified name: object}`` for every public name: the ``__all__`` of ``sk`` and its
    submodules, ``sk.layout``'s public names, ``sk.backends``' functions and constants, and the
    public members of the public classes."""
    api: dict[str, object] = {}
    for mod in (sk, sk.nn, sk.optim, sk.ops):
        prefix = "sk" if mod is sk else "sk." + mod.__name__.rsplit(".", 1)[1]
        for name in mod.__all__:
            if not name.startswith("__"):
                api[f"{prefix}.{name}"] = getattr(mod, name)
    for name, obj in vars(sk.layout).items():
        if not name.startswith("_") and getattr(obj, "__module__", None) == sk.layout.__name__:
            api[f"sk.layout.{name}"] = obj
    for name in BACKEND_FUNCTIONS + BACKEND_CONSTANTS:
        api[f"sk.backends.{name}"] = getattr(sk.backends, name)
    for cls in CLASSES:
        for name in vars(cls):
            if not name.startswith("_") and name not in NOT_API:
                api[f"{cls.__name__}.{name}"] = Member(cls, name)
    return api


def _callable_api() -> dict[str, tuple[object, inspect.Signature]]:
    """``{qualified name: (key, signature)}`` for the public functions, classes and methods;
    ``key`` identifies the function however it is reached (module, class, instance)."""
    out = {}
    for qual, obj in _public_api().items():
        if isinstance(obj, Member):
            cls, name = obj
            raw = vars(cls)[name]
            if isinstance(raw, property):
                continue
            func = getattr(raw, "__func__", raw)
            sig = inspect.signature(getattr(cls, name))
            if inspect.isfunction(raw):  # a plain method: drop self
                sig = sig.replace(parameters=list(sig.parameters.values())[1:])
            out[qual] = (func, sig)
        elif (inspect.isclass(obj) or inspect.isfunction(obj)) and id(obj) not in NO_SIGNATURE:
            out[qual] = (obj, inspect.signature(obj))
    return out


def _key(obj):
    return getattr(obj, "__func__", obj)


def _resolve(dotted: str, owner):
    """The object ``dotted`` names in the reference: ``sk.``-qualified, or relative to the section's
    class or module (``to(device)``, ``opt.step(...)``, ``SparseLinear.from_dense(...)``)."""
    parts = dotted.split(".")
    tries = [(sk, parts[1:])] if parts[0] == "sk" else [(sk, parts), (owner, parts), (owner, parts[1:])]
    for base, path in tries:
        if base is None or not path:
            continue
        obj = base
        try:
            for part in path:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None


def _sections(text: str):
    """``(owner, body)`` per heading of the reference; owner: the class or module the heading names
    (a function heading keeps its chapter's owner; a heading naming nothing of ``sk``: None)."""
    chapter = None
    for block in re.split(r"\n(?=#{1,3} )", text):
        heading = block.split("\n", 1)[0]
        level = len(heading) - len(heading.lstrip("#"))
        named = re.search(r"`([\w.]+)", heading)
        obj = _resolve(named.group(1), None) if named and named.group(1).startswith("sk") else None
        if obj is not None and not (inspect.isclass(obj) or inspect.ismodule(obj)):
            owner = chapter
        else:
            owner = obj
        if level <= 2:
            chapter = owner
        yield owner, block


def _split_params(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "([{" and 1 or 0
        depth -= ch in ")]}" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _documented(args: str) -> list[tuple[str, str, object]] | None:
    """``[(kind, name, default)]`` of a documented call, or None if it is not a signature."""
    out, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for part in _split_params(args):
        if part == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        m = _PARAM.fullmatch(part)
        if m is None:
            return None
        stars, name, default = m.groups()
        k = {"*": inspect.Parameter.VAR_POSITIONAL, "**": inspect.Parameter.VAR_KEYWORD}.get(stars, kind)
        if stars == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
        out.append((k, name, inspect.Parameter.empty if default is None else default.strip()))
    return out


def _mismatch(sig: inspect.Signature, doc: list) -> str | None:
    real = list(sig.parameters.values())
    if [p.name for p in real] != [d[1] for d in doc]:
        return f"parameters {[p.name for p in real]}, documented {[d[1] for d in doc]}"
    for p, (kind, name, default) in zip(real, doc):
        if p.kind != kind:
            return f"{name} is {p.kind.description}, documented {kind.description}"
        if (p.default is inspect.Parameter.empty) != (default is inspect.Parameter.empty):
            return f"{name}: default {p.default!r}, documented {default!r}"
        if default is not inspect.Parameter.empty:
            try:
                value = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                continue  # not a literal: only its presence is checked
            if value != p.default or type(value) is not type(p.default):
                return f"{name}: default {p.default!r}, documented {default}"
    return None


def _documented_calls() -> dict[object, list[tuple[str, list | None]]]:
    """``{key: [(text, parsed parameters)]}``: every call-like mention of a public callable."""
    keys = {key for key, _ in _callable_api().values()}
    found: dict = {}
    for owner, body in _sections(API.read_text()):
        for m in _CALL.finditer(body):
            obj = _resolve(m.group(1), owner)
            if obj is not None and _key(obj) in keys:
                found.setdefault(_key(obj), []).append((m.group(0), _documented(m.group(2))))
    return found


def test_signature_parser_sees_a_renamed_parameter():
    sig = inspect.signature(sk.ops.block_sparse_linear)
    assert _mismatch(sig, _documented("x, values, layout, bias=None, *, backend=None")) is None
    assert "bias" in _mismatch(sig, _documented("x, values, layout, b=None, *, backend=None"))
    assert _mismatch(sig, _documented("x, values, layout, bias=None, backend=None")) is not None
    assert _mismatch(sig, _documented("x, values, layout, bias=1, *, backend=None")) is not None
    assert _mismatch(sig, _documented("x, values, layout, bias, *, backend=None")) is not None
    assert _mismatch(sig, _documented("x, values, layout, bias=None, *, backend=None, extra=0")) is not None


@pytest.mark.parametrize("qual", sorted(_callable_api()))
def test_api_reference_documents_every_signature(qual):
    """Every public function, class and method has its call signature in docs/api.md, with the
    real parameter names, order, kinds (positional / keyword-only) and defaults; every call of it
    written there with parameters is that signature (so a renamed parameter fails here)."""
    key, sig = _callable_api()[qual]
    calls = _documented_calls().get(key, [])
    with_params = [(text, doc) for text, doc in calls if doc != []]
    if not list(sig.parameters):
        assert calls, f"docs/api.md shows no call {qual}()"
        return
    assert with_params, f"docs/api.md has no signature for {qual}{sig}"
    for text, doc in with_params:
        assert doc is not None, f"docs/api.md: {text!r} is not a signature"
        problem = _mismatch(sig, doc)
        assert problem is None, f"docs/api.md: {text!r} does not match {qual}{sig}: {problem}"


@pytest.mark.parametrize("qual", sorted(_public_api()))
def test_api_reference_names_every_public_name(qual):
    """Every public name appears in backticks; a class member in its class's section."""
    obj = _public_api()[qual]
    name = qual.rsplit(".", 1)[1]
    if isinstance(obj, Member):
        cls = obj.cls
        text = "\n".join(body for owner, body in _sections(API.read_text()) if owner is cls)
        assert text, f"docs/api.md has no section for {cls.__name__}"
        end = r"(?:\(|`|\s)"
    else:  # a module-level name may also be the start of a dotted one (`sk.optim.MaskedAdam`)
        text, end = API.read_text(), r"(?:\(|`|\s|\.)"
    assert re.search(rf"`(?:[\w.]*\.)?{re.escape(name)}{end}", text), f"docs/api.md does not mention {qual}"


def test_api_reference_lists_the_set_evolution_contract():
    text = (DOCS / "api.md").read_text()
    for word in ("zeta", "interval", "regrow", "prune", "schedule", "end_step", "seed", "state_dict"):
        assert f"`{word}" in text, word


def test_how_it_works_covers_the_topics():
    text = (DOCS / "how-it-works.md").read_text().lower()
    for topic in ("transposed", "csr", "linear_forward", "linear_grad_input", "linear_grad_weight", "masked adam", "evolution", "auto_order",
                  "set_kernels_backend", "perm"):
        assert topic in text, topic
