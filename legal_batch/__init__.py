"""legal_batch: provider batch-API LLM workloads over court judgments, orchestrated by Dagster.

`dagster job execute -m legal_batch -j <job>` loads `defs` from here.
"""

from legal_batch.definitions import defs

__all__ = ["defs"]
