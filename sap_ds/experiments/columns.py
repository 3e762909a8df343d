"""The column names of the compare and sweep tables and the order they lead with. Apart from
the report modules because both the flat columns (``comparison_report.scalar_metrics``) and
the paired intervals (``paired``) name the same figures, and one spelling keeps a reader's
"harmful score" the same figure in both tables.

The order: what a defence is judged on first (harmful score), then what it may have paid
for it in refusals of safe requests (XSTest over-refusal, or the benign sets' over-refusal
when the eval has no XSTest section), then whether the answers are answers at all
(incoherent share, and the harmful score over the coherent ones only), then everything
else in the order it came."""
from __future__ import annotations

HARMFUL_SCORE = "harmful score"
OVER_REFUSAL = "over-refusal (%)"  # the benign sets, by the refusal matcher
XSTEST_OVER_REFUSAL = "XSTest over-refusal (%)"  # the 250 safe prompts, by the XSTest authors' rule
XSTEST_OVER_REFUSAL_MATCHER = "XSTest over-refusal, matcher (%)"
XSTEST_UNSAFE_COMPLIANCE = "XSTest unsafe compliance (%)"  # the 200 unsafe prompts not refused, authors' rule
INCOHERENT = "incoherent (%)"  # empty + degenerate + off-language, % of all judged answers
HARMFUL_SCORE_COHERENT = "harmful score, coherent only"  # n/a when no harmful answer is coherent
TOKENS_PER_S = "train tokens/s"


def task_column(label: str, task_metrics: dict) -> str:
    """A task's column: ``<label> loss`` for a test loss, ``<label> acc (%)`` for an accuracy."""
    return f"{label} loss" if "loss" in task_metrics else f"{label} acc (%)"


def over_refusal_column(present) -> str:
    """The over-refusal the tables lead with: XSTest's when measured, else the benign sets'."""
    return XSTEST_OVER_REFUSAL if XSTEST_OVER_REFUSAL in present else OVER_REFUSAL


def lead_order(names, first: str = HARMFUL_SCORE, after: tuple[str, ...] = ()) -> list[str]:
    """``names`` reordered: ``first`` (the harm column), the leading over-refusal, the
    coherence columns, then ``after`` (the sweep's task column), then the rest as given
    with the train tokens/s last. Columns not in ``names`` are left out."""
    names = list(dict.fromkeys(names))
    lead = [first, over_refusal_column(names), INCOHERENT, HARMFUL_SCORE_COHERENT, *after]
    lead = [n for n in dict.fromkeys(lead) if n in names]
    rest = [n for n in names if n not in lead and n != TOKENS_PER_S]
    return lead + rest + ([TOKENS_PER_S] if TOKENS_PER_S in names else [])
