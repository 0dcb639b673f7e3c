"""The JSON document of ``set-kernels bench``, defined once: :data:`SECTIONS` is checked by
:func:`validate` and printed by :func:`markdown` (benchmarks/README.md points here).

A type is alternatives joined by " or ": ``str``, ``int``, ``number``, ``bool``, ``object``,
``list``, ``null``, and ``absent`` (the field may be missing).
"""
from __future__ import annotations

import math

SCHEMA = 1
KINDS = ("sparse", "dense", "baseline")
_TIMES = (("median_ms", "number", "time of one call (ms), > 0; the median"),
          ("q20_ms", "number", "20 % quantile"), ("q80_ms", "number", "80 % quantile"),
          ("min_ms", "number", "fastest call"), ("max_ms", "number", "slowest call"),
          ("repeats", "int", "number of timed calls (0: GPU timer without the count)"))
SECTIONS = {
    "": (("schema", "int", f"{SCHEMA}"), ("meta", "object", "the run"), ("ceilings", "object", "`copy`"),
         ("records", "list", "one per implementation timed in one comparison group"),
         ("skipped", "list", "what was not timed")),
    "meta": (
        ("device_type", "str", "`cpu` or `cuda`"), ("device_name", "str", "GPU name, or CPU model"),
        ("device_slug", "str", "the results folder name"), ("cpu", "str", "CPU model"),
        ("gpu", "str or null", "GPU name (null on CPU)"), ("threads", "int", "torch threads"),
        ("versions", "object", "library versions"),
        *((f"versions.{lib}", "str or null", "null: not importable") for lib in ("python", "torch", "triton", "numba", "numpy",
                                                               "set_kernels")),
        ("git", "object", "the checkout"), ("git.commit", "str or null", "null outside a git checkout"),
        ("git.dirty", "bool or null", "uncommitted changes under set_kernels/, csrc/, python/"),
        ("command", "str", "the command line"), ("mode", "str", "`quick`, `full` or `tiny`"),
        ("ops", "list", "op names timed"), ("timing", "str", "the method, in words"),
        ("started_at", "str", "ISO-8601, UTC"), ("wall_s", "number", "duration of the run (s)"),
        ("grid", "object", "every `Grid` parameter"),
        ("loadavg", "number or null", "1-minute load average at the start (a busy machine slows every time)"),
        ("loadavg_end", "number or null", "the same at the end")),
    "ceilings.copy": (
        ("bytes", "int", "bytes credited: read + written"), ("gbps", "number", "bytes / fastest run / 1e9, > 0"),
        ("footprint_bytes", "int or absent", "buffers streamed (each read once)"),
        ("written_bytes", "int or absent", "bytes written back in place"),
        ("method", "str or absent", "the reference, in words"), *_TIMES),
    "records[]": (
        ("op", "str", "`block_sparse_linear`, `masked_adam_` or `set_mlp_step`"),
        ("pass", "str", "`forward`, `forward_backward` (linear), `step` (Adam), `train_step` (SET-MLP)"),
        ("impl", "str", "a backend name, `dense` or `torch_bsr`"),
        ("kind", "str", "`sparse` (a set_kernels backend), `dense` (torch, dense weight), `baseline` (torch BSR/CSR)"),
        ("backend", "str or null", "= `impl` for kind `sparse`, else null"),
        ("shape", "object", "{`tokens`, `in_features`, `out_features`}, {`rows`, `cols`} or {`batch`, `layers`}"),
        ("dtype", "str", "`float32`, `bfloat16`, ..."),
        ("block", "int or null", "block size (Adam: of the mask; dense: that of its group)"),
        ("density", "number or null", "live fraction of the sparse operand (exact, not the nominal value)"),
        ("nnz_blocks", "int or null", "live blocks (null for the MLP)"), *_TIMES,
        ("flops", "number or null", "FLOPs of one call on live blocks (dense: the whole matrix)"),
        ("tflops", "number or null", "flops / median / 1e12"),
        ("bytes", "number or null", "minimum bytes of one call (memory-bound ops)"),
        ("gbps", "number or null", "bytes / median / 1e9"),
        ("copy_gbps", "number or null", "the copy ceiling timed along with this group"),
        ("copy_share", "number or null", "gbps / copy_gbps"),
        ("dense_ms", "number or null", "median of the dense baseline of the group (null when it failed)"),
        ("speedup", "number or null", "dense_ms / median_ms"),
        ("E", "number or null", "density * dense_ms / median_ms, null for dense: 1.0 = time scales with density"),
        ("step_ms", "number or absent", "`set_mlp_step` sparse: the training step alone"),
        ("evolution_ms", "number or absent", "`set_mlp_step` sparse: one SET update; median_ms (and quantiles) "
                                             "= step + evolution / interval"),
        ("interval", "int or absent", "`set_mlp_step` sparse: steps between SET updates"),
        ("zeta", "number or absent", "`set_mlp_step` sparse: fraction of weights SET replaces"),
        ("optimizer_backend", "str or null or absent", "`set_mlp_step` sparse: MaskedAdam's backend")),
    "skipped[]": (("op", "str", ""), ("pass", "str", "`-` for a failed case"), ("impl", "str", "`-` for a failed case"),
                  ("case", "str", "the case label"), ("reason", "str", "why it was not timed")),
}
_TYPES = {"str": str, "int": int, "number": (int, float), "bool": bool, "object": dict, "list": list,
          "null": type(None)}


