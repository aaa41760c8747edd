"""Token prices per model (USD per 1M tokens, real-time) and the batch discount.

Override or extend with `LEGAL_BATCH_PRICES` (JSON: `{"model": [input, output], ...}`); the batch
discount (`LEGAL_BATCH_BATCH_DISCOUNT`, default 0.5) applies to every provider's batch jobs. Both
are settings: loading them (`settings.get_settings`) passes them here through `configure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

# Public list prices, USD per 1M tokens (input, output), real-time.
PRICES: dict[str, tuple[float, float]] = {
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "amazon.titan-embed-text-v2:0": (0.02, 0.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "anthropic.claude-3-haiku-20240307-v1:0": (0.25, 1.25),
    "anthropic.claude-3-5-haiku-20241022-v1:0": (0.80, 4.00),
    "anthropic.claude-3-5-sonnet-20240620-v1:0": (3.00, 15.00),
    "local-lexical-v1": (0.0, 0.0),
    "local-extractive-v1": (0.0, 0.0),
}


_prices: dict[str, tuple[float, float]] = PRICES
_batch_discount = 0.5


def configure(*, prices: Mapping[str, tuple[float, float]], batch_discount: float) -> None:
    """Use `prices` (added to, or replacing, the list prices above) and `batch_discount` from now on."""
    global _prices, _batch_discount
    _prices = {**PRICES, **{model: (float(i), float(o)) for model, (i, o) in prices.items()}}
    _batch_discount = float(batch_discount)


def batch_discount() -> float:
    return _batch_discount


@dataclass(frozen=True)
class Cost:
    batch_usd: Decimal
    realtime_usd: Decimal
    priced: bool
    """False when the model has no price: the figures are zero, not an estimate."""


def price(model: str, *, input_tokens: int, output_tokens: int = 0, batch: bool = True) -> Cost:
    """Cost of the tokens at batch price (and the real-time equivalent for comparison)."""
    table = _prices
    key = next((k for k in (model, model.split("/")[-1]) if k in table), None)
    if key is None:
        return Cost(Decimal(0), Decimal(0), priced=False)
    per_in, per_out = table[key]
    realtime = (input_tokens * per_in + output_tokens * per_out) / 1_000_000
    factor = (1 - batch_discount()) if batch else 1.0
    return Cost(Decimal(f"{realtime * factor:.6f}"), Decimal(f"{realtime:.6f}"), priced=True)
