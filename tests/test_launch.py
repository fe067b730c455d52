"""When a torchrun restart is at risk: the check behind process_state's warning (the restarts
themselves run for real in test_processes.py)."""

from __future__ import annotations

import pytest

from genfusion.launch import restarts_share_the_agents_store

# What torchrun's agent sets for its processes (torch.distributed.elastic's local_elastic_agent.py).
TWO_NODES_RESTARTABLE = {
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_MAX_RESTARTS": "1",
    "GROUP_WORLD_SIZE": "2",
}


@pytest.mark.parametrize(
    ("change", "at_risk"),
    [
        ({}, True),
        ({"TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        ({"TORCHELASTIC_MAX_RESTARTS": "0"}, False),
        ({"GROUP_WORLD_SIZE": "1"}, False),  # one agent: one restart count
    ],
)
def test_restarts_are_at_risk_only_on_several_nodes_sharing_the_agents_store(
    change: dict[str, str], at_risk: bool
) -> None:
    assert restarts_share_the_agents_store(TWO_NODES_RESTARTABLE | change) is at_risk
    assert not restarts_share_the_agents_store({})