def _has_type(value, typ: str) -> bool:
    return any(isinstance(value, _TYPES[t]) and not (isinstance(value, bool) and t in ("int", "number"))
               for t in typ.split(" or ") if t != "absent")


def _check(obj, section: str, prefix: str) -> list[str]:
    """Every field of ``SECTIONS[section]`` that ``obj`` lacks or holds with another type."""
    out = []
    for name, typ, _ in SECTIONS[section]:
        outer, _, key = name.rpartition(".")
        parent = obj.get(outer) if outer and isinstance(obj, dict) else obj
        if not isinstance(parent, dict) or key not in parent:
            out += [] if "absent" in typ else [f"{prefix}{name}: missing"]
        elif not _has_type(parent[key], typ):
            out.append(f"{prefix}{name}: expected {typ}, got {parent[key]!r}")
    return out


def validate(doc: dict) -> list[str]:
    """Every way ``doc`` departs from :data:`SECTIONS` (an empty list when it conforms)."""
    if not isinstance(doc, dict):
        return ["document: expected a JSON object"]
    copy = doc["ceilings"].get("copy") if isinstance(doc.get("ceilings"), dict) else None
    problems = _check(doc, "", "") + _check(doc.get("meta"), "meta", "meta.") + _check(copy, "ceilings.copy",
                                                                                      "ceilings.copy.")
    if doc.get("schema", SCHEMA) != SCHEMA:
        problems.append(f"schema: expected {SCHEMA}, got {doc['schema']!r}")
    if isinstance(copy, dict) and _has_type(copy.get("gbps"), "number") and not copy["gbps"] > 0:
        problems.append(f"ceilings.copy.gbps: expected > 0, got {copy['gbps']!r}")
    for part in ("records", "skipped"):
        for i, item in enumerate(doc[part] if isinstance(doc.get(part), list) else []):
            problems += _check(item, part + "[]", f"{part}[{i}].")
            if part == "records" and isinstance(item, dict):
                problems += [f"records[{i}].{p}" for p in _record_rules(item)]
    return problems


def _record_rules(rec: dict) -> list[str]:
    """What a record's types cannot say: its kind, backend, positive time and E."""
    out = []
    if rec.get("kind") not in KINDS:
        out.append(f"kind: expected one of {KINDS}, got {rec.get('kind')!r}")
    if rec.get("kind") == "sparse" and rec.get("backend") != rec.get("impl"):
        out.append("backend: expected the impl name for a sparse record")
    numbers = all(_has_type(rec.get(k), "number") for k in ("density", "dense_ms", "median_ms"))
    if _has_type(rec.get("median_ms"), "number") and not rec["median_ms"] > 0:
        out.append(f"median_ms: expected > 0, got {rec['median_ms']}")
    elif rec.get("kind") != "dense" and numbers:
        expect = rec["density"] * rec["dense_ms"] / rec["median_ms"]
        if not _has_type(rec.get("E"), "number") or not math.isclose(rec["E"], expect, rel_tol=1e-6):
            out.append(f"E: expected density * dense_ms / median_ms = {expect}, got {rec.get('E')}")
    return out


def markdown() -> str:
    """:data:`SECTIONS` as markdown tables, one per part of the document."""
    out = []
    for section, fields in SECTIONS.items():
        out += [f"`{section or 'top level'}`:", "", "| field | type | meaning |", "|---|---|---|"]
        out += [f"| `{name}` | {typ} | {meaning} |" for name, typ, meaning in fields] + [""]
    return "\n".join(out)
