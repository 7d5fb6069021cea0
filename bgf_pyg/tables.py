"""Results tables: Markdown rows of retrieval metrics in percent, with the caption that says
which split and which checkpoint-selection protocol produced them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

#: Columns of the results table: (metric key, header).
TABLE_COLUMNS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"),
                 ("recall@8", "R@8"), ("nmi", "NMI"), ("map@r", "MAP@R"))
#: What each ``select_on`` means, for the caption of the results table.
PROTOCOLS = {
    "val": "checkpoint selected on the validation classes (held-out training classes)",
    "test": "TEST-SELECTED: checkpoint selected on the test split itself, as the originals do",
    "last": "checkpoint of the last epoch",
}


def results_caption(config) -> str:
    """The line above a results table: which split and which protocol produced it."""
    val = (f"; validation classes: val_classes {config.val_classes}, val_seed {config.val_seed}"
           if config.val_classes else "")
    return f"Test-split retrieval, in %; {PROTOCOLS[config.select_on]}{val}"


def row_name(config) -> str:
    """A results-table row's name: the method, marked when its checkpoint was chosen on the
    test split."""
    return f"{config.method} (test-selected)" if config.select_on == "test" else config.method


def format_cell(values: Sequence[float]) -> str:
    """A table cell of fractions in percent: the value, mean ± std over several, – for none."""
    percent = [100 * v for v in values]
    if not percent:
        return "–"
    if len(percent) == 1:
        return f"{percent[0]:.1f}"
    return f"{statistics.mean(percent):.1f} ± {statistics.stdev(percent):.1f}"


def format_table(rows: Sequence[tuple[str, Sequence[dict[str, float]]]]) -> str:
    """A Markdown table, one row per ``(name, [metrics of each seed])``: mean (± std with
    several seeds), in percent."""
    header = "| method | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, runs in rows:
        cells = [format_cell([r[key] for r in runs if key in r]) for key, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refinement_row(name: str, record: dict) -> str:
    """A results row's name: the model, the refinement and the setting it used."""
    setting = ", ".join(f"{key[len('refine_'):].replace('alpha', 'α')} {value:g}"
                        for key, value in record.items() if key in ("refine_k", "refine_alpha"))
    return f"{name}, refine {record['refine']}" + (f" ({setting})" if setting else "")


def refinement_tables(name: str, records: list[dict]) -> str:
    """The test table (one row per refinement, its setting chosen on validation) and, when
    there is one, the validation grid it was chosen from."""
    test = [(refinement_row(name, r), [r]) for r in records if r["split"] == "test"]
    val = [(refinement_row(name, r), [r]) for r in records if r["split"] == "val"]
    text = format_table(test)
    if val:
        text += ("\n\nValidation classes (each refinement's setting is the best of these by "
                 "R@1):\n" + format_table(val))
    return text


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
