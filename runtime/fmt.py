"""One formatter for each kind of figure, so that a number reads the same in report.md, the model card,
the CLI's headline, `edgexfer inspect` and `edgexfer bench`.

    accuracy(0.8954248366013072) -> "0.8954"     a fraction in [0, 1] (accuracy, macro-F1, recall)
    points(35.95)                -> "+36.0"      a difference in percentage points, always signed
    ms(4.0712)                   -> "4.07"       milliseconds
    ratio(0.2824)                -> "0.28"       one figure over another (size, latency, speed-up)
    pct(0.9785)                  -> "97.9%"      a share (agreement, coverage)
    img_s(245.6)                 -> "246"        images per second
    count(1, "image")            -> "1 image"    a count with its noun, singular for 1 ("2 images", "3 classes")

None (not measured) reads "n/a" in each.
"""
from __future__ import annotations

NA = "n/a"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def accuracy(x) -> str:
    return f"{x:.4f}" if _num(x) else NA


def points(x, signed: bool = True) -> str:
    """Signed by default (a change); signed=False for a spread such as a standard error."""
    return (f"{x:+.1f}" if signed else f"{x:.1f}") if _num(x) else NA


def ms(x) -> str:
    return f"{x:.2f}" if _num(x) else NA


def ratio(x) -> str:
    return f"{x:.2f}" if _num(x) else NA


def pct(x) -> str:
    return f"{100 * x:.1f}%" if _num(x) else NA


def img_s(x) -> str:
    return f"{x:.0f}" if _num(x) else NA


def count(n, noun: str, plural: str | None = None) -> str:
    """`n` and its noun, in the singular for exactly one: "1 image", "0 images", "2 classes"."""
    many = plural or _plural(noun)
    return f"{n if isinstance(n, int) else format(n, 'g')} {noun if n == 1 else many}" if _num(n) else f"{NA} {many}"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def accuracy_delta(x) -> str:
    """A difference of two accuracies as a signed fraction (the unit of --max-accuracy-drop)."""
    return f"{x:+.4f}" if _num(x) else NA


KINDS = {"accuracy": accuracy, "points": points, "ms": ms, "ratio": ratio, "pct": pct, "img_s": img_s,
         "accuracy_delta": accuracy_delta}


def figure(x, kind: str | None) -> str:
    """`x` as its kind says; a value of no known kind (a class list, a sentence) as it is."""
    f = KINDS.get(kind or "")
    return f(x) if f and _num(x) else ("none" if x == [] else ", ".join(map(str, x)) if isinstance(x, list) else str(x))
