"""Pure pieces of the template-driven structured processing flow.

A user supplies a folder of tabular files, a ``prompts.json`` and a JSON Schema. Each row
becomes one LLM request; each response is parsed and validated into result columns. The
modules here hold that logic as plain typed functions (no Dagster):

- ``tabular``: find input files, stream rows, write outputs mirroring the input layout.
- ``prompts``: load ``prompts.json`` and render one prompt per row.
- ``schema``: load a JSON Schema and build a pydantic model from it.
- ``response_json``: pull the JSON object out of real model output.
- ``results``: turn a response into result columns; the processing summary.
"""
