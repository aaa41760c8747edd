"""Token prices per model (USD per 1M tokens, real-time) and the batch discount.

Override or extend with `LEGAL_BATCH_PRICES` (JSON: `{"model": [input, output], ...}`); the batch
discount (`LEGAL_BATCH_BATCH_DISCOUNT`, default 0.5) applies to every provider's batch jobs.
"""

from __future__ import annotations

import json
import os
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


def _prices() -> dict[str, tuple[float, float]]:
    override = os.environ.get("LEGAL_BATCH_PRICES")
    if not override:
        return PRICES
    extra = {k: (float(v[0]), float(v[1])) for k, v in json.loads(override).items()}
    return {**PRICES, **extra}


def batch_discount() -> float:
    return float(os.environ.get("LEGAL_BATCH_BATCH_DISCOUNT", "0.5"))


@dataclass(frozen=True)
class Cost:
    batch_usd: Decimal
    realtime_usd: Decimal
    priced: bool
    """False when the model has no price: the figures are zero, not an estimate."""


def price(model: str, *, input_tokens: int, output_tokens: int = 0, batch: bool = True) -> Cost:
    """Cost of the tokens at batch price (and the real-time equivalent for comparison)."""
    table = _prices()
    key = next((k for k in (model, model.split("/")[-1]) if k in table), None)
    if key is None:
        return Cost(Decimal(0), Decimal(0), priced=False)
    per_in, per_out = table[key]
    realtime = (input_tokens * per_in + output_tokens * per_out) / 1_000_000
    factor = (1 - batch_discount()) if batch else 1.0
    return Cost(Decimal(f"{realtime * factor:.6f}"), Decimal(f"{realtime:.6f}"), priced=True)
