"""The ledger's state groups as SQL lists: built from the enums only."""

import pytest

from legal_batch.core.ledger import ITEM_OPEN_STATES, ItemState, JobState, sql_in


def test_a_state_group_becomes_an_sql_list() -> None:
    assert sql_in(ITEM_OPEN_STATES) == "('exported', 'submitted')"
    assert sql_in([JobState.INGESTED]) == "('ingested')"


@pytest.mark.parametrize("states", [[], ["exported"], [ItemState.DONE, "x'); DROP TABLE batch_items; --"]])
def test_anything_but_ledger_states_is_refused(states: list) -> None:
    with pytest.raises(ValueError, match="not a group of ledger states"):
        sql_in(states)
