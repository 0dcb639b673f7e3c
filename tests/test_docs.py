"""The docs stay true: the migration example runs (and differs from the dense loop by exactly the
import plus three lines), and the API reference names every public name."""
from __future__ import annotations

import contextlib
import difflib
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
    assert hasattr(sk, "SET"), "set_kernels.SET is part of the public API (docs/migration.md uses it)"
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


def _public_names() -> list[str]:
    names = set()
    for mod in (sk, sk.nn, sk.optim, sk.ops):
        names.update(n for n in mod.__all__ if not n.startswith("__"))
    names.update(["SET", "info", "BlockSparseLayout", "sparsify"])
    for fn in ("resolve", "availability", "unsupported_reasons", "load", "get", "BACKENDS", "AUTO_ORDER", "ENV_VAR"):
        assert hasattr(sk.backends, fn)
        names.add(fn)
    classes = [sk.BlockSparseLayout, sk.nn.SparseLinear, sk.nn.MaskedLinear, sk.optim.MaskedAdam]
    if hasattr(sk, "SET"):
        classes.append(sk.SET)
    for cls in classes:
        for name, member in vars(cls).items():
            if not name.startswith("_") and name not in ("training", "forward", "extra_repr"):
                names.add(name)
    return sorted(names)


@pytest.mark.parametrize("name", _public_names())
def test_api_reference_names_every_public_name(name):
    text = (DOCS / "api.md").read_text()
    assert re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", text), f"docs/api.md does not mention {name!r}"


def test_api_reference_lists_the_set_evolution_contract():
    text = (DOCS / "api.md").read_text()
    for word in ("zeta", "interval", "regrow", "prune", "schedule", "end_step", "seed", "state_dict"):
        assert f"`{word}" in text, word


def test_how_it_works_covers_the_topics():
    text = (DOCS / "how-it-works.md").read_text().lower()
    for topic in ("transposed", "csr", "dsd", "dds", "sdd", "masked adam", "evolution", "auto_order",
                  "set_kernels_backend", "perm"):
        assert topic in text, topic
