"""The limit a provider's quota refusal states, read from the messages as the services write them."""

import pytest

from legal_batch.core.quota import stated_limit


@pytest.mark.parametrize(("message", "limit"), [
    ("Enqueued token limit reached for text-embedding-3-small in organization org-abc. Limit: 3,000,000 enqueued "
     "tokens. Please try again once some in_progress batches have been completed.", 3_000_000),
    ("Enqueued token limit reached for gpt-4o-mini in organization org-x. Limit: 2,000,000 enqueued tokens.",
     2_000_000),
    ("The number of enqueued tokens has surpassed the configured limit of 30K for the deployment 'gpt-4.1-batch'. "
     "Please either increase the limit or try again once the current jobs have finished.", 30_000),
    ("The number of enqueued tokens has surpassed the configured limit of 1B for the deployment 'gpt-4o-mini'.",
     1_000_000_000),
    ("The number of enqueued tokens has surpassed the configured limit of 5.5M for the deployment 'x'.", 5_500_000),
    ("ServiceQuotaExceededException: The number of active batch inference jobs (10) has reached the quota of 10.",
     10),
    ("Enqueued token limit reached for text-embedding-3-small in organization org-abc. Please try again once some "
     "in_progress batches have been completed.", None),
    ("Rate limit reached for requests", None),
])
def test_the_stated_limit_is_read_from_each_providers_message(message: str, limit: int | None) -> None:
    assert stated_limit(message) == limit
