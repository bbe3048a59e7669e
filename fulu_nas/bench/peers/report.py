"""The tables ``bench peers`` prints from its measured configurations (the dicts
:func:`fulu_nas.bench.peers.measure.measure_config` returns, as written to ``--json``)."""

from __future__ import annotations

from ..common import markdown_table
from .configs import BOUND_RATIOS, IMPLS, MOE_IMPLS


def na_cell(d: dict) -> str:
    """What an implementation without a figure shows: n/a (not measured here), or FAILED."""
    return "n/a" if not d["failed"] else "FAILED"


def time_cell(d: dict) -> str:
    """Milliseconds, the variant that gave them where several were timed, and the bound ratios."""
    if d["ms"] is None:
        return na_cell(d)
    # Named where several were timed, and where the best path ran compiled without its CUDA graph (the
    # CPU's --cpu-compile), which its column's header promises.
    named = len(d["ms_by_variant"]) > 1 or d["variant"] == "compiled"
    variant = f" {d['variant']}" if named else ""
    ratios = "/".join(f"{d[k]:.2f}" if d.get(k) else "-" for k in BOUND_RATIOS)
    return f"{d['ms']:.3f} ms{variant} ({ratios})"


def _routing_line(label: str, shape: dict) -> str:
    cr = shape["compiled_routing"]
    eager_share = shape["eager_routing_differs_from_reference_share"]
    line = f"- {label}: eager router vs the fp32 reference: " + (
        f"{eager_share:.3%} of tokens differ" if eager_share is not None else "n/a")
    if not cr:
        return line + "; compiled router: not run"
    return line + ("; compiled router vs eager: identical expert sets" if cr["identical"] else
                   f"; compiled router vs eager: {cr['differs_tokens']} tokens ({cr['differs_share']:.3%}) differ")


def format_tables(results: list[dict]) -> str:
    """The timing table, the accuracy table, the routing checks and the reasons for each n/a."""
    time_rows, error_rows, notes, routing = [], [], {}, []
    for c in results:
        if "ratio" in c:
            cells = []
            for key in IMPLS:
                ratio = c["ratio"][key]
                first, second = (s["impls"][key] for s in c["shapes"])
                # FAILED where either shape failed (the first alone was looked at: a failed second was n/a)
                cells.append(f"{ratio:.2f} ({second['ms']:.3f} / {first['ms']:.3f} ms)" if ratio
                             else na_cell(second if second["failed"] else first))
            time_rows.append([c["label"], *cells])
        else:
            time_rows.append([c["label"], *(time_cell(c["shapes"][0]["impls"][k]) for k in IMPLS)])
        for s in c["shapes"]:
            label = c["label"] if len(c["shapes"]) == 1 else f"{c['label'].split(' ')[0]} E={s['shape']['experts']}"
            impls = s["impls"]
            error_rows.append([label, *(f"{impls[k]['rel_error']:.2e}" if impls[k]["rel_error"] is not None
                                        else na_cell(impls[k]) for k in MOE_IMPLS)])
            for key, d in impls.items():
                if d["reason"]:
                    notes.setdefault(f"{IMPLS[key]}: {d['reason']}", []).append(label)
                for note in d["notes"]:
                    if not note.startswith("error:"):
                        notes.setdefault(f"{IMPLS[key]}: {note}", []).append(label)
            routing.append(_routing_line(label, s))
    parts = [
        "Milliseconds per call (median over the rounds of each round's median; of an even number of rounds "
        "the lower middle one), and in brackets the "
        "throughput relative to the dense ceiling / to the GEMM-only bound / to the wide dense FFN "
        "(1.00 = as fast). "
        "E-scaling: each implementation's throughput at the larger expert count over the smaller "
        "(in brackets: ms at the smaller / at the larger). "
        "Where two variants were timed, the faster counts (named).\n",
        markdown_table(["config", *IMPLS.values()], time_rows, text_columns=1),
        "\nRelative error ||out - ref|| / ||ref|| against the fp32 per-expert loop (fp32 copy of the layer, "
        "impl=\"loop\"):\n",
        markdown_table(["config", *(IMPLS[k] for k in MOE_IMPLS)], error_rows, text_columns=1),
        "\nRouting (share of tokens whose expert set differs):\n",
        "\n".join(routing),
    ]
    if notes:
        parts += ["\nNotes:\n", "\n".join(f"- {note} ({', '.join(dict.fromkeys(where))})"
                                          for note, where in notes.items())]
    return "\n".join(parts)
