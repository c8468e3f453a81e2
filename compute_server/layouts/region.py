"""What every stored layout is made of: named regions of fixed-size records (pure int math)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def ceil_div(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative a and positive b."""
    return -(-a // b)


@dataclass(frozen=True)
class Region:
    """A named run of ``num_records`` records of ``record_size`` bytes each."""

    name: str
    num_records: int
    record_size: int
