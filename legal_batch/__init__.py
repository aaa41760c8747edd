"""legal_batch: provider batch-API LLM workloads over court judgments, orchestrated by Dagster.

Deliberately empty: importing a part (e.g. `legal_batch.core.chunking`) must not load Dagster or every
flow. The Dagster definitions are `legal_batch.definitions.defs`.
"""
