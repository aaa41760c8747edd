"""Assembles the Dagster definitions; nothing else."""

import dagster as dg

from legal_batch.core.embeddings import DONE_WITHOUT_RESULT_SQL as EMBEDDINGS_DONE_WITHOUT_RESULT
from legal_batch.core.headnotes import DONE_WITHOUT_RESULT_SQL as HEADNOTES_DONE_WITHOUT_RESULT
from legal_batch.core.template.flow import DONE_WITHOUT_RESULT_SQL as TEMPLATE_DONE_WITHOUT_RESULT
from legal_batch.flows.embeddings.assets import DEFS as EMBEDDINGS
from legal_batch.flows.headnotes.assets import DEFS as HEADNOTES
from legal_batch.flows.template.assets import DEFS as TEMPLATE
from legal_batch.resources import DatabaseResource, FileStoreResource, ProvidersResource

FLOWS_BY_NAME = {"embeddings": EMBEDDINGS, "headnotes": HEADNOTES, "template": TEMPLATE}
DONE_WITHOUT_RESULT = {"embeddings": EMBEDDINGS_DONE_WITHOUT_RESULT, "headnotes": HEADNOTES_DONE_WITHOUT_RESULT,
                       "template": TEMPLATE_DONE_WITHOUT_RESULT}

defs = dg.Definitions(
    assets=[asset for flow in FLOWS_BY_NAME.values() for asset in flow.assets],
    jobs=[job for flow in FLOWS_BY_NAME.values() for job in flow.jobs],
    sensors=[sensor for flow in FLOWS_BY_NAME.values() for sensor in flow.sensors],
    resources={
        "database": DatabaseResource(),
        "files": FileStoreResource(),
        "providers": ProvidersResource(),
    },
)
